"""Stage ``eval``: held-out accuracy and reverse KL to a teacher for every model of the run.

Models are named ``base`` (the initial student), ``sft``, ``teacher:NAME`` and ``arm:NAME`` (an OPD arm's final
student). With ``eval.models`` empty every one whose directory exists is evaluated; otherwise exactly the listed
ones (a listed model that does not exist is an error). Each answers the held-out prompts with
``jopd.evaluation.evaluate_policy``; the reverse KL is to ``eval.kl_teacher`` (default: the SFT-data teacher),
loaded once. Writes ``RUN_DIR/eval/results.json``: ``{name: {accuracy, reverse_kl, ..., "path", "fingerprint",
"eval_seconds"}}``.
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


def inputs(run: Run) -> dict[str, Any]:
    teacher = kl_teacher_name(run)
    return {"eval": run.cfg.eval,
            "models": {name: run.fingerprint(path) for name, path in models_to_evaluate(run).items()},
            "kl_teacher": {teacher: run.fingerprint(run.layout.teacher(teacher))},
            "numerics": numerics_inputs(run.cfg, logits_chunked=True), "prepare": run.upstream("prepare")}


def execute(run: Run) -> dict[str, Any]:
    cfg = run.cfg.eval
    models = models_to_evaluate(run)
    if not models:
        raise StageError("eval: no model to evaluate exists yet (run prepare first)")
    prompts = read_jsonl(run.layout.prompts("eval"))
    if not prompts:
        raise StageError(f"eval: {run.layout.prompts('eval')} is empty (task.num_eval_prompts = 0?)")
    teacher_name = kl_teacher_name(run)
    if not (run.layout.teacher(teacher_name) / "config.json").is_file():
        raise StageError(f"eval: the KL teacher {teacher_name!r} has no model at {run.layout.teacher(teacher_name)}")
    kl_teacher = run.load_teacher(teacher_name)
    log.info("eval: %d model(s) on %d held-out prompts; reverse KL to teacher %s", len(models), len(prompts),
             teacher_name)
    results: dict[str, Any] = {}
    bar = tqdm(models.items(), desc="eval", unit="model", disable=not run.is_main)
    for name, path in bar:
        bar.set_postfix_str(name)
        t0 = time.time()
        # The KL teacher itself is scored against the already-loaded copy.
        model = kl_teacher if name == f"teacher:{teacher_name}" else run.load_model(path)
        metrics = evaluate_policy(model, prompts, run.tokenizer, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  samples_per_prompt=cfg.samples_per_prompt, batch_size=cfg.batch_size,
                                  seed=run.cfg.seed, kl_teacher=kl_teacher, kl_samples=cfg.kl_samples)
        del model
        metrics.update({"path": str(path), "fingerprint": run.fingerprint(path), "eval_seconds": time.time() - t0,
                        "kl_teacher": teacher_name})
        results[name] = metrics
        log.info("eval %-24s accuracy %.3f  reverse KL %.4f/token  eos %.2f  (%.1f s)", name, metrics["accuracy"],
                 metrics["reverse_kl"], metrics["eos_rate"], metrics["eval_seconds"])
    if run.is_main:
        atomic_write_json(run.layout.eval_results, results)
    return {name: {"accuracy": r["accuracy"], "reverse_kl": r["reverse_kl"]} for name, r in results.items()}
