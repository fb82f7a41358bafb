"""Stage ``train``: Lightning OPD (offline on-policy distillation) for every arm with ``mode: lightning``.

The student starts from the SFT model and trains on the *fixed* rollouts that the SFT student sampled once
(``rollout``), with the teacher log-probs precomputed once per token (``precompute/<teacher>/store``). Each step
reads a batch from the store (Grain loader, resumable), and runs ONE fused forward/backward
(``jopd.steps.make_opd_step``) with the per-token advantage ``A_t = teacher_lp - student_lp`` inside a
PPO-clipped surrogate. The behaviour log-probs stored with the rollouts feed the ``behaviour_*`` metrics (how
far the student has drifted from the policy that produced its training data).

Lightning OPD's guarantee rests on the teacher being *consistent*: the teacher that scores the rollouts must
be the one whose responses the student was fine-tuned on. The stage refuses otherwise (naming both teachers
and fingerprints) unless the arm explicitly allows it as an ablation, which is then recorded.

The loop itself (:func:`train_arm`) is shared with the ``online`` stage (standard OPD); only the batch source
differs (:class:`LightningSource` here, ``jopd.stages.online.OnlineSource`` there).

Resume: checkpoints (Orbax) hold params, optimizer state, step, the loader state (lightning) or the prompt
cursor (online), and the cumulative seconds; a re-run continues from the newest one and reaches the same
parameters as an uninterrupted run. Arms already finished (``arms/NAME/meta.json`` with ``complete``) are
skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jopd.checkpointing import Checkpointer
from jopd.config import ArmSection
from jopd.data import tokenizer as toklib
from jopd.models import Model, save_pretrained
from jopd.stages.base import RunContext, Stage, StageError, atomic_write_json, read_json
from jopd.stages.sft import local_rows, placed_state
from jopd.steps import OPDLossConfig, make_opd_step, optimizer_from_section, shard_batch

log = logging.getLogger("jopd")

OPD_FIELDS = ("tokens", "response_mask", "teacher_logprobs", "behaviour_logprobs")
# Step metrics copied from the jitted step into each metrics row (when present).
STEP_METRICS = ("loss", "advantage_mean", "reverse_kl", "clip_frac", "grad_norm", "entropy_est", "ratio_mean",
                "behaviour_ratio_mean", "behaviour_ratio_max", "behaviour_ess", "tis_clip_frac", "kl_ref")


def after_step(arm: str, step: int) -> None:
    """Called after every completed (and, when due, checkpointed) step. A seam for tests, which replace it
    to simulate an interruption; it does nothing in a normal run."""


# ------------------------------------------------------------------------------------------ consistency
def sft_teacher(ctx: RunContext) -> tuple[str | None, str]:
    """(name, fingerprint) of the teacher that wrote the SFT data, as recorded by the ``sft`` stage."""
    outputs = ctx.done_record("sft").get("outputs", {})
    if "sft_teacher_fingerprint" not in outputs:
        meta_path = ctx.stage_dir("sft") / "meta.json"
        outputs = read_json(meta_path) if meta_path.is_file() else {}
    fp = outputs.get("sft_teacher_fingerprint")
    if not fp:
        raise StageError(f"the sft stage in {ctx.run_dir} recorded no sft_teacher_fingerprint; re-run it")
    return outputs.get("sft_teacher_name"), fp


def check_teacher(ctx: RunContext, arm: ArmSection, teacher_fp: str) -> bool:
    """True if the arm's teacher is the SFT-data teacher; refuses (StageError) unless the arm allows it."""
    sft_name, sft_fp = sft_teacher(ctx)
    if teacher_fp == sft_fp:
        return True
    msg = (f"arm {arm.name!r}: its teacher {arm.teacher!r} (fingerprint {teacher_fp}) is not the teacher that "
           f"wrote the SFT data, {sft_name!r} (fingerprint {sft_fp}): the student was not fine-tuned on this "
           "teacher's responses, so OPD would distil from an inconsistent teacher")
    if not arm.allow_inconsistent_teacher:
        raise StageError(msg + f". Set allow_inconsistent_teacher: true on arm {arm.name!r} to run this ablation.")
    log.warning("%s (allowed by allow_inconsistent_teacher; recorded as consistent_teacher: false)", msg)
    return False


def teacher_store_path(ctx: RunContext, teacher: str) -> Path:
    return ctx.stage_dir("precompute") / teacher / "store"


def check_store(ctx: RunContext, arm: ArmSection) -> tuple[Path, dict[str, Any]]:
    """Open, vet (tokenizer, integrity) the arm's precomputed store -> (path, attrs)."""
    from jopd.data.store import RolloutStore, StoreError

    path = teacher_store_path(ctx, arm.teacher)
    try:
        store = RolloutStore.open(path)
    except StoreError as e:
        raise StageError(f"arm {arm.name!r}: cannot open the precomputed store of teacher {arm.teacher!r}: {e}") from e
    attrs = store.attrs
    run_tok = toklib.tokenizer_fingerprint(ctx.tokenizer)
    if attrs.get("tokenizer_fingerprint") != run_tok:
        raise StageError(f"arm {arm.name!r}: store {path} was made with tokenizer fingerprint "
                         f"{attrs.get('tokenizer_fingerprint')}, but the run's tokenizer ({ctx.tokenizer_dir()}) has "
                         f"{run_tok}: token ids would not mean the same thing")
    try:
        counts = store.verify()
    except StoreError as e:
        raise StageError(f"arm {arm.name!r}: the precomputed store {path} is corrupt or incomplete; re-run "
                         f"rollout/precompute (delete {path.parent}): {e}") from e
    log.info("arm %s: store %s verified (%s)", arm.name, path, counts)
    if not attrs.get("teacher_fingerprint"):
        raise StageError(f"arm {arm.name!r}: store {path} records no teacher_fingerprint")
    return path, attrs


# ------------------------------------------------------------------------------------------ batch sources
class BatchSource(Protocol):
    """Where an arm's batches come from (lightning: the store; online: fresh samples + a live teacher)."""

    data_iterator: Any  # a Grain iterator whose state is checkpointed, or None

    def next_batch(self, step: int, params: Any) -> tuple[dict[str, np.ndarray], str, dict[str, float]]:
        """Host arrays (this process's rows of global batch ``step``), a description of the rows for error
        messages, and the seconds spent per phase producing them."""
        ...

    def extra_state(self) -> dict[str, Any]:
        """JSON state saved in checkpoints (besides the data iterator)."""
        ...

    def load_extra(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""
        ...


class LightningSource:
    """Batches of the fixed rollouts with their stored teacher / behaviour log-probs (Grain loader)."""

    def __init__(self, store_path: Path, *, batch_size: int, seed: int, shuffle: bool):
        from jopd.data.loader import make_loader

        try:
            self.data_iterator = make_loader(store_path, global_batch_size=batch_size, seed=seed, shuffle=shuffle,
                                             seq_len="auto", fields=OPD_FIELDS + ("row_index",))
        except ValueError as e:  # e.g. fewer rows than one batch
            raise StageError(f"cannot read {store_path}: {e}") from e

    def next_batch(self, step: int, params: Any) -> tuple[dict[str, np.ndarray], str, dict[str, float]]:
        t0 = time.perf_counter()
        batch = dict(next(self.data_iterator))
        rows = batch.pop("row_index").tolist()
        return batch, f"store rows {rows}", {"data_s": time.perf_counter() - t0}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra(self, extra: dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------------------------------------- the loop
def loss_config(ctx: RunContext) -> OPDLossConfig:
    o = ctx.cfg.opd
    return OPDLossConfig(eps_low=o.eps_low, eps_high=o.eps_high, aggregation=o.aggregation,
                         normalize_advantages=o.normalize_advantages, kl_coef=o.kl_coef, tis_cap=o.tis_cap)


class TeacherCache:
    """Teachers loaded once per stage run and shared (live scoring and the periodic reverse-KL eval)."""

    def __init__(self, ctx: RunContext):
        self.ctx, self._models = ctx, {}

    def get(self, name: str) -> Model:
        if name not in self._models:
            self._models[name] = self.ctx.load_teacher(name)
        return self._models[name]


class PeriodicEval:
    """``jopd.evaluation.evaluate_policy`` on the eval prompts; disabled when ``opd.eval_every == 0`` or when
    the evaluation module is unavailable (warned once)."""

    def __init__(self, ctx: RunContext, teachers: TeacherCache):
        self.ctx, self.teachers = ctx, teachers
        self.every = ctx.cfg.opd.eval_every
        self._fn: Callable | None = None
        self._prompts: list[dict[str, Any]] | None = None
        if self.every > 0:
            try:
                from jopd.evaluation import evaluate_policy
            except ImportError as e:
                log.warning("periodic evaluation disabled: jopd.evaluation is unavailable (%s)", e)
            else:
                self._fn = evaluate_policy

    @property
    def enabled(self) -> bool:
        return self._fn is not None

    def due(self, step: int, total: int) -> bool:
        return self.enabled and (step == 0 or step == total or step % self.every == 0)

    def __call__(self, model: Model) -> dict[str, float]:
        from jopd.stages.prepare import read_prompts

        cfg = self.ctx.cfg
        if self._prompts is None:
            self._prompts = read_prompts(self.ctx, "eval")
        kl_teacher = self.teachers.get(cfg.eval.kl_teacher or cfg.sft_teacher)
        res = self._fn(model, self._prompts, self.ctx.tokenizer, max_new_tokens=cfg.eval.max_new_tokens,
                       temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                       samples_per_prompt=cfg.eval.samples_per_prompt, batch_size=cfg.eval.batch_size, seed=cfg.seed,
                       kl_teacher=kl_teacher, kl_samples=cfg.eval.kl_samples)
        return {f"eval/{k}": float(v) for k, v in res.items() if isinstance(v, int | float | np.number)}


def arm_meta_path(ctx: RunContext, arm: ArmSection) -> Path:
    return ctx.arm_dir(arm.name) / "meta.json"


def train_arm(ctx: RunContext, arm: ArmSection, *, make_source: Callable[[Model], BatchSource],
              teacher_info: dict[str, Any], evaluator: PeriodicEval) -> dict[str, Any]:
    """Run (or resume) one OPD arm to ``cfg.opd.steps`` and export its student; returns the arm summary.

    ``make_source(student)`` builds the batch source; ``teacher_info`` (mode, teacher name/fingerprint,
    consistent_teacher, ...) goes into meta.json and the summary.
    """
    cfg, opd = ctx.cfg, ctx.cfg.opd
    adir = ctx.arm_dir(arm.name)
    meta_path = arm_meta_path(ctx, arm)
    if meta_path.is_file() and (adir / "model" / "config.json").is_file():
        meta = read_json(meta_path)
        if meta.get("complete") and meta.get("steps") == opd.steps:
            log.info("arm %s: already complete (skipped)", arm.name)
            return meta

    student = ctx.load_model(ctx.sft_model_dir())
    mesh = student.mesh
    # The KL reference must be a separate copy: the state's params are donated to (consumed by) each step.
    ref_params = jax.tree.map(jnp.copy, student.params) if opd.kl_coef > 0 else None
    optimizer = optimizer_from_section(opd.optim, opd.steps)
    state = placed_state(student.params, optimizer, mesh)
    step_fn = make_opd_step(student.config, optimizer, loss_config(ctx), mesh=mesh, state=state,
                            batch_size=opd.batch_size, micro_batch_size=opd.micro_batch_size,
                            with_behaviour=True, with_ref=ref_params is not None)
    source = make_source(student)

    ckpt = Checkpointer(adir / "ckpt", keep=opd.keep_checkpoints, async_save=opd.async_checkpointing)
    start = ckpt.latest_step() or 0
    extra: dict[str, Any] = {}
    if start:
        state, extra = ckpt.restore(start, state, data_iterator=source.data_iterator)
        source.load_extra(extra)
        log.info("arm %s: resumed from the checkpoint of step %d", arm.name, start)
    metrics_log = ctx.metrics(f"arm_{arm.name}", resume_after_step=start if start else None)
    time_s = float(extra.get("time_s", 0.0))
    tokens = float(extra.get("tokens", 0.0))
    phase_s: dict[str, float] = dict(extra.get("phase_s", {}))
    eval_s = float(extra.get("eval_s", 0.0))
    last_eval: dict[str, float] = dict(extra.get("last_eval", {}))

    def run_eval(step: int) -> None:
        nonlocal eval_s, last_eval
        t0 = time.perf_counter()
        last_eval = evaluator(dataclasses.replace(student, params=state.params))
        eval_s += time.perf_counter() - t0
        metrics_log.log(step, {**last_eval, "time_s": time_s})
        log.info("arm %s step %d: %s", arm.name, step, {k: round(v, 4) for k, v in last_eval.items()})

    last: dict[str, float] = {}
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=opd.steps, initial=start, desc=f"arm {arm.name}", disable=not ctx.is_main_process,
                   leave=False)
    except ImportError:
        bar = None
    try:
        if start == 0 and evaluator.due(0, opd.steps):
            run_eval(0)
        for s in range(start, opd.steps):
            t0 = time.perf_counter()
            host, rows, phases = source.next_batch(s, state.params)
            t_update = time.perf_counter()
            args = (state, shard_batch(local_rows(host), mesh)) + ((ref_params,) if ref_params is not None else ())
            state, metrics = step_fn(*args)
            metrics = jax.device_get(metrics)  # waits for the step: update_s is the real device time
            phases["update_s"] = time.perf_counter() - t_update
            done = s + 1
            if bool(metrics["nonfinite"]):
                raise StageError(
                    f"arm {arm.name!r}: non-finite loss/gradient at step {done} (loss={float(metrics['loss'])}, "
                    f"grad_norm={float(metrics['grad_norm'])}); the update was skipped. Batch: {rows}")
            step_tokens = float(metrics["num_tokens"])
            if done % max(opd.checkpoint_every, 1) == 0 or done == opd.steps:
                ckpt_t = time.perf_counter()
                # Seconds up to and including this step go into the checkpoint, so a resumed run continues
                # the same time axis.
                pending = time_s + (ckpt_t - t0)
                ckpt.save(done, state, data_iterator=source.data_iterator,
                          extra={"time_s": pending, "tokens": tokens + step_tokens,
                                 "phase_s": {k: phase_s.get(k, 0.0) + phases.get(k, 0.0)
                                             for k in set(phase_s) | set(phases)},
                                 "eval_s": eval_s, "last_eval": last_eval, "time": time.time(),
                                 **source.extra_state()})
                phases["checkpoint_s"] = time.perf_counter() - ckpt_t
            step_s = time.perf_counter() - t0
            time_s += step_s
            tokens += step_tokens
            for k, v in phases.items():
                phase_s[k] = phase_s.get(k, 0.0) + v
            last = {k: float(metrics[k]) for k in STEP_METRICS if k in metrics}
            metrics_log.log(done, {**last, "tokens": step_tokens, "tokens/s": step_tokens / max(step_s, 1e-9),
                                   "time_s": time_s, "step_s": step_s, **phases})
            if evaluator.due(done, opd.steps):
                run_eval(done)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", rkl=f"{last['reverse_kl']:.4f}")
            if done % max(opd.log_every, 1) == 0:
                log.info("arm %s step %d/%d: loss %.4f reverse_kl %.4f grad_norm %.3f (%.2fs/step)", arm.name,
                         done, opd.steps, last["loss"], last["reverse_kl"], last["grad_norm"], step_s)
            after_step(arm.name, done)
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        metrics_log.close()

    final = dataclasses.replace(student, params=state.params)
    model_dir = adir / "model"
    save_pretrained(final, model_dir, tokenizer_dir=str(ctx.tokenizer_dir()))
    ctx.sync(f"arm-{arm.name}-export")
    steps_run = max(opd.steps, 1)
    summary = {
        **teacher_info, "arm": arm.name, "steps": opd.steps, "complete": True, "resumed_from_step": start,
        "final_metrics": last, "final_eval": last_eval, "train_seconds": time_s, "eval_seconds": eval_s,
        "seconds_per_step": time_s / steps_run,
        "seconds_per_step_by_phase": {k: v / steps_run for k, v in sorted(phase_s.items())},
        "tokens": tokens, "model_path": str(model_dir), "model_fingerprint": ctx.model_fingerprint(model_dir),
        "seed": cfg.seed,
    }
    if ctx.is_main_process:
        atomic_write_json(meta_path, summary)
    return summary


# ------------------------------------------------------------------------------------------------- stage
class LightningStage(Stage):
    name = "train"
    mode = "lightning"

    def arms(self, ctx: RunContext) -> list[ArmSection]:
        return [a for a in ctx.cfg.arms if a.mode == self.mode]

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        arms = self.arms(ctx)
        if not arms:
            return {"arms": []}
        return {"opd": ctx.cfg.opd, "arms": arms, "seed": ctx.cfg.seed, "precision": ctx.cfg.precision,
                "sft": ctx.upstream("sft"), "precompute": ctx.upstream("precompute")}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        arms = self.arms(ctx)
        if not arms:
            log.info("%s: no arm with mode %s", self.name, self.mode)
            return {"arms": {}}
        teachers = TeacherCache(ctx)
        evaluator = PeriodicEval(ctx, teachers)
        sft_name, sft_fp = sft_teacher(ctx)
        out: dict[str, Any] = {}
        for arm in arms:
            path, attrs = check_store(ctx, arm)
            consistent = check_teacher(ctx, arm, attrs["teacher_fingerprint"])
            info = {"mode": self.mode, "teacher_name": arm.teacher, "teacher_fingerprint": attrs["teacher_fingerprint"],
                    "sft_teacher_name": sft_name, "sft_teacher_fingerprint": sft_fp,
                    "consistent_teacher": consistent, "store": str(path)}
            opd = ctx.cfg.opd

            def make_source(student: Model, path: Path = path) -> BatchSource:
                return LightningSource(path, batch_size=opd.batch_size, seed=ctx.cfg.seed, shuffle=opd.shuffle)

            out[arm.name] = train_arm(ctx, arm, make_source=make_source, teacher_info=info, evaluator=evaluator)
        return {"arms": out}


STAGE = LightningStage()
