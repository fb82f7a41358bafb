"""What the report knows about a run, read from the files the other stages recorded (each piece optional).

- ``eval/results.json``: held-out accuracy and reverse KL of every evaluated model;
- ``arms/NAME/meta.json`` and ``metrics/arm_NAME.jsonl``: per-arm mode, teacher, teacher consistency, wall
  time, tokens, per-step timings, and the periodic ``eval/accuracy`` / ``eval/reverse_kl`` rows;
- ``<stage>/DONE.json`` of sft, rollout, precompute, train and online: stage wall seconds and token counts.

From these: each arm's `ArmInfo`, the one-off cost (rollout + precompute) a lightning arm pays, and the
speed-ups of Lightning OPD over online OPD per teacher. Times are seconds, token counts are response tokens.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jopd.config import ArmSection, Config
from jopd.io import read_json, read_jsonl
from jopd.layout import RunLayout

__all__ = [
    "COMPILE_OUTLIER_FACTOR",
    "PHASES",
    "ArmInfo",
    "compute_speedups",
    "device_info",
    "final_metric",
    "first_number",
    "gather_arm",
    "one_off_cost",
    "read_optional_json",
    "stage_done",
    "steady_steps",
    "store_tokens",
]

# Per-step timing keys of the arms' metrics rows (jopd.stages.train.train_arm) and the online phase split.
PHASES = {"generate": "gen_s", "score": "score_s", "update": "update_s"}
STORE_TOKEN_KEYS = ("response_tokens",)
# A step slower than this many times the median step is taken to include compilation (see steady_steps).
COMPILE_OUTLIER_FACTOR = 5.0


def read_optional_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is absent or unreadable (the report says what is missing)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def first_number(d: dict[str, Any] | None, keys: tuple[str, ...]) -> float | int | None:
    """The first of ``keys`` whose value in ``d`` is a finite number (booleans are not numbers here)."""
    if not d:
        return None
    for k in keys:
        v = d.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return v
    return None


def _mean_of(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> float | None:
    vals = [v for r in rows if (v := first_number(r, keys)) is not None]
    return float(np.mean(vals)) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


@dataclasses.dataclass
class ArmInfo:
    """What the report knows about one arm (seconds, response tokens; None = not recorded)."""

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
    refresh: dict[str, Any] | None = None  # meta.json's refresh-schedule record (refresh_every > 0)
    lora: dict[str, Any] | None = None  # meta.json's LoRA record (rank, targets, sizes) of a LoRA student


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


def gather_arm(layout: RunLayout, arm: ArmSection, results: dict[str, Any]) -> ArmInfo:
    """An arm's summary from ``arms/NAME/meta.json``, falling back to its metrics rows where it is missing
    (an arm interrupted before writing meta.json still shows its progress)."""
    meta = read_optional_json(layout.arm_meta(arm.name)) or {}
    rows = read_jsonl(layout.metrics(f"arm_{arm.name}"), skip_malformed=True)
    eval_rows = [r for r in rows if "eval/accuracy" in r or "eval/reverse_kl" in r]
    step_rows = [r for r in rows if first_number(r, ("step_s",)) is not None]
    wall = first_number(meta, ("train_seconds",))
    if wall is None:
        wall = max((r["time_s"] for r in rows if first_number(r, ("time_s",)) is not None), default=None)
    tokens = first_number(meta, ("tokens",))
    if tokens is None and step_rows:
        tokens = float(sum(first_number(r, ("tokens",)) or 0.0 for r in step_rows))  # per-step counts
    steps = meta.get("steps") if isinstance(meta.get("steps"), int) else None
    if steps is None and step_rows:
        steps = max(int(r.get("step", 0)) for r in step_rows)
    warm = steady_steps(step_rows)
    step_s = _mean_of(warm, ("step_s",))
    if step_s is None:
        step_s = first_number(meta, ("seconds_per_step",))
    by_phase = meta.get("seconds_per_step_by_phase")
    phases = {p: _mean_of(warm, (key,)) if warm else (first_number(by_phase, (key,)) if isinstance(by_phase, dict)
                                                      else None)
              for p, key in PHASES.items()}
    consistent = meta.get("consistent_teacher")
    return ArmInfo(name=arm.name, mode=meta.get("mode", arm.mode), teacher=meta.get("teacher_name", arm.teacher),
                   consistent=consistent if isinstance(consistent, bool) else None,
                   trained=(layout.arm_model(arm.name) / "config.json").is_file(), wall_s=wall,
                   tokens=tokens, steps=steps, step_s=step_s, phases=phases,
                   eval_rows=sorted(eval_rows, key=lambda r: r.get("step", 0)),
                   final=results.get(f"arm:{arm.name}"),
                   refresh=meta.get("refresh") if isinstance(meta.get("refresh"), dict) else None,
                   lora=meta.get("lora") if isinstance(meta.get("lora"), dict) else None)


def final_metric(arm: ArmInfo, key: str) -> float | None:
    """The arm's final held-out metric: the eval stage's result, else the last periodic eval row."""
    if arm.final is not None and isinstance(arm.final.get(key), int | float):
        return float(arm.final[key])
    vals = [r[f"eval/{key}"] for r in arm.eval_rows if isinstance(r.get(f"eval/{key}"), int | float)]
    return float(vals[-1]) if vals else None


def stage_done(layout: RunLayout, stage: str) -> dict[str, Any] | None:
    """A stage's ``DONE.json`` record, or None when it has not completed."""
    return read_optional_json(layout.done(stage))


def one_off_cost(layout: RunLayout, teacher: str) -> tuple[float | None, float | None, float | None, str]:
    """(rollout s, precompute s attributed to ``teacher``, their total, note): a lightning arm's one-off cost.

    The precompute stage scores the rollouts once per teacher; with several teachers each gets the share of
    the stage's wall time that its scoring took (so loading and verification are shared out too).
    """
    roll_s = first_number(stage_done(layout, "rollout"), ("seconds",))
    pre = stage_done(layout, "precompute")
    pre_s = first_number(pre, ("seconds",))
    note = ""
    per_teacher = ((pre or {}).get("outputs") or {}).get("teachers")
    if pre_s is not None and isinstance(per_teacher, dict) and len(per_teacher) > 1:
        scoring = {n: first_number(v, ("seconds",)) for n, v in per_teacher.items() if isinstance(v, dict)}
        if teacher in scoring and None not in scoring.values() and sum(scoring.values()) > 0:
            share = scoring[teacher] / sum(scoring.values())
            note = (f"precompute of teacher {teacher}: {share:.0%} of the stage's {pre_s:.1f} s "
                    f"(its share of the scoring time of {len(scoring)} teachers)")
            pre_s *= share
        else:
            note = f"precompute time covers all {len(per_teacher)} teachers (upper bound for teacher {teacher})"
    total = roll_s + pre_s if roll_s is not None and pre_s is not None else None
    return roll_s, pre_s, total, note


def store_tokens(done: dict[str, Any] | None) -> float | None:
    """Response tokens a rollout / precompute stage produced or scored (precompute: summed over teachers)."""
    out = (done or {}).get("outputs") or {}
    direct = first_number(out, STORE_TOKEN_KEYS)
    if direct is not None:
        return direct
    teachers = out.get("teachers")
    if isinstance(teachers, dict):
        vals = [first_number(v, STORE_TOKEN_KEYS) for v in teachers.values() if isinstance(v, dict)]
        if vals and None not in vals:
            return float(sum(vals))
    return None


def device_info(cfg: Config, layout: RunLayout) -> tuple[int, str]:
    """(device count, device kind) the arms recorded; the current process's devices when none did."""
    for arm in cfg.arms:
        meta = read_optional_json(layout.arm_meta(arm.name)) or {}
        n = meta.get("num_devices") or meta.get("devices")
        kind = meta.get("device_kind") or meta.get("platform")
        if isinstance(n, int) and isinstance(kind, str):
            return n, kind
    dev = jax.devices()[0]
    return jax.device_count(), f"{dev.platform} ({getattr(dev, 'device_kind', dev.platform)})"


def compute_speedups(layout: RunLayout, arms: list[ArmInfo]) -> dict[str, dict[str, Any]]:
    """For each teacher with both a lightning and an online arm: total and per-step speed-ups."""
    out: dict[str, dict[str, Any]] = {}
    teachers = sorted({a.teacher for a in arms})
    for t in teachers:
        light = [a for a in arms if a.teacher == t and a.mode == "lightning" and (a.wall_s or a.step_s)]
        online = [a for a in arms if a.teacher == t and a.mode == "online" and (a.wall_s or a.step_s)]
        if not light or not online:
            continue
        la, oa = light[0], online[0]
        roll_s, pre_s, one_off, note = one_off_cost(layout, t)
        total = la.wall_s + one_off if la.wall_s is not None and one_off is not None else None
        out[t] = {"lightning_arm": la.name, "online_arm": oa.name, "rollout_s": roll_s, "precompute_s": pre_s,
                  "one_off_note": note, "lightning_train_s": la.wall_s, "lightning_total_s": total,
                  "online_total_s": oa.wall_s, "total_speedup": _ratio(oa.wall_s, total),
                  "lightning_step_s": la.step_s, "online_step_s": oa.step_s,
                  "step_speedup": _ratio(oa.step_s, la.step_s), "online_phases": oa.phases,
                  "lightning_accuracy": final_metric(la, "accuracy"),
                  "online_accuracy": final_metric(oa, "accuracy")}
    return out
