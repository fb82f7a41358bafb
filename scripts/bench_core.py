"""Benchmark of the model core: log-prob throughput, generation throughput, log-prob head memory.

Three sections, all on a Qwen3-shaped random model (presets shared with ``bench_opd_step.py``):

1. ``token_logprobs`` throughput (tokens/s = batch * seq / median time), forward only and forward + backward
   (``jax.grad`` of the sum of the log-probs w.r.t. all params), jitted, ``block_until_ready``.
2. Generation throughput, prefill and decode timed *separately* by calling the two jitted programs that
   ``jopd.sampling.generate`` uses (``jopd.sampling._compiled``) directly: ``prefill`` (prompt forward + KV
   cache fill + first token) and ``decode`` (the ``while_loop`` producing the remaining ``new - 1`` tokens;
   EOS disabled so every row runs to the end). prefill tok/s = batch * prompt_len / t_prefill,
   decode tok/s = batch * (new - 1) / t_decode. Sampling at temperature 1 (categorical draw included).
   Decode is memory-bound, so each row also gives its HBM-bandwidth limit: one decode step reads every
   parameter once and the KV cache of every row up to its current position,

       bytes/step = N_params * param bytes + batch * 2 * L * kv_heads * head_dim * cache bytes * (P + new / 2)

   (``P + new / 2``: the mean context over the decode steps), limit tok/s = batch * bandwidth / bytes/step, with
   the datasheet bandwidth of the device kind (``bench_opd_step.HBM_BANDWIDTH``; "unknown device" otherwise).
3. Memory of the chunked log-prob head (``logprobs_fn``: ``lax.scan`` over ``logits_chunk_size`` positions,
   rematerialised) versus the naive full-logits ``naive_logprobs_fn`` at vocab 151936 and seq 4096, forward
   and forward + backward, from the *compiled* executables' ``memory_analysis()`` (no allocation: params are
   ``ShapeDtypeStruct``s; a tiny hidden size and one layer keep the compile fast and isolate the head).
   peak = argument + output - aliased + temp bytes. Target: chunked ≤ 1/8 of naive.

    python scripts/bench_core.py --small          # < 2 min on a 2-core CPU
    python scripts/bench_core.py                  # 50M-param model (CPU: several minutes)
    python scripts/bench_core.py --preset 0.6b --dtype bfloat16 --param-dtype bfloat16   # on a GPU

Writes ``--out`` (default bench_results/core.json) with the environment (device kind, jax version, date).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_opd_step import (  # noqa: E402 - shared helpers next to this script
    PRESETS,
    env_info,
    hbm_bandwidth,
    model_config,
    print_table,
    total_params,
    write_json,
)


def _time(fn, repeats: int) -> tuple[float, float, list[float]]:
    """(first call incl. compile, median of ``repeats`` further calls, all timings)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), times


# ---------------------------------------------------------------------------------------------------------
# 1. log-prob throughput
# ---------------------------------------------------------------------------------------------------------
def bench_logprobs(cfg, params, mesh, batch: int, seq: int, repeats: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jopd import sharding
    from jopd.models import logprobs_fn

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    sh = sharding.batch_sharding(mesh, 2, batch)
    tokens, mask = jax.device_put(tokens, sh), jax.device_put(mask, sh)

    def fwd(p, t, m):
        return logprobs_fn(p, cfg, t, m)

    def fwd_bwd(p, t, m):
        return jax.value_and_grad(lambda q: jnp.sum(logprobs_fn(q, cfg, t, m)))(p)

    rows = []
    for name, f in (("forward", fwd), ("forward+backward", fwd_bwd)):
        jf = sharding.bind_mesh(jax.jit(f), mesh)
        first, med, times = _time(lambda jf=jf: jf(params, tokens, mask), repeats)
        rows.append(dict(section="token_logprobs", mode=name, batch=batch, seq=seq, first_call_s=first,
                         median_s=med, times_s=times, tokens_per_s=batch * seq / med))
        print(f"  logprobs {name:17s} B={batch} T={seq}: {med:.3f} s  {batch * seq / med:,.0f} tok/s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------
# 2. generation throughput (prefill / decode separately)
# ---------------------------------------------------------------------------------------------------------
def decode_bytes_per_step(cfg, batch: int, prompt_len: int, new_tokens: int) -> int:
    """HBM bytes one decode step must read: all parameters plus each row's KV cache at the mean context."""
    import numpy as np

    param_bytes = cfg.num_params() * np.dtype(cfg.param_dtype).itemsize
    kv_per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.compute_dtype).itemsize
    return int(param_bytes + batch * kv_per_position * (prompt_len + new_tokens / 2))


def bench_generate(cfg, params, mesh, batches: list[int], prompt_len: int, new_tokens: int, repeats: int,
                   bandwidth: float) -> list[dict[str, Any]]:
    import jax
    import numpy as np

    from jopd import sharding
    from jopd.sampling import SamplingParams, _compiled, left_pad

    sp = SamplingParams(temperature=1.0)
    prefill, decode = _compiled(cfg, mesh, prompt_len, new_tokens, sp, ())
    mesh_rows = sharding.batch_parallelism(mesh)
    base_key = jax.random.PRNGKey(0)
    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        prompts = [rng.integers(0, cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]
        n_rows = -(-batch // mesh_rows) * mesh_rows
        tokens, mask = left_pad(prompts, prompt_len, n_rows)
        args = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim, n_rows))
                for a in (tokens, mask, np.arange(n_rows, dtype=np.int32))]
        t_pre, t_dec, firsts = [], [], None
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            state = jax.block_until_ready(prefill(params, *args, base_key))
            t1 = time.perf_counter()
            out = jax.block_until_ready(decode(params, state, args[2], base_key))  # state is donated
            t2 = time.perf_counter()
            if i == 0:
                firsts = (t1 - t0, t2 - t1)
            else:
                t_pre.append(t1 - t0)
                t_dec.append(t2 - t1)
        lengths = np.asarray(out.lengths)[:batch]
        assert (lengths == new_tokens).all(), lengths
        pre, dec = statistics.median(t_pre), statistics.median(t_dec)
        row = dict(section="generate", batch=batch, padded_rows=n_rows, prompt_len=prompt_len,
                   new_tokens=new_tokens, prefill_first_call_s=firsts[0], decode_first_call_s=firsts[1],
                   prefill_s=pre, decode_s=dec, prefill_tokens_per_s=batch * prompt_len / pre,
                   decode_tokens_per_s=batch * (new_tokens - 1) / dec,
                   decode_ms_per_step=1e3 * dec / (new_tokens - 1),
                   end_to_end_new_tokens_per_s=batch * new_tokens / (pre + dec),
                   decode_bytes_per_step=decode_bytes_per_step(cfg, batch, prompt_len, new_tokens))
        row["hbm_limit_tokens_per_s"] = batch * bandwidth / row["decode_bytes_per_step"]
        row["fraction_of_hbm_limit"] = row["decode_tokens_per_s"] / row["hbm_limit_tokens_per_s"]
        rows.append(row)
        print(f"  generate B={batch:3d} P={prompt_len} N={new_tokens}: prefill {pre:.3f} s "
              f"({row['prefill_tokens_per_s']:,.0f} tok/s), decode {dec:.3f} s "
              f"({row['decode_tokens_per_s']:,.0f} tok/s, {row['decode_ms_per_step']:.1f} ms/step)", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------
# 3. memory of the chunked head vs naive full logits
# ---------------------------------------------------------------------------------------------------------
def _mem(compiled) -> dict[str, int]:
    ma = compiled.memory_analysis()
    out = dict(argument_bytes=int(ma.argument_size_in_bytes), output_bytes=int(ma.output_size_in_bytes),
               alias_bytes=int(ma.alias_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes))
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def bench_memory(vocab: int, seq: int, batch: int, chunk: int, dtype: str) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from jopd.models import ModelConfig, logprobs_fn, naive_logprobs_fn, param_shapes

    cfg = ModelConfig(model_type="qwen3", qk_norm=True, vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32, tie_word_embeddings=True,
                      logits_chunk_size=chunk, compute_dtype=dtype, max_position_embeddings=max(seq, 4096))
    shapes = param_shapes(cfg)
    tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    rows = []
    results: dict[tuple[str, str], dict[str, int]] = {}
    for head, fn in (("chunked", logprobs_fn), ("naive", naive_logprobs_fn)):
        for mode in ("forward", "forward+backward"):
            if mode == "forward":
                f = lambda p, t, m, fn=fn: fn(p, cfg, t, m)  # noqa: E731
            else:
                f = lambda p, t, m, fn=fn: jax.grad(lambda q: jnp.sum(fn(q, cfg, t, m)))(p)  # noqa: E731
            t0 = time.perf_counter()
            mem = _mem(jax.jit(f).lower(shapes, tok, tok).compile())
            results[head, mode] = mem
            rows.append(dict(section="memory", head=head, mode=mode, vocab=vocab, seq=seq, batch=batch,
                             chunk=chunk if head == "chunked" else None, compile_s=time.perf_counter() - t0,
                             **mem))
            print(f"  memory {head:7s} {mode:17s}: peak {mem['peak_bytes'] / 2**20:9.1f} MiB "
                  f"(temp {mem['temp_bytes'] / 2**20:9.1f} MiB)", flush=True)
    for row in rows:
        if row["head"] == "chunked":
            naive = results["naive", row["mode"]]
            row["peak_ratio_vs_naive"] = row["peak_bytes"] / naive["peak_bytes"]
            row["temp_ratio_vs_naive"] = row["temp_bytes"] / naive["temp_bytes"]
            row["meets_1_8_target"] = row["peak_ratio_vs_naive"] <= 1 / 8
    return rows


# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="fast CPU run: preset small, short sequences")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default 50m (small with --small)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype (default float32 on CPU, bfloat16 on GPU/TPU)")
    ap.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameter dtype of the log-prob and generate model")
    ap.add_argument("--batch", type=int, default=None, help="log-prob batch (default: CPU 1, 2 small; GPU 8)")
    ap.add_argument("--seq", type=int, default=None, help="log-prob sequence length (default: CPU 512, 256 "
                    "small; GPU 2048)")
    ap.add_argument("--gen-batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=None, help="default: CPU 64, 32 small; GPU 512")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: CPU 32, 16 small; GPU 128")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 3; 2 with --small)")
    ap.add_argument("--mem-vocab", type=int, default=151936)
    ap.add_argument("--mem-seq", type=int, default=4096)
    ap.add_argument("--mem-chunk", type=int, default=None, help="logits_chunk_size (default: ModelConfig's)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("logprobs", "generate", "memory"))
    ap.add_argument("--out", default="bench_results/core.json")
    args = ap.parse_args(argv)

    from jopd import sharding
    from jopd.models import ModelConfig, from_params, init_params

    env = env_info("jax")
    gpu = env["platform"] != "cpu"
    preset = args.preset or ("small" if args.small else "50m")
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    batch = args.batch or (8 if gpu else (2 if args.small else 1))
    seq = args.seq or (2048 if gpu else (256 if args.small else 512))
    prompt_len = args.prompt_len or (512 if gpu else (32 if args.small else 64))
    new_tokens = args.new_tokens or (128 if gpu else (16 if args.small else 32))
    repeats = args.repeats or (2 if args.small else 3)
    chunk = args.mem_chunk or ModelConfig.__dataclass_fields__["logits_chunk_size"].default
    bandwidth, bandwidth_source = hbm_bandwidth(env["device_kind"])
    print(f"device: {env['device_kind']} ({env['platform']} x{env['device_count']}), jax {env['jax']}, "
          f"{env['date']}; model {preset} ({total_params(PRESETS[preset]) / 1e6:.1f}M params), compute {dtype}, "
          f"params {args.param_dtype}; HBM bandwidth: {bandwidth_source}")

    rows: list[dict[str, Any]] = []
    mesh = sharding.make_mesh()
    if "logprobs" not in args.skip or "generate" not in args.skip:
        cfg = model_config(preset, dtype=dtype, param_dtype=args.param_dtype).replace(
            max_position_embeddings=max(seq, prompt_len + new_tokens))
        model = from_params(cfg, init_params(cfg, seed=0), mesh=mesh)
        if "logprobs" not in args.skip:
            rows += bench_logprobs(cfg, model.params, mesh, batch, seq, repeats)
        if "generate" not in args.skip:
            rows += bench_generate(cfg, model.params, mesh, args.gen_batches, prompt_len, new_tokens, repeats,
                                   bandwidth)
        del model
    if "memory" not in args.skip:
        rows += bench_memory(args.mem_vocab, args.mem_seq, 1, chunk, dtype)

    print()
    lp = [r for r in rows if r["section"] == "token_logprobs"]
    if lp:
        print(f"token_logprobs ({preset}, compute {dtype})")
        print_table(lp, [("mode", "mode"), ("batch", "B"), ("seq", "T"), ("first_call_s", "1st call s"),
                         ("median_s", "median s"), ("tokens_per_s", "tok/s")])
        print()
    gen = [r for r in rows if r["section"] == "generate"]
    if gen:
        print(f"generate ({preset}, temperature 1; prefill and decode jitted programs timed separately)")
        print_table(gen, [("batch", "B"), ("prompt_len", "prompt"), ("new_tokens", "new"),
                          ("prefill_s", "prefill s"), ("prefill_tokens_per_s", "prefill tok/s"),
                          ("decode_s", "decode s"), ("decode_tokens_per_s", "decode tok/s"),
                          ("decode_ms_per_step", "ms/step"), ("end_to_end_new_tokens_per_s", "new tok/s e2e"),
                          ("hbm_limit_tokens_per_s", "HBM limit tok/s"), ("fraction_of_hbm_limit", "of limit")])
        print()
    mem = [r for r in rows if r["section"] == "memory"]
    if mem:
        print(f"log-prob head memory (compiled memory_analysis; vocab {args.mem_vocab}, seq {args.mem_seq}, "
              f"batch 1, hidden 64, chunk {chunk})")
        table = [dict(r, peak_mib=r["peak_bytes"] / 2**20, temp_mib=r["temp_bytes"] / 2**20) for r in mem]
        print_table(table, [("head", "head"), ("mode", "mode"), ("peak_mib", "peak MiB"), ("temp_mib", "temp MiB"),
                            ("peak_ratio_vs_naive", "peak / naive"), ("meets_1_8_target", "<= 1/8")])
        print()
    payload = {"benchmark": "core", "framework": "jopd", "env": env, "preset": preset,
               "params": total_params(PRESETS[preset]), "compute_dtype": dtype, "param_dtype": args.param_dtype,
               "hbm_bandwidth": bandwidth, "hbm_bandwidth_source": bandwidth_source,
               "definitions": {
                   "tokens_per_s": "batch * seq / median time (forward+backward: value_and_grad of sum of "
                                   "log-probs w.r.t. all params)",
                   "generate": "prefill/decode = the two jitted programs of jopd.sampling.generate "
                               "(_compiled), timed separately; prefill tok/s = batch * prompt_len / t_prefill; "
                               "decode tok/s = batch * (new_tokens - 1) / t_decode; EOS disabled",
                   "hbm_limit": "batch * bandwidth / bytes per decode step; bytes = N_params * param bytes + "
                                "batch * 2 * L * kv_heads * head_dim * cache bytes * (prompt_len + new_tokens / 2)",
                   "memory": "compiled memory_analysis(): peak = argument + output - alias + temp bytes",
               },
               "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
