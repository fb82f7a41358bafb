"""Stage ``precompute``: every teacher in ``precompute.teachers`` scores every rollout token, once.

For each teacher NAME this writes ``RUN_DIR/precompute/NAME/store``: a RolloutStore holding a copy of the rollout
group of ``RUN_DIR/rollout/store`` plus the teacher group -- ``teacher_logprobs`` (log p_teacher(token_t |
tokens_<t) at temperature 1, at response positions, 0 elsewhere) and, when ``precompute.topk`` > 0, the teacher's
top-k (ids, log-probs) per response position. Attributes are the rollout store's plus ``teacher_name``,
``teacher_fingerprint``, ``teacher_tokenizer_fingerprint``, ``source_store``, ``source_store_fingerprint``,
``logprob_temperature`` (1.0) and ``topk``. Multi-teacher runs (``routing.field``): a teacher's store holds only
the rollouts of the routes it is given (``jopd.multi_teacher.scored_routes``), route after route (routes sorted,
rows in rollout order), and its attrs add ``routing_field`` and ``routes`` ({route: [first row, end row]}). The
copy is created aside and renamed into place. The storage
cost of the teacher group (``4 + 8 k`` bytes per response token; see :func:`storage_cost`) is logged and
returned per teacher (``storage``).

Resuming: copy and scoring go chunk by chunk with completion markers, and every chunk is scored in the same
fixed-shape batches ([batch, length bucket], padding rows masked out), so an interrupted run ends with a store
byte-identical to an uninterrupted one. Several processes: the copy is split by chunk owner (pure I/O); the
scoring is collective, so every process walks all pending chunks and only the owner writes each one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jopd.data import tokenizer as toklib
from jopd.data.store import RolloutStore, StoreError
from jopd.io import read_jsonl
from jopd.multi_teacher import prompt_routes, scored_routes
from jopd.pipeline import (
    Run,
    StageError,
    barrier,
    check_tokenizer,
    numerics_inputs,
    open_or_create_store,
    store_fingerprint,
)
from jopd.rollouts import score_chunk, scoring_shape

log = logging.getLogger("jopd")

TEACHER_ARRAYS = ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")


def bytes_per_token(topk: int) -> int:
    """Bytes the teacher group stores per scored position: the sampled token's log-prob (float32) plus, with
    ``topk`` k, k int32 ids and k float32 log-probs: ``4 + 8 k`` (516 at k = 64)."""
    return 4 + 8 * int(topk)


def storage_cost(store: RolloutStore, response_tokens: int) -> dict[str, Any]:
    """The teacher group's storage: per response token, for the store's response tokens (logical bytes), as
    allocated (dense ``[N, L(, k)]``, before compression) and on disk (compressed files)."""
    per_token = bytes_per_token(store.topk)
    on_disk = sum(f.stat().st_size for name in TEACHER_ARRAYS if (Path(store.path) / name).is_dir()
                  for f in (Path(store.path) / name).rglob("*") if f.is_file())
    return {"topk": store.topk, "bytes_per_response_token": per_token,
            "response_token_bytes": per_token * response_tokens,
            "dense_bytes": per_token * store.num_rows * store.max_len, "on_disk_bytes": on_disk}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def inputs(run: Run) -> dict[str, Any]:
    pc = run.cfg.precompute
    rollout = run.upstream("rollout")
    # batch_size fixes the compiled batch shape, hence the exact floating-point results.
    # Multi-teacher runs: the routes whose rollouts each teacher scores (one-teacher runs keep their fingerprint).
    routes = {"routes": scored_routes(run.cfg)} if run.cfg.routing.enabled else {}
    return {"teachers": {n: run.fingerprint(run.layout.teacher(n)) for n in pc.teachers}, "topk": pc.topk,
            "batch_size": pc.batch_size, "numerics": numerics_inputs(run.cfg, logits_chunked=True), "rollout": rollout,
            **routes}


def execute(run: Run) -> dict[str, Any]:
    src_path = run.layout.rollout_store
    try:
        src = RolloutStore.open(src_path, "r")
        if not src.is_complete("rollout"):
            raise StoreError(f"only {len(src.done_chunks('rollout'))}/{src.num_chunks} chunks are written")
        # Copying re-hashes what it reads, so corruption must be caught here or it would be laundered.
        src.verify(["rollout"])
    except StoreError as e:
        raise StageError(f"precompute: the rollout store {src_path} is unusable: {e}\n  delete "
                         f"{run.layout.stage('rollout')} and re-run the rollout stage") from e
    run_tok_fp = toklib.tokenizer_fingerprint(run.tokenizer)
    if src.attrs.get("tokenizer_fingerprint") != run_tok_fp:
        raise StageError(f"precompute: {src_path} was sampled with tokenizer {src.attrs.get('tokenizer_fingerprint')}, "
                         f"but the run tokenizer ({run.layout.tokenizer}) is {run_tok_fp}")
    src_fp = store_fingerprint(src_path)
    rows = _routed_rows(run, src) if run.cfg.routing.enabled else {}
    return {"teachers": {name: _score(run, name, src, src_fp, rows.get(name)) for name in run.cfg.precompute.teachers}}


def _routed_rows(run: Run, src: RolloutStore) -> dict[str, dict[str, list[int]]]:
    """Multi-teacher runs: teacher -> {route: the rollout rows of the route's prompts, ascending}, for the routes
    the teacher scores (jopd.multi_teacher.scored_routes)."""
    path = run.layout.prompts("opd")
    try:
        routes = prompt_routes(read_jsonl(path), run.cfg, str(path))
    except ValueError as e:
        raise StageError(f"precompute: {e}") from e
    prompt_index = src.read_rows(range(src.num_rows), ["prompt_index"])["prompt_index"]
    row_route = np.asarray(routes)[prompt_index]
    return {teacher: {r: np.flatnonzero(row_route == r).tolist() for r in rs}
            for teacher, rs in scored_routes(run.cfg).items()}


def _score(run: Run, name: str, src: RolloutStore, src_fp: str,
           routed: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Teacher ``name``'s store: every rollout row, or (``routed``: route -> rollout rows) the rows of its routes,
    route after route."""
    pc, layout = run.cfg.precompute, run.layout
    attrs = {**src.attrs, "teacher_name": name, "teacher_fingerprint": run.fingerprint(layout.teacher(name)),
             "teacher_tokenizer_fingerprint": check_tokenizer(run, layout.teacher(name), f"teacher {name!r}"),
             "source_store": layout.relative(src.path), "source_store_fingerprint": src_fp,
             "logprob_temperature": 1.0, "topk": pc.topk}
    source_rows = np.arange(src.num_rows)
    if routed is not None:
        spans, lo = {}, 0
        for route, rows in routed.items():
            spans[route] = [lo, lo + len(rows)]
            lo += len(rows)
        source_rows = np.asarray([i for rows in routed.values() for i in rows], np.int64)
        attrs.update(routing_field=run.cfg.routing.field, routes=spans)
        log.info("precompute: teacher %s scores the rollouts of route(s) %s (%d of %d rows)", name,
                 ", ".join(f"{r} ({hi - lo})" for r, (lo, hi) in spans.items()), len(source_rows), src.num_rows)
    path = layout.teacher_store(name)
    store = open_or_create_store(run, path, attrs=attrs, num_rows=len(source_rows), max_len=src.max_len,
                                 rows_per_chunk=src.rows_per_chunk, topk=pc.topk)

    # 1. The rollout group, copied chunk by chunk (pure I/O: each process copies the chunks it owns).
    pid, nproc = jax.process_index(), jax.process_count()
    fields = store.group_fields("rollout")
    for c in store.pending_chunks("rollout", process_index=pid, process_count=nproc):
        store.write_rollout_chunk(c, **src.read_rows(source_rows[slice(*store.chunk_rows(c))], fields))
    barrier(f"precompute-{name}-copied")

    # 2. Teacher scores of the pending chunks, in fixed [batch, length] shapes.
    pending = store.pending_chunks("teacher")
    mine = set(store.pending_chunks("teacher", process_index=pid, process_count=nproc))
    barrier(f"precompute-{name}-pending")
    shape = scoring_shape(store, pc.batch_size, run.mesh)  # static across chunks and resumes
    t0, scored = time.time(), 0
    if pending:
        model = run.load_teacher(name)
        t0 = time.time()  # throughput excludes loading (compilation stays in: it is part of the real cost)
        log.info("precompute: teacher %s scores %d chunks ([%d, %d] batches, topk %d)", name, len(pending),
                 shape.batch, shape.length, pc.topk)
        bar = tqdm(total=sum(hi - lo for lo, hi in map(store.chunk_rows, pending)), desc=f"precompute {name}",
                   unit="row", disable=not run.is_main)
        for c in pending:
            try:
                lp, ids, vals, n = score_chunk(model, store, c, shape, pc.topk, what=f"teacher {name!r}")
            except ValueError as e:
                raise StageError(f"precompute: {e}") from e
            if c in mine:
                store.write_teacher_chunk(c, lp, ids, vals)
            scored += n
            bar.update(len(range(*store.chunk_rows(c))))
        bar.close()
        del model
    seconds = time.time() - t0
    barrier(f"precompute-{name}-scored")

    try:
        counts = store.verify()
    except StoreError as e:
        raise StageError(f"precompute: teacher {name!r} store failed verification: {e}") from e
    # Statistics over the whole store (chunks of an earlier, interrupted run included), one chunk at a time.
    total, lp_sum = 0, 0.0
    for c in range(store.num_chunks):
        d = store.read_rows(range(*store.chunk_rows(c)), ["teacher_logprobs", "response_mask"])
        total += int(d["response_mask"].sum())
        lp_sum += float(d["teacher_logprobs"][d["response_mask"].astype(bool)].astype(np.float64).sum())
    summary = {"store": str(path), "teacher_fingerprint": attrs["teacher_fingerprint"], "rows": store.num_rows,
               "response_tokens": total, "tokens_scored_this_run": scored,
               "tokens_per_s": float(scored / seconds) if scored and seconds > 0 else None, "seconds": seconds,
               "mean_teacher_logprob": lp_sum / total if total else None, "scored_length": shape.length,
               "chunks_verified": counts, "storage": storage_cost(store, total),
               **({"routes": attrs["routes"]} if routed is not None else {})}
    log.info("precompute: teacher %s: %d response tokens, mean log-prob %.4f", name, total,
             summary["mean_teacher_logprob"] or float("nan"))
    cost = summary["storage"]
    log.info("precompute: teacher %s storage (topk %d): %d bytes per response token; %s for the %d response "
             "tokens, %s dense [N, L] arrays before compression, %s on disk", name, pc.topk,
             cost["bytes_per_response_token"], _size(cost["response_token_bytes"]), total, _size(cost["dense_bytes"]),
             _size(cost["on_disk_bytes"]))
    return summary
