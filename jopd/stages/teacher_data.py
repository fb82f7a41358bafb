"""Stage ``teacher_data``: the SFT-data teacher answers the SFT prompts; its responses become the SFT set.

Writes ``RUN_DIR/teacher_data/``:

- ``sft.jsonl``: one row per SFT prompt, ``{"prompt", "label", "prompt_ids", "response_ids", "response_text",
  "ended_with_eos"}``. ``response_ids`` are the exact ids the sampler produced (the stop id included when it was
  emitted), never re-tokenised text; ``response_text`` is their decoding, for humans only.
- ``meta.json``: ``{"teacher_name", "teacher_fingerprint", "tokenizer_fingerprint", "sampling", "num_rows"}``.
- ``parts/NNNNN.jsonl``: the same rows, one file per batch of ``teacher_data.batch_size`` prompts, each sampled
  with its own seed (``derive_seed(teacher_data.seed, part)``) and renamed into place when complete, so an
  interrupted run resumes at the first missing part and yields the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jopd.data import tokenizer as toklib
from jopd.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from jopd.pipeline import Run, StageError, barrier, derive_seed, numerics_inputs
from jopd.sampling import generate

log = logging.getLogger("jopd")


def inputs(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    return {"teacher_name": cfg.sft_teacher, "teacher_fingerprint": run.fingerprint(run.layout.teacher(cfg.sft_teacher)),
            "sampling": dataclasses.asdict(cfg.teacher_data), "numerics": numerics_inputs(cfg),
            "prepare": run.upstream("prepare")}


def execute(run: Run) -> dict[str, Any]:
    cfg, layout, s = run.cfg, run.layout, run.cfg.teacher_data
    name, tok = cfg.sft_teacher, run.tokenizer
    teacher_fp = run.fingerprint(layout.teacher(name))
    prompts = read_jsonl(layout.prompts("sft"))
    if not prompts:
        raise StageError(f"{layout.prompts('sft')} has no prompts")
    parts = layout.teacher_data_parts
    if run.is_main:
        parts.mkdir(parents=True, exist_ok=True)
    barrier("teacher_data-parts")

    batches = [(lo, min(lo + s.batch_size, len(prompts))) for lo in range(0, len(prompts), s.batch_size)]
    # Every process sees the same parts on the shared run directory, so they agree on what is left; all of them
    # take part in the (collective) sampling and process 0 alone writes.
    pending = [i for i in range(len(batches)) if not (parts / f"{i:05d}.jsonl").is_file()]
    t0, new_tokens = time.time(), 0
    if pending:
        model = run.load_teacher(name)
        stops = toklib.stop_ids(tok, model.config)
        log.info("teacher_data: teacher %s samples %d prompts (%d parts, %d left)", name, len(prompts), len(batches),
                 len(pending))
        t0 = time.time()  # throughput excludes loading (compilation stays in: it is part of the real cost)
        bar = tqdm(total=sum(batches[i][1] - batches[i][0] for i in pending), desc="teacher_data", unit="prompt",
                   disable=not run.is_main)
        for i in pending:
            lo, hi = batches[i]
            res = generate(model, [p["prompt_ids"] for p in prompts[lo:hi]], max_new_tokens=s.max_new_tokens,
                           temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_token_id=stops,
                           seed=derive_seed(s.seed, i), batch_size=s.batch_size)
            rows = []
            for j, p in enumerate(prompts[lo:hi]):
                ids = res.response(j)
                rows.append({"prompt": p["prompt"], "label": p["label"], "prompt_ids": p["prompt_ids"],
                             "response_ids": ids, "response_text": tok.decode(ids, skip_special_tokens=True),
                             "ended_with_eos": bool(res.ended_with_eos[j])})
            if run.is_main:
                atomic_write_jsonl(parts / f"{i:05d}.jsonl", rows)
            new_tokens += int(res.lengths.sum())
            bar.update(hi - lo)
        bar.close()
        del model
    seconds = time.time() - t0
    barrier("teacher_data-sampled")

    rows = [r for i in range(len(batches)) for r in read_jsonl(parts / f"{i:05d}.jsonl")]
    if len(rows) != len(prompts):
        raise StageError(f"{parts}: {len(rows)} rows for {len(prompts)} prompts (parts from another run?)")
    lengths = np.array([len(r["response_ids"]) for r in rows])
    if run.is_main:
        atomic_write_jsonl(layout.sft_jsonl, rows)
        atomic_write_json(layout.teacher_data_meta, {
            "teacher_name": name, "teacher_fingerprint": teacher_fp,
            "tokenizer_fingerprint": toklib.tokenizer_fingerprint(tok), "sampling": dataclasses.asdict(s),
            "num_rows": len(rows)})
    summary = {"num_rows": len(rows), "eos_rate": float(np.mean([r["ended_with_eos"] for r in rows])),
               "mean_response_len": float(lengths.mean()), "tokens": int(lengths.sum()),
               "tokens_sampled_this_run": new_tokens,
               "tokens_per_s": float(new_tokens / seconds) if new_tokens and seconds > 0 else None,
               "seconds": seconds, "teacher_name": name, "teacher_fingerprint": teacher_fp}
    log.info("teacher_data: %d rows, eos rate %.3f, mean response %.1f tokens", len(rows), summary["eos_rate"],
             summary["mean_response_len"])
    return summary
