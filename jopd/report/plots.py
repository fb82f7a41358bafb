"""The report's plots: held-out accuracy and reverse KL against training step and against wall time.

One line per arm (lightning solid, online dashed; lightning arms' time axis starts after their one-off
rollout + precompute), with the SFT student and the SFT-data teacher as horizontal reference lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jopd.config import Config
from jopd.layout import RunLayout
from jopd.report.gather import ArmInfo, one_off_cost
from jopd.report.routes import sft_teacher_label

__all__ = ["make_plots"]


def make_plots(cfg: Config, layout: RunLayout, arms: list[ArmInfo], results: dict[str, Any]) -> list[Path]:
    """accuracy / reverse KL vs step / time for every arm (PNG, Agg backend); returns the written paths."""
    # Imported here: the backend must be chosen before pyplot loads, and only the plotting process needs it.
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = layout.plots
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = sft_teacher_label(cfg)  # multi-teacher runs: the route -> teacher map, no single teacher line
    refs = {"SFT student": results.get("sft")}
    if not cfg.routing.enabled:
        refs[f"teacher {teacher}"] = results.get(f"teacher:{teacher}")
    written = []
    for metric, label in (("accuracy", "held-out accuracy"), ("reverse_kl", f"reverse KL to teacher {teacher}")):
        for xkey, xlabel in (("step", "training step"), ("time_s", "wall time (s)")):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            plotted = False
            for arm in arms:
                pts = [(r[xkey], r[f"eval/{metric}"]) for r in arm.eval_rows
                       if isinstance(r.get(xkey), int | float) and isinstance(r.get(f"eval/{metric}"), int | float)]
                if not pts:
                    continue
                offset = 0.0
                if xkey == "time_s" and arm.mode == "lightning":
                    offset = one_off_cost(layout, arm.teacher)[2] or 0.0
                xs, ys = zip(*sorted(pts))
                style = "-o" if arm.mode == "lightning" else "--s"
                ax.plot([x + offset for x in xs], ys, style, markersize=3,
                        label=f"{arm.name} ({arm.mode}, teacher {arm.teacher})")
                plotted = True
            for (ref_name, ref), color in zip(refs.items(), ("gray", "black")):
                if ref is not None and isinstance(ref.get(metric), int | float):
                    ax.axhline(ref[metric], color=color, linestyle=":", linewidth=1,
                               label=f"{ref_name} ({ref[metric]:.3f})")
                    plotted = True
            if xkey == "time_s":
                xlabel += " (lightning arms: incl. one-off rollout + precompute)"
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_title(f"{label} vs {'step' if xkey == 'step' else 'time'}")
            if plotted:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no evaluation rows recorded", ha="center", va="center", transform=ax.transAxes)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = out_dir / f"{metric}_vs_{'step' if xkey == 'step' else 'time'}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written
