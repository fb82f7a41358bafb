"""Stage ``online``: standard (online) OPD, the baseline Lightning OPD is compared against.

Every arm with ``mode: online`` trains the SFT student with the same step and loop as the ``train`` stage, but
each batch is made fresh (``jopd.training.OnlineBatches``): the next ``opd.batch_size`` OPD prompts, answered by
the CURRENT student with the ``rollout`` sampling settings (stopping at the same stop ids as the rollouts), and
scored by the live teacher. The seconds spent generating, scoring and updating are recorded per step
(``gen_s``, ``score_s``, ``update_s``): the cost Lightning OPD removes. Batch s depends only on (seed, s), so a
resumed arm reproduces the uninterrupted one from its checkpoint's step.
"""

from __future__ import annotations

from typing import Any

from jopd import arms
from jopd.data import tokenizer as toklib
from jopd.io import read_jsonl
from jopd.models import ModelConfig
from jopd.pipeline import Run, check_teacher_consistency, check_tokenizer
from jopd.training import OnlineBatches, opd


def inputs(run: Run) -> dict[str, Any]:
    online = [a for a in run.cfg.arms if a.mode == "online"]
    if not online:
        return {"arms": []}
    r = run.cfg.rollout
    return {"opd": run.cfg.opd, "arms": online, "seed": run.cfg.seed, "precision": run.cfg.precision,
            "sampling": {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
                         "max_new_tokens": r.max_new_tokens},
            "teachers": {a.teacher: run.fingerprint(run.layout.teacher(a.teacher)) for a in online},
            "sft": run.upstream("sft"), "prepare": run.upstream("prepare"), **arms.objective_inputs(run, online),
            **arms.ppo_inputs(run)}


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
        check_tokenizer(run, layout.teacher(arm.teacher), f"teacher {arm.teacher!r}")
        teacher_fp = run.fingerprint(layout.teacher(arm.teacher))
        info = arms.teacher_info(run, arm, "online", teacher_fp, check_teacher_consistency(run, arm, teacher_fp),
                                 objective=arms.objective(run, arm))
        student = run.load_model(layout.sft_model)
        batches = OnlineBatches(prompts, student, teachers[arm.teacher], batch_size=cfg.opd.batch_size,
                                seed=cfg.seed, sampling=cfg.rollout, stop_ids=stops)
        model, loop = opd(student, batches, opd=cfg.opd, rows=cfg.opd.batch_size, ckpt_dir=layout.arm_ckpt(arm.name),
                          describe_batch=batches.describe, batch_phases=lambda b=batches: b.last_phases,
                          evaluate=evaluate, logger=arms.arm_logger(run, arm), name=f"arm {arm.name!r}",
                          hooks=[batches, *run.hooks], arm=arm, seed=cfg.seed)
        out[arm.name] = arms.finish_arm(run, arm, model, loop, info)
    return {"arms": out}
