"""Stage ``train``: Lightning OPD (offline on-policy distillation) for every arm with ``mode: lightning``.

Each arm starts from the SFT student and trains on the *fixed* rollouts the SFT student sampled once, with the
teacher log-probs precomputed once per token (``precompute/<teacher>/store``): the store is vetted (tokenizer,
SHA-256 of every chunk), its teacher checked against the SFT-data teacher (teacher consistency: refused unless
the arm allows the ablation, then recorded), and ``jopd.training.opd`` runs the fused OPD step on the store's
batches (padded, or packed with ``opd.token_budget``). Resumes from the arm's checkpoint, loader position
included; complete arms are skipped (see jopd.arms). An arm with top-k objectives (``loss_weights.topk_*``)
also reads the store's ``teacher_topk_ids`` / ``teacher_topk_logprobs`` (docs/topk-objectives.md). An arm with
a refresh schedule (``refresh_every`` N > 0) trains steps 1..N on that store and every later N steps on a new
generation its current student samples and its teacher scores (jopd.rollouts.refreshing_batches); meta.json
records each generation's cost and teacher consistency (``refresh``). A multi-teacher arm (``routing.field``)
trains on every route's rows in the store of the teacher it gives the route (``StoreSlices``: each batch holds
the routes in proportion to their rows), each route's teacher checked against the one that wrote the route's SFT
data; meta.json records them per route (``routes``).
"""

from __future__ import annotations

import logging
from typing import Any

from jopd import arms
from jopd.data import tokenizer as toklib
from jopd.data.loader import TOPK_FIELDS, StoreSlices
from jopd.data.store import RolloutStore, StoreError
from jopd.models import ModelConfig
from jopd.multi_teacher import route_inputs, route_slices, routed_teacher_info
from jopd.pipeline import Run, StageError, check_teacher_consistency
from jopd.rollouts import refresh_summary, refreshing_batches
from jopd.training import OPD_FIELDS, opd, store_batches

log = logging.getLogger("jopd")


def _checked_store(run: Run, arm: Any, teacher: str | None = None) -> dict[str, Any]:
    """The precomputed store of the arm's teacher (or of ``teacher``, one of a multi-teacher arm's) vetted
    (tokenizer, integrity, teacher record) -> its attrs."""
    teacher = arm.teacher if teacher is None else teacher
    path = run.layout.teacher_store(teacher)
    try:
        store = RolloutStore.open(path)
        attrs = store.attrs
        run_tok = toklib.tokenizer_fingerprint(run.tokenizer)
        if attrs.get("tokenizer_fingerprint") != run_tok:
            raise StageError(f"arm {arm.name!r}: store {path} was made with tokenizer fingerprint "
                             f"{attrs.get('tokenizer_fingerprint')}, but the run's tokenizer ({run.layout.tokenizer}) "
                             f"has {run_tok}: token ids would not mean the same thing")
        counts = store.verify()
    except StoreError as e:
        raise StageError(f"arm {arm.name!r}: the precomputed store {path} of teacher {teacher!r} is unusable; "
                         f"re-run rollout/precompute (delete {path.parent}): {e}") from e
    log.info("arm %s: store %s verified (%s)", arm.name, path, counts)
    if not attrs.get("teacher_fingerprint"):
        raise StageError(f"arm {arm.name!r}: store {path} records no teacher_fingerprint")
    if arm.objective(run.cfg.opd)[0].uses_topk:
        if store.topk <= 0:
            raise StageError(f"arm {arm.name!r}: its top-k objectives need the teacher's top-k, but store {path} "
                             f"holds none (topk 0); set precompute.topk > 0 and re-run precompute")
        teacher_vocab = ModelConfig.from_pretrained(run.layout.teacher(teacher)).vocab_size
        student_vocab = ModelConfig.from_pretrained(run.layout.sft_model).vocab_size
        if teacher_vocab > student_vocab:
            raise StageError(f"arm {arm.name!r}: teacher {teacher!r} has vocab_size {teacher_vocab} > the "
                             f"student's {student_vocab}: its stored top-k ids may name no student token")
    return attrs


def _routed_source(run: Run, arm: Any) -> tuple[StoreSlices, dict[str, dict[str, Any]]]:
    """A multi-teacher arm's rows: every route's rows in the store of the teacher the arm gives it, each teacher
    store vetted and each route's teacher checked against the teacher that wrote the route's SFT data. Returns
    the slices (one part per route, routes sorted) and {route: teacher record}."""
    parts, per_route = [], {}
    for route, teacher in sorted(arm.routes(run.cfg.routing).items()):
        attrs = _checked_store(run, arm, teacher)
        path = run.layout.teacher_store(teacher)
        fp = attrs["teacher_fingerprint"]
        consistent = check_teacher_consistency(run, arm, fp, route=route, teacher=teacher)
        try:
            part = route_slices(attrs, route, path)
        except KeyError as e:
            raise StageError(f"arm {arm.name!r}: {e.args[0]}; re-run precompute (delete {path.parent})") from e
        per_route[route] = {"teacher_name": teacher, "teacher_fingerprint": fp, "store": str(path),
                            "rows": part[2] - part[1], "consistent_teacher": consistent}
        parts.append(part)
    return StoreSlices(tuple(parts)), per_route


def inputs(run: Run) -> dict[str, Any]:
    lightning = [a for a in run.cfg.arms if a.mode == "lightning"]
    if not lightning:
        return {"arms": []}
    return {"opd": run.cfg.opd, "arms": lightning, "seed": run.cfg.seed, "precision": run.cfg.precision,
            "sft": run.upstream("sft"), "precompute": run.upstream("precompute"),
            **arms.objective_inputs(run, lightning), **arms.ppo_inputs(run), **arms.refresh_inputs(run, lightning),
            **arms.lora_inputs(run, lightning), **arms.periodic_eval_inputs(run),
            **route_inputs(run, lightning)}


def execute(run: Run) -> dict[str, Any]:
    cfg, layout = run.cfg, run.layout
    teachers = arms.Teachers(run)
    evaluate = arms.periodic_evaluator(run, teachers)
    out: dict[str, Any] = {}
    for arm in (a for a in cfg.arms if a.mode == "lightning"):
        if (done := arms.completed_arm(run, arm)) is not None:
            out[arm.name] = done
            continue
        if cfg.routing.enabled:
            source, per_route = _routed_source(run, arm)
            info = routed_teacher_info(run, arm, "lightning", per_route, objective=arms.objective(run, arm))
        else:
            attrs = _checked_store(run, arm)
            consistent = check_teacher_consistency(run, arm, attrs["teacher_fingerprint"])
            source = layout.teacher_store(arm.teacher)
            info = arms.teacher_info(run, arm, "lightning", attrs["teacher_fingerprint"], consistent,
                                     store=str(source), objective=arms.objective(run, arm))
        fields = OPD_FIELDS + (TOPK_FIELDS if arm.objective(cfg.opd)[0].uses_topk else ())
        try:
            data = store_batches(source, batch_size=cfg.opd.batch_size, token_budget=cfg.opd.token_budget,
                                 row_len=cfg.opd.row_len, seed=cfg.seed, num_steps=cfg.opd.steps, fields=fields,
                                 shuffle=cfg.opd.shuffle)
        except ValueError as e:  # e.g. fewer rows than one batch
            raise StageError(f"arm {arm.name!r}: cannot batch {source}: {e}") from e
        student = arms.student(run, arm)
        batches, extra_hooks, phases = data, [], None
        if arm.refresh(cfg.opd):
            batches = refreshing_batches(run, arm, data, student=student, teacher=teachers.__getitem__,
                                         fields=fields)
            extra_hooks, phases = [batches], (lambda b=batches: b.last_phases)
        model, loop = opd(student, batches, opd=cfg.opd, rows=data.rows, packed=data.packed,
                          ckpt_dir=layout.arm_ckpt(arm.name), data_iterator=data.data_iterator,
                          describe_batch=batches.describe, batch_phases=phases, evaluate=evaluate,
                          logger=arms.arm_logger(run, arm), name=f"arm {arm.name!r}",
                          hooks=[*extra_hooks, *run.hooks], arm=arm, seed=cfg.seed)
        if arm.refresh(cfg.opd):
            info = {**info, "refresh": refresh_summary(run, arm)}
        out[arm.name] = arms.finish_arm(run, arm, model, loop, info)
    return {"arms": out}
