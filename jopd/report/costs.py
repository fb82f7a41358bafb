"""The run's cost in the paper's terms: seconds per pipeline stage, the one-off cost of Lightning OPD amortised
over the epochs it actually ran over its fixed rollouts, and each teacher's Lightning vs online total.

The paper (Lightning OPD, Table "cost") counts GPU-hours of the OPD phase: Lightning pays a one-off rollout +
teacher scoring pass and then trains without a teacher; standard OPD generates and scores at every step. Here a
second of wall time on ``n`` devices is ``n`` device-seconds. Every number comes from the stages' records
(``<stage>/DONE.json``, ``metrics/teacher_NAME.jsonl``, ``arms/NAME/meta.json``); what is missing is n/a.
"""

from __future__ import annotations

import math
from typing import Any

from jopd.config import Config
from jopd.io import read_jsonl
from jopd.layout import RunLayout
from jopd.report.gather import ArmInfo, first_number, one_off_cost, stage_done, store_tokens

__all__ = ["cost_section", "epochs_over_rollouts", "stage_costs", "stage_cpu", "teacher_training_seconds"]


def _fmt(x: Any, spec: str = ".1f") -> str:
    return format(x, spec) if isinstance(x, int | float) and math.isfinite(x) else "n/a"


def teacher_training_seconds(cfg: Config, layout: RunLayout) -> dict[str, float | None]:
    """Seconds each in-run teacher's training loop ran (its metrics' last ``time_s``); given teachers cost 0."""
    out: dict[str, float | None] = {}
    for name, t in cfg.teachers.items():
        if t.path is not None:
            continue
        rows = read_jsonl(layout.metrics(f"teacher_{name}"), skip_malformed=True)
        times = [r["time_s"] for r in rows if isinstance(r.get("time_s"), int | float)]
        out[name] = float(max(times)) if times else None
    return out


def epochs_over_rollouts(arm: ArmInfo, rollout_tokens: float | None) -> float | None:
    """Passes a lightning arm made over the fixed rollouts: its trained response tokens / the store's (packed or
    padded batches alike); None for online arms and when a count is missing."""
    if arm.mode != "lightning" or arm.refresh or not arm.tokens or not rollout_tokens:
        return None
    return arm.tokens / rollout_tokens


def stage_costs(cfg: Config, layout: RunLayout, arms: list[ArmInfo]) -> list[dict[str, Any]]:
    """One row per cost item, in pipeline order: ``{"item", "what", "seconds", "one_off"}``."""
    rows: list[dict[str, Any]] = []
    for name, secs in teacher_training_seconds(cfg, layout).items():
        rows.append({"item": f"teacher {name} training", "what": "in-run teacher trained from scratch (the demo's "
                     "stand-in for a given teacher; not part of either method's cost)", "seconds": secs,
                     "one_off": None})
    td = stage_done(layout, "teacher_data")
    td_out = (td or {}).get("outputs") or {}
    rows.append({"item": "teacher data", "what": f"the SFT-data teacher answers {td_out.get('num_rows', '?')} SFT "
                 "prompts", "seconds": first_number(td, ("seconds",)), "one_off": None})
    sft = stage_done(layout, "sft")
    rows.append({"item": "SFT", "what": f"{cfg.sft.steps} steps x {cfg.sft.batch_size}",
                 "seconds": first_number(sft, ("seconds",)), "one_off": None})
    roll = stage_done(layout, "rollout")
    roll_out = (roll or {}).get("outputs") or {}
    rows.append({"item": "rollout", "what": f"the SFT student samples {roll_out.get('rows', '?')} responses to the "
                 "OPD prompts, once", "seconds": first_number(roll, ("seconds",)), "one_off": True})
    for teacher in cfg.precompute.teachers:
        _, pre_s, _, _ = one_off_cost(layout, teacher)
        rows.append({"item": f"precompute {teacher}", "what": f"teacher {teacher} scores every rollout token, once",
                     "seconds": pre_s, "one_off": True})
    rollout_tokens = store_tokens(roll)
    for a in arms:
        if a.mode == "lightning":
            epochs = epochs_over_rollouts(a, rollout_tokens)
            what = (f"{a.steps or '?'} steps on the fixed rollouts"
                    + (f" ({epochs:.2f} epochs)" if epochs is not None else "")
                    + (f", refreshed every {a.refresh['every']} steps" if a.refresh else ""))
        else:
            what = f"{a.steps or '?'} steps, each generating and scoring its batch live"
        rows.append({"item": f"arm {a.name}", "what": what, "seconds": a.wall_s, "one_off": False})
    ev = stage_done(layout, "eval")
    rows.append({"item": "eval", "what": "every model on the held-out prompts", "seconds": first_number(ev, ("seconds",)),
                 "one_off": None})
    return rows


def stage_cpu(cfg: Config, layout: RunLayout) -> list[dict[str, Any]]:
    """Wall and CPU seconds (user + system, all threads; DONE.json ``cpu_seconds``) of every completed stage."""
    rows = []
    for stage in cfg.stages:
        done = stage_done(layout, stage)
        if done is not None:
            rows.append({"stage": stage, "seconds": first_number(done, ("seconds",)),
                         "cpu_seconds": first_number(done, ("cpu_seconds",))})
    return rows


def amortised(layout: RunLayout, arms: list[ArmInfo]) -> list[dict[str, Any]]:
    """Per teacher with a lightning and an online arm: the one-off cost, epochs, one-off per epoch, totals."""
    rollout_tokens = store_tokens(stage_done(layout, "rollout"))
    out = []
    for t in sorted({a.teacher for a in arms}):
        light = next((a for a in arms if a.teacher == t and a.mode == "lightning" and not a.refresh and a.wall_s), None)
        online = next((a for a in arms if a.teacher == t and a.mode == "online" and a.wall_s), None)
        if light is None or online is None:
            continue
        _, _, one_off, _ = one_off_cost(layout, t)
        epochs = epochs_over_rollouts(light, rollout_tokens)
        per_epoch = one_off / epochs if one_off is not None and epochs else None
        total = light.wall_s + one_off if one_off is not None else None
        out.append({"teacher": t, "lightning_arm": light.name, "online_arm": online.name, "one_off_s": one_off,
                    "epochs": epochs, "one_off_per_epoch_s": per_epoch, "lightning_train_s": light.wall_s,
                    "lightning_total_s": total, "online_total_s": online.wall_s,
                    "online_over_lightning": online.wall_s / total if total else None})
    return out


def cost_section(cfg: Config, layout: RunLayout, arms: list[ArmInfo], n_dev: int) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines of the "Cost" section and its numbers (JSON-able)."""
    rows = stage_costs(cfg, layout, arms)
    lines = ["", "## Cost in the paper's terms", "",
             f"Wall seconds of each step of the run (device-seconds = wall x {n_dev}). One-off: what Lightning OPD "
             "pays once before training (the SFT student's rollouts and each teacher's scoring of them); online OPD "
             "pays generation and scoring inside every step instead.", "",
             "| step | what | wall s | device s | Lightning one-off |", "|---|---|---|---|---|"]
    for r in rows:
        secs = r["seconds"]
        flag = {True: "yes", False: "no", None: "-"}[r["one_off"]]
        lines.append(f"| {r['item']} | {r['what']} | {_fmt(secs)} | "
                     f"{_fmt(secs * n_dev if isinstance(secs, int | float) else None)} | {flag} |")
    am = amortised(layout, arms)
    if am:
        lines += ["", "Lightning's one-off cost amortised over the epochs it ran over its fixed rollouts (the paper "
                  "trains about 2 epochs), and each method's total OPD cost for the same teacher:", "",
                  "| teacher | one-off s (rollout + precompute) | epochs | one-off per epoch s | lightning train s "
                  "| lightning total s | online total s | online / lightning |", "|---|---|---|---|---|---|---|---|"]
        for r in am:
            lines.append(f"| {r['teacher']} ({r['lightning_arm']} vs {r['online_arm']}) | {_fmt(r['one_off_s'])} | "
                         f"{_fmt(r['epochs'], '.2f')} | {_fmt(r['one_off_per_epoch_s'])} | "
                         f"{_fmt(r['lightning_train_s'])} | {_fmt(r['lightning_total_s'])} | "
                         f"{_fmt(r['online_total_s'])} | {_fmt(r['online_over_lightning'], '.2f')}x |")
    cpu = stage_cpu(cfg, layout)
    if any(r["cpu_seconds"] is not None for r in cpu):
        wall = sum(r["seconds"] or 0.0 for r in cpu)
        total_cpu = sum(r["cpu_seconds"] or 0.0 for r in cpu)
        lines += ["", "Per stage, wall and CPU seconds of the process (user + system over all threads): on a shared "
                  "machine the wall time depends on the load, the CPU time much less.", "",
                  "| stage | wall s | CPU s | CPU / wall |", "|---|---|---|---|"]
        for r in cpu:
            ratio = r["cpu_seconds"] / r["seconds"] if r["cpu_seconds"] is not None and r["seconds"] else None
            lines.append(f"| {r['stage']} | {_fmt(r['seconds'])} | {_fmt(r['cpu_seconds'])} | {_fmt(ratio, '.2f')} |")
        lines.append(f"| all stages | {_fmt(wall)} | {_fmt(total_cpu)} | "
                     f"{_fmt(total_cpu / wall if wall else None, '.2f')} |")
    return lines, {"stages": rows, "amortised": am, "stage_cpu": cpu}
