"""Stage ``eval``: held-out accuracy and reverse KL to a teacher for every model of the run.

Models are named ``base`` (the initial student), ``sft``, ``teacher:NAME`` and ``arm:NAME`` (an OPD arm's final
student). With ``eval.models`` empty every one whose directory exists is evaluated; otherwise exactly the listed
ones (a listed model that does not exist is an error). Each answers the held-out prompts with
``jopd.evaluation.evaluate_policy``; the reverse KL is to ``eval.kl_teacher`` (default: the SFT-data teacher),
loaded once. Writes ``RUN_DIR/eval/results.json``: ``{name: {accuracy, reverse_kl, ..., "path", "fingerprint",
"eval_seconds"}}``. Multi-teacher runs (``routing.field``): each route's prompts are evaluated against the route's
teacher (``eval.kl_teacher`` when set), and each result adds ``per_route`` {route: the route's own metrics}; its
``accuracy`` is over every prompt and its ``reverse_kl`` per token of every route's samples against their
teachers (jopd.multi_teacher.evaluate_routes).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from jopd.arms import kl_teacher_name
from jopd.evaluation import evaluate_policy
from jopd.io import atomic_write_json, read_jsonl
from jopd.multi_teacher import describe_routes, evaluate_routes, kl_teacher_names, prompt_routes
from jopd.pipeline import Run, StageError, numerics_inputs

log = logging.getLogger("jopd")


def candidate_models(run: Run) -> dict[str, Path]:
    """Every model name the run can have, in report order, with its directory (present or not)."""
    layout = run.layout
    out: dict[str, Path] = {"base": layout.student_base, "sft": layout.sft_model}
    out.update({f"teacher:{name}": layout.teacher(name) for name in run.cfg.teachers})
    out.update({f"arm:{arm.name}": layout.arm_model(arm.name) for arm in run.cfg.arms})
    return out


def models_to_evaluate(run: Run) -> dict[str, Path]:
    """The models this stage evaluates (module doc); StageError for requested ones that do not exist."""
    candidates = candidate_models(run)
    requested = run.cfg.eval.models
    if not requested:
        return {name: path for name, path in candidates.items() if (path / "config.json").is_file()}
    unknown = [m for m in requested if m not in candidates]
    if unknown:
        raise StageError(f"eval.models: unknown model name(s) {unknown}; known: {list(candidates)}")
    missing = [f"{m} ({candidates[m]})" for m in requested if not (candidates[m] / "config.json").is_file()]
    if missing:
        raise StageError(f"eval.models: these models do not exist (run the stages that make them first): "
                         f"{', '.join(missing)}")
    return {m: candidates[m] for m in requested}


def _kl_teachers(run: Run) -> dict[str | None, str]:
    """Route -> KL teacher (multi-teacher runs), or {None: the one KL teacher}."""
    return kl_teacher_names(run.cfg) if run.cfg.routing.enabled else {None: kl_teacher_name(run)}


def inputs(run: Run) -> dict[str, Any]:
    by_route = _kl_teachers(run)
    routed = {"kl_teacher_by_route": by_route} if run.cfg.routing.enabled else {}
    return {"eval": run.cfg.eval,
            "models": {name: run.fingerprint(path) for name, path in models_to_evaluate(run).items()},
            "kl_teacher": {t: run.fingerprint(run.layout.teacher(t)) for t in sorted(set(by_route.values()))},
            "numerics": numerics_inputs(run.cfg, logits_chunked=True), "prepare": run.upstream("prepare"), **routed}


def execute(run: Run) -> dict[str, Any]:
    cfg = run.cfg.eval
    models = models_to_evaluate(run)
    if not models:
        raise StageError("eval: no model to evaluate exists yet (run prepare first)")
    prompts = read_jsonl(run.layout.prompts("eval"))
    if not prompts:
        raise StageError(f"eval: {run.layout.prompts('eval')} is empty (task.num_eval_prompts = 0?)")
    by_route = _kl_teachers(run)
    for teacher_name in sorted(set(by_route.values())):
        if not (run.layout.teacher(teacher_name) / "config.json").is_file():
            raise StageError(f"eval: the KL teacher {teacher_name!r} has no model at {run.layout.teacher(teacher_name)}")
    kl_models = {t: run.load_teacher(t) for t in sorted(set(by_route.values()))}
    routes: list[str] = []
    if run.cfg.routing.enabled:  # each route's prompts against its own teacher
        try:
            routes = prompt_routes(prompts, run.cfg, str(run.layout.prompts("eval")))
        except ValueError as e:
            raise StageError(f"eval: {e}") from e
        teacher_name = f"routes ({describe_routes(by_route)})"
    else:
        teacher_name = by_route[None]
    log.info("eval: %d model(s) on %d held-out prompts; reverse KL to teacher %s", len(models), len(prompts),
             teacher_name)
    results: dict[str, Any] = {}
    bar = tqdm(models.items(), desc="eval", unit="model", disable=not run.is_main)
    for name, path in bar:
        bar.set_postfix_str(name)
        t0 = time.time()
        # A KL teacher itself is scored with the already-loaded copy.
        loaded = name.startswith("teacher:") and name[len("teacher:"):] in kl_models
        model = kl_models[name[len("teacher:"):]] if loaded else run.load_model(path)

        def on(rows: Any, kl_teacher: Any, model: Any = model) -> dict[str, Any]:
            return evaluate_policy(model, rows, run.tokenizer, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_p=cfg.top_p,
                                   samples_per_prompt=cfg.samples_per_prompt, batch_size=cfg.batch_size,
                                   seed=run.cfg.seed, kl_teacher=kl_teacher, kl_samples=cfg.kl_samples)

        if routes:
            metrics = evaluate_routes(on, prompts, routes, {r: kl_models[t] for r, t in by_route.items()})
        else:
            metrics = on(prompts, kl_models[teacher_name])
        del model
        metrics.update({"path": str(path), "fingerprint": run.fingerprint(path), "eval_seconds": time.time() - t0,
                        "kl_teacher": teacher_name})
        results[name] = metrics
        log.info("eval %-24s accuracy %.3f  reverse KL %.4f/token  eos %.2f  (%.1f s)", name, metrics["accuracy"],
                 metrics["reverse_kl"], metrics["eos_rate"], metrics["eval_seconds"])
    if run.is_main:
        atomic_write_json(run.layout.eval_results, results)
    return {name: {"accuracy": r["accuracy"], "reverse_kl": r["reverse_kl"],
                   **({"per_route": {route: {"accuracy": v["accuracy"], "reverse_kl": v["reverse_kl"]}
                                     for route, v in r["per_route"].items()}} if "per_route" in r else {})}
            for name, r in results.items()}
