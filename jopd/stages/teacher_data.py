"""Stage ``teacher_data``: the SFT-data teacher answers the SFT prompts; its responses become the SFT set.

Writes ``RUN_DIR/teacher_data/``:

- ``sft.jsonl``: one row per SFT prompt, ``{"prompt", "label", "prompt_ids", "response_ids", "response_text",
  "ended_with_eos"}``. ``response_ids`` are the exact ids the sampler produced (the end-of-turn id included
  when it was emitted), never re-tokenised text; ``response_text`` is their decoding, for humans only.
- ``meta.json``: ``{"teacher_name", "teacher_fingerprint", "tokenizer_fingerprint", "sampling", "num_rows"}``.
- ``parts/NNNNN.jsonl``: the same rows, one file per batch of ``teacher_data.batch_size`` prompts. Each part is
  sampled with its own seed derived from (``teacher_data.seed``, part index) and renamed into place when
  complete, so an interrupted run resumes at the first missing part and yields the same bytes as an
  uninterrupted one.

Also home of small helpers the other generation stages (rollout, precompute) share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jopd.data import tokenizer as toklib
from jopd.stages.base import RunContext, Stage, StageError, atomic_write_json, iter_batches
from jopd.stages.prepare import read_prompts

log = logging.getLogger("jopd")


# ---- helpers shared by the generation stages ---------------------------------------------------------
def derive_seed(seed: int, index: int) -> int:
    """A sampling seed for unit ``index`` (a part / a store chunk) of a run seeded with ``seed``.

    `jopd.sampling.generate` keys row ``i`` of a call by ``fold_in(seed, i)``, so calls that share a seed would
    repeat their random streams row by row; hashing (seed, index) gives every unit an independent stream that
    depends only on its index, which is what makes a resumed run reproduce an uninterrupted one.
    """
    digest = hashlib.sha256(f"jopd:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def stop_ids(tokenizer: Any, model_config: Any) -> tuple[int, ...]:
    """Ids that end a response: the chat template's end-of-turn id plus the model config's eos ids."""
    return tuple(sorted({toklib.end_of_turn_id(tokenizer)} | {int(e) for e in model_config.eos_token_id}))


def numerics_inputs(ctx: RunContext, *, logits_chunked: bool = False) -> dict[str, Any]:
    """Precision settings that change sampled tokens / computed log-probs (so they belong to stage inputs).

    ``logits_chunked``: the stage computes log-probs with the chunked head (`token_logprobs`), whose chunk size
    can change the last bits; sampling does not use it.
    """
    p = ctx.cfg.precision
    out: dict[str, Any] = {"param_dtype": p.param_dtype, "teacher_dtype": p.teacher_dtype,
                           "compute_dtype": p.compute_dtype, "attention_impl": p.attention_impl}
    if logits_chunked:
        out["logits_chunk_size"] = p.logits_chunk_size
    return out


def run_relative(ctx: RunContext, path: str | os.PathLike) -> str:
    """``path`` relative to the run directory when inside it (records stay valid if the run dir moves)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ctx.run_dir.resolve()))
    except ValueError:
        return str(path)


def sampling_settings(section: Any) -> dict[str, Any]:
    """The sampling fields of a config section (SamplingSection / RolloutSection) as a plain dict."""
    return dataclasses.asdict(section)


# ---- the stage ------------------------------------------------------------------------------------------
def _write_part(path: Path, rows: list[dict[str, Any]]) -> None:
    """Writes a part atomically: a crash leaves either no part or a complete one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class TeacherDataStage(Stage):
    name = "teacher_data"

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        cfg = ctx.cfg
        return {"teacher_name": cfg.sft_teacher, "teacher_fingerprint": ctx.teacher_fingerprint(cfg.sft_teacher),
                "sampling": sampling_settings(cfg.teacher_data), "numerics": numerics_inputs(ctx),
                "prepare": ctx.upstream("prepare")}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from jopd.sampling import generate

        cfg = ctx.cfg
        s = cfg.teacher_data
        sdir = ctx.stage_dir(self.name)
        parts_dir = sdir / "parts"
        name = cfg.sft_teacher
        teacher_fp = ctx.teacher_fingerprint(name)
        tok = ctx.tokenizer
        prompts = read_prompts(ctx, "sft")
        if not prompts:
            raise StageError(f"{ctx.stage_dir('prepare')}/prompts/sft.jsonl has no prompts")
        if ctx.is_main_process:
            parts_dir.mkdir(parents=True, exist_ok=True)
        ctx.sync("teacher_data-parts")

        batches = list(iter_batches(len(prompts), s.batch_size))
        # Every process sees the same parts on the shared run directory, so they agree on what is left; all of
        # them take part in the (collective) sampling and process 0 alone writes.
        pending = [i for i in range(len(batches)) if not (parts_dir / f"{i:05d}.jsonl").is_file()]
        model = ctx.load_teacher(name) if pending else None
        t0 = time.time()  # throughput excludes loading (compilation stays in: it is part of the real cost)
        new_tokens = 0
        if model is not None:
            eos = stop_ids(tok, model.config)
            log.info("teacher_data: teacher %s samples %d prompts (%d parts, %d left)", name, len(prompts),
                     len(batches), len(pending))
            bar = tqdm(total=sum(batches[i][1] - batches[i][0] for i in pending), desc="teacher_data",
                       unit="prompt", disable=not ctx.is_main_process)
            for i in pending:
                lo, hi = batches[i]
                res = generate(model, [p["prompt_ids"] for p in prompts[lo:hi]], max_new_tokens=s.max_new_tokens,
                               temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_token_id=eos,
                               seed=derive_seed(s.seed, i), batch_size=s.batch_size)
                rows = [{"prompt": p["prompt"], "label": p["label"], "prompt_ids": p["prompt_ids"],
                         "response_ids": [int(t) for t in ids],
                         "response_text": tok.decode(ids, skip_special_tokens=True),
                         "ended_with_eos": bool(e)}
                        for p, ids, e in zip(prompts[lo:hi], res.tokens, res.ended_with_eos)]
                if ctx.is_main_process:
                    _write_part(parts_dir / f"{i:05d}.jsonl", rows)
                new_tokens += sum(len(ids) for ids in res.tokens)
                bar.update(hi - lo)
            bar.close()
            del model
        seconds = time.time() - t0
        ctx.sync("teacher_data-sampled")

        rows = [r for i in range(len(batches)) for r in _read_jsonl(parts_dir / f"{i:05d}.jsonl")]
        if len(rows) != len(prompts):
            raise StageError(f"{parts_dir}: {len(rows)} rows for {len(prompts)} prompts (parts from another run?)")
        lengths = np.array([len(r["response_ids"]) for r in rows])
        summary = {
            "num_rows": len(rows),
            "eos_rate": float(np.mean([r["ended_with_eos"] for r in rows])),
            "mean_response_len": float(lengths.mean()),
            "tokens": int(lengths.sum()),
            "tokens_sampled_this_run": int(new_tokens),
            "tokens_per_s": float(new_tokens / seconds) if new_tokens and seconds > 0 else None,
            "seconds": seconds,
            "teacher_name": name,
            "teacher_fingerprint": teacher_fp,
        }
        if ctx.is_main_process:
            _write_part(sdir / "sft.jsonl", rows)
            atomic_write_json(sdir / "meta.json", {
                "teacher_name": name, "teacher_fingerprint": teacher_fp,
                "tokenizer_fingerprint": toklib.tokenizer_fingerprint(tok),
                "sampling": sampling_settings(s), "num_rows": len(rows)})
        log.info("teacher_data: %d rows, eos rate %.3f, mean response %.1f tokens", len(rows),
                 summary["eos_rate"], summary["mean_response_len"])
        return summary


STAGE = TeacherDataStage()

__all__ = ["STAGE", "TeacherDataStage", "derive_seed", "numerics_inputs", "run_relative", "sampling_settings",
           "stop_ids"]
