"""Stage ``precompute``: every teacher in ``precompute.teachers`` scores every rollout token, once.

For each teacher NAME this writes ``RUN_DIR/precompute/NAME/store``: a RolloutStore holding a copy of the rollout
group of ``RUN_DIR/rollout/store`` plus the teacher group -- ``teacher_logprobs`` (log p_teacher(token_t |
tokens_<t) at temperature 1, at response positions, 0 elsewhere) and, when ``precompute.topk`` > 0, the teacher's
top-k (ids, log-probs) per response position. Attributes are the rollout store's plus ``teacher_name``,
``teacher_fingerprint``, ``teacher_tokenizer_fingerprint``, ``source_store``, ``source_store_fingerprint``,
``logprob_temperature`` (1.0) and ``topk``. The copy is created aside and renamed into place. The storage
cost of the teacher group (``4 + 8 k`` bytes per response token; see :func:`storage_cost`) is logged and
returned per teacher (``storage``).

Resuming: copy and scoring go chunk by chunk with completion markers, and every chunk is scored in the same
fixed-shape batches ([batch, length bucket], padding rows masked out), so an interrupted run ends with a store
byte-identical to an uninterrupted one. Several processes: the copy is split by chunk owner (pure I/O); the
scoring is collective, so every process walks all pending chunks and only the owner writes each one.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jopd import sharding
from jopd.data import tokenizer as toklib
from jopd.data.loader import SEQ_LEN_BUCKET
from jopd.data.store import RolloutStore, StoreError
from jopd.models import Model, logprobs_and_topk_fn, token_logprobs
from jopd.pipeline import (
    Run,
    StageError,
    barrier,
    check_tokenizer,
    numerics_inputs,
    open_or_create_store,
    store_fingerprint,
)

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


@functools.lru_cache(maxsize=8)
def _topk_scorer(config: Any, mesh: Any, topk: int):
    return sharding.bind_mesh(jax.jit(lambda p, t, m: logprobs_and_topk_fn(p, config, t, m, topk)), mesh)


def teacher_scores(model: Model, tokens: np.ndarray, mask: np.ndarray, topk: int):
    """Host arrays (log-probs [B, T], top-k ids [B, T, k] | None, top-k log-probs | None) of ``model``."""
    if topk == 0:
        return sharding.to_host(token_logprobs(model, tokens, mask)), None, None
    fn = _topk_scorer(model.config, model.mesh, topk)
    if model.mesh is not None:
        sh = sharding.batch_sharding(model.mesh, 2, tokens.shape[0])
        tokens, mask = jax.device_put(tokens, sh), jax.device_put(mask, sh)
    return sharding.to_host(fn(model.params, tokens, mask))


def inputs(run: Run) -> dict[str, Any]:
    pc = run.cfg.precompute
    rollout = run.upstream("rollout")
    # batch_size fixes the compiled batch shape, hence the exact floating-point results.
    return {"teachers": {n: run.fingerprint(run.layout.teacher(n)) for n in pc.teachers}, "topk": pc.topk,
            "batch_size": pc.batch_size, "numerics": numerics_inputs(run.cfg, logits_chunked=True), "rollout": rollout}


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
    return {"teachers": {name: _score(run, name, src, src_fp) for name in run.cfg.precompute.teachers}}


def _score(run: Run, name: str, src: RolloutStore, src_fp: str) -> dict[str, Any]:
    pc, layout = run.cfg.precompute, run.layout
    attrs = {**src.attrs, "teacher_name": name, "teacher_fingerprint": run.fingerprint(layout.teacher(name)),
             "teacher_tokenizer_fingerprint": check_tokenizer(run, layout.teacher(name), f"teacher {name!r}"),
             "source_store": layout.relative(src.path), "source_store_fingerprint": src_fp,
             "logprob_temperature": 1.0, "topk": pc.topk}
    path = layout.teacher_store(name)
    store = open_or_create_store(run, path, attrs=attrs, num_rows=src.num_rows, max_len=src.max_len,
                                 rows_per_chunk=src.rows_per_chunk, topk=pc.topk)

    # 1. The rollout group, copied chunk by chunk (pure I/O: each process copies the chunks it owns).
    pid, nproc = jax.process_index(), jax.process_count()
    fields = store.group_fields("rollout")
    for c in store.pending_chunks("rollout", process_index=pid, process_count=nproc):
        store.write_rollout_chunk(c, **src.read_rows(range(*store.chunk_rows(c)), fields))
    barrier(f"precompute-{name}-copied")

    # 2. Teacher scores of the pending chunks, in fixed [batch, length] shapes.
    pending = store.pending_chunks("teacher")
    mine = set(store.pending_chunks("teacher", process_index=pid, process_count=nproc))
    barrier(f"precompute-{name}-pending")
    length = sharding.round_up(max(store.max_row_len(), 2), SEQ_LEN_BUCKET)  # static across chunks and resumes
    read_len = min(length, store.max_len)
    batch = sharding.round_up(pc.batch_size, 1 if run.mesh is None else sharding.batch_parallelism(run.mesh))
    t0, scored = time.time(), 0
    if pending:
        model = run.load_teacher(name)
        t0 = time.time()  # throughput excludes loading (compilation stays in: it is part of the real cost)
        log.info("precompute: teacher %s scores %d chunks ([%d, %d] batches, topk %d)", name, len(pending), batch,
                 length, pc.topk)
        bar = tqdm(total=sum(hi - lo for lo, hi in map(store.chunk_rows, pending)), desc=f"precompute {name}",
                   unit="row", disable=not run.is_main)
        for c in pending:
            lo, hi = store.chunk_rows(c)
            data = store.read_rows(range(lo, hi), ["tokens", "prompt_len", "response_len", "response_mask"],
                                   seq_len=read_len)
            if int(data["tokens"].max()) >= model.config.vocab_size:
                raise StageError(f"precompute: rows {lo}:{hi} hold token id {int(data['tokens'].max())} >= teacher "
                                 f"{name!r} vocab_size {model.config.vocab_size}")
            n, k = hi - lo, pc.topk
            lp = np.zeros((n, store.max_len), np.float32)
            ids = np.zeros((n, store.max_len, k), np.int32) if k else None
            vals = np.zeros((n, store.max_len, k), np.float32) if k else None
            real = np.arange(read_len)[None, :] < (data["prompt_len"] + data["response_len"])[:, None]
            for b0 in range(0, n, batch):
                m = min(batch, n - b0)
                tokens = np.zeros((batch, length), np.int32)
                mask = np.zeros((batch, length), np.int32)
                tokens[:m, :read_len] = data["tokens"][b0:b0 + m]
                mask[:m, :read_len] = real[b0:b0 + m]
                out_lp, out_ids, out_vals = teacher_scores(model, tokens, mask, k)
                lp[b0:b0 + m, :read_len] = out_lp[:m, :read_len]
                if k:
                    ids[b0:b0 + m, :read_len] = out_ids[:m, :read_len]
                    vals[b0:b0 + m, :read_len] = out_vals[:m, :read_len]
            # Only response positions are stored (the prompt's log-probs are not needed and 0 is canonical).
            resp = np.zeros((n, store.max_len), bool)
            resp[:, :read_len] = data["response_mask"].astype(bool)
            lp = np.where(resp, lp, np.float32(0))
            if k:
                ids, vals = np.where(resp[..., None], ids, 0), np.where(resp[..., None], vals, np.float32(0))
            if c in mine:
                store.write_teacher_chunk(c, lp, ids, vals)
            scored += int(resp.sum())
            bar.update(n)
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
               "mean_teacher_logprob": lp_sum / total if total else None, "scored_length": length,
               "chunks_verified": counts, "storage": storage_cost(store, total)}
    log.info("precompute: teacher %s: %d response tokens, mean log-prob %.4f", name, total,
             summary["mean_teacher_logprob"] or float("nan"))
    cost = summary["storage"]
    log.info("precompute: teacher %s storage (topk %d): %d bytes per response token; %s for the %d response "
             "tokens, %s dense [N, L] arrays before compression, %s on disk", name, pc.topk,
             cost["bytes_per_response_token"], _size(cost["response_token_bytes"]), total, _size(cost["dense_bytes"]),
             _size(cost["on_disk_bytes"]))
    return summary
