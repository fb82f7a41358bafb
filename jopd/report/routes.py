"""The report's multi-teacher section (``routing.field``): the routes and their teachers, every model's accuracy
and reverse KL on each route's held-out prompts against that route's teacher, and each arm's teacher per route
with its consistency (each route's teacher must be the one that wrote the route's SFT data)."""

from __future__ import annotations

import math
from typing import Any

from jopd.config import Config
from jopd.layout import RunLayout
from jopd.multi_teacher import describe_routes, kl_teacher_names, route_names
from jopd.report.gather import ArmInfo, read_optional_json, stage_done

__all__ = ["routes_section", "sft_teacher_label"]


def sft_teacher_label(cfg: Config) -> str:
    """Who wrote the SFT data: ``sft_teacher``, or the route -> teacher map of a multi-teacher run."""
    return f"routes ({describe_routes(cfg.routing.teachers)})" if cfg.routing.enabled else cfg.sft_teacher


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, int | float) and math.isfinite(x) else "n/a"


def routes_section(cfg: Config, layout: RunLayout, results: dict[str, Any], arms: list[ArmInfo]) -> list[str]:
    """Markdown lines of the per-teacher section (empty without routing)."""
    if not cfg.routing.enabled:
        return []
    routes, kl = route_names(cfg), kl_teacher_names(cfg)
    counts = ((stage_done(layout, "prepare") or {}).get("outputs") or {}).get("prompts_per_route") or {}
    lines = ["", f"## Per teacher (prompts routed by `{cfg.routing.field}`)", "",
             "Each route's prompts: its SFT data written by its teacher, its rollouts scored by the teacher each arm "
             "gives it, its held-out accuracy and reverse KL(student || teacher) per token measured on its own "
             "eval prompts against its KL teacher.", "",
             "| route | SFT-data teacher | KL teacher | SFT prompts | OPD prompts | eval prompts |",
             "|---|---|---|---|---|---|"]
    for r in routes:
        n = [(counts.get(split) or {}).get(r, "?") for split in ("sft", "opd", "eval")]
        lines.append(f"| {r} | {cfg.routing.teachers[r]} | {kl[r]} | {n[0]} | {n[1]} | {n[2]} |")

    order = ["base", "sft", *(f"teacher:{t}" for t in cfg.teachers), *(f"arm:{a.name}" for a in cfg.arms)]
    rows = [name for name in order if isinstance((results.get(name) or {}).get("per_route"), dict)]
    if rows:
        lines += ["", "| model | " + " | ".join(f"route {r} ({kl[r]}): accuracy | reverse KL" for r in routes)
                  + " | all routes: accuracy | reverse KL |",
                  "|---|" + "---|---|" * (len(routes) + 1)]
        for name in rows:
            res = results[name]
            cells = []
            for r in routes:
                per = res["per_route"].get(r) or {}
                cells += [_fmt(per.get("accuracy"), ".3f"), _fmt(per.get("reverse_kl"), ".4f")]
            cells += [_fmt(res.get("accuracy"), ".3f"), _fmt(res.get("reverse_kl"), ".4f")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    else:
        lines += ["", "_No per-route evaluation results (`eval/results.json` has no `per_route`): run the eval "
                  "stage._"]

    lines += ["", "| arm | mode | route | teacher | SFT-data teacher | consistent |", "|---|---|---|---|---|---|"]
    for a in arms:
        meta = read_optional_json(layout.arm_meta(a.name)) or {}
        recorded = meta.get("routes") if isinstance(meta.get("routes"), dict) else {}
        cfg_arm = next(x for x in cfg.arms if x.name == a.name)
        for r in routes:
            rec = recorded.get(r) or {}
            teacher = rec.get("teacher_name") or cfg_arm.routes(cfg.routing).get(r, "?")
            cons = {True: "yes", False: "no (ablation)"}.get(rec.get("consistent_teacher"), "unknown (not trained)")
            lines.append(f"| {a.name} | {a.mode} | {r} | {teacher} | {cfg.routing.teachers[r]} | {cons} |")
    return lines
