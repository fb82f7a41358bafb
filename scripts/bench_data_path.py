"""Data-path benchmark: padding fraction and real-token throughput of the Lightning OPD step, padded vs packed.

A store of rollouts whose lengths follow a reasoning-like spread (log-normal, median ~1/3 of the longest, capped
at ``--max-len``, 4096 by default) is read two ways with the same token slots per step:

- ``padded``: ``--rows`` sequences per step, each padded to the store's longest row (what jopd did before);
- ``packed``: a token budget of ``--rows`` x ``--max-len`` slots, rows packed with several whole sequences
  (``opd.token_budget``; segment-aware attention, per-sequence positions).

For each it prints the padding fraction of the step's token slots and the step's throughput in *real* tokens
(prompt + response tokens, padding excluded) per second, median over ``--steps`` timed steps after one warm-up
step, and writes the table as JSON. Run it alone on the machine: a neighbour job halves XLA's CPU speed.

It also times the padded loader alone on a store shaped like the demo's rollouts (``--loader-rows`` rows of up to
96 tokens, batches of ``--loader-batch``): jopd's pipeline (indices through Grain, one read per field per batch)
against reading rows one at a time through Grain's thread pool (what jopd did before 2026-12-06).

    python scripts/bench_data_path.py [--small] [--out bench_data_path.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import grain
import jax
import numpy as np

from jopd import models, sharding, steps
from jopd.data.loader import make_loader, make_packed_dataset, open_source
from jopd.data.store import RolloutStore
from jopd.models import ModelConfig

FIELDS = ("tokens", "response_mask", "teacher_logprobs", "behaviour_logprobs")


def write_store(path: Path, *, rows: int, max_len: int, vocab: int, seed: int) -> np.ndarray:
    """Random rollouts with log-normal lengths (median max_len / 3); returns the sequence lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(max_len / 3), 0.6, rows), 32, max_len).astype(np.int64)
    lengths[0] = max_len  # the longest row sets the padded length, as one long reasoning trace would
    prompt_len = np.minimum(rng.integers(16, 64, rows), lengths - 1)
    store = RolloutStore.create(path, num_rows=rows, max_len=max_len, rows_per_chunk=16)
    for c in range(store.num_chunks):
        lo, hi = store.chunk_rows(c)
        n = hi - lo
        tokens = rng.integers(1, vocab, (n, max_len)).astype(np.int32)
        tokens[np.arange(max_len)[None] >= lengths[lo:hi, None]] = 0
        store.write_rollout_chunk(c, tokens=tokens, prompt_len=prompt_len[lo:hi],
                                  response_len=lengths[lo:hi] - prompt_len[lo:hi],
                                  behaviour_logprobs=-rng.random((n, max_len)).astype(np.float32),
                                  ended_with_eos=np.ones(n, bool), truncated=np.zeros(n, bool),
                                  prompt_index=np.arange(lo, hi), sample_index=np.zeros(n, np.int32))
        store.write_teacher_chunk(c, -rng.random((n, max_len)).astype(np.float32))
    return lengths


def real_tokens(batch: dict[str, np.ndarray]) -> int:
    """Prompt + response tokens of a batch (padding excluded)."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] > 0).sum())
    mask = batch["response_mask"]
    # right-padded rows: the real length is one past the last response token
    last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    return int(np.where(mask.any(1), last, 0).sum())


def measure(layout: str, store: Path, args, cfg: ModelConfig, mesh) -> dict[str, float]:
    num_steps = args.steps + 1
    if layout == "packed":
        ds, plan = make_packed_dataset(store, token_budget=args.rows * args.max_len, row_len=args.max_len, seed=0,
                                       num_steps=num_steps, fields=FIELDS)
        batches, rows = iter(ds), plan.rows
    else:
        batches, rows = make_loader(store, global_batch_size=args.rows, seed=0, seq_len="auto", fields=FIELDS), args.rows
    optimizer = steps.make_optimizer(lr=1e-4, total_steps=num_steps)
    state = steps.init_state(models.from_params(cfg, models.init_params(cfg, 0), mesh=mesh).params, optimizer)
    step = steps.make_opd_step(cfg, optimizer, steps.OPDLossConfig(), mesh=mesh, state=state, batch_size=rows,
                               with_behaviour=True, packed=layout == "packed")
    place = functools.partial(steps.shard_batch, mesh=mesh)
    times, reals, slots = [], [], []
    for i in range(num_steps):
        batch = dict(next(batches))
        t0 = time.perf_counter()
        state, metrics = step(state, place(batch))
        jax.block_until_ready(metrics)
        if i:  # the first step compiles
            times.append(time.perf_counter() - t0)
            reals.append(real_tokens(batch))
            slots.append(batch["tokens"].size)
    med = statistics.median(times)
    return {"layout": layout, "rows": rows, "row_len": int(batch["tokens"].shape[1]),
            "padding_fraction": 1 - sum(reals) / sum(slots), "real_tokens_per_step": sum(reals) / len(reals),
            "step_s_median": med, "real_tokens_per_s": statistics.median(r / t for r, t in zip(reals, times))}


def time_batches(batches, n: int) -> float:
    """Median seconds per `next(batches)` over `n` batches after one warm-up batch."""
    next(batches)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_loader(store: Path, batch: int, n: int) -> list[dict[str, float]]:
    """Seconds per padded batch: jopd's loader vs per-row reads through Grain's thread pool."""
    jopd_s = time_batches(make_loader(store, global_batch_size=batch, seed=0, seq_len="auto", fields=FIELDS), n)
    source = open_source(store, FIELDS, seq_len="auto")
    per_row = (grain.MapDataset.source(source).shuffle(seed=0).repeat(None)
               .to_iter_dataset(grain.ReadOptions(num_threads=8, prefetch_buffer_size=max(64, 2 * batch)))
               .batch(batch, drop_remainder=True))
    per_row_s = time_batches(iter(per_row), n)
    return [{"loader": "jopd (indices through Grain, one read per field per batch)", "batch_s_median": jopd_s},
            {"loader": "per-row reads through Grain's thread pool (before)", "batch_s_median": per_row_s}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="max_len 512, 2 steps (a quick check)")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--rows", type=int, default=2, help="rows per step (token budget = rows x max_len)")
    p.add_argument("--store-rows", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps per layout")
    p.add_argument("--loader-rows", type=int, default=8192, help="rows of the loader-timing store")
    p.add_argument("--loader-batch", type=int, default=512, help="rows per batch in the loader timing")
    p.add_argument("--out", default="bench_data_path.json")
    args = p.parse_args()
    if args.small:
        args.max_len, args.steps, args.loader_rows, args.loader_batch = 512, 2, 256, 64
    cfg = ModelConfig(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True,
                      max_position_embeddings=args.max_len)
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        lengths = write_store(store, rows=args.store_rows, max_len=args.max_len, vocab=cfg.vocab_size, seed=0)
        rows = [measure(layout, store, args, cfg, mesh) for layout in ("padded", "packed")]
        loader_store = Path(tmp) / "loader_store"
        write_store(loader_store, rows=args.loader_rows, max_len=96, vocab=cfg.vocab_size, seed=1)
        loader_rows = measure_loader(loader_store, args.loader_batch, 2 * args.steps + 4)
    speedup = rows[1]["real_tokens_per_s"] / rows[0]["real_tokens_per_s"]
    print(f"store: {args.store_rows} rollouts, lengths median {int(np.median(lengths))}, mean "
          f"{lengths.mean():.0f}, max {lengths.max()} (log-normal); model {cfg.num_params() / 1e6:.2f}M params, "
          f"{jax.devices()[0].platform}")
    print("| layout | rows x row_len | padding of step tokens | real tokens/step | step s (median) | "
          "real tokens/s (median) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['rows']} x {r['row_len']} | {r['padding_fraction']:.1%} | "
              f"{r['real_tokens_per_step']:.0f} | {r['step_s_median']:.3f} | {r['real_tokens_per_s']:.0f} |")
    print(f"packed / padded real-token throughput: {speedup:.2f}x (target: padding <= 10% of step tokens)")
    print(f"\npadded loader alone: {args.loader_rows} rows of up to 96 tokens, batches of {args.loader_batch}\n"
          "| loader | s per batch (median) |\n|---|---|")
    for r in loader_rows:
        print(f"| {r['loader']} | {r['batch_s_median']:.4f} |")
    Path(args.out).write_text(json.dumps({"rows": rows, "speedup": speedup, "loader": loader_rows, "args": vars(args),
                                          "lengths": {"median": float(np.median(lengths)),
                                                      "mean": float(lengths.mean()), "max": int(lengths.max())}},
                                         indent=2))


if __name__ == "__main__":
    main()
