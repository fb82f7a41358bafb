"""Stage ``eval``: held-out accuracy and reverse KL to a teacher for every model of the run.

Models are named ``base`` (the initial student), ``sft`` (the SFT student), ``teacher:NAME`` and ``arm:NAME``
(an OPD arm's final student). With ``eval.models`` empty every one whose directory exists is evaluated;
otherwise exactly the listed ones, and a listed model that does not exist is an error.

Each model answers the held-out prompts (``prepare/prompts/eval.jsonl``) with
:func:`jopd.evaluation.evaluate_policy`; the reverse KL is measured against ``eval.kl_teacher`` (default: the
SFT-data teacher), loaded once. Writes ``RUN_DIR/eval/results.json``:
``{name: {accuracy, reverse_kl, ..., "path", "fingerprint", "eval_seconds"}}``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from jopd.evaluation import evaluate_policy
from jopd.stages.base import RunContext, Stage, StageError, atomic_write_json
from jopd.stages.prepare import read_prompts

log = logging.getLogger("jopd")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def candidate_models(ctx: RunContext) -> dict[str, Path]:
    """Every model name the run can have, in report order, with its directory (present or not)."""
    cfg = ctx.cfg
    out: dict[str, Path] = {"base": ctx.student_base_dir(), "sft": ctx.sft_model_dir()}
    for name in cfg.teachers:
        out[f"teacher:{name}"] = ctx.teacher_dir(name)
    for arm in cfg.arms:
        out[f"arm:{arm.name}"] = ctx.arm_dir(arm.name) / "model"
    return out


def models_to_evaluate(ctx: RunContext) -> dict[str, Path]:
    """The models this stage evaluates (see the module doc); raises StageError for missing requested ones."""
    candidates = candidate_models(ctx)
    requested = ctx.cfg.eval.models
    if not requested:
        return {name: path for name, path in candidates.items() if _is_model_dir(path)}
    unknown = [m for m in requested if m not in candidates]
    if unknown:
        raise StageError(f"eval.models: unknown model name(s) {unknown}; known: {list(candidates)}")
    missing = [f"{m} ({candidates[m]})" for m in requested if not _is_model_dir(candidates[m])]
    if missing:
        raise StageError(f"eval.models: these models do not exist (run the stages that make them first): "
                         f"{', '.join(missing)}")
    return {m: candidates[m] for m in requested}


def kl_teacher_name(ctx: RunContext) -> str:
    return ctx.cfg.eval.kl_teacher or ctx.cfg.sft_teacher


class EvalStage(Stage):
    name = "eval"

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        models = models_to_evaluate(ctx)
        p = ctx.cfg.precision
        return {
            "eval": ctx.cfg.eval,
            "models": {name: ctx.model_fingerprint(path) for name, path in models.items()},
            "kl_teacher": {kl_teacher_name(ctx): ctx.teacher_fingerprint(kl_teacher_name(ctx))},
            "numerics": {"param_dtype": p.param_dtype, "teacher_dtype": p.teacher_dtype,
                         "compute_dtype": p.compute_dtype,
                         "attention_impl": p.attention_impl, "logits_chunk_size": p.logits_chunk_size},
            "prepare": ctx.upstream("prepare"),
        }

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg = ctx.cfg.eval
        models = models_to_evaluate(ctx)
        if not models:
            raise StageError("eval: no model to evaluate exists yet (run prepare first)")
        prompts = read_prompts(ctx, "eval")
        if not prompts:
            raise StageError("eval: prepare/prompts/eval.jsonl is empty (task.num_eval_prompts = 0?)")
        teacher_name = kl_teacher_name(ctx)
        teacher_dir = ctx.teacher_dir(teacher_name)
        if not _is_model_dir(teacher_dir):
            raise StageError(f"eval: the KL teacher {teacher_name!r} has no model at {teacher_dir}")
        kl_teacher = ctx.load_teacher(teacher_name)
        tokenizer = ctx.tokenizer
        log.info("eval: %d model(s) on %d held-out prompts; reverse KL to teacher %s",
                 len(models), len(prompts), teacher_name)

        results: dict[str, Any] = {}
        bar = tqdm(models.items(), desc="eval", unit="model", disable=not ctx.is_main_process)
        for name, path in bar:
            bar.set_postfix_str(name)
            t0 = time.time()
            # The KL teacher itself is scored against the already-loaded copy.
            model = kl_teacher if name == f"teacher:{teacher_name}" else ctx.load_model(path)
            metrics = evaluate_policy(model, prompts, tokenizer, max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, top_p=cfg.top_p,
                                      samples_per_prompt=cfg.samples_per_prompt, batch_size=cfg.batch_size,
                                      seed=ctx.cfg.seed, kl_teacher=kl_teacher, kl_samples=cfg.kl_samples)
            del model
            metrics.update({"path": str(path), "fingerprint": ctx.model_fingerprint(path),
                            "eval_seconds": time.time() - t0, "kl_teacher": teacher_name})
            results[name] = metrics
            log.info("eval %-24s accuracy %.3f  reverse KL %.4f/token  eos %.2f  (%.1f s)", name,
                     metrics["accuracy"], metrics["reverse_kl"], metrics["eos_rate"], metrics["eval_seconds"])
        if ctx.is_main_process:
            atomic_write_json(ctx.stage_dir(self.name) / "results.json", results)
        return {name: {"accuracy": r["accuracy"], "reverse_kl": r["reverse_kl"]} for name, r in results.items()}


STAGE = EvalStage()
