"""Stage ``online``: standard (online) OPD, the baseline Lightning OPD is compared against.

Every arm with ``mode: online`` trains the SFT student with the same step and loop as the ``train`` stage, but
each batch is made fresh (``jopd.training.OnlineBatches``): the next ``opd.batch_size`` OPD prompts, answered by
the CURRENT student with the ``rollout`` sampling settings (stopping at the same stop ids as the rollouts), and
scored by the live teacher. The seconds spent generating, scoring and updating are recorded per step
(``gen_s``, ``score_s``, ``update_s``): the cost Lightning OPD removes. Batch s depends only on (seed, s), so a
resumed arm reproduces the uninterrupted one from its checkpoint's step. A multi-teacher arm (``routing.field``)
takes the prompts stratified by route and scores each row with the teacher it gives the row's route.
"""

from __future__ import annotations

from typing import Any

from jopd import arms
from jopd.data import tokenizer as toklib
from jopd.io import read_jsonl
from jopd.models import ModelConfig
from jopd.multi_teacher import prompt_routes, route_inputs, route_names, routed_teacher_info
from jopd.pipeline import Run, StageError, check_teacher_consistency, check_tokenizer
from jopd.training import OnlineBatches, opd


def inputs(run: Run) -> dict[str, Any]:
    online = [a for a in run.cfg.arms if a.mode == "online"]
    if not online:
        return {"arms": []}
    r = run.cfg.rollout
    return {"opd": run.cfg.opd, "arms": online, "seed": run.cfg.seed, "precision": run.cfg.precision,
            "sampling": {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
                         "max_new_tokens": r.max_new_tokens},
            "teachers": {t: run.fingerprint(run.layout.teacher(t)) for t in _teacher_names(run, online)},
            "sft": run.upstream("sft"), "prepare": run.upstream("prepare"), **arms.objective_inputs(run, online),
            **arms.ppo_inputs(run), **route_inputs(run, online), **arms.lora_inputs(run, online),
            **arms.periodic_eval_inputs(run)}


def _teacher_names(run: Run, arm_list: list[Any]) -> list[str]:
    """Every teacher the arms score with (each arm's, or every route's of a multi-teacher arm), in order."""
    if not run.cfg.routing.enabled:
        return list(dict.fromkeys(a.teacher for a in arm_list))
    return sorted({t for a in arm_list for t in a.routes(run.cfg.routing).values()})


def execute(run: Run) -> dict[str, Any]:
    cfg, layout = run.cfg, run.layout
    teachers = arms.Teachers(run)
    evaluate = arms.periodic_evaluator(run, teachers)
    prompts = read_jsonl(layout.prompts("opd"))
    stops = toklib.stop_ids(run.tokenizer, ModelConfig.from_pretrained(layout.sft_model))
    out: dict[str, Any] = {}
    for arm in (a for a in cfg.arms if a.mode == "online"):
        if (done := arms.completed_arm(run, arm)) is not None:
            out[arm.name] = done
            continue
        if cfg.routing.enabled:  # every row scored by its route's teacher
            names, per_route = route_names(cfg), {}
            for route, teacher in sorted(arm.routes(cfg.routing).items()):
                check_tokenizer(run, layout.teacher(teacher), f"teacher {teacher!r}")
                fp = run.fingerprint(layout.teacher(teacher))
                per_route[route] = {"teacher_name": teacher, "teacher_fingerprint": fp, "consistent_teacher":
                                    check_teacher_consistency(run, arm, fp, route=route, teacher=teacher)}
            info = routed_teacher_info(run, arm, "online", per_route, objective=arms.objective(run, arm))
            try:
                routes = prompt_routes(prompts, cfg, str(layout.prompts("opd")))
            except ValueError as e:
                raise StageError(f"arm {arm.name!r}: {e}") from e
            teacher: Any = [teachers[per_route[r]["teacher_name"]] for r in names]
            route_index: list[int] | None = [names.index(r) for r in routes]
        else:
            check_tokenizer(run, layout.teacher(arm.teacher), f"teacher {arm.teacher!r}")
            teacher_fp = run.fingerprint(layout.teacher(arm.teacher))
            info = arms.teacher_info(run, arm, "online", teacher_fp, check_teacher_consistency(run, arm, teacher_fp),
                                     objective=arms.objective(run, arm))
            teacher, route_index = teachers[arm.teacher], None
        student = arms.student(run, arm)
        batches = OnlineBatches(prompts, student, teacher, batch_size=cfg.opd.batch_size, seed=cfg.seed,
                                sampling=cfg.rollout, stop_ids=stops, routes=route_index)
        model, loop = opd(student, batches, opd=cfg.opd, rows=cfg.opd.batch_size, ckpt_dir=layout.arm_ckpt(arm.name),
                          describe_batch=batches.describe, batch_phases=lambda b=batches: b.last_phases,
                          evaluate=evaluate, logger=arms.arm_logger(run, arm), name=f"arm {arm.name!r}",
                          hooks=[batches, *run.hooks], arm=arm, seed=cfg.seed)
        out[arm.name] = arms.finish_arm(run, arm, model, loop, info)
    return {"arms": out}
