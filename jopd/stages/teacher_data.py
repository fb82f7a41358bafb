"""Stage ``teacher_data``: the SFT-data teacher answers the SFT prompts; its responses become the SFT set.

Multi-teacher runs (``routing.field``): each prompt is answered by its route's teacher (``routing.teachers``);
the rows add ``route`` and ``teacher_name`` and meta.json records every route's teacher and fingerprint
(``teachers``: {route: {"teacher_name", "teacher_fingerprint"}}) instead of one teacher.

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
from jopd.data.routing import ROUTE
from jopd.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from jopd.multi_teacher import prompt_routes
from jopd.pipeline import Run, StageError, barrier, derive_seed, numerics_inputs
from jopd.sampling import generate

log = logging.getLogger("jopd")


def _route_teachers(run: Run) -> dict[str, dict[str, str]]:
    """Multi-teacher runs: route -> {"teacher_name", "teacher_fingerprint"} of the teacher writing its SFT data."""
    return {route: {"teacher_name": t, "teacher_fingerprint": run.fingerprint(run.layout.teacher(t))}
            for route, t in sorted(run.cfg.routing.teachers.items())}


def inputs(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    if cfg.routing.enabled:
        who: dict[str, Any] = {"routing_field": cfg.routing.field, "routes": _route_teachers(run)}
    else:
        who = {"teacher_name": cfg.sft_teacher,
               "teacher_fingerprint": run.fingerprint(run.layout.teacher(cfg.sft_teacher))}
    return {**who, "sampling": dataclasses.asdict(cfg.teacher_data), "numerics": numerics_inputs(cfg),
            "prepare": run.upstream("prepare")}


def _assignments(run: Run, prompts: list[dict[str, Any]]) -> list[tuple[str, list[int]]]:
    """(teacher, the indices of the SFT prompts it answers), teachers in sorted order: ``sft_teacher`` answers
    every prompt; with routing, each route's teacher answers the route's prompts."""
    cfg = run.cfg
    if not cfg.routing.enabled:
        return [(cfg.sft_teacher, list(range(len(prompts))))]
    try:
        routes = prompt_routes(prompts, cfg, str(run.layout.prompts("sft")))
    except ValueError as e:
        raise StageError(f"teacher_data: {e}") from e
    by_teacher: dict[str, list[int]] = {}
    for i, route in enumerate(routes):
        by_teacher.setdefault(cfg.routing.teachers[route], []).append(i)
    return sorted(by_teacher.items())


def execute(run: Run) -> dict[str, Any]:
    cfg, layout, s = run.cfg, run.layout, run.cfg.teacher_data
    tok = run.tokenizer
    prompts = read_jsonl(layout.prompts("sft"))
    if not prompts:
        raise StageError(f"{layout.prompts('sft')} has no prompts")
    parts = layout.teacher_data_parts
    if run.is_main:
        parts.mkdir(parents=True, exist_ok=True)
    barrier("teacher_data-parts")

    # Part i: up to batch_size prompts of one teacher, sampled with derive_seed(seed, i); with one teacher the parts
    # are consecutive prompts, with routing each teacher's prompts in order, teacher after teacher.
    batches = [(teacher, idx[lo:lo + s.batch_size]) for teacher, idx in _assignments(run, prompts)
               for lo in range(0, len(idx), s.batch_size)]
    fingerprints = {t: run.fingerprint(layout.teacher(t)) for t in dict.fromkeys(t for t, _ in batches)}
    # Every process sees the same parts on the shared run directory, so they agree on what is left; all of them
    # take part in the (collective) sampling and process 0 alone writes.
    pending = [i for i in range(len(batches)) if not (parts / f"{i:05d}.jsonl").is_file()]
    seconds, new_tokens = 0.0, 0
    for name in dict.fromkeys(batches[i][0] for i in pending):  # each teacher loaded once, for its parts
        mine = [i for i in pending if batches[i][0] == name]
        model = run.load_teacher(name)
        stops = toklib.stop_ids(tok, model.config)
        log.info("teacher_data: teacher %s samples %d prompts (%d parts, %d left)", name,
                 sum(len(idx) for t, idx in batches if t == name), sum(t == name for t, _ in batches), len(mine))
        t_start = time.time()  # throughput excludes loading (compilation stays in: it is part of the real cost)
        bar = tqdm(total=sum(len(batches[i][1]) for i in mine), desc=f"teacher_data {name}", unit="prompt",
                   disable=not run.is_main)
        for i in mine:
            batch = [prompts[j] for j in batches[i][1]]
            res = generate(model, [p["prompt_ids"] for p in batch], max_new_tokens=s.max_new_tokens,
                           temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_token_id=stops,
                           seed=derive_seed(s.seed, i), batch_size=s.batch_size)
            rows = []
            for j, p in enumerate(batch):
                ids = res.response(j)
                rows.append({"prompt": p["prompt"], "label": p["label"], "prompt_ids": p["prompt_ids"],
                             "response_ids": ids, "response_text": tok.decode(ids, skip_special_tokens=True),
                             "ended_with_eos": bool(res.ended_with_eos[j]),
                             **({ROUTE: p[ROUTE], "teacher_name": name} if cfg.routing.enabled else {})})
            if run.is_main:
                atomic_write_jsonl(parts / f"{i:05d}.jsonl", rows)
            new_tokens += int(res.lengths.sum())
            bar.update(len(batch))
        bar.close()
        seconds += time.time() - t_start
        del model
    barrier("teacher_data-sampled")

    by_index: dict[int, dict[str, Any]] = {}
    for i, (_, idx) in enumerate(batches):
        part = read_jsonl(parts / f"{i:05d}.jsonl")
        if len(part) != len(idx):
            raise StageError(f"{parts}: part {i} holds {len(part)} rows for {len(idx)} prompts (parts from another "
                             "run?)")
        by_index.update(zip(idx, part))
    rows = [by_index[i] for i in range(len(prompts))]  # the SFT prompts' order, whatever teacher answered
    lengths = np.array([len(r["response_ids"]) for r in rows])
    if cfg.routing.enabled:
        routes = _route_teachers(run)
        who: dict[str, Any] = {"routing_field": cfg.routing.field, "teachers": routes,
                               "rows_per_route": {r: sum(row[ROUTE] == r for row in rows) for r in routes}}
    else:
        who = {"teacher_name": cfg.sft_teacher, "teacher_fingerprint": fingerprints[cfg.sft_teacher]}
    if run.is_main:
        atomic_write_jsonl(layout.sft_jsonl, rows)
        atomic_write_json(layout.teacher_data_meta, {
            **who, "tokenizer_fingerprint": toklib.tokenizer_fingerprint(tok), "sampling": dataclasses.asdict(s),
            "num_rows": len(rows)})
    summary = {"num_rows": len(rows), "eos_rate": float(np.mean([r["ended_with_eos"] for r in rows])),
               "mean_response_len": float(lengths.mean()), "tokens": int(lengths.sum()),
               "tokens_sampled_this_run": new_tokens,
               "tokens_per_s": float(new_tokens / seconds) if new_tokens and seconds > 0 else None,
               "seconds": seconds, **who}
    log.info("teacher_data: %d rows, eos rate %.3f, mean response %.1f tokens", len(rows), summary["eos_rate"],
             summary["mean_response_len"])
    return summary
