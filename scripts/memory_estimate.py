"""Expected memory per device of a jopd config, computed from the model shapes, the mesh and the sharding rules.

Usage::

    .venv/bin/python scripts/memory_estimate.py --config configs/qwen3-4b.yaml \
        [--student-arch qwen3-4b] [--teacher-arch qwen3-8b] [--devices 8] [--mesh fsdp=8,tensor=1] \
        [--hbm h100-80gb | --hbm-gib 80] [--prompt-len 1024] [--set key=value ...] [--json out.json]

Architectures come from the models' ``config.json`` when the config's paths exist, else from ``--student-arch``
/ ``--teacher-arch`` presets (the real Qwen3 dimensions are built in), else from ``student.init``.

Every parameter's per-device size is derived exactly as jopd shards it: the decoder's parameter shapes and
logical axes (``jopd.models.decoder.param_shapes`` / ``param_logical_axes``) go through
``jopd.sharding.logical_to_spec`` with ``DEFAULT_RULES`` on the requested mesh, so an axis that a mesh axis does
not divide is replicated here as it is in a run. Activations follow jopd's code paths:

- train steps (``jopd.steps``): fp32 (param-dtype) master params, AdamW moments (2 × param dtype, as optax), the
  gradient (+ an fp32 accumulator with micro-batching), the layer weights all-gathered over ``fsdp`` and cast to
  the compute dtype inside the scanned layer (plus their gradient before the reduce-scatter), activations
  (remat full: one residual checkpoint ``[B_local, S, D]`` per layer plus one layer's working set, recomputed and
  differentiated; no remat: every layer's working set is kept), the attention scores (xla path:
  ``[B_local, H/tp, S, S]`` fp32 + probs; cudnn flash: only the ``[B_local, H/tp, S]`` softmax statistics), and
  the chunked log-prob head (``[B_local, chunk, V/tp]`` fp32 logits, rematerialised: ×2 for the backward);
- rollout generation (``jopd.sampling``): policy params in the param dtype, KV cache
  ``2 × L × B × S × K/tp × Dh`` in the compute dtype (rows and prompt length are rounded up to powers of two,
  as the sampler buckets them), prefill working set (the cached path always uses xla attention over the whole
  cache), and the ``[B, V]`` sampling logits with their top-p sort;
- precompute (``jopd.stages.precompute``): the teacher's params (jopd loads teachers in
  ``precision.param_dtype``; a bf16 line is given for comparison) and one forward (no gradient) with the chunked
  head;
- online OPD (standard OPD, for comparison): the student's train state plus a live teacher, with the largest of
  the three working sets;
- LoRA (``sft.lora`` / ``opd.lora`` or an arm's ``lora`` with rank > 0, or ``--lora RANK``): the train step again
  with a frozen base (jopd/models/lora.py), next to the full fine-tuning one: the base params stay resident in the
  param dtype but get no gradient and no Adam moments; the adapters (their exact shapes and shardings,
  ``jopd.models.lora.adapter_shapes`` / ``adapter_logical_axes``) get both; the gathered layer weights and the
  output head need no gradient buffer; each adapted projection adds a ``[B, S, r]`` intermediate.

What is not modelled: XLA's own scratch and fragmentation, communication buffers beyond one gathered layer, the
CUDA/TPU runtime (≈ 1-2 GiB on a GPU), host memory. These are computed estimates, not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

from jopd.data.loader import SEQ_LEN_BUCKET  # noqa: E402
from jopd.models.config import QWEN3_ARCHS  # noqa: E402 - after the sys.path tweak
from jopd.sharding import round_up  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {f"qwen3-{k}": v for k, v in QWEN3_ARCHS.items()}
# Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B-Base; the -Thinking-2507 model shares it, bar rope_theta and
# max_position_embeddings): 48 layers, every MLP a routed MoE of 128 experts, 8 active per token (3.3e9 active
# of 30.5e9 parameters); intermediate_size is the (unused) dense width.
PRESETS["qwen3-30b-a3b"] = dict(model_type="qwen3_moe", hidden_size=2048, num_layers=48, num_heads=32,
                                num_kv_heads=4, head_dim=128, intermediate_size=6144, num_experts=128,
                                num_experts_per_tok=8, moe_intermediate_size=768, vocab_size=151936,
                                tie_word_embeddings=False)

# Accelerator memory per device, for the "fits" column (GiB as the runtime reports them).
HBM_PRESETS_GIB = {"h100-80gb": 79.1, "h200": 139.8, "tpu-v5p": 95.7, "tpu-v5e": 15.75, "a100-80gb": 79.1}


# ---------------------------------------------------------------------------------------------------------
def model_config(arch: dict[str, Any] | str | None, path: str | None, init: Any, vocab_hint: int | None,
                 precision: Any, what: str):
    """A jopd ModelConfig from (in order) an existing HF dir, a preset name / dict, or an ArchSection."""
    from jopd.models.config import ModelConfig

    runtime = dict(param_dtype=precision.param_dtype, compute_dtype=precision.compute_dtype,
                   remat=precision.remat, attention_impl=precision.attention_impl,
                   logits_chunk_size=precision.logits_chunk_size)
    if path and os.path.isfile(os.path.join(path, "config.json")) and not isinstance(arch, str | dict):
        return ModelConfig.from_pretrained(path, **runtime), f"{path}/config.json"
    if isinstance(arch, str):
        if arch not in PRESETS:
            raise SystemExit(f"--{what}-arch {arch!r}: unknown preset (known: {', '.join(PRESETS)})")
        arch_kw = {"model_type": "qwen3", "qk_norm": True, **PRESETS[arch]}
        return ModelConfig(**arch_kw, **runtime), f"preset {arch}"
    if init is not None:
        vocab = vocab_hint or 128  # no HF tokenizer anywhere: the built-in character tokenizer (< 128 ids)
        return (ModelConfig(model_type=init.model_type, vocab_size=-(-vocab // 16) * 16,
                            hidden_size=init.hidden_size, intermediate_size=init.intermediate_size,
                            num_layers=init.num_layers, num_heads=init.num_heads, num_kv_heads=init.num_kv_heads,
                            head_dim=init.head_dim, tie_word_embeddings=init.tie_word_embeddings,
                            qk_norm=init.model_type in ("qwen3", "qwen3_moe"),
                            attention_bias=init.model_type == "qwen2", num_experts=init.num_experts,
                            num_experts_per_tok=init.num_experts_per_tok,
                            moe_intermediate_size=init.moe_intermediate_size, **runtime),
                f"{what}.init (vocab {vocab})")
    where = path or "(no path)"
    raise SystemExit(f"{what}: {where} has no config.json; pass --{what}-arch (one of {', '.join(PRESETS)})")


def _vocab_of(dirs: list[str | None]) -> int | None:
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, "config.json")):
            with open(os.path.join(d, "config.json")) as f:
                v = json.load(f).get("vocab_size")
            if v:
                return int(v)
    return None


def resolve_mesh(mesh_cfg: Any, devices: int) -> dict[str, int]:
    from jopd.sharding import MeshConfig

    return MeshConfig(data=mesh_cfg.data, fsdp=mesh_cfg.fsdp, tensor=mesh_cfg.tensor,
                      expert=mesh_cfg.expert).resolve(devices)


def _local_elems(shape: tuple[int, ...], ax: tuple, mesh_shape: dict[str, int]) -> int:
    """Elements of one device's shard of an array with logical axes ``ax`` (jopd's sharding rules)."""
    from jopd.sharding import logical_to_spec

    m = SimpleNamespace(shape=dict(mesh_shape))
    spec = logical_to_spec(ax, shape, m)
    n = 1
    for dim, s in zip(shape, spec):
        parts = s if isinstance(s, tuple) else ((s,) if s else ())
        n *= dim // math.prod(m.shape[a] for a in parts)
    return n


def sharded_adapter_bytes(mcfg: Any, spec: Any, mesh: dict[str, int], bytes_per: int) -> dict[str, int]:
    """Count, total and per-device bytes of the LoRA adapters of ``spec`` on ``mcfg``, sharded like a run."""
    import jax

    from jopd.models import lora

    cfg = mcfg.replace(attention_impl="xla", lora=spec)
    shapes, axes = lora.adapter_shapes(cfg), lora.adapter_logical_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
    leaves = list(zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=is_axes)))
    count = sum(math.prod(x.shape) for x, _ in leaves)
    per_dev = sum(_local_elems(x.shape, ax, mesh) for x, ax in leaves)
    return {"count": count, "total": count * bytes_per, "per_device": per_dev * bytes_per,
            "targets": len(spec.targets)}


def sharded_param_bytes(mcfg: Any, mesh: dict[str, int], bytes_per: int) -> dict[str, int]:
    """Total and per-device bytes of the parameters, sharded with jopd's logical-axis rules.

    Returns total, per_device, and per_device_layer (one decoder layer per device) /
    gathered_layer (one layer after the fsdp all-gather: split by tensor/expert only) / gathered_head.
    """
    import jax

    from jopd.models.decoder import output_kernel, param_logical_axes, param_shapes
    from jopd.sharding import logical_to_spec

    fake_mesh = SimpleNamespace(shape=dict(mesh))
    no_fsdp = SimpleNamespace(shape={**mesh, "fsdp": 1, "data": 1})
    mcfg = mcfg.replace(attention_impl="xla")  # shapes do not depend on it; tracing cudnn needs a GPU
    shapes = param_shapes(mcfg)
    axes = param_logical_axes(mcfg)
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
    flat_axes = jax.tree.leaves(axes, is_leaf=is_axes)
    flat_paths = jax.tree_util.tree_flatten_with_path(shapes)[0]

    def local(shape, ax, m) -> int:
        spec = logical_to_spec(ax, shape, m)
        n = 1
        for dim, s in zip(shape, spec):
            parts = s if isinstance(s, tuple) else ((s,) if s else ())
            n *= dim // math.prod(m.shape[a] for a in parts)
        return n

    total = per_dev = layer_local = layer_gathered = head_gathered = 0
    for (path, leaf), ax in zip(flat_paths, flat_axes):
        n = math.prod(leaf.shape)
        total += n
        per_dev += local(leaf.shape, ax, fake_mesh)
        if str(getattr(path[0], "key", "")) == "layers":
            layer_local += local(leaf.shape, ax, fake_mesh) // mcfg.num_layers
            layer_gathered += local(leaf.shape, ax, no_fsdp) // mcfg.num_layers
    # The output head [D, V] (tied: the transposed embedding) as the head's einsum sees it: vocab over tensor.
    head = jax.eval_shape(lambda p: output_kernel(p, mcfg), shapes)
    head_gathered = local(head.shape, ("embed", "vocab"), no_fsdp)
    return {"count": total, "total": total * bytes_per, "per_device": per_dev * bytes_per,
            "layer_per_device": layer_local * bytes_per, "layer_gathered_elems": layer_gathered,
            "head_gathered_elems": head_gathered}


def _div(n: int, d: int) -> int:
    return -(-n // d)


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass
class Line:
    name: str
    formula: str
    bytes: float
    kind: str = "state"  # state (resident) | work (transient, peak of one step)


def layer_working_set(m: Any, b: int, s: int, tp: int, cb: int, *, grad: bool) -> tuple[int, str]:
    """Bytes of one decoder layer's intermediates (excluding attention scores), forward (+ backward)."""
    d, h, k, hd, f = m.hidden_size, _div(m.num_heads, tp), _div(m.num_kv_heads, tp), m.head_dim, m.intermediate_size
    if m.is_moe:
        f = m.num_experts_per_tok * m.moe_intermediate_size
    f = _div(f, tp)
    # residual in/out + 2 norm outputs + attention output projection (4 x [B,S,D]), fp32 norm temporaries
    # (2 x [B,S,D] x 4 B), q/k/v before and after RoPE (2 x [B,S,H+2K,Dh]), attention output [B,S,H,Dh],
    # MLP gate/up/product ([B,S,F] x 3).
    elems = b * s * (4 * d + 2 * (h + 2 * k) * hd + h * hd + 3 * f)
    nbytes = elems * cb + 2 * b * s * d * 4
    formula = "B·S·(4D + 2(H+2K)·Dh + H·Dh + 3F)·cb + 2·B·S·D·4"
    if m.is_moe:
        # the routed dispatch of this device's tokens: tokens sorted by expert, the experts' outputs sorted and
        # scattered back (3 x [B·S·k, D]), the fp32 router probabilities [B·S, E] (F above = k·moe_intermediate)
        topk = m.num_experts_per_tok
        nbytes += 3 * b * s * topk * d * cb + b * s * m.num_experts * 4
        formula += " + 3·B·S·k·D·cb + B·S·E·4 (MoE dispatch, F = k·F_moe)"
    if grad:
        nbytes *= 2
        formula = "2 × [" + formula + "] (fwd + its gradient)"
    return nbytes, formula


def attention_lines(m: Any, b: int, q: int, s: int, tp: int, cb: int, impl: str, *, grad: bool) -> list[Line]:
    h = _div(m.num_heads, tp)
    mult = 2 if grad else 1
    pre = "2 × " if grad else ""
    if impl == "cudnn":
        return [Line("attention (cudnn flash)", f"{pre}B·H/tp·S·4 (softmax statistics only)", mult * b * h * q * 4,
                     "work")]
    scores = b * h * q * s * (4 + cb) + b * q * s  # fp32 scores + probs in compute dtype + bool mask
    return [Line("attention scores (xla)", f"{pre}B·H/tp·Sq·Sk·(4 + cb) + B·Sq·Sk (mask)", mult * scores, "work")]


def lora_specs(cfg: Any, rank: int | None) -> dict[str, Any]:
    """The LoRA settings the estimate shows a frozen-base step for: {"sft": spec, "opd": spec} (the config's
    sft.lora; opd.lora or the first arm with its own); ``rank`` (--lora) sets both (alpha 2 * rank, every
    projection) where the config has none."""
    from jopd.models.config import LoraSpec

    out = {}
    if cfg.sft.lora.enabled:
        out["sft"] = cfg.sft.lora.spec()
    arm_specs = [a.lora_section(cfg.opd).spec() for a in cfg.arms]
    opd = next((s for s in arm_specs if s is not None), None)
    if opd is not None:
        out["opd"] = opd
    if rank:
        for key in ("sft", "opd"):
            out.setdefault(key, LoraSpec(rank=rank, alpha=2.0 * rank))
    return out


def estimate(cfg: Any, student: Any, teacher: Any, mesh: dict[str, int], *, prompt_len: int,
             hbm_gib: float | None, lora_rank: int | None = None) -> dict[str, Any]:
    p = cfg.precision
    pb, cb = DTYPE_BYTES[p.param_dtype], DTYPE_BYTES[p.compute_dtype]
    tp = mesh["tensor"]
    batch_div = mesh["data"] * mesh["fsdp"] * mesh["expert"]  # DEFAULT_RULES: batch -> (data, fsdp, expert)
    ndev = math.prod(mesh.values())
    sp = sharded_param_bytes(student, mesh, pb)
    tpar = sharded_param_bytes(teacher, mesh, pb)
    tpar_bf16 = sharded_param_bytes(teacher, mesh, 2)
    stages: dict[str, list[Line]] = {}

    def train_lines(loop: Any, resp_len: int, lora: Any = None) -> list[Line]:
        micro = loop.micro_batch_size or loop.batch_size
        n_micro = loop.batch_size // micro
        b = _div(micro, batch_div)
        s = round_up(prompt_len + resp_len, SEQ_LEN_BUCKET)  # the loader's static length for the longest row
        m = student
        accum = " × 2 (fp32 accumulator, micro-batching)" if n_micro > 1 else ""
        if lora is None:
            lines = [
                Line("params (master)", f"N·{pb} / shards = {sp['count'] / 1e9:.3f}e9·{pb} sharded",
                     sp["per_device"]),
                Line("Adam moments", f"2 × N·{pb} / shards", 2 * sp["per_device"]),
                Line("gradients", f"N·{pb} / shards" + accum, sp["per_device"] * (2 if n_micro > 1 else 1)),
            ]
        else:
            ad = sharded_adapter_bytes(m, lora, mesh, 4)  # float32 adapters whatever the base's dtype
            lines = [
                Line("frozen base params", f"N·{pb} / shards = {sp['count'] / 1e9:.3f}e9·{pb} sharded (no grad, "
                     "no moments)", sp["per_device"]),
                Line("LoRA adapters (trained, fp32)", f"N_A·4 / shards, N_A = {ad['count'] / 1e6:.2f}e6 "
                     f"(r {lora.rank}, {len(lora.targets)} targets)", ad["per_device"]),
                Line("Adam moments (adapters)", "2 × N_A·4 / shards", 2 * ad["per_device"]),
                Line("gradients (adapters)", "N_A·4 / shards" + accum,
                     ad["per_device"] * (2 if n_micro > 1 else 1)),
            ]
        if mesh["fsdp"] > 1 or cb != pb:
            lw, hw = sp["layer_gathered_elems"], sp["head_gathered_elems"]
            if lora is None:
                lines.append(Line("gathered layer weights + grad", f"layer/tp·({cb} + 4) (all-gather, cast to "
                                  "compute; grad before reduce-scatter)", lw * (cb + 4), "work"))
                lines.append(Line("gathered output head + grad", f"D·V/tp·({cb} + 4)", hw * (cb + 4), "work"))
            else:
                lines.append(Line("gathered layer weights (frozen: no grad)", f"layer/tp·{cb}", lw * cb, "work"))
                lines.append(Line("gathered output head (frozen: no grad)", f"D·V/tp·{cb}", hw * cb, "work"))
        if lora is not None:
            kept = 1 if p.remat in ("full", "dots") else m.num_layers
            lines.append(Line("adapter intermediates", f"{'' if kept == 1 else 'L × '}2 × B·S·r·targets·cb "
                              "(x·A and its gradient)", kept * 2 * b * s * lora.rank * len(lora.targets) * cb,
                              "work"))
        ckpt = m.num_layers * b * s * m.hidden_size * cb
        ws, ws_f = layer_working_set(m, b, s, tp, cb, grad=True)
        if p.remat in ("full", "dots"):
            lines.append(Line("residual checkpoints (remat)", "L·B·S·D·cb", ckpt, "work"))
            if p.remat == "dots":
                d, h, k, hd = m.hidden_size, _div(m.num_heads, tp), _div(m.num_kv_heads, tp), m.head_dim
                f = _div(m.num_experts_per_tok * m.moe_intermediate_size if m.is_moe else m.intermediate_size, tp)
                dots = m.num_layers * b * s * ((h + 2 * k) * hd + d + 3 * f) * cb
                lines.append(Line("saved matmul outputs (remat dots)", "L·B·S·((H+2K)·Dh + D + 3F)·cb", dots, "work"))
            lines.append(Line("one layer's working set", ws_f, ws, "work"))
            lines += attention_lines(m, b, s, s, tp, cb, p.attention_impl, grad=True)
        else:
            ws_fwd, f_fwd = layer_working_set(m, b, s, tp, cb, grad=False)
            lines.append(Line("saved activations (no remat)", f"L × [{f_fwd}]", m.num_layers * ws_fwd, "work"))
            if p.remat == "attention" and p.attention_impl == "xla":
                # scores/probs are recomputed in the backward: one layer's worth at a time
                lines += attention_lines(m, b, s, s, tp, cb, p.attention_impl, grad=True)
            else:
                att = attention_lines(m, b, s, s, tp, cb, p.attention_impl, grad=False)[0]
                lines.append(Line(att.name + " × L (saved)", f"L × {att.formula}", m.num_layers * att.bytes, "work"))
            lines.append(Line("backward of one layer", ws_f, ws, "work"))
        v = _div(m.vocab_size, tp)
        c = min(p.logits_chunk_size, s)
        lines.append(Line("log-prob head (chunked, remat)", f"2 × B·C·V/tp·4  (C = {c})", 2 * b * c * v * 4, "work"))
        lines.append(Line("batch inputs", "B·S·4·4 (tokens, mask, teacher & behaviour log-probs)", b * s * 16,
                          "work"))
        return lines, {"B_local": b, "S": s, "micro_batches": n_micro}

    stages["sft train step"], sft_dims = train_lines(cfg.sft, cfg.teacher_data.max_new_tokens)
    stages["opd train step"], opd_dims = train_lines(cfg.opd, cfg.rollout.max_new_tokens)
    specs = lora_specs(cfg, lora_rank)
    lora_stages = {}
    for key, loop, resp in (("sft", cfg.sft, cfg.teacher_data.max_new_tokens),
                            ("opd", cfg.opd, cfg.rollout.max_new_tokens)):
        if key in specs:
            name = f"{key} train step, LoRA r={specs[key].rank}"
            stages[name] = train_lines(loop, resp, specs[key])[0]
            lora_stages[key] = {"stage": name, "rank": specs[key].rank, "alpha": specs[key].alpha,
                                "targets": list(specs[key].targets),
                                "adapter_params": sharded_adapter_bytes(student, specs[key], mesh, 4)["count"]}

    # ---- rollout generation (policy = SFT student) -----------------------------------------------------
    def gen_lines(m: Any, params: dict, batch_size: int, max_new: int, label: str) -> tuple[list[Line], dict]:
        rows = _pow2(batch_size)
        b = _div(rows, batch_div)
        pl = _pow2(prompt_len, 16)
        s = pl + max_new
        k = _div(m.num_kv_heads, tp)
        lines = [Line(f"{label} params", f"N·{pb} / shards", params["per_device"])]
        kv = 2 * m.num_layers * b * s * k * m.head_dim * cb
        lines.append(Line("KV cache", "2·L·B·S·K/tp·Dh·cb", kv, "work"))
        if mesh["fsdp"] > 1 or cb != pb:
            lines.append(Line("gathered layer weights", f"layer/tp·{cb}", params["layer_gathered_elems"] * cb, "work"))
            lines.append(Line("gathered output head", f"D·V/tp·{cb}", params["head_gathered_elems"] * cb, "work"))
        ws, ws_f = layer_working_set(m, b, pl, tp, cb, grad=False)
        lines.append(Line("prefill layer working set", ws_f + f" (S = P = {pl})", ws, "work"))
        lines += attention_lines(m, b, pl, s, tp, cb, "xla", grad=False)  # cached path is always xla
        v = _div(m.vocab_size, tp)
        lines.append(Line("sampling logits (+ top-p sort)", "4 × B·V/tp·4", 4 * b * v * 4, "work"))
        return lines, {"rows": rows, "B_local": b, "P": pl, "S": s}

    stages["teacher_data generation"], tgen_dims = gen_lines(teacher, tpar, cfg.teacher_data.batch_size,
                                                             cfg.teacher_data.max_new_tokens, "teacher")
    stages["rollout generation"], gen_dims = gen_lines(student, sp, cfg.rollout.batch_size,
                                                       cfg.rollout.max_new_tokens, "policy")

    # ---- precompute (teacher forward) -----------------------------------------------------------------
    b = _div(cfg.precompute.batch_size, batch_div)
    s = _div(prompt_len + cfg.rollout.max_new_tokens, 64) * 64
    t = teacher
    pre = [Line("teacher params", f"N·{pb} / shards (jopd loads teachers in param_dtype)", tpar["per_device"]),
           Line("  (for comparison: bf16 teacher)", "N·2 / shards (not added)", 0.0, "note")]
    pre[1].formula += f" = {tpar_bf16['per_device'] / GIB:.2f} GiB"
    if mesh["fsdp"] > 1 or cb != pb:
        pre.append(Line("gathered layer weights", f"layer/tp·{cb}", tpar["layer_gathered_elems"] * cb, "work"))
        pre.append(Line("gathered output head", f"D·V/tp·{cb}", tpar["head_gathered_elems"] * cb, "work"))
    ws, ws_f = layer_working_set(t, b, s, tp, cb, grad=False)
    pre.append(Line("residual stream", "B·S·D·cb", b * s * t.hidden_size * cb, "work"))
    pre.append(Line("one layer's working set", ws_f, ws, "work"))
    pre += attention_lines(t, b, s, s, tp, cb, p.attention_impl, grad=False)
    c = min(p.logits_chunk_size, s)
    pre.append(Line("log-prob head (chunked)", f"B·C·V/tp·4 (C = {c}) + top-k", b * c * _div(t.vocab_size, tp) * 4
                    * (2 if cfg.precompute.topk else 1), "work"))
    stages["precompute"] = pre
    pre_dims = {"B_local": b, "S": s}

    # ---- standard (online) OPD for comparison: student train state + live teacher -------------------------
    def total(lines: list[Line], kind: str | None = None) -> float:
        return sum(ln.bytes for ln in lines if ln.kind != "note" and (kind is None or ln.kind == kind))

    opd = stages["opd train step"]
    online = [Line("student train state", "params + Adam + grads (as the OPD step)", total(opd, "state")),
              Line("teacher params (live)", f"N_T·{pb} / shards", tpar["per_device"]),
              Line("largest working set", "max(OPD step, generation, teacher forward)",
                   max(total(opd, "work"), total(stages["rollout generation"], "work"),
                       total(pre, "work")), "work")]
    stages["online OPD (standard, comparison)"] = online

    out: dict[str, Any] = {
        "mesh": mesh, "devices": ndev, "param_dtype": p.param_dtype, "compute_dtype": p.compute_dtype,
        "remat": p.remat, "attention_impl": p.attention_impl, "hbm_gib": hbm_gib,
        "student": {"params": sp["count"], "params_per_device_gib": sp["per_device"] / GIB},
        "teacher": {"params": tpar["count"], "params_per_device_gib": tpar["per_device"] / GIB},
        "dims": {"sft": sft_dims, "opd": opd_dims, "generation": gen_dims, "teacher_generation": tgen_dims,
                 "precompute": pre_dims,
                 "prompt_len": prompt_len},
        "lora": lora_stages,
        "stages": {},
    }
    for name, lines in stages.items():
        tot = total(lines)
        out["stages"][name] = {
            "lines": [{"name": ln.name, "formula": ln.formula, "gib": ln.bytes / GIB, "kind": ln.kind}
                      for ln in lines],
            "total_gib": tot / GIB,
            "fits": None if hbm_gib is None else tot / GIB <= hbm_gib,
        }
    return out


def render(est: dict[str, Any], title: str) -> str:
    lines = [f"## {title}", "",
             f"mesh {est['mesh']} ({est['devices']} devices), params {est['param_dtype']}, compute "
             f"{est['compute_dtype']}, remat {est['remat']}, attention {est['attention_impl']}; student "
             f"{est['student']['params'] / 1e9:.2f}e9 params, teacher {est['teacher']['params'] / 1e9:.2f}e9 params.",
             "B = sequences per device (global batch / (data·fsdp·expert)), S = sequence length, cb / pb = "
             "compute / param bytes, tp = tensor-parallel size.", ""]
    d = est["dims"]
    lines.append(f"shapes: SFT B={d['sft']['B_local']} S={d['sft']['S']} (x{d['sft']['micro_batches']} micro); "
                 f"OPD B={d['opd']['B_local']} S={d['opd']['S']} (x{d['opd']['micro_batches']} micro); "
                 f"generation rows/device={d['generation']['B_local']} P={d['generation']['P']} "
                 f"S={d['generation']['S']}; teacher_data rows/device={d['teacher_generation']['B_local']} "
                 f"S={d['teacher_generation']['S']}; precompute B={d['precompute']['B_local']} S={d['precompute']['S']}; "
                 f"prompt length assumed {d['prompt_len']}.")
    lines.append("")
    for name, st in est["stages"].items():
        fits = "" if st["fits"] is None else (" — fits" if st["fits"] else " — DOES NOT FIT")
        lines.append(f"### {name}: {st['total_gib']:.2f} GiB per device{fits}")
        lines.append("")
        lines.append("| component | formula | GiB/device |")
        lines.append("|---|---|---:|")
        for ln in st["lines"]:
            val = "—" if ln["kind"] == "note" else f"{ln['gib']:.2f}"
            lines.append(f"| {ln['name']} | `{ln['formula']}` | {val} |")
        lines.append(f"| **total** | | **{st['total_gib']:.2f}** |")
        lines.append("")
    return "\n".join(lines)


def parse_mesh(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        k, v = part.split("=")
        if k.strip() not in ("data", "fsdp", "tensor", "expert"):
            raise SystemExit(f"--mesh: unknown axis {k!r} (data, fsdp, tensor, expert)")
        out[k.strip()] = int(v)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="jopd YAML config")
    ap.add_argument("--student-arch", help=f"preset when student.path does not exist ({', '.join(PRESETS)})")
    ap.add_argument("--teacher-arch", help="preset for the precompute teacher (default: its config.json)")
    ap.add_argument("--devices", type=int, help="device count (default: the mesh's product when fixed)")
    ap.add_argument("--mesh", help="override the config's mesh, e.g. fsdp=4,tensor=2")
    ap.add_argument("--hbm-gib", type=float, help="memory per device to compare against")
    ap.add_argument("--hbm", choices=sorted(HBM_PRESETS_GIB), help="named accelerator (sets --hbm-gib)")
    ap.add_argument("--prompt-len", type=int,
                    help="longest prompt in tokens (default: 96 for the arithmetic task, 1024 for prompt files)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as on the jopd command line (e.g. precision.attention_impl=xla)")
    ap.add_argument("--lora", type=int, metavar="RANK",
                    help="also estimate the SFT / OPD train steps with LoRA adapters of this rank (alpha 2*RANK, "
                         "every projection) where the config has no LoRA settings of its own")
    ap.add_argument("--json", help="write the estimate as JSON here")
    ap.add_argument("--title", help="heading of the table")
    ap.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = ap.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jopd.config import load_config

    cfg = load_config(args.config, args.set, check_files=False)
    mesh_cfg = cfg.mesh
    if args.mesh:
        mesh_cfg = dataclasses.replace(mesh_cfg, **parse_mesh(args.mesh))
    devices = args.devices
    if devices is None:
        sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, mesh_cfg.expert]
        if -1 in sizes:
            raise SystemExit("the mesh has an automatic (-1) axis: pass --devices N")
        devices = math.prod(sizes)
    mesh = resolve_mesh(mesh_cfg, devices)
    tname = cfg.precompute.teachers[0] if cfg.precompute.teachers else cfg.sft_teacher
    tsec = cfg.teachers[tname]
    # A from-scratch model's vocabulary is the run tokenizer's: read it from the first HF dir that exists.
    vocab = _vocab_of([cfg.tokenizer.path, cfg.student.path, *(t.path for t in cfg.teachers.values())])
    teacher, t_src = model_config(args.teacher_arch, tsec.path, tsec.init, vocab, cfg.precision, "teacher")
    if vocab is None and tsec.init is None:
        vocab = teacher.vocab_size
    student, s_src = model_config(args.student_arch, cfg.student.path, cfg.student.init, vocab, cfg.precision,
                                  "student")
    prompt_len = args.prompt_len or (96 if cfg.task.kind == "arithmetic" else 1024)
    hbm = args.hbm_gib if args.hbm_gib is not None else (HBM_PRESETS_GIB[args.hbm] if args.hbm else None)
    est = estimate(cfg, student, teacher, mesh, prompt_len=prompt_len, hbm_gib=hbm, lora_rank=args.lora)
    est.update(config=args.config, overrides=args.set, student_source=s_src, teacher_source=t_src, teacher_name=tname)
    if not args.quiet:
        print(render(est, args.title or f"{args.config}: student {s_src}, teacher {tname} {t_src}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(est, f, indent=2)
    return est


if __name__ == "__main__":
    main()
