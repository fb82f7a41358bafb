"""Stage ``precompute``: every teacher in ``precompute.teachers`` scores every rollout token, once.

For each teacher NAME this writes ``RUN_DIR/precompute/NAME/store``: a RolloutStore holding a copy of the rollout
group of ``RUN_DIR/rollout/store`` plus the teacher group -- ``teacher_logprobs`` (log p_teacher(token_t |
tokens_<t) at temperature 1, at response positions, 0 elsewhere) and, when ``precompute.topk`` > 0, the teacher's
top-k (ids, log-probs) per response position. Attributes are the rollout store's plus ``teacher_name``,
``teacher_fingerprint``, ``teacher_tokenizer_fingerprint``, ``source_store`` (path of the rollout store, relative
to the run directory), ``source_store_fingerprint`` (see `store_fingerprint`), ``logprob_temperature`` (1.0) and
``topk``.

The copy is a fresh store (its topk may differ from the rollout store's, so files cannot simply be copied) filled
chunk by chunk from the source; it is created aside and renamed into place, so it exists complete or not at all.

Resuming: both the copy and the scoring go chunk by chunk with completion markers, and every chunk is scored in
the same fixed-shape batches ([batch, bucketed length], padding rows masked out) whatever was done before, so an
interrupted run resumed ends with a store byte-identical to an uninterrupted one. With several JAX processes,
the copy is split by chunk owner (pure I/O); the scoring forward passes are collective, so every process walks
all pending chunks together and only the owner (``chunk % process_count``) writes each one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jopd import sharding
from jopd.data import tokenizer as toklib
from jopd.data.store import RolloutStore, StoreError
from jopd.models import logprobs_and_topk_fn, token_logprobs
from jopd.stages.base import RunContext, Stage, StageError
from jopd.stages.rollout import open_or_create_store
from jopd.stages.teacher_data import numerics_inputs, run_relative

log = logging.getLogger("jopd")

LENGTH_BUCKET = 64  # scored sequence length is the longest row rounded up to this: one compiled shape per store


def store_fingerprint(path: str | Path, group: str = "rollout") -> str:
    """Identity of a store's ``group`` content without re-reading it: sha256 over meta.json and the group's
    completion markers, which carry the SHA-256 of every chunk of every array."""
    path = Path(path)
    h = hashlib.sha256()
    for f in [path / "meta.json", *sorted((path / "progress" / group).glob("*.json"))]:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) global array as a full numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


_TOPK_FNS: dict[Any, Any] = {}


def _scorer(model: Any, topk: int):
    """``(tokens, mask) -> (logprobs, topk_ids | None, topk_logprobs | None)`` as host arrays."""
    if topk == 0:
        return lambda tokens, mask: (_to_host(token_logprobs(model, tokens, mask)), None, None)
    config, mesh = model.config, model.mesh
    key = (config, id(mesh), topk)
    if key not in _TOPK_FNS:
        def run(params, tokens, mask):
            with sharding.activate(mesh):
                return logprobs_and_topk_fn(params, config, tokens, mask, topk)

        _TOPK_FNS[key] = jax.jit(run)
    fn = _TOPK_FNS[key]

    def call(tokens: np.ndarray, mask: np.ndarray):
        if mesh is not None:
            sh = sharding.batch_sharding(mesh, 2, tokens.shape[0])
            tokens, mask = jax.device_put(tokens, sh), jax.device_put(mask, sh)
        lp, ids, vals = fn(model.params, tokens, mask)
        return _to_host(lp), _to_host(ids), _to_host(vals)

    return call


def check_teacher_tokenizer(ctx: RunContext, teacher_dir: Path, name: str) -> str:
    """Fingerprint of the teacher's vocabulary; StageError naming both tokenizers if it differs from the run's.

    A teacher directory without tokenizer files is used with the run's tokenizer.
    """
    if not any((teacher_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return toklib.tokenizer_fingerprint(ctx.tokenizer)
    try:
        return toklib.check_same_vocab(ctx.tokenizer, str(teacher_dir),
                                       name_a=f"run tokenizer ({ctx.tokenizer_dir()})",
                                       name_b=f"teacher {name!r} tokenizer ({teacher_dir})")
    except toklib.VocabMismatchError as e:
        raise StageError(f"precompute: teacher {name!r} cannot score the rollouts: {e}") from e


class PrecomputeStage(Stage):
    name = "precompute"

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        pc = ctx.cfg.precompute
        rollout = ctx.upstream("rollout")
        # batch_size fixes the compiled batch shape, hence the exact floating-point results.
        return {"teachers": {n: ctx.teacher_fingerprint(n) for n in pc.teachers}, "topk": pc.topk,
                "batch_size": pc.batch_size, "numerics": numerics_inputs(ctx, logits_chunked=True), "rollout": rollout}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        pc = ctx.cfg.precompute
        if pc.batch_size < 1 or pc.topk < 0:
            raise StageError("precompute.batch_size must be >= 1 and precompute.topk >= 0")
        src_path = ctx.stage_dir("rollout") / "store"
        try:
            src = RolloutStore.open(src_path, "r")
            if not src.is_complete("rollout"):
                raise StoreError(f"only {len(src.done_chunks('rollout'))}/{src.num_chunks} chunks are written")
            # Copying re-hashes what it reads, so corruption must be caught here or it would be laundered.
            src.verify(["rollout"])
        except StoreError as e:
            raise StageError(f"precompute: the rollout store {src_path} is unusable: {e}\n  delete "
                             f"{ctx.stage_dir('rollout')} and re-run the rollout stage") from e
        run_tok_fp = toklib.tokenizer_fingerprint(ctx.tokenizer)
        if src.attrs.get("tokenizer_fingerprint") != run_tok_fp:
            raise StageError(f"precompute: {src_path} was sampled with tokenizer "
                             f"{src.attrs.get('tokenizer_fingerprint')}, but the run tokenizer "
                             f"({ctx.tokenizer_dir()}) is {run_tok_fp}")
        src_fp = store_fingerprint(src_path)
        return {"teachers": {name: self._teacher(ctx, name, src, src_fp) for name in pc.teachers}}

    def _teacher(self, ctx: RunContext, name: str, src: RolloutStore, src_fp: str) -> dict[str, Any]:
        pc = ctx.cfg.precompute
        tdir = ctx.teacher_dir(name)
        attrs = {**src.attrs, "teacher_name": name, "teacher_fingerprint": ctx.teacher_fingerprint(name),
                 "teacher_tokenizer_fingerprint": check_teacher_tokenizer(ctx, tdir, name),
                 "source_store": run_relative(ctx, src.path), "source_store_fingerprint": src_fp,
                 "logprob_temperature": 1.0, "topk": pc.topk}
        path = ctx.stage_dir(self.name) / name / "store"
        store = open_or_create_store(ctx, path, attrs=attrs, num_rows=src.num_rows, max_len=src.max_len,
                                     rows_per_chunk=src.rows_per_chunk, topk=pc.topk)

        # 1. The rollout group, copied chunk by chunk (pure I/O: each process copies the chunks it owns).
        pid, nproc = jax.process_index(), jax.process_count()
        fields = store.group_fields("rollout")
        for c in store.pending_chunks("rollout", process_index=pid, process_count=nproc):
            store.write_rollout_chunk(c, **src.read_rows(range(*store.chunk_rows(c)), fields))
        ctx.sync(f"precompute-{name}-copied")

        # 2. Teacher scores of the pending chunks, in fixed [batch, length] shapes.
        pending = store.pending_chunks("teacher")
        mine = set(store.pending_chunks("teacher", process_index=pid, process_count=nproc))
        ctx.sync(f"precompute-{name}-pending")
        max_row = store.max_row_len()
        length = _round_up(max(max_row, 2), LENGTH_BUCKET)  # static across chunks and resumes
        read_len = min(length, store.max_len)
        mesh_rows = 1 if ctx.mesh is None else sharding.batch_parallelism(ctx.mesh)
        batch = _round_up(pc.batch_size, mesh_rows)  # a batch that shards evenly over the mesh
        model = ctx.load_teacher(name) if pending else None
        t0 = time.time()  # throughput excludes loading (compilation stays in: it is part of the real cost)
        scored = 0
        if model is not None:
            score = _scorer(model, pc.topk)
            log.info("precompute: teacher %s scores %d chunks ([%d, %d] batches, topk %d)", name, len(pending),
                     batch, length, pc.topk)
            bar = tqdm(total=sum(hi - lo for lo, hi in map(store.chunk_rows, pending)), desc=f"precompute {name}",
                       unit="row", disable=not ctx.is_main_process)
            for c in pending:
                lo, hi = store.chunk_rows(c)
                data = store.read_rows(range(lo, hi), ["tokens", "prompt_len", "response_len", "response_mask"],
                                       seq_len=read_len)
                if int(data["tokens"].max()) >= model.config.vocab_size:
                    raise StageError(f"precompute: rows {lo}:{hi} hold token id {int(data['tokens'].max())} >= "
                                     f"teacher {name!r} vocab_size {model.config.vocab_size}")
                n = hi - lo
                lp = np.zeros((n, store.max_len), np.float32)
                ids = np.zeros((n, store.max_len, pc.topk), np.int32) if pc.topk else None
                vals = np.zeros((n, store.max_len, pc.topk), np.float32) if pc.topk else None
                real = (np.arange(read_len)[None, :] < (data["prompt_len"] + data["response_len"])[:, None])
                for b0 in range(0, n, batch):
                    m = min(batch, n - b0)
                    tokens = np.zeros((batch, length), np.int32)
                    mask = np.zeros((batch, length), np.int32)
                    tokens[:m, :read_len] = data["tokens"][b0:b0 + m]
                    mask[:m, :read_len] = real[b0:b0 + m]
                    out_lp, out_ids, out_vals = score(tokens, mask)
                    lp[b0:b0 + m, :read_len] = out_lp[:m, :read_len]
                    if pc.topk:
                        ids[b0:b0 + m, :read_len] = out_ids[:m, :read_len]
                        vals[b0:b0 + m, :read_len] = out_vals[:m, :read_len]
                # Only response positions are stored (the prompt's log-probs are not needed and 0 is canonical).
                resp = np.zeros((n, store.max_len), bool)
                resp[:, :read_len] = data["response_mask"].astype(bool)
                lp = np.where(resp, lp, np.float32(0))
                if pc.topk:
                    ids = np.where(resp[..., None], ids, 0)
                    vals = np.where(resp[..., None], vals, np.float32(0))
                if c in mine:
                    store.write_teacher_chunk(c, lp, ids, vals)
                scored += int(resp.sum())
                bar.update(n)
            bar.close()
            del model
        seconds = time.time() - t0
        ctx.sync(f"precompute-{name}-scored")

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
        summary = {
            "store": str(path), "teacher_fingerprint": attrs["teacher_fingerprint"], "rows": store.num_rows,
            "response_tokens": total, "tokens_scored_this_run": scored,
            "tokens_per_s": float(scored / seconds) if scored and seconds > 0 else None, "seconds": seconds,
            "mean_teacher_logprob": lp_sum / total if total else None, "scored_length": length,
            "chunks_verified": counts,
        }
        log.info("precompute: teacher %s: %d response tokens, mean log-prob %.4f", name, total,
                 summary["mean_teacher_logprob"] or float("nan"))
        return summary


STAGE = PrecomputeStage()
