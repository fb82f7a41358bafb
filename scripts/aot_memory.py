"""Compiled (AOT) per-device memory of a config's OPD train step, next to scripts/memory_estimate.py's figure.

Usage::

    .venv/bin/python scripts/aot_memory.py --config configs/qwen3-8b.yaml \\
        [--devices 8] [--mesh fsdp=8] [--student-arch qwen3-8b] [--attention auto|flash|xla|config] \\
        [--moe-matmul auto|standin|ragged_dot] [--pipeline default|no-licm|both] \\
        [--layers N] [--set key=value ...] [--json out.json] [--quiet]

``--config`` may be repeated (one table). docs/scaling.md section 4 has the paper configs' figures.

Nothing is allocated and nothing runs: the config's mesh is built over ``--devices`` simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set here before jax is imported, with
``JAX_PLATFORMS=cpu`` unless set: on a host with N GPUs, ``JAX_PLATFORMS=cuda`` compiles for them), the student's params
and AdamW state are abstract (``jax.ShapeDtypeStruct`` with the shardings jopd gives them:
``jopd.models.decoder.param_shardings``; 8B fp32 params alone would be 32 GB), and jopd's real OPD step
(``jopd.steps.make_opd_step`` with ``training.opd``'s arguments: behaviour log-probs, the config's loss, optimizer
and micro-batching) is ``.lower(state, batch).compile()``d at the run's shapes:

- batch: ``opd.batch_size`` rows (the config's global batch, 256 in the paper configs), accumulated over
  ``opd.batch_size / opd.micro_batch_size`` micro-batches inside the step exactly as in a run (packed configs:
  ``token_budget / row_len`` rows of ``row_len`` tokens);
- sequence: ``round_up(prompt_len + rollout.max_new_tokens, 64)`` (1024 + 4096 = 5120: the rollout store's
  longest row, as the loader pads it).

XLA's ``compiled.memory_analysis()`` then gives per-device bytes: arguments (params + Adam state + this
device's batch rows), outputs, aliased (the donated state updated in place), temporaries and generated code;
``total = arguments + outputs - aliased + temp`` is the step's peak as XLA plans it. Next to it: the estimator's
``opd train step`` for the same config, mesh, batch and attention implementation (``estimate`` of
scripts/memory_estimate.py, same layer count).

Attention (``--attention``): a CPU has no cuDNN. ``auto`` (default) compiles the config's implementation where
the backend has it; a ``cudnn`` config on a CPU is compiled with ``flash``: ``jax.nn.dot_product_attention(...,
implementation="cudnn")`` is routed, while lowering only, to a pure-JAX attention with flash attention's memory
profile (exact causal softmax over query chunks of ``--flash-chunk`` rows inside a ``lax.scan``, custom VJP that
keeps only the output and the ``[B, H, S]`` log-sum-exp and recomputes the scores in the backward), compared
with the estimator's cudnn line. Its own transient (``~4 × B·H·chunk·S·4`` bytes: one chunk's fp32 scores,
probabilities and their gradients) is in XLA's temp and printed separately; cuDNN keeps its tiles on chip.
``xla`` compiles the einsum path (``[B, H, S, S]`` scores per layer) and runs the estimator with xla too.

MoE (``--moe-matmul``): XLA:CPU lowers ``jax.lax.ragged_dot`` by masking the input once per local expert (E x
the ``[M, D]`` operand); on a CPU the MoE layer's grouped matmuls are routed, while lowering, to ``x @ sum_e
w[e]``, which has a grouped GEMM's operand, result and gradient shapes (the memory is right, the numbers are not).

XLA pipelines (``--pipeline``, default both): ``default`` is the backend's own; ``no-licm`` disables
while-loop-invariant code motion for that compile (``compiler_options``), which on XLA:CPU hoists a bf16 -> f32
convert of the ``[L, B, S, D]`` residual-checkpoint stack out of the backward layer loop (an f32 copy of the
whole stack). What else differs from a GPU compile: XLA:CPU computes bf16 matmuls in f32 and keeps their
outputs in f32; no latency-hiding overlap of the next layer's all-gather (a GPU may hold one gathered layer
more); the attention kernel above; no CUDA runtime / NCCL buffers (~1-2 GiB per GPU). The train state is
placed as ``jopd.steps.init_state`` places it (Adam moments sharded like the params).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))

GIB = 1024 ** 3
# XLA compile options per reported pipeline: the backend's own, and the same without while-loop-invariant code
# motion (on XLA:CPU that pass hoists a bf16 -> f32 convert of the [L, B, S, D] residual-checkpoint stack out of
# the backward layer loop: an f32 copy of the whole stack, 2x its bf16 size, that the step does not need).
PIPELINES: dict[str, dict[str, str]] = {
    "default": {},
    "no-licm": {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"},
}
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _want_devices(argv: list[str] | None) -> int:
    """--devices from the command line (before argparse: XLA_FLAGS must be set before jax is imported)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):
        if a == "--devices" and i + 1 < len(args):
            return int(args[i + 1])
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
    return 8


def _set_device_flag(n: int) -> None:
    """Ask XLA for ``n`` host devices unless jax is already imported (then its device count stands)."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_FLAG in flags:
        flags = re.sub(_DEVICE_FLAG + r"=\d+", f"{_DEVICE_FLAG}={n}", flags)
    else:
        flags = (flags + f" {_DEVICE_FLAG}={n}").strip()
    os.environ["XLA_FLAGS"] = flags
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _memory_estimate():
    """scripts/memory_estimate.py as a module (the same one tests/test_configs.py loads)."""
    if "memory_estimate" in sys.modules:
        return sys.modules["memory_estimate"]
    spec = importlib.util.spec_from_file_location("memory_estimate", os.path.join(_HERE, "memory_estimate.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["memory_estimate"] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


def preset_for(path: str | None, presets: dict[str, Any]) -> str | None:
    """The preset named by a model directory's basename: /data/models/Qwen3-8B-Base -> qwen3-8b (longest match)."""
    if not path:
        return None
    base = os.path.basename(os.path.normpath(path)).lower()
    hits = [p for p in presets if base == p or base.startswith(p + "-")]
    return max(hits, key=len) if hits else None


# ---- flash attention's memory profile in pure JAX (for lowering a cudnn config on a backend without cuDNN) ----
def flash_standin(chunk: int):
    """``attention(q [B,T,H,Dh], k/v [B,S,K,Dh], scale) -> [B,T,H,Dh]``: causal, exact, grouped-query; the
    forward keeps (q, k, v, out, lse [B,T,H]) only and the backward recomputes each query chunk's scores."""
    import jax
    import jax.numpy as jnp

    def split(x, c):  # [B, T, ...] -> [T/c, B, c, ...]
        b, t = x.shape[:2]
        return jnp.moveaxis(x.reshape((b, t // c, c) + x.shape[2:]), 1, 0)

    def merge(x):  # [T/c, B, c, ...] -> [B, T, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])

    def chunk_scores(qc, k, start, scale):
        # qc [B, c, K, G, Dh], k [B, S, K, Dh] -> fp32 scores [B, K, G, c, S], causal-masked
        s = jnp.einsum("bckgd,bskd->bkgcs", qc, k, preferred_element_type=jnp.float32) * scale
        qpos = start + jnp.arange(qc.shape[1])
        # an additive [c, S] bias (not a select over [B, K, G, c, S]: nothing big derives from the index)
        bias = jnp.where(qpos[:, None] >= jnp.arange(k.shape[1])[None, :], 0.0, jnp.finfo(jnp.float32).min)
        return s + bias

    def grouped(q, kv_heads):
        b, t, h, d = q.shape
        return q.reshape(b, t, kv_heads, h // kv_heads, d)

    def fwd_impl(q, k, v, scale):
        b, t, h, d = q.shape
        c = math.gcd(t, chunk)
        qs = split(grouped(q, k.shape[2]), c)

        def body(i, qc):
            s = chunk_scores(qc, k, i * c, scale)
            lse = jax.nn.logsumexp(s, axis=-1)  # [B, K, G, c]
            p = jnp.exp(s - lse[..., None]).astype(v.dtype)
            o = jnp.einsum("bkgcs,bskd->bckgd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)
            return i + 1, (o, lse)

        _, (o, lse) = jax.lax.scan(body, jnp.zeros((), jnp.int32), qs)
        return merge(o).reshape(b, t, h, d), lse  # lse [T/c, B, K, G, c]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def attention(q, k, v, scale):
        return fwd_impl(q, k, v, scale)[0]

    def attention_fwd(q, k, v, scale):
        out, lse = fwd_impl(q, k, v, scale)
        return out, (q, k, v, out, lse)

    def attention_bwd(scale, res, d_out):
        q, k, v, out, lse = res
        b, t, h, d = q.shape
        kv = k.shape[2]
        c = math.gcd(t, chunk)
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, H]
        xs = (split(grouped(q, kv), c), split(grouped(d_out, kv), c), split(delta.reshape(b, t, kv, h // kv), c),
              lse)

        def body(carry, xs):
            i, dk, dv = carry
            qc, doc, dc, lc = xs
            p = jnp.exp(chunk_scores(qc, k, i * c, scale) - lc[..., None])  # [B, K, G, c, S] fp32
            dv = dv + jnp.einsum("bkgcs,bckgd->bskd", p.astype(v.dtype), doc, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bckgd,bskd->bkgcs", doc, v, preferred_element_type=jnp.float32)
            ds = (p * (dp - jnp.moveaxis(dc, 1, -1)[..., None])).astype(q.dtype)  # dc [B,c,K,G] -> [B,K,G,c]
            dq = jnp.einsum("bkgcs,bskd->bckgd", ds, k, preferred_element_type=jnp.float32) * scale
            dk = dk + jnp.einsum("bkgcs,bckgd->bskd", ds, qc, preferred_element_type=jnp.float32) * scale
            return (i + 1, dk, dv), dq.astype(q.dtype)

        zeros = jnp.zeros(k.shape, jnp.float32)
        (_, dk, dv), dq = jax.lax.scan(body, (jnp.zeros((), jnp.int32), zeros, zeros), xs)
        return merge(dq).reshape(q.shape), dk.astype(k.dtype), dv.astype(v.dtype)

    attention.defvjp(attention_fwd, attention_bwd)
    return attention


@contextlib.contextmanager
def cudnn_routed_to_standin(chunk: int, calls: list):
    """While active, ``jax.nn.dot_product_attention(..., implementation="cudnn")`` (the decoder's cudnn branch)
    runs :func:`flash_standin`; every other call goes to JAX's own. ``calls`` counts the routed calls."""
    import jax

    original = jax.nn.dot_product_attention
    attention = flash_standin(chunk)

    def routed(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False, query_seq_lengths=None,
               key_value_seq_lengths=None, local_window_size=None, implementation=None, **kw):
        if implementation != "cudnn":
            return original(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                            local_window_size=local_window_size, implementation=implementation, **kw)
        if bias is not None or mask is not None or not is_causal or query_seq_lengths is not None \
                or key_value_seq_lengths is not None or local_window_size is not None or kw:
            raise NotImplementedError("the flash stand-in covers plain causal attention only (the decoder's call)")
        calls.append(tuple(query.shape))
        return attention(query, key, value, query.shape[-1] ** -0.5 if scale is None else scale)

    jax.nn.dot_product_attention = routed
    try:
        yield
    finally:
        jax.nn.dot_product_attention = original


@contextlib.contextmanager
def ragged_dot_routed_to_standin(calls: list):
    """While active, ``jax.lax.ragged_dot(x [M, D], w [E, D, F], group_sizes)`` (the MoE layer's grouped
    matmuls) is ``x @ sum_e w[e]``: the same operand, result and gradient shapes as a grouped GEMM (the weight
    gradient is ``[E, D, F]``), so the same memory, without XLA:CPU's lowering of ragged_dot, which masks the
    lhs once per local expert (E x the ``[M, D]`` input). The numbers are wrong, the buffers are not."""
    import jax
    import jax.numpy as jnp

    original = jax.lax.ragged_dot

    def routed(lhs, rhs, group_sizes, precision=None, preferred_element_type=None, **kw):
        if lhs.ndim != 2 or rhs.ndim != 3:
            return original(lhs, rhs, group_sizes, precision=precision,
                            preferred_element_type=preferred_element_type, **kw)
        calls.append((tuple(lhs.shape), tuple(rhs.shape)))
        out = jnp.dot(lhs, jnp.sum(rhs, axis=0), precision=precision, preferred_element_type=preferred_element_type)
        return out.astype(preferred_element_type or lhs.dtype)

    jax.lax.ragged_dot = routed
    try:
        yield
    finally:
        jax.lax.ragged_dot = original


# ---- abstract train state ------------------------------------------------------------------------------
def abstract_state(mcfg: Any, mesh: Any, optimizer: Any) -> Any:
    """A TrainState of ShapeDtypeStructs, placed as jopd places it: params sharded as ``load_pretrained`` loads
    them, the optimizer state as ``jopd.steps.init_state`` makes it (``steps.opt_state_shardings``)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jopd import steps
    from jopd.models.decoder import param_shapes, param_shardings

    rep = NamedSharding(mesh, PartitionSpec())
    shapes, shardings = param_shapes(mcfg), param_shardings(mcfg, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       jax.eval_shape(optimizer.init, params), steps.opt_state_shardings(optimizer, params, mesh))
    return steps.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params, opt)


def tree_local_bytes(tree: Any) -> int:
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---- one config ------------------------------------------------------------------------------------------
def analyse(config: str, *, devices: int = 8, mesh_override: str | None = None, student_arch: str | None = None,
            teacher_arch: str | None = None, attention: str = "auto", flash_chunk: int = 64,
            layers: int | None = None, overrides: list[str] | tuple[str, ...] = (), prompt_len: int | None = None,
            pipelines: tuple[str, ...] = tuple(PIPELINES),
            moe_matmul: str = "auto") -> dict[str, Any]:
    """Compile the config's OPD step ahead of time and return its memory next to the estimator's."""
    import jax

    from jopd import sharding
    from jopd.config import load_config
    from jopd.steps import make_opd_step, optimizer_from_section
    from jopd.training import opd_loss_config

    me = _memory_estimate()
    if len(jax.devices()) < devices:
        raise SystemExit(f"{devices} devices wanted, jax has {len(jax.devices())} ({jax.devices()[0].platform}): "
                         f"set XLA_FLAGS={_DEVICE_FLAG}={devices} before jax is imported")
    overrides = list(overrides)
    base = load_config(config, overrides, check_files=False)
    configured = base.precision.attention_impl
    backend = jax.devices()[0].platform
    if attention == "auto":
        attention = configured if (configured == "xla" or backend == "gpu") else "flash"
    if attention == "config":
        attention = configured
    if attention == "flash" and configured != "cudnn":
        raise SystemExit("--attention flash stands in for a cudnn config; this one is configured with xla")
    # The estimator's line per implementation: flash = cudnn's (softmax statistics only).
    impl = "xla" if attention == "xla" else "cudnn"
    cfg = load_config(config, overrides + [f"precision.attention_impl={impl}"], check_files=False)
    mesh_cfg = cfg.mesh
    if mesh_override:
        mesh_cfg = dataclasses.replace(mesh_cfg, **me.parse_mesh(mesh_override))
    mesh_sizes = me.resolve_mesh(mesh_cfg, devices)

    # Architectures: the models' config.json where the paths exist, else presets named by the paths.
    tname = cfg.precompute.teachers[0] if cfg.precompute.teachers else cfg.sft_teacher
    tsec = cfg.teachers[tname]
    vocab = me._vocab_of([cfg.tokenizer.path, cfg.student.path, *(t.path for t in cfg.teachers.values())])
    has_dir = lambda p: bool(p) and os.path.isfile(os.path.join(p, "config.json"))  # noqa: E731
    t_arch = teacher_arch or (None if has_dir(tsec.path) else preset_for(tsec.path, me.PRESETS))
    teacher, t_src = me.model_config(t_arch, tsec.path, tsec.init, vocab, cfg.precision, "teacher")
    if vocab is None and tsec.init is None:
        vocab = teacher.vocab_size
    s_arch = student_arch or (None if has_dir(cfg.student.path) else preset_for(cfg.student.path, me.PRESETS))
    student, s_src = me.model_config(s_arch, cfg.student.path, cfg.student.init, vocab, cfg.precision, "student")
    if layers is not None:
        student = student.replace(num_layers=layers)
        teacher = teacher.replace(num_layers=min(layers, teacher.num_layers))
        s_src += f", {layers} of its layers"

    prompt_len = prompt_len or (96 if cfg.task.kind == "arithmetic" else 1024)
    o = cfg.opd
    packed = o.token_budget is not None
    if packed:
        seq = o.row_len or sharding.round_up(prompt_len + cfg.rollout.max_new_tokens, 64)
        rows = o.token_budget // seq
    else:
        seq = sharding.round_up(prompt_len + cfg.rollout.max_new_tokens, 64)
        rows = o.batch_size
    micro = o.micro_batch_size or rows

    est = me.estimate(cfg, student, teacher, mesh_sizes, prompt_len=prompt_len, hbm_gib=None)
    est_opd = est["stages"]["opd train step"]
    est_lines = {ln["name"]: ln["gib"] for ln in est_opd["lines"]}

    mesh = sharding.make_mesh(sharding.MeshConfig(**mesh_sizes), devices=jax.devices()[:devices])
    optimizer = optimizer_from_section(o.optim, o.steps)
    state = abstract_state(student, mesh, optimizer)
    step = make_opd_step(
        student, optimizer, opd_loss_config(o), mesh=mesh, state=state, batch_size=rows, micro_batch_size=micro,
        with_behaviour=True, with_ref=o.kl_coef > 0, packed=packed)
    keys = ["tokens", "response_mask", "teacher_logprobs", "behaviour_logprobs"]
    keys += ["segment_ids", "positions"] if packed else []
    bsh = sharding.batch_sharding(mesh, 2, rows)
    int_keys = {"tokens", "response_mask", "segment_ids", "positions"}
    batch = {k: jax.ShapeDtypeStruct((rows, seq), "int32" if k in int_keys else "float32", sharding=bsh)
             for k in keys}
    args = (state, batch) + ((state.params,) if o.kl_coef > 0 else ())

    calls: list = []
    moe_calls: list = []
    if moe_matmul == "auto":
        moe_matmul = "standin" if student.is_moe and backend == "cpu" else "ragged_dot"
    t0 = time.perf_counter()
    with contextlib.ExitStack() as routed:
        if attention == "flash":
            routed.enter_context(cudnn_routed_to_standin(flash_chunk, calls))
        if moe_matmul == "standin":
            routed.enter_context(ragged_dot_routed_to_standin(moe_calls))
        lowered = step.lower(*args)
    lower_s = time.perf_counter() - t0
    if attention == "flash" and not calls:
        raise SystemExit("--attention flash: the decoder never called jax.nn.dot_product_attention(cudnn); "
                         "its cudnn branch changed: update scripts/aot_memory.py")
    if moe_matmul == "standin" and student.is_moe and not moe_calls:
        raise SystemExit("--moe-matmul standin: the MoE layer never called jax.lax.ragged_dot; it changed: "
                         "update scripts/aot_memory.py")
    compiled = {}
    for name in pipelines:
        t0 = time.perf_counter()
        exe = lowered.compile(compiler_options=PIPELINES[name] or None)
        ma = exe.memory_analysis()
        arg, out, alias = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes
        temp, code = ma.temp_size_in_bytes, ma.generated_code_size_in_bytes
        total = arg + out - alias + temp
        compiled[name] = {"argument_gib": arg / GIB, "output_gib": out / GIB, "alias_gib": alias / GIB,
                          "temp_gib": temp / GIB, "generated_code_gib": code / GIB, "total_gib": total / GIB,
                          "ratio_to_estimate": (total / GIB) / est_opd["total_gib"],
                          "compile_s": round(time.perf_counter() - t0, 1)}
        del exe
    b_local = -(-micro // sharding.batch_parallelism(mesh))
    heads = -(-student.num_heads // mesh_sizes["tensor"])
    standin = 4 * b_local * heads * math.gcd(seq, flash_chunk) * seq * 4 if attention == "flash" else 0
    est_args = est_lines["params (master)"] + est_lines["Adam moments"] + est_lines["batch inputs"] * rows / micro
    return {
        "config": config, "overrides": overrides, "devices": devices, "backend": backend, "mesh": mesh_sizes,
        "student": s_src, "teacher": f"{tname}: {t_src}", "params": student.num_params(),
        "num_layers": student.num_layers, "rows": rows, "micro_batch_size": micro, "micro_batches": rows // micro,
        "rows_per_device_per_micro_batch": b_local, "seq_len": seq, "prompt_len": prompt_len, "packed": packed,
        "attention_configured": configured, "attention_compiled": attention, "attention_estimated": impl,
        "flash_chunk": flash_chunk if attention == "flash" else None,
        "moe_matmul": moe_matmul if student.is_moe else None,
        "standin_attention_transient_gib": standin / GIB,
        "lower_s": round(lower_s, 1), "compiled": compiled,
        "abstract": {"state_gib": tree_local_bytes(state) / GIB, "batch_gib": tree_local_bytes(batch) / GIB},
        "estimate": {"total_gib": est_opd["total_gib"], "arguments_gib": est_args,
                     "gradients_gib": est_lines["gradients"],
                     "work_gib": sum(ln["gib"] for ln in est_opd["lines"] if ln["kind"] == "work"),
                     "lines": est_opd["lines"]},
    }


def render(results: list[dict[str, Any]]) -> str:
    head = ("| config | mesh | layers | B/dev × S (×micro) | attention: compiled / estimated | XLA pipeline | "
            "arguments | temp | outputs − aliased | compiled total | estimate | compiled / estimate |")
    lines = [head, "|" + "---|" * 6 + "---:|" * 6]
    for r in results:
        e = r["estimate"]
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        att = r["attention_compiled"] + (f" (chunk {r['flash_chunk']})" if r["flash_chunk"] else "")
        att += f", MoE {r['moe_matmul']}" if r["moe_matmul"] else ""
        for name, c in r["compiled"].items():
            lines.append(
                f"| {os.path.basename(r['config'])} | {mesh} | {r['num_layers']} | "
                f"{r['rows_per_device_per_micro_batch']} × {r['seq_len']} (×{r['micro_batches']}) | {att} / "
                f"{r['attention_estimated']} | {name} | {c['argument_gib']:.2f} | {c['temp_gib']:.2f} | "
                f"{c['output_gib'] - c['alias_gib']:.2f} | **{c['total_gib']:.2f}** | {e['total_gib']:.2f} | "
                f"{c['ratio_to_estimate']:.2f} |")
    lines.append("")
    for r in results:
        e = r["estimate"]
        secs = ", ".join(f"{n} {c['compile_s']} s" for n, c in r["compiled"].items())
        lines.append(
            f"- {os.path.basename(r['config'])} [{r['attention_compiled']}]: student {r['student']} "
            f"({r['params'] / 1e9:.2f}e9 params), {r['rows']} rows/step; abstract state + batch "
            f"{r['abstract']['state_gib'] + r['abstract']['batch_gib']:.2f} GiB/device (estimator: params + Adam "
            f"+ batch {e['arguments_gib']:.2f}); estimator temp-side: gradients {e['gradients_gib']:.2f} + working "
            f"set {e['work_gib']:.2f} GiB; lower {r['lower_s']} s, compile {secs} on {r['devices']} "
            f"{r['backend']} devices.")
        if r["standin_attention_transient_gib"]:
            lines.append(f"  The flash stand-in's own transient (~4·B·H·chunk·S·4 bytes) is "
                         f"{r['standin_attention_transient_gib']:.2f} GiB of the temp.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    _set_device_flag(_want_devices(argv))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, action="append", help="jopd YAML config (repeatable)")
    ap.add_argument("--devices", type=int, default=8, help="simulated devices (default 8)")
    ap.add_argument("--mesh", help="override the config's mesh, e.g. fsdp=4,expert=2")
    ap.add_argument("--student-arch", help="preset when student.path has no config.json (default: from the "
                    "path's name, e.g. Qwen3-8B-Base -> qwen3-8b)")
    ap.add_argument("--teacher-arch", help="preset for the teacher (default: from its path's name)")
    ap.add_argument("--attention", choices=("auto", "flash", "xla", "config"), default="auto",
                    help="attention to compile: auto = the config's where the backend has it, else flash for "
                    "cudnn; flash = flash attention's memory profile in pure JAX; xla = the einsum path")
    ap.add_argument("--flash-chunk", type=int, default=64, help="query rows per chunk of the flash stand-in")
    ap.add_argument("--layers", type=int, help="compile only this many decoder layers (the estimate too)")
    ap.add_argument("--prompt-len", type=int, help="longest prompt (default 1024 for prompt files, 96 arithmetic)")
    ap.add_argument("--moe-matmul", choices=("auto", "standin", "ragged_dot"), default="auto",
                    help="MoE expert matmuls: ragged_dot as the model calls it, or standin (same buffers; the "
                    "default on a CPU, whose ragged_dot lowering masks the input once per expert)")
    ap.add_argument("--pipeline", choices=(*PIPELINES, "both"), default="both",
                    help="XLA pipeline(s) to compile with: default, no-licm (without while-loop-invariant code "
                    "motion), both (default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = ap.parse_args(argv)

    results = [analyse(c, devices=args.devices, mesh_override=args.mesh, student_arch=args.student_arch,
                       teacher_arch=args.teacher_arch, attention=args.attention, flash_chunk=args.flash_chunk,
                       layers=args.layers, overrides=args.set, prompt_len=args.prompt_len,
                       pipelines=tuple(PIPELINES) if args.pipeline == "both" else (args.pipeline,),
                       moe_matmul=args.moe_matmul)
               for c in args.config]
    if not args.quiet:
        print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
