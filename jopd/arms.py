"""OPD arms of a run: what the ``train`` (Lightning) and ``online`` stages share around ``jopd.training.opd``.

An arm starts from the SFT student, trains ``opd.steps`` steps on its batch source, and ends as
``arms/NAME/model`` (HF) plus ``arms/NAME/meta.json`` (mode, teacher and SFT-data teacher fingerprints, teacher
consistency, timings). A complete arm (meta.json with ``complete`` and the same step count) is skipped; an
interrupted one resumes from its checkpoint. Periodic evaluation (``opd.eval_every``) runs
``jopd.evaluation.evaluate_policy`` on the held-out prompts against the KL teacher.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jopd.config import LossWeightsSection
from jopd.evaluation import evaluate_policy
from jopd.io import atomic_write_json, read_json, read_jsonl
from jopd.loop import LoopState, MetricsLogger
from jopd.models import Model, lora, save_adapter, save_pretrained
from jopd.multi_teacher import evaluate_routes, kl_teacher_names, prompt_routes
from jopd.pipeline import Run, barrier, sft_teacher

log = logging.getLogger("jopd")


class Teachers:
    """Teachers loaded once per stage and shared (live scoring and the periodic reverse-KL evaluation)."""

    def __init__(self, run: Run):
        self.run, self._models = run, {}

    def __getitem__(self, name: str) -> Model:
        if name not in self._models:
            self._models[name] = self.run.load_teacher(name)
        return self._models[name]


def objective(run: Run, arm: Any) -> dict[str, Any]:
    """The arm's effective objective as recorded (meta.json, stage inputs): its loss weights, and the JSD beta
    when the JSD is on (it changes nothing otherwise)."""
    weights, beta = arm.objective(run.cfg.opd)
    return {"loss_weights": dataclasses.asdict(weights), **({"jsd_beta": beta} if weights.topk_jsd > 0 else {})}


def objective_inputs(run: Run, arm_list: list[Any]) -> dict[str, Any]:
    """What an OPD stage's inputs add for its arms' objectives: ``{"objectives": {arm: objective}}`` for the
    arms whose effective objective is not the default sampled-token one, else nothing. The objective fields
    are left out of the sections' reprs (the form in which ``opd`` and ``arms`` enter the inputs), so a run
    directory made before the top-k objectives existed keeps its fingerprints and an unused ``jsd_beta``
    changes nothing; changing what an arm optimises changes the stage's inputs (the usual refusal then asks
    for the arm to be re-trained)."""
    default = {"loss_weights": dataclasses.asdict(LossWeightsSection())}
    objectives = {a.name: obj for a in arm_list if (obj := objective(run, a)) != default}
    return {"objectives": objectives} if objectives else {}


def ppo_inputs(run: Run) -> dict[str, Any]:
    """What an OPD stage's inputs add for several PPO updates per batch: ``{"ppo": {"ppo_epochs": E,
    "mini_batches": M}}`` unless both are 1 (the fused default), else nothing. Like the objective fields they
    are out of the OPD section's repr, so existing run directories keep their fingerprints."""
    opd = run.cfg.opd
    if opd.ppo_epochs == 1 and opd.mini_batches == 1:
        return {}
    return {"ppo": {"ppo_epochs": opd.ppo_epochs, "mini_batches": opd.mini_batches}}


def periodic_eval_inputs(run: Run) -> dict[str, Any]:
    """What an OPD stage's inputs add when the periodic evaluation takes a subset of the eval prompts
    (``opd.eval_prompts``, out of the OPD section's repr like the fields above), else nothing."""
    n = run.cfg.opd.eval_prompts
    return {} if n is None else {"periodic_eval_prompts": n}


def refresh_inputs(run: Run, arm_list: list[Any]) -> dict[str, Any]:
    """What the train stage's inputs add for refresh schedules: ``{"refresh": {arm: N}}`` for the arms with
    N > 0, else nothing (out of the sections' reprs too, so existing run directories keep their fingerprints).
    The sampling and scoring settings a refresh uses are the rollout's and precompute's, already upstream."""
    every = {a.name: a.refresh(run.cfg.opd) for a in arm_list if a.refresh(run.cfg.opd)}
    return {"refresh": every} if every else {}


def lora_inputs(run: Run, arm_list: list[Any]) -> dict[str, Any]:
    """What an OPD stage's inputs add for LoRA students: ``{"lora": {arm: its lora settings}}`` for the arms with
    adapters (rank > 0), else nothing (out of the sections' reprs too, so existing run directories keep their
    fingerprints)."""
    on = {a.name: dataclasses.asdict(sec) for a in arm_list if (sec := a.lora_section(run.cfg.opd)).enabled}
    return {"lora": on} if on else {}


def student(run: Run, arm: Any) -> Model:
    """The student an arm trains: the SFT model, as a LoRA model (fresh adapters from the run's seed on its
    frozen weights, jopd.models.lora) when the arm has LoRA settings."""
    model = run.load_model(run.layout.sft_model)
    spec = arm.lora_section(run.cfg.opd).spec()
    return model if spec is None else lora.with_adapters(model, spec, seed=run.cfg.seed)


def kl_teacher_name(run: Run) -> str:
    return run.cfg.eval.kl_teacher or run.cfg.sft_teacher


def periodic_evaluator(run: Run, teachers: Teachers) -> Callable[[Model], dict[str, float]]:
    """``model -> {accuracy, reverse_kl, ...}`` on the held-out prompts (the first ``opd.eval_prompts`` of them when
    set) with the eval settings. Multi-teacher
    runs: each route's prompts against the route's teacher (jopd.multi_teacher.evaluate_routes), the overall
    metrics plus ``routes/ROUTE/accuracy``, ``routes/ROUTE/reverse_kl``, ... per route."""
    cfg = run.cfg.eval
    prompts = read_jsonl(run.layout.prompts("eval"))[: run.cfg.opd.eval_prompts]  # None: all of them
    routed = run.cfg.routing.enabled
    routes = prompt_routes(prompts, run.cfg, str(run.layout.prompts("eval"))) if routed else []

    def evaluate(model: Model) -> dict[str, float]:
        def on(rows: Any, teacher: Model) -> dict[str, Any]:
            return evaluate_policy(model, rows, run.tokenizer, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_p=cfg.top_p,
                                   samples_per_prompt=cfg.samples_per_prompt, batch_size=cfg.batch_size,
                                   seed=run.cfg.seed, kl_teacher=teacher, kl_samples=cfg.kl_samples)

        if not routed:
            res = on(prompts, teachers[kl_teacher_name(run)])
            return {k: float(v) for k, v in res.items() if isinstance(v, int | float | np.number)}
        res = evaluate_routes(on, prompts, routes,
                              {r: teachers[t] for r, t in kl_teacher_names(run.cfg).items()})
        out = {k: float(v) for k, v in res.items() if isinstance(v, int | float | np.number)}
        for route, r in res["per_route"].items():
            out.update({f"routes/{route}/{k}": float(v) for k, v in r.items()
                        if isinstance(v, int | float | np.number)})
        return out

    return evaluate


def completed_arm(run: Run, arm: Any) -> dict[str, Any] | None:
    """The meta.json of an arm finished with the configured step count, else None."""
    meta_path, model_dir = run.layout.arm_meta(arm.name), run.layout.arm_model(arm.name)
    if meta_path.is_file() and (model_dir / "config.json").is_file():
        meta = read_json(meta_path)
        if meta.get("complete") and meta.get("steps") == run.cfg.opd.steps:
            log.info("arm %s: already complete (skipped)", arm.name)
            return meta
    return None


def arm_logger(run: Run, arm: Any) -> MetricsLogger:
    return run.metrics_logger(f"arm_{arm.name}")


def teacher_info(run: Run, arm: Any, mode: str, teacher_fp: str, consistent: bool, **more: Any) -> dict[str, Any]:
    sft_name, sft_fp = sft_teacher(run)
    return {"mode": mode, "teacher_name": arm.teacher, "teacher_fingerprint": teacher_fp,
            "sft_teacher_name": sft_name, "sft_teacher_fingerprint": sft_fp, "consistent_teacher": consistent, **more}


def finish_arm(run: Run, arm: Any, model: Model, loop: LoopState, info: Mapping[str, Any]) -> dict[str, Any]:
    """Export the arm's student and record its meta.json; returns the arm summary."""
    model_dir = run.layout.arm_model(arm.name)
    # A LoRA student is saved merged (a normal HF directory, what eval / export / refresh read) and its adapter
    # alone (PEFT format, for the SFT model).
    save_pretrained(model, model_dir, tokenizer_dir=str(run.layout.tokenizer))
    if lora.is_lora(model.params):
        adapter_dir = run.layout.arm_adapter(arm.name)
        save_adapter(model, adapter_dir, base_model=str(run.layout.sft_model))
        info = {**info, "lora": {**lora.describe(model), "adapter_path": str(adapter_dir)}}
    barrier(f"arm-{arm.name}-export")
    steps = max(run.cfg.opd.steps, 1)
    summary = {**info, "arm": arm.name, "steps": run.cfg.opd.steps, "complete": True,
               "resumed_from_step": loop.start_step, "final_metrics": loop.last_metrics,
               "final_eval": loop.extra.get("last_eval", {}), "train_seconds": loop.seconds,
               "eval_seconds": loop.extra.get("eval_seconds", 0.0), "seconds_per_step": loop.seconds / steps,
               "seconds_per_step_by_phase": {k: v / steps for k, v in sorted(loop.phase_seconds.items())},
               "tokens": loop.tokens, "model_path": str(model_dir), "model_fingerprint": run.fingerprint(model_dir),
               "seed": run.cfg.seed}
    if run.is_main:
        atomic_write_json(run.layout.arm_meta(arm.name), summary)
    return summary
