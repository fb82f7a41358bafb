"""The run report: ``RUN_DIR/report.md`` and ``RUN_DIR/plots/*.png`` from what the other stages recorded.

Each input is optional (see `jopd.report.gather`); what is missing is said so in the report rather than
failing. The report holds a results table, the speed-up of Lightning OPD over online OPD for each teacher that
has both kinds of arm ((a) total time, the one-off rollout + precompute included; (b) per training step, with
the online arms' generate / score / update split), each arm's teacher consistency, and a "what this shows"
paragraph whose every statement is computed from those numbers. Plots: accuracy and reverse KL against step
and against wall time for every arm, with the SFT student and the SFT-data teacher as reference lines.
"""

from __future__ import annotations

from typing import Any

from jopd.config import Config
from jopd.io import atomic_write_json, atomic_write_text
from jopd.layout import RunLayout
from jopd.report.plots import make_plots
from jopd.report.stats import compare_accuracy
from jopd.report.text import render_report

__all__ = ["UPSTREAM", "compare_accuracy", "make_plots", "render_report", "write_report"]

# Stages whose outputs the report reads: their DONE fingerprints are the report's inputs.
UPSTREAM = ("prepare", "sft", "rollout", "precompute", "train", "online", "eval")


def write_report(cfg: Config, layout: RunLayout, *, is_main_process: bool = True) -> dict[str, Any]:
    """Render the report, write ``report.md``, the plots and ``report/summary.json``, and print the text.

    Returns the summary (speed-ups, findings, devices, arms) with ``plots`` (the PNG paths) and ``report``
    (the markdown path) added; on other processes nothing is written and the summary lacks those two keys.
    """
    text, info = render_report(cfg, layout)
    summary = {k: v for k, v in info.items() if k not in ("arms_info", "results")}
    if not is_main_process:
        return summary
    plots = make_plots(cfg, layout, info["arms_info"], info["results"])
    text += "".join(f"![{p.stem}]({p.relative_to(layout.report.parent)})\n" for p in plots)
    atomic_write_text(layout.report, text)
    atomic_write_json(layout.stage("report") / "summary.json", summary)
    print(text, flush=True)
    summary["plots"] = [str(p) for p in plots]
    summary["report"] = str(layout.report)
    return summary
