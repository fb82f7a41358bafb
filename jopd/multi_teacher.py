"""Multi-teacher OPD (``routing.field`` / ``routing.teachers``, docs/multi-teacher.md): what the stages share.

Each prompt has a route (``prepare/prompts/*.jsonl`` rows carry ``"route"``) and each route a teacher: the one that
writes the route's SFT data (``routing.teachers``) and, for an arm, the one it distils the route from (the arm's
``teachers``, default ``routing.teachers``). Routes are always taken in sorted order.

- :func:`prompt_routes`: the routes of prepared prompt rows, checked against the run's routes;
- :func:`scored_routes`: the routes each teacher's precompute store holds (every route some mapping gives it);
- :func:`route_slices`: the store rows an arm trains on, route by route (``routes`` attr of a teacher store);
- :func:`evaluate_routes`: accuracy and reverse KL per route, each against its own teacher, and overall;
- :func:`route_inputs`: what the OPD stages' inputs add for routed arms (nothing for one-teacher runs).

Nothing here runs without ``routing.field``: one-teacher runs keep their code paths and fingerprints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jopd.data.routing import ROUTE

__all__ = ["describe_routes", "evaluate_routes", "kl_teacher_names", "prompt_routes", "route_inputs", "route_names",
           "route_slices", "routed_teacher_info", "scored_routes", "sft_teachers_record"]


def route_names(cfg: Any) -> list[str]:
    """The run's routes, in the order every stage takes them (sorted)."""
    return sorted(cfg.routing.teachers)


def describe_routes(routes: Mapping[str, str]) -> str:
    """``"1: A, 2: B"``: a route -> teacher map in one line (logs, reports, meta.json)."""
    return ", ".join(f"{r}: {t}" for r, t in sorted(routes.items()))


def prompt_routes(rows: Sequence[Mapping[str, Any]], cfg: Any, where: str) -> list[str]:
    """The route of every prepared prompt row (``where``: the file, for messages), each one of the run's routes.

    Raises ValueError when a row has no route (prepared without routing) or one the config does not map (the
    prepare stage refuses both first; this guards a changed config against an old run directory)."""
    routes = set(cfg.routing.teachers)
    out = []
    for i, row in enumerate(rows):
        route = row.get(ROUTE)
        if route is None:
            raise ValueError(f"{where} row {i}: no {ROUTE!r}: the prompts were prepared without routing; delete "
                             "the run's prepare directory (and the stages after it) to redo them")
        if route not in routes:
            raise ValueError(f"{where} row {i}: route {route!r} has no teacher in routing.teachers "
                             f"({sorted(routes)})")
        out.append(route)
    return out


def scored_routes(cfg: Any) -> dict[str, list[str]]:
    """Teacher -> the routes its precompute store holds: every route that routing.teachers or a lightning arm's
    ``teachers`` gives it (so the inconsistent-teacher ablation of a route has its teacher's scores)."""
    out: dict[str, set[str]] = {}
    maps = [cfg.routing.teachers] + [a.routes(cfg.routing) for a in cfg.arms if a.mode == "lightning"]
    for routes in maps:
        for route, teacher in routes.items():
            out.setdefault(teacher, set()).add(route)
    return {t: sorted(rs) for t, rs in sorted(out.items()) if t in cfg.precompute.teachers}


def sft_teachers_record(teachers: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """What the sft stage records of a multi-teacher SFT set (``teachers``: route -> {"teacher_name",
    "teacher_fingerprint"}): ``sft_teachers`` (per route, the consistency record of every route), and in
    ``sft_teacher_name`` / ``sft_teacher_fingerprint`` the map described and its fingerprint (the identity of
    the SFT data's teachers as a whole, e.g. in the rollout store's attrs)."""
    from jopd.pipeline import fingerprint

    routes = {r: dict(v) for r, v in sorted(teachers.items())}
    return {"sft_teacher_name": f"routes ({describe_routes({r: v['teacher_name'] for r, v in routes.items()})})",
            "sft_teacher_fingerprint": fingerprint({r: v["teacher_fingerprint"] for r, v in routes.items()}),
            "sft_teachers": routes}


def route_slices(store_attrs: Mapping[str, Any], route: str, path: str | Path) -> tuple[str, int, int]:
    """(store path, first row, end row) of ``route``'s rows in a teacher store (its ``routes`` attr)."""
    spans = store_attrs.get("routes") or {}
    if route not in spans:
        raise KeyError(f"{path} holds no rows of route {route!r} (its routes: {sorted(spans)})")
    lo, hi = spans[route]
    return str(path), int(lo), int(hi)


def routed_teacher_info(run: Any, arm: Any, mode: str, per_route: Mapping[str, Mapping[str, Any]],
                        **more: Any) -> dict[str, Any]:
    """A multi-teacher arm's teacher record for meta.json (like ``jopd.arms.teacher_info``): ``routes`` {route:
    {"teacher_name", "teacher_fingerprint", "consistent_teacher", ...}}, ``consistent_teacher`` = every route's,
    and the map described in ``teacher_name``."""
    from jopd.pipeline import fingerprint, sft_teacher

    sft_name, sft_fp = sft_teacher(run)
    routes = {r: dict(v) for r, v in sorted(per_route.items())}
    return {"mode": mode, "teacher_name": f"routes ({describe_routes({r: v['teacher_name'] for r, v in routes.items()})})",
            "teacher_fingerprint": fingerprint({r: v["teacher_fingerprint"] for r, v in routes.items()}),
            "sft_teacher_name": sft_name, "sft_teacher_fingerprint": sft_fp,
            "consistent_teacher": all(v["consistent_teacher"] for v in routes.values()), "routes": routes, **more}


def kl_teacher_names(cfg: Any) -> dict[str, str]:
    """Route -> the teacher the route's held-out reverse KL is measured against: ``eval.kl_teacher`` for every
    route when set, else the route's SFT-data teacher (routing.teachers)."""
    return {r: cfg.eval.kl_teacher or t for r, t in sorted(cfg.routing.teachers.items())}


def route_inputs(run: Any, arm_list: Sequence[Any]) -> dict[str, Any]:
    """What an OPD stage's inputs add for routed arms: ``{"routes": {arm: {route: teacher}}}`` (fingerprints of
    the teachers are checked against the stores and the SFT data when the arm runs), else nothing."""
    if not run.cfg.routing.enabled:
        return {}
    return {"routes": {a.name: a.routes(run.cfg.routing) for a in arm_list}}


# ------------------------------------------------------------------------------------------------ evaluation
_SUMMED = ("num_prompts", "num_responses", "num_correct", "generated_tokens", "kl_num_sequences",
           "kl_response_tokens")


def evaluate_routes(evaluate: Callable[[Sequence[Mapping[str, Any]], Any], dict[str, Any]],
                    prompts: Sequence[Mapping[str, Any]], routes: Sequence[str],
                    kl_teachers: Mapping[str, Any]) -> dict[str, Any]:
    """Held-out metrics of one model per route and overall.

    ``evaluate(prompts, kl_teacher)`` evaluates the model on some prompts against one teacher
    (`jopd.evaluation.evaluate_policy` with the run's settings); ``routes``: each prompt's route;
    ``kl_teachers``: route -> the teacher its reverse KL is measured against. Returns the overall metrics --
    ``accuracy`` over every prompt (``per_prompt_accuracy`` in prompt order), ``reverse_kl`` per response token of
    every route's samples against its own teacher, ``reverse_kl_seq`` per sample, the counts summed -- plus
    ``per_route``: {route: that route's own metrics (its samples and per-prompt accuracies kept)}.
    """
    routes = list(routes)
    per: dict[str, dict[str, Any]] = {}
    per_prompt = np.zeros(len(prompts), np.float64)
    for route in sorted(set(routes)):
        idx = [i for i, r in enumerate(routes) if r == route]
        res = evaluate([prompts[i] for i in idx], kl_teachers[route])
        per_prompt[idx] = res["per_prompt_accuracy"]
        per[route] = res
    n = len(prompts)
    out: dict[str, Any] = {k: sum(int(r.get(k, 0)) for r in per.values()) for k in _SUMMED if
                           all(k in r for r in per.values())}
    out["accuracy"] = float(per_prompt.mean())
    out["accuracy_se"] = float(per_prompt.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    out["per_prompt_accuracy"] = per_prompt.tolist()
    responses = sum(r["num_responses"] for r in per.values())
    out["eos_rate"] = float(sum(r["eos_rate"] * r["num_responses"] for r in per.values()) / responses)
    out["mean_response_len"] = float(sum(r["mean_response_len"] * r["num_responses"] for r in per.values())
                                     / responses)
    out["samples"] = [s for r in per.values() for s in r.get("samples", [])[:1]]
    if all("reverse_kl" in r for r in per.values()):
        tokens = sum(r["kl_response_tokens"] for r in per.values())
        seqs = sum(r["kl_num_sequences"] for r in per.values())
        out["reverse_kl"] = float(sum(r["reverse_kl"] * r["kl_response_tokens"] for r in per.values())
                                  / max(tokens, 1))
        out["reverse_kl_seq"] = float(sum(r["reverse_kl_seq"] * r["kl_num_sequences"] for r in per.values())
                                      / max(seqs, 1))
    out["per_route"] = per
    return out
