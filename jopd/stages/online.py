"""Stage ``online``: standard (online) OPD, the baseline Lightning OPD is compared against.

Every arm with ``mode: online`` trains the SFT student with the same jitted OPD step and loop as the ``train``
stage (:func:`jopd.stages.train.train_arm`), but each step first

1. takes the next ``opd.batch_size`` OPD prompts (cycling over the split; each pass is a fresh seeded
   permutation),
2. samples one response per prompt from the CURRENT student (``jopd.sampling.generate`` with the ``rollout``
   sampling settings, seed derived from ``(seed, step)``), and
3. scores every response token with the live teacher (loaded once and kept in memory),

then builds the same batch arrays as a Lightning batch (tokens right-padded to a static length, response
mask, teacher and behaviour log-probs). The seconds spent generating, scoring and updating are recorded per
step (``gen_s``, ``score_s``, ``update_s``) -- the cost Lightning OPD removes.

Resume: the checkpoint holds the prompt cursor besides the train state; sampling seeds depend only on
``(seed, step)``, so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import numpy as np

from jopd.data import tokenizer as toklib
from jopd.models import Model, token_logprobs
from jopd.stages.base import RunContext, StageError
from jopd.stages.train import (
    BatchSource,
    LightningStage,
    PeriodicEval,
    TeacherCache,
    check_teacher,
    sft_teacher,
    train_arm,
)

log = logging.getLogger("jopd")
SEQ_BUCKET = 64


def sample_seed(seed: int, step: int) -> int:
    """The sampling seed of step ``step``: a hash of (seed, step), so steps draw independent samples."""
    return int(np.random.SeedSequence([seed, step, 0x0B5]).generate_state(1)[0] % (2**31 - 1))


class OnlineSource:
    """Fresh student samples for the next prompts, scored by a live teacher."""

    data_iterator = None  # nothing for Grain to checkpoint: the cursor travels in the JSON extra

    def __init__(self, prompts: list[dict[str, Any]], student: Model, teacher: Model, *, batch_size: int,
                 seed: int, sampling: Any):
        if not prompts:
            raise StageError("online OPD: the opd prompt split is empty")
        self.prompts, self.student, self.teacher = prompts, student, teacher
        self.batch_size, self.seed, self.sampling = batch_size, seed, sampling
        longest_prompt = max(len(p["prompt_ids"]) for p in prompts)
        # One static length for every batch: the longest prompt plus a full-length response, rounded up.
        self.seq_len = -(-(longest_prompt + sampling.max_new_tokens) // SEQ_BUCKET) * SEQ_BUCKET
        self.cursor = 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def prompt_index(self, position: int) -> int:
        """Index of the prompt at global position ``position`` of the (cycled, per-pass shuffled) stream."""
        epoch, j = divmod(position, len(self.prompts))
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 0x0B5]).permutation(len(self.prompts))
            self._perm_epoch = epoch
        return int(self._perm[j])

    def next_batch(self, step: int, params: Any) -> tuple[dict[str, np.ndarray], str, dict[str, float]]:
        from jopd.sampling import generate

        ids = [self.prompt_index(self.cursor + i) for i in range(self.batch_size)]
        self.cursor += self.batch_size
        prompt_ids = [self.prompts[i]["prompt_ids"] for i in ids]
        sp = self.sampling
        t0 = time.perf_counter()
        res = generate(dataclasses.replace(self.student, params=params), prompt_ids,
                       max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                       eos_token_id=self.student.config.eos_token_id, seed=sample_seed(self.seed, step),
                       batch_size=self.batch_size)
        gen_s = time.perf_counter() - t0

        b, length = self.batch_size, self.seq_len
        tokens = np.zeros((b, length), np.int32)
        real = np.zeros((b, length), np.int32)
        response = np.zeros((b, length), np.int32)
        behaviour = np.zeros((b, length), np.float32)
        for r, (p, out, lps) in enumerate(zip(prompt_ids, res.tokens, res.logprobs, strict=True)):
            n_p, n_r = len(p), len(out)
            tokens[r, :n_p] = p
            tokens[r, n_p:n_p + n_r] = out
            real[r, :n_p + n_r] = 1
            response[r, n_p:n_p + n_r] = 1
            behaviour[r, n_p:n_p + n_r] = lps
        t1 = time.perf_counter()
        teacher_lp = np.asarray(jax.device_get(token_logprobs(self.teacher, tokens, real)), np.float32)
        score_s = time.perf_counter() - t1
        teacher_lp = np.where(response > 0, teacher_lp, np.float32(0))
        batch = {"tokens": tokens, "response_mask": response, "teacher_logprobs": teacher_lp,
                 "behaviour_logprobs": behaviour}
        return batch, f"opd prompt indices {ids}", {"gen_s": gen_s, "score_s": score_s}

    def extra_state(self) -> dict[str, Any]:
        return {"prompt_cursor": self.cursor}

    def load_extra(self, extra: dict[str, Any]) -> None:
        if "prompt_cursor" not in extra:
            raise StageError("online OPD checkpoint has no prompt_cursor; delete the arm's ckpt/ to restart it")
        self.cursor = int(extra["prompt_cursor"])


class OnlineStage(LightningStage):
    name = "online"
    mode = "online"

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        arms = self.arms(ctx)
        if not arms:
            return {"arms": []}
        r = ctx.cfg.rollout
        return {"opd": ctx.cfg.opd, "arms": arms, "seed": ctx.cfg.seed, "precision": ctx.cfg.precision,
                "sampling": {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
                             "max_new_tokens": r.max_new_tokens},
                "teachers": {a.teacher: ctx.teacher_fingerprint(a.teacher) for a in arms},
                "sft": ctx.upstream("sft"), "prepare": ctx.upstream("prepare")}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from jopd.stages.prepare import read_prompts

        arms = self.arms(ctx)
        if not arms:
            log.info("%s: no arm with mode %s", self.name, self.mode)
            return {"arms": {}}
        cfg = ctx.cfg
        teachers = TeacherCache(ctx)
        evaluator = PeriodicEval(ctx, teachers)
        sft_name, sft_fp = sft_teacher(ctx)
        prompts = read_prompts(ctx, "opd")
        run_tok = toklib.tokenizer_fingerprint(ctx.tokenizer)
        out: dict[str, Any] = {}
        for arm in arms:
            tdir = ctx.teacher_dir(arm.teacher)
            if (tdir / "tokenizer.json").is_file() and toklib.tokenizer_fingerprint(str(tdir)) != run_tok:
                raise StageError(f"arm {arm.name!r}: teacher {arm.teacher!r} ({tdir}) has a tokenizer whose "
                                 f"fingerprint differs from the run's ({run_tok})")
            teacher_fp = ctx.teacher_fingerprint(arm.teacher)
            consistent = check_teacher(ctx, arm, teacher_fp)
            info = {"mode": self.mode, "teacher_name": arm.teacher, "teacher_fingerprint": teacher_fp,
                    "sft_teacher_name": sft_name, "sft_teacher_fingerprint": sft_fp,
                    "consistent_teacher": consistent}

            def make_source(student: Model, arm=arm) -> BatchSource:
                return OnlineSource(prompts, student, teachers.get(arm.teacher), batch_size=cfg.opd.batch_size,
                                    seed=cfg.seed, sampling=cfg.rollout)

            out[arm.name] = train_arm(ctx, arm, make_source=make_source, teacher_info=info, evaluator=evaluator)
        return {"arms": out}


STAGE = OnlineStage()
