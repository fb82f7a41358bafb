"""Stage ``report``: ``RUN_DIR/report.md`` and ``RUN_DIR/plots/*.png`` from what the other stages recorded.

Reads (each piece optional; what is missing is said so in the report rather than failing):

- ``eval/results.json``: held-out accuracy and reverse KL of every evaluated model;
- ``arms/NAME/meta.json`` and ``metrics/arm_NAME.jsonl``: per-arm mode, teacher, teacher consistency, wall
  time, tokens, per-step timings, and the periodic ``eval/accuracy`` / ``eval/reverse_kl`` rows;
- ``<stage>/DONE.json`` of sft, rollout, precompute, train and online: stage wall seconds and token counts.

The report holds a results table, the speed-up of Lightning OPD over online OPD for each teacher that has
both kinds of arm ((a) total time, the one-off rollout + precompute included; (b) per training step, with the
online arms' generate / score / update split), each arm's teacher consistency, and a "what this shows"
paragraph whose every statement is computed from those numbers. Plots: accuracy and reverse KL against
step and against wall time for every arm, with the SFT student and the SFT-data teacher as reference lines.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jopd.stages.base import RunContext, Stage, atomic_write_json, read_json

log = logging.getLogger("jopd")

UPSTREAM = ("prepare", "sft", "rollout", "precompute", "train", "online", "eval")
# Per-step timing keys of the arms' metrics rows (jopd.stages.train.train_arm) and the online phase split.
PHASES = {"generate": "gen_s", "score": "score_s", "update": "update_s"}
STORE_TOKEN_KEYS = ("response_tokens",)
# A step slower than this many times the median step is taken to include compilation (see steady_steps).
COMPILE_OUTLIER_FACTOR = 5.0


# ------------------------------------------------------------------------------------------------ helpers
def _read_json(path: Path) -> Any | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file ([] if absent); malformed lines (e.g. a torn last line) are skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _first(d: dict[str, Any] | None, keys: tuple[str, ...]) -> Any | None:
    if not d:
        return None
    for k in keys:
        v = d.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return v
    return None


def _mean_of(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> float | None:
    vals = [v for r in rows if (v := _first(r, keys)) is not None]
    return float(np.mean(vals)) if vals else None


def _fmt(x: Any, spec: str = ".3f", none: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


# ------------------------------------------------------------------------------------------------ gathering
@dataclasses.dataclass
class ArmInfo:
    """What the report knows about one arm."""

    name: str
    mode: str
    teacher: str
    consistent: bool | None
    trained: bool
    wall_s: float | None
    tokens: float | None
    steps: int | None
    step_s: float | None
    phases: dict[str, float | None]
    eval_rows: list[dict[str, Any]]
    final: dict[str, Any] | None  # eval/results.json entry


def steady_steps(step_rows: list[dict[str, Any]], factor: float = COMPILE_OUTLIER_FACTOR
                 ) -> list[dict[str, Any]]:
    """Training-step rows without the compilation outliers.

    The first step(s) of a loop (and of a resumed loop) include compiling the step function, which says
    nothing about a method's per-step cost. Steps slower than ``factor`` x the median step are dropped; with
    fewer than three steps only the first is dropped. meta.json's averages (compilation included) are the
    fallback when nothing is left.
    """
    rows = sorted(step_rows, key=lambda r: r.get("step", 0))
    if len(rows) < 3:
        return rows[1:]
    median = float(np.median([r["step_s"] for r in rows]))
    return [r for r in rows if r["step_s"] <= factor * median]


def gather_arm(ctx: RunContext, arm: Any, results: dict[str, Any]) -> ArmInfo:
    """An arm's summary from ``arms/NAME/meta.json``, falling back to its metrics rows where it is missing
    (an arm interrupted before writing meta.json still shows its progress)."""
    meta = _read_json(ctx.arm_dir(arm.name) / "meta.json") or {}
    rows = read_jsonl(ctx.run_dir / "metrics" / f"arm_{arm.name}.jsonl")
    eval_rows = [r for r in rows if "eval/accuracy" in r or "eval/reverse_kl" in r]
    step_rows = [r for r in rows if _first(r, ("step_s",)) is not None]
    wall = _first(meta, ("train_seconds",))
    if wall is None:
        wall = max((r["time_s"] for r in rows if _first(r, ("time_s",)) is not None), default=None)
    tokens = _first(meta, ("tokens",))
    if tokens is None and step_rows:
        tokens = float(sum(_first(r, ("tokens",)) or 0.0 for r in step_rows))  # per-step counts
    steps = meta.get("steps") if isinstance(meta.get("steps"), int) else None
    if steps is None and step_rows:
        steps = max(int(r.get("step", 0)) for r in step_rows)
    warm = steady_steps(step_rows)
    step_s = _mean_of(warm, ("step_s",))
    if step_s is None:
        step_s = _first(meta, ("seconds_per_step",))
    by_phase = meta.get("seconds_per_step_by_phase")
    phases = {p: _mean_of(warm, (key,)) if warm else (_first(by_phase, (key,)) if isinstance(by_phase, dict)
                                                          else None)
              for p, key in PHASES.items()}
    consistent = meta.get("consistent_teacher")
    return ArmInfo(name=arm.name, mode=meta.get("mode", arm.mode), teacher=meta.get("teacher_name", arm.teacher),
                   consistent=consistent if isinstance(consistent, bool) else None,
                   trained=(ctx.arm_dir(arm.name) / "model" / "config.json").is_file(), wall_s=wall,
                   tokens=tokens, steps=steps, step_s=step_s, phases=phases,
                   eval_rows=sorted(eval_rows, key=lambda r: r.get("step", 0)),
                   final=results.get(f"arm:{arm.name}"))


def _final_metric(arm: ArmInfo, key: str) -> float | None:
    """The arm's final held-out metric: the eval stage's result, else the last periodic eval row."""
    if arm.final is not None and isinstance(arm.final.get(key), int | float):
        return float(arm.final[key])
    vals = [r[f"eval/{key}"] for r in arm.eval_rows if isinstance(r.get(f"eval/{key}"), int | float)]
    return float(vals[-1]) if vals else None


def _stage_done(ctx: RunContext, stage: str) -> dict[str, Any] | None:
    return _read_json(ctx.stage_dir(stage) / "DONE.json")


def _one_off(ctx: RunContext, teacher: str) -> tuple[float | None, float | None, float | None, str]:
    """(rollout s, precompute s attributed to ``teacher``, their total, note): a lightning arm's one-off cost.

    The precompute stage scores the rollouts once per teacher; with several teachers each gets the share of
    the stage's wall time that its scoring took (so loading and verification are shared out too).
    """
    roll_s = _first(_stage_done(ctx, "rollout"), ("seconds",))
    pre = _stage_done(ctx, "precompute")
    pre_s = _first(pre, ("seconds",))
    note = ""
    per_teacher = ((pre or {}).get("outputs") or {}).get("teachers")
    if pre_s is not None and isinstance(per_teacher, dict) and len(per_teacher) > 1:
        scoring = {n: _first(v, ("seconds",)) for n, v in per_teacher.items() if isinstance(v, dict)}
        if teacher in scoring and None not in scoring.values() and sum(scoring.values()) > 0:
            share = scoring[teacher] / sum(scoring.values())
            note = (f"precompute of teacher {teacher}: {share:.0%} of the stage's {pre_s:.1f} s "
                    f"(its share of the scoring time of {len(scoring)} teachers)")
            pre_s *= share
        else:
            note = f"precompute time covers all {len(per_teacher)} teachers (upper bound for teacher {teacher})"
    total = roll_s + pre_s if roll_s is not None and pre_s is not None else None
    return roll_s, pre_s, total, note


def _store_tokens(done: dict[str, Any] | None) -> float | None:
    """Response tokens a rollout / precompute stage produced or scored (precompute: summed over teachers)."""
    out = (done or {}).get("outputs") or {}
    direct = _first(out, STORE_TOKEN_KEYS)
    if direct is not None:
        return direct
    teachers = out.get("teachers")
    if isinstance(teachers, dict):
        vals = [_first(v, STORE_TOKEN_KEYS) for v in teachers.values() if isinstance(v, dict)]
        if vals and None not in vals:
            return float(sum(vals))
    return None


def _device_info(ctx: RunContext) -> tuple[int, str]:
    for arm in ctx.cfg.arms:
        meta = _read_json(ctx.arm_dir(arm.name) / "meta.json") or {}
        n = meta.get("num_devices") or meta.get("devices")
        kind = meta.get("device_kind") or meta.get("platform")
        if isinstance(n, int) and isinstance(kind, str):
            return n, kind
    dev = jax.devices()[0]
    return jax.device_count(), f"{dev.platform} ({getattr(dev, 'device_kind', dev.platform)})"


# ------------------------------------------------------------------------------------------------ plots
def make_plots(ctx: RunContext, arms: list[ArmInfo], results: dict[str, Any]) -> list[Path]:
    """accuracy / reverse KL vs step / time for every arm (PNG, Agg backend); returns the written paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = ctx.run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = ctx.cfg.sft_teacher
    refs = {"SFT student": results.get("sft"), f"teacher {teacher}": results.get(f"teacher:{teacher}")}
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
                    offset = _one_off(ctx, arm.teacher)[2] or 0.0
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


# ------------------------------------------------------------------------------------------------ text
def _accuracy_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def _compare(new: float | None, old: float | None, n: int | None,
             new_per_prompt: list[float] | None = None, old_per_prompt: list[float] | None = None) -> str:
    """'improved … / did not improve …' with the difference in standard errors.

    With both models' per-prompt accuracies on the same prompts the standard error is the paired one
    (sd of the per-prompt differences / sqrt(n)), which removes the prompt-difficulty variance both models
    share; otherwise that of a difference of two independent proportions."""
    if new is None or old is None:
        return "could not be compared (missing numbers)"
    delta = new - old
    if delta == 0:
        return f"did not improve held-out accuracy (unchanged at {new:.3f})"
    verb = "improved" if delta > 0 else "did not improve (lowered)"
    text = f"{verb} held-out accuracy from {old:.3f} to {new:.3f} ({delta:+.3f})"
    paired = (new_per_prompt is not None and old_per_prompt is not None
              and len(new_per_prompt) == len(old_per_prompt) > 1)
    if paired:
        diff = [a - b for a, b in zip(new_per_prompt, old_per_prompt)]
        mean = sum(diff) / len(diff)
        sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (len(diff) - 1))
        se, n, kind = sd / math.sqrt(len(diff)), len(diff), "paired standard errors"
    elif n:
        se, kind = math.sqrt(_accuracy_se(new, n) ** 2 + _accuracy_se(old, n) ** 2), "standard errors"
    if (paired or n) and delta != 0:
        z = abs(delta) / se if se > 0 else math.inf
        text += f", {z:.1f} {kind} on {n} prompts" + (" (within noise)" if z < 2 else "")
    return text


def _times(ratio: float, better: str, worse: str) -> str:
    """'2.50x less' for a ratio >= 1, '1.25x more' (the inverse) below 1."""
    return f"{ratio:.2f}x {better}" if ratio >= 1 else f"{1 / ratio:.2f}x {worse}"


def findings(ctx: RunContext, arms: list[ArmInfo], results: dict[str, Any],
             speedups: dict[str, dict[str, Any]]) -> list[str]:
    """The "what this shows" statements, each computed from the numbers."""
    out: list[str] = []
    sft = results.get("sft") or {}
    sft_acc, sft_kl = sft.get("accuracy"), sft.get("reverse_kl")
    n = sft.get("num_prompts")
    base = results.get("base") or {}
    if base.get("accuracy") is not None and sft_acc is not None:
        cmp = _compare(sft_acc, base["accuracy"], n, sft.get("per_prompt_accuracy"), base.get("per_prompt_accuracy"))
        out.append(f"SFT on teacher {ctx.cfg.sft_teacher}'s responses {cmp} "
                   "over the base student.")
    for arm in arms:
        label = f"{'Lightning' if arm.mode == 'lightning' else 'Online'} OPD arm {arm.name} (teacher {arm.teacher})"
        if not arm.trained and not arm.eval_rows:
            out.append(f"{label} has no trained model or evaluations yet.")
            continue
        acc, kl = _final_metric(arm, "accuracy"), _final_metric(arm, "reverse_kl")
        final = results.get(f"arm:{arm.name}") or {}
        # Paired only when the final accuracy is this evaluation's (not a periodic one).
        per_prompt = final.get("per_prompt_accuracy") if final.get("accuracy") == acc else None
        s = f"{label} {_compare(acc, sft_acc, n, per_prompt, sft.get('per_prompt_accuracy'))} over the SFT student"
        if kl is not None and sft_kl is not None:
            direction = "lowered" if kl < sft_kl else "raised"
            s += (f"; it {direction} the reverse KL to teacher {ctx.cfg.sft_teacher} from {sft_kl:.4f} to "
                  f"{kl:.4f} per token")
        out.append(s + ".")
    for teacher, sp in speedups.items():
        a, b = sp.get("total_speedup"), sp.get("step_speedup")
        if a is None and b is None:
            continue
        parts = []
        if a is not None:
            parts.append(f"{_times(a, 'less', 'more')} total wall time ({sp['lightning_total_s']:.1f} s incl. "
                         f"one-off rollout + precompute vs {sp['online_total_s']:.1f} s)")
        if b is not None:
            parts.append(f"was {_times(b, 'faster', 'slower')} per training step")
        la, oa = sp.get("lightning_accuracy"), sp.get("online_accuracy")
        acc_txt = (f"; final accuracy {la:.3f} (lightning) vs {oa:.3f} (online)"
                   if la is not None and oa is not None else "")
        out.append(f"With teacher {teacher}, Lightning OPD ({sp['lightning_arm']}) took " + " and ".join(parts)
                   + f" than online OPD ({sp['online_arm']}){acc_txt}.")
    inconsistent = [a for a in arms if a.consistent is False]
    for arm in inconsistent:
        peers = [a for a in arms if a.consistent is True and a.mode == arm.mode]
        acc = _final_metric(arm, "accuracy")
        peer_accs = [(p.name, _final_metric(p, "accuracy")) for p in peers]
        peer_accs = [(nm, v) for nm, v in peer_accs if v is not None]
        if acc is None or not peer_accs:
            out.append(f"Inconsistent-teacher arm {arm.name} (teacher {arm.teacher}) cannot be compared: "
                       "no final accuracy for it or for a consistent arm of the same mode.")
            continue
        worse = [nm for nm, v in peer_accs if acc < v]
        peers_txt = ", ".join(f"{nm} {v:.3f}" for nm, v in peer_accs)
        verdict = "ended worse than" if len(worse) == len(peer_accs) else (
            "ended worse than some of" if worse else "did not end worse than")
        out.append(f"Inconsistent-teacher arm {arm.name} (teacher {arm.teacher}, not the SFT-data teacher "
                   f"{ctx.cfg.sft_teacher}) {verdict} the consistent {arm.mode} arm(s): accuracy {acc:.3f} vs "
                   f"{peers_txt}. (Its reverse KL is measured to teacher {ctx.cfg.sft_teacher}, not to the teacher "
                   "it was distilled toward.)")
    if not inconsistent:
        out.append("No arm used an inconsistent teacher, so teacher consistency was not tested in this run.")
    if n is not None and n < 100:
        out.append(f"Held-out sets of {n} prompts give coarse accuracies (one prompt = {1 / n:.3f}); treat "
                   "differences under about two standard errors as noise.")
    return out


def compute_speedups(ctx: RunContext, arms: list[ArmInfo]) -> dict[str, dict[str, Any]]:
    """For each teacher with both a lightning and an online arm: total and per-step speed-ups."""
    out: dict[str, dict[str, Any]] = {}
    teachers = sorted({a.teacher for a in arms})
    for t in teachers:
        light = [a for a in arms if a.teacher == t and a.mode == "lightning" and (a.wall_s or a.step_s)]
        online = [a for a in arms if a.teacher == t and a.mode == "online" and (a.wall_s or a.step_s)]
        if not light or not online:
            continue
        la, oa = light[0], online[0]
        roll_s, pre_s, one_off, note = _one_off(ctx, t)
        total = la.wall_s + one_off if la.wall_s is not None and one_off is not None else None
        out[t] = {"lightning_arm": la.name, "online_arm": oa.name, "rollout_s": roll_s, "precompute_s": pre_s,
                  "one_off_note": note, "lightning_train_s": la.wall_s, "lightning_total_s": total,
                  "online_total_s": oa.wall_s, "total_speedup": _ratio(oa.wall_s, total),
                  "lightning_step_s": la.step_s, "online_step_s": oa.step_s,
                  "step_speedup": _ratio(oa.step_s, la.step_s), "online_phases": oa.phases,
                  "lightning_accuracy": _final_metric(la, "accuracy"),
                  "online_accuracy": _final_metric(oa, "accuracy")}
    return out


def render_report(ctx: RunContext) -> tuple[str, dict[str, Any]]:
    """The markdown report and a JSON-able summary of its numbers."""
    cfg = ctx.cfg
    results = _read_json(ctx.stage_dir("eval") / "results.json") or {}
    arms = [gather_arm(ctx, a, results) for a in cfg.arms]
    n_dev, dev_kind = _device_info(ctx)
    speedups = compute_speedups(ctx, arms)
    kl_teacher = next((r.get("kl_teacher") for r in results.values() if r.get("kl_teacher")),
                      cfg.eval.kl_teacher or cfg.sft_teacher)
    lines = [f"# jopd report: {ctx.run_dir.name}", "",
             f"Run directory `{ctx.run_dir}`. SFT-data teacher: **{cfg.sft_teacher}**. Devices: {n_dev} x "
             f"{dev_kind}; device-seconds = wall seconds x {n_dev}.", ""]
    if not results:
        lines += ["_No evaluation results (`eval/results.json` is missing): run the eval stage._", ""]

    # --- results table ---------------------------------------------------------------------------------
    n_prompts = next((r.get("num_prompts") for r in results.values() if r.get("num_prompts")), None)
    lines += ["## Results", "",
              f"Held-out accuracy on {n_prompts if n_prompts else '?'} prompts "
              + (f"(avg@{cfg.eval.samples_per_prompt}: the mean over {cfg.eval.samples_per_prompt} samples per "
                 f"prompt at temperature {cfg.eval.temperature}"
                 + (f", top-p {cfg.eval.top_p}" if cfg.eval.top_p < 1 else "") + ")"
                 if cfg.eval.samples_per_prompt > 1 else f"(temperature {cfg.eval.temperature})")
              + f"; reverse KL(student || teacher {kl_teacher}) per response "
              f"token on {cfg.eval.kl_samples} temperature-1 sample(s) per prompt.", "",
              "| model | kind | teacher | consistent | accuracy | reverse KL | wall s | device s | tokens |",
              "|---|---|---|---|---|---|---|---|---|"]
    sft_done = _stage_done(ctx, "sft")
    sft_out = (sft_done or {}).get("outputs") or {}

    def row(name: str, kind: str, teacher: str, consistent: str, res: dict[str, Any] | None,
            wall: float | None, tokens: float | None, missing: str = "not evaluated") -> str:
        acc = _fmt(res.get("accuracy")) if res else missing
        kl = _fmt(res.get("reverse_kl"), ".4f") if res else missing
        dev_s = wall * n_dev if wall is not None else None
        return (f"| {name} | {kind} | {teacher} | {consistent} | {acc} | {kl} | {_fmt(wall, '.1f')} | "
                f"{_fmt(dev_s, '.1f')} | {_fmt(tokens, ',.0f')} |")

    if "base" in results:
        lines.append(row("base", "initial student", "-", "-", results["base"], None, None))
    lines.append(row("sft", "SFT student", cfg.sft_teacher, "-", results.get("sft"),
                     _first(sft_out, ("train_seconds",)) or _first(sft_done, ("seconds",)),
                     _first(sft_out, ("tokens",)), missing="not evaluated" if sft_done else "not trained"))
    for t in cfg.teachers:
        if f"teacher:{t}" in results:
            lines.append(row(f"teacher {t}", "teacher", t, "-", results[f"teacher:{t}"], None, None))
    for stage in ("rollout", "precompute"):
        done = _stage_done(ctx, stage)
        if done is not None:
            secs = _first(done, ("seconds",))
            lines.append(f"| ({stage}) | one-off cost | - | - | - | - | {_fmt(secs, '.1f')} | "
                         f"{_fmt(secs * n_dev if secs is not None else None, '.1f')} | "
                         f"{_fmt(_store_tokens(done), ',.0f')} |")
    for a in arms:
        cons = {True: "yes", False: "**no**", None: "?"}[a.consistent]
        res = a.final
        if res is None and a.eval_rows:
            res = {"accuracy": _final_metric(a, "accuracy"), "reverse_kl": _final_metric(a, "reverse_kl")}
        lines.append(row(f"arm {a.name}", f"{a.mode} OPD", a.teacher, cons, res, a.wall_s, a.tokens,
                         missing="not evaluated" if a.trained else "not trained"))
    if not any(a.mode == "online" for a in cfg.arms):
        lines += ["", "_No online OPD arm is configured: there is no online baseline to compare against._"]
    if not any(a.mode == "lightning" for a in cfg.arms):
        lines += ["", "_No Lightning OPD arm is configured._"]

    # --- speed-ups -----------------------------------------------------------------------------------
    lines += ["", "## Lightning OPD vs online OPD (same teacher)", ""]
    if not speedups:
        lines.append("_No teacher has both a trained lightning arm and a trained online arm: no speed-up to "
                     "report._")
    else:
        lines += ["| teacher | lightning arm | rollout s | precompute s | lightning train s | lightning total s "
                  "| online arm | online total s | (a) total speed-up | lightning s/step | online s/step "
                  "| (b) per-step speed-up | online gen / score / update s/step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t, sp in speedups.items():
            ph = sp["online_phases"]
            split = " / ".join(_fmt(ph.get(p), ".4f") for p in PHASES)
            lines.append(f"| {t} | {sp['lightning_arm']} | {_fmt(sp['rollout_s'], '.1f')} | "
                         f"{_fmt(sp['precompute_s'], '.1f')} | {_fmt(sp['lightning_train_s'], '.1f')} | "
                         f"{_fmt(sp['lightning_total_s'], '.1f')} | {sp['online_arm']} | "
                         f"{_fmt(sp['online_total_s'], '.1f')} | {_fmt(sp['total_speedup'], '.2f')}x | "
                         f"{_fmt(sp['lightning_step_s'], '.4f')} | {_fmt(sp['online_step_s'], '.4f')} | "
                         f"{_fmt(sp['step_speedup'], '.2f')}x | {split} |")
        notes = sorted({sp["one_off_note"] for sp in speedups.values() if sp["one_off_note"]})
        lines += [""] + [f"_Note: {n}._" for n in notes]
        lines.append("(a) = online total / (rollout + precompute + lightning training); "
                     f"(b) = online mean step time / lightning mean step time, over steady-state steps (steps slower "
                     f"than {COMPILE_OUTLIER_FACTOR:g}x the median are taken to include compilation and left out). "
                     "Arm wall times are the training loops' own (periodic evaluation excluded, compilation "
                     "included).")

    # --- consistency ------------------------------------------------------------------------------------
    lines += ["", "## Teacher consistency", "",
              "| arm | mode | teacher | SFT-data teacher | consistent |", "|---|---|---|---|---|"]
    for a in arms:
        cons = {True: "yes", False: "no (ablation)", None: "unknown (no arms/NAME/meta.json)"}[a.consistent]
        lines.append(f"| {a.name} | {a.mode} | {a.teacher} | {cfg.sft_teacher} | {cons} |")

    # --- findings ------------------------------------------------------------------------------------------
    found = findings(ctx, arms, results, speedups)
    lines += ["", "## What this shows", ""] + [f"- {f}" for f in found]

    # --- examples -----------------------------------------------------------------------------------------
    order = {name: i for i, name in enumerate(["base", "sft"] + [f"teacher:{t}" for t in cfg.teachers]
                                                + [f"arm:{a.name}" for a in cfg.arms])}
    examples = [(name, s) for name, r in sorted(results.items(), key=lambda kv: order.get(kv[0], len(order)))
                for s in (r.get("samples") or [])[:1]]
    if examples:
        lines += ["", "## Example responses (first held-out prompt)", ""]
        for name, s in examples:
            resp = str(s.get("response", "")).replace("\n", " \\n ").replace("|", "\\|")
            lines.append(f"- **{name}** ({'correct' if s.get('correct') else 'wrong'}): "
                         f"`{s.get('prompt', '')}` -> `{resp[:160]}`")
    lines += ["", "## Plots", ""]
    summary = {"speedups": speedups, "findings": found, "devices": {"count": n_dev, "kind": dev_kind},
               "arms": {a.name: {"mode": a.mode, "teacher": a.teacher, "consistent_teacher": a.consistent,
                                 "wall_s": a.wall_s, "tokens": a.tokens, "mean_step_s": a.step_s,
                                 "accuracy": _final_metric(a, "accuracy"),
                                 "reverse_kl": _final_metric(a, "reverse_kl")} for a in arms}}
    return "\n".join(lines) + "\n", {"arms_info": arms, "results": results, **summary}


class ReportStage(Stage):
    name = "report"

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        done = {}
        for stage in UPSTREAM:
            rec = _stage_done(ctx, stage)
            done[stage] = rec.get("fingerprint") if rec else None
        return {"upstream": done, "arms": ctx.cfg.arms, "sft_teacher": ctx.cfg.sft_teacher}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        text, info = render_report(ctx)
        summary = {k: v for k, v in info.items() if k not in ("arms_info", "results")}
        if not ctx.is_main_process:
            return summary
        plots = make_plots(ctx, info["arms_info"], info["results"])
        text += "".join(f"![{p.stem}](plots/{p.name})\n" for p in plots)
        tmp = ctx.run_dir / ".report.md.tmp"
        tmp.write_text(text)
        tmp.replace(ctx.run_dir / "report.md")
        atomic_write_json(ctx.stage_dir(self.name) / "summary.json", summary)
        print(text, flush=True)
        summary["plots"] = [str(p) for p in plots]
        summary["report"] = str(ctx.run_dir / "report.md")
        return summary


STAGE = ReportStage()
