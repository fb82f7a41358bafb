"""The decoder: one Flax (Linen) module for llama / qwen2 / qwen3 / qwen3_moe.

Layers are stacked and run under ``nn.scan`` (one compiled layer, params with a leading ``[layers]`` axis),
under a rematerialisation policy (``config.remat``: none / attention / dots / full). The module returns
final-norm hidden states; the output projection is applied separately (see :mod:`jopd.models.logprobs`) so that log-probs never need the full ``[B, T, V]`` logits.

Numerics follow transformers: RMSNorm in fp32, rotate-half RoPE with fp32 angles, softmax in fp32, MoE router
softmax in fp32 then top-k (renormalised when ``norm_topk_prob``).

Parameter tree (shapes; ``L`` = layers, ``K`` = kv heads, ``H`` = query heads, ``Dh`` = head dim)::

    embedding [V, D]        final_norm [D]        lm_head [D, V] (untied only)
    layers/attn_norm [L, D]  layers/mlp_norm [L, D]
    layers/attn/{q_kernel [L, D, H, Dh], k_kernel, v_kernel [L, D, K, Dh], o_kernel [L, H, Dh, D]}
                (+ q_bias [L, H, Dh], k_bias, v_bias [L, K, Dh] for qwen2; q_norm, k_norm [L, Dh] for qwen3)
    layers/mlp/{gate_kernel, up_kernel [L, D, F], down_kernel [L, F, D]}                     (dense)
    layers/moe/{router_kernel [L, D, E], gate_kernel, up_kernel [L, E, D, F], down_kernel [L, E, F, D]}
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jopd import sharding
from jopd.models.config import ModelConfig, rope_inv_freq

Array = jax.Array
_NEG_INF = float(np.finfo(np.float32).min)


class KVCache(NamedTuple):
    """Key/value cache for all layers: k, v ``[layers, batch, slots, kv_heads, head_dim]``."""

    k: Array
    v: Array


def _dtype(name: str) -> Any:
    return jnp.dtype(name)


def _acc(dtype: Any) -> Any:
    """Accumulation dtype: float32, or float64 when computing in float64 (reference tests)."""
    return jnp.promote_types(dtype, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """HF RMSNorm: normalise in fp32, cast back, then multiply by the weight.

    Its backward pass recomputes the normalised ``x`` from ``x`` and the ``[.., 1]`` inverse RMS, so autodiff
    keeps one activation per norm (its input) instead of three (input, normalised input, output)."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    xf = x.astype(_acc(x.dtype))
    inv_rms = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * (xf * inv_rms).astype(x.dtype), (x, scale, inv_rms)


def _rms_norm_bwd(eps, res, ct):
    x, scale, inv_rms = res
    acc = inv_rms.dtype
    y = x.astype(acc) * inv_rms
    ctf = ct.astype(acc)
    d_scale = jnp.sum((ctf * y.astype(x.dtype).astype(acc)).reshape(-1, x.shape[-1]), axis=0)
    dy = ctf * scale.astype(x.dtype).astype(acc)
    # y = x * r with r = (mean(x^2) + eps)^-1/2:  dx = r * (dy - y * mean(dy * y))
    dx = inv_rms * (dy - y * jnp.mean(dy * y, axis=-1, keepdims=True))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rope_cos_sin(config: ModelConfig, positions: Array, dtype: Any) -> tuple[Array, Array]:
    """cos/sin ``[B, T, head_dim]`` for integer ``positions`` ``[B, T]`` (fp32 angles, like HF)."""
    inv_freq = jnp.asarray(rope_inv_freq(config).astype(np.float32))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x ``[B, T, heads, Dh]``; rotate-half convention (HF ``rotate_half``)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def dense(x: Array, w: Array) -> Array:
    """``x [..., D] @ w [D, N]`` as ONE 2-D matmul over the flattened leading dims.

    Equivalent to an einsum with batch dims, but XLA:CPU runs the backward of a matmul with several
    contracting dims (batch, seq) 2-3x slower than this flattened form; GPUs and TPUs are indifferent.
    """
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(x.shape[:-1] + (w.shape[-1],))


def _kernel_init(scale: float = 0.02):
    return nn.initializers.normal(stddev=scale)


# The variable collection of LoRA adapters (jopd/models/lora.py): ``{name}_lora_a`` / ``{name}_lora_b`` beside the
# kernels they adapt, e.g. lora/layers/attn/q_lora_a. A model's params carry them under this top-level key.
LORA = "lora"


def _lora_input(module: nn.Module, x: Array) -> Array:
    """The adapter path's input: ``x`` under LoRA dropout when the model has a dropout rate and the call passed a
    ``dropout`` rng (training steps); ``x`` itself otherwise (evaluation, sampling, the frozen-logprob pass)."""
    rate = module.config.lora.dropout
    if rate == 0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _adapter(module: nn.Module, name: str) -> tuple[Array, Array] | None:
    """The LoRA pair (A, B) of projection ``name`` (this layer's slice) when the model carries one, else None."""
    if not module.has_variable(LORA, f"{name}_lora_a"):
        return None
    if module.config.lora is None:
        raise ValueError(f"the params carry LoRA adapters ({name}_lora_a) but the model config has no lora spec")
    return module.get_variable(LORA, f"{name}_lora_a"), module.get_variable(LORA, f"{name}_lora_b")


def project(module: nn.Module, name: str, x: Array, w: Array) -> Array:
    """``dense(x, w)`` (``w`` ``[in, out]`` in the compute dtype) plus, when projection ``name`` has an adapter,
    ``scale * (dropout(x) @ A) @ B`` with A ``[in, r]`` and B ``[r, out]`` (stored with the kernel's own
    dimensions, flattened here the way the kernel is), in the compute dtype. The base matmul is unchanged, so a
    model without adapters computes exactly what it did before LoRA existed."""
    y = dense(x, w)
    pair = _adapter(module, name)
    if pair is None:
        return y
    dt = w.dtype
    a, b = pair
    rank = a.shape[-1]
    delta = dense(dense(_lora_input(module, x), a.reshape(-1, rank).astype(dt)), b.reshape(rank, -1).astype(dt))
    return y + (module.config.lora.scale * delta).astype(y.dtype)


def expert_project(module: nn.Module, name: str, xs: Array, w: Array, group_sizes: Array) -> Array:
    """The grouped (MoE) form of :func:`project`: ``ragged_dot(xs, w [E, in, out])`` plus each expert's own
    adapter, ``scale * ragged_dot(ragged_dot(dropout(xs), A [E, in, r]), B [E, r, out])``."""
    y = jax.lax.ragged_dot(xs, w, group_sizes)
    pair = _adapter(module, name)
    if pair is None:
        return y
    dt = w.dtype
    a, b = pair
    low = jax.lax.ragged_dot(_lora_input(module, xs), a.astype(dt), group_sizes)
    delta = jax.lax.ragged_dot(low, b.astype(dt), group_sizes)
    return y + (module.config.lora.scale * delta).astype(y.dtype)


@jax.custom_vjp
def _scores(qg: Array, k: Array) -> Array:
    """q k^T ``[B, K, G, T, S]`` from qg ``[B, T, K, G, Dh]`` and k ``[B, S, K, Dh]``, accumulated (and returned) in
    fp32 or wider. The backward keeps both of its matmuls on compute-dtype operands: plain autodiff would run
    d q and d k on the fp32 scores cotangent, i.e. the attention's two largest backward matmuls in fp32 under
    bf16 compute (as in :func:`jopd.models.logprobs.head_logits`)."""
    return _scores_fwd(qg, k)[0]


def _scores_fwd(qg: Array, k: Array) -> tuple[Array, tuple[Array, Array]]:
    return jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=_acc(qg.dtype)), (qg, k)


def _scores_bwd(res: tuple[Array, Array], ct: Array) -> tuple[Array, Array]:
    qg, k = res
    ct = ct.astype(qg.dtype)
    dq = jnp.einsum("bkgts,bskd->btkgd", ct, k, preferred_element_type=_acc(qg.dtype)).astype(qg.dtype)
    dk = jnp.einsum("bkgts,btkgd->bskd", ct, qg, preferred_element_type=_acc(qg.dtype)).astype(k.dtype)
    return dq, dk


_scores.defvjp(_scores_fwd, _scores_bwd)


def _attention_core(q: Array, k: Array, v: Array, mask: Array, scale: float, dt: Any) -> Array:
    """softmax(q k^T * scale, masked) v with grouped query heads (GQA, no kv repeat); softmax in fp32.

    q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, T, S] (True = attend) -> [B, T, H, Dh].
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, hd)
    scores = _scores(qg, k.astype(qg.dtype)) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache: KVCache | None, layer_idx, cache_index):
        cfg = self.config
        dt, pdt = _dtype(cfg.compute_dtype), _dtype(cfg.param_dtype)
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = self.param("q_kernel", _kernel_init(), (d, h, hd), pdt).astype(dt)
        wk = self.param("k_kernel", _kernel_init(), (d, k, hd), pdt).astype(dt)
        wv = self.param("v_kernel", _kernel_init(), (d, k, hd), pdt).astype(dt)
        wo = self.param("o_kernel", _kernel_init(), (h, hd, d), pdt).astype(dt)
        b, t = x.shape[:2]
        q = project(self, "q", x, wq.reshape(d, h * hd)).reshape(b, t, h, hd)
        kk = project(self, "k", x, wk.reshape(d, k * hd)).reshape(b, t, k, hd)
        v = project(self, "v", x, wv.reshape(d, k * hd)).reshape(b, t, k, hd)
        if cfg.attention_bias:
            q = q + self.param("q_bias", nn.initializers.zeros, (h, hd), pdt).astype(dt)
            kk = kk + self.param("k_bias", nn.initializers.zeros, (k, hd), pdt).astype(dt)
            v = v + self.param("v_bias", nn.initializers.zeros, (k, hd), pdt).astype(dt)
        if cfg.qk_norm:
            q = rms_norm(q, self.param("q_norm", nn.initializers.ones, (hd,), pdt), cfg.rms_norm_eps)
            kk = rms_norm(kk, self.param("k_norm", nn.initializers.ones, (hd,), pdt), cfg.rms_norm_eps)
        q = apply_rope(q, cos, sin)
        kk = apply_rope(kk, cos, sin)
        q = sharding.constrain(q, ("batch", "seq", "q_heads", "head_dim"))

        if cache is not None:
            # Write this step's keys/values into the slots [cache_index, cache_index + T) of this layer,
            # then attend over the whole (fixed-size) cache; invalid slots are masked out.
            zero = jnp.zeros((), jnp.int32)
            start = (layer_idx, zero, cache_index, zero, zero)
            cache = KVCache(
                jax.lax.dynamic_update_slice(cache.k, kk[None].astype(cache.k.dtype), start),
                jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), start),
            )
            kk = cache.k[layer_idx].astype(dt)
            v = cache.v[layer_idx].astype(dt)

        scale = hd ** -0.5
        if cfg.attention_impl == "cudnn" and cache is None:
            out = jax.nn.dot_product_attention(q, kk, v, scale=scale, is_causal=True, implementation="cudnn")
        else:
            core = _attention_core
            if cfg.remat == "attention" and cache is None:
                # Recompute the [B, H, T, S] scores/probs in the backward pass instead of saving them per layer
                # (as flash attention does): they are most of a layer's activations at long T, cheap to redo.
                core = jax.checkpoint(_attention_core, static_argnums=(4, 5), prevent_cse=False)
            out = core(q, kk, v, mask, scale, dt)
        y = project(self, "o", out.reshape(b, t, h * hd), wo.reshape(h * hd, d))
        return y, cache


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """``silu(gate) * up``, elementwise. Its backward pass recomputes the sigmoid from ``gate``, so autodiff
    keeps only the two inputs (which the matmul gradients keep anyway) instead of its intermediates: three
    ``[B, T, F]`` activations per layer fewer at no matmul cost."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, ct):
    gate, up = res
    g, u, c = (a.astype(jnp.promote_types(a.dtype, jnp.float32)) for a in (gate, up, ct))
    sig = jax.nn.sigmoid(g)
    d_silu = sig * (1 + g * (1 - sig))  # d/dg g * sigmoid(g)
    return (c * u * d_silu).astype(gate.dtype), (c * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Mlp(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, pdt = _dtype(cfg.compute_dtype), _dtype(cfg.param_dtype)
        d, f = cfg.hidden_size, cfg.intermediate_size
        wg = self.param("gate_kernel", _kernel_init(), (d, f), pdt).astype(dt)
        wu = self.param("up_kernel", _kernel_init(), (d, f), pdt).astype(dt)
        wd = self.param("down_kernel", _kernel_init(), (f, d), pdt).astype(dt)
        hidden = swiglu(project(self, "gate", x, wg), project(self, "up", x, wu))
        hidden = sharding.constrain(hidden, ("batch", "seq", "mlp"))
        return project(self, "down", hidden, wd)


class MoeMlp(nn.Module):
    """Routed top-k experts (Qwen3-MoE). Tokens are sorted by expert and run with grouped matmuls
    (``lax.ragged_dot``): each token costs k expert MLPs, not E."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, pdt = _dtype(cfg.compute_dtype), _dtype(cfg.param_dtype)
        d, f, e, topk = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
        wr = self.param("router_kernel", _kernel_init(), (d, e), pdt).astype(dt)
        wg = self.param("gate_kernel", _kernel_init(), (e, d, f), pdt).astype(dt)
        wu = self.param("up_kernel", _kernel_init(), (e, d, f), pdt).astype(dt)
        wd = self.param("down_kernel", _kernel_init(), (e, f, d), pdt).astype(dt)
        b, t, _ = x.shape
        tokens = x.reshape(b * t, d)
        router_probs = jax.nn.softmax((tokens @ wr).astype(_acc(dt)), axis=-1)
        weights, experts = jax.lax.top_k(router_probs, topk)  # [N, k]
        if cfg.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights.astype(dt)

        flat_expert = experts.reshape(-1)  # [N*k]
        order = jnp.argsort(flat_expert, stable=True)
        token_of = order // topk
        xs = tokens[token_of]  # [N*k, D], grouped by expert
        group_sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)
        gate = expert_project(self, "gate", xs, wg, group_sizes)
        up = expert_project(self, "up", xs, wu, group_sizes)
        out_sorted = expert_project(self, "down", swiglu(gate, up), wd, group_sizes)  # [N*k, D]
        out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(b * t, topk, d)
        y = jnp.einsum("nkd,nk->nd", out, weights)
        return y.reshape(b, t, d)


class DecoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, carry, layer_idx, cos, sin, mask, cache_index):
        cfg = self.config
        pdt = _dtype(cfg.param_dtype)
        x, cache = carry
        d = cfg.hidden_size
        h = rms_norm(x, self.param("attn_norm", nn.initializers.ones, (d,), pdt), cfg.rms_norm_eps)
        attn_out, cache = Attention(cfg, name="attn")(h, cos, sin, mask, cache, layer_idx, cache_index)
        x = x + attn_out
        h = rms_norm(x, self.param("mlp_norm", nn.initializers.ones, (d,), pdt), cfg.rms_norm_eps)
        x = x + (MoeMlp(cfg, name="moe")(h) if cfg.is_moe else Mlp(cfg, name="mlp")(h))
        x = sharding.constrain(x, ("batch", "seq", None))
        return (x, cache), None


class Decoder(nn.Module):
    """``__call__(tokens [B,T], positions [B,T], mask [B,T,S] bool, cache=None, cache_index=None)``
    → (final-norm hidden states ``[B, T, D]`` in the compute dtype, updated cache or None)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, mask, cache: KVCache | None = None, cache_index=None):
        cfg = self.config
        dt, pdt = _dtype(cfg.compute_dtype), _dtype(cfg.param_dtype)
        embedding = self.param("embedding", _kernel_init(), (cfg.vocab_size, cfg.hidden_size), pdt)
        x = jnp.take(embedding, tokens, axis=0).astype(dt)
        x = sharding.constrain(x, ("batch", "seq", None))
        cos, sin = rope_cos_sin(cfg, positions, dt)
        if cache_index is None:
            cache_index = jnp.zeros((), jnp.int32)

        layer_cls = DecoderLayer
        if cfg.remat == "full":
            layer_cls = nn.remat(layer_cls, prevent_cse=False)
        elif cfg.remat == "dots":
            # Projections are flattened 2-D matmuls (no batch dims): saved; attention einsums recomputed.
            layer_cls = nn.remat(layer_cls, prevent_cse=False,
                                 policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0, LORA: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, name="layers")
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, cache), _ = stack((x, cache), layer_ids, cos, sin, mask, cache_index)
        x = rms_norm(x, self.param("final_norm", nn.initializers.ones, (cfg.hidden_size,), pdt), cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.param("lm_head", _kernel_init(), (cfg.hidden_size, cfg.vocab_size), pdt)
        return x, cache


def output_kernel(params: dict, config: ModelConfig) -> Array:
    """The ``[D, V]`` output projection (the transposed embedding when tied)."""
    kernel, vocab_major = stored_output_kernel(params, config)
    return kernel.T if vocab_major else kernel


def stored_output_kernel(params: dict, config: ModelConfig) -> tuple[Array, bool]:
    """The output projection as stored, and whether it is vocab-major: the ``[V, D]`` embedding when tied
    (so a gradient taken through it needs no transpose), else the ``[D, V]`` ``lm_head``."""
    if config.tie_word_embeddings:
        return params["embedding"], True
    return params["lm_head"], False


def causal_mask(batch: int, length: int) -> Array:
    """``[B, T, T]`` causal mask for right-padded full sequences (pad keys only follow real queries)."""
    m = jnp.tril(jnp.ones((length, length), dtype=bool))
    return jnp.broadcast_to(m, (batch, length, length))


def segment_mask(segment_ids: Array) -> Array:
    """``[B, T, T]`` mask of packed rows: causal and same-segment.

    ``segment_ids`` ``[B, T]`` int: 1, 2, ... per sequence of the row, 0 on trailing padding. Padding attends
    to padding only, so every query row keeps at least its own key and no softmax row is empty.
    """
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same & jnp.tril(jnp.ones((t, t), dtype=bool))[None]


def decoder_variables(params: dict) -> dict:
    """The Flax variables of a model's params: ``{"params": ...}``, plus the ``lora`` collection when the params
    carry adapters (``params["lora"]``, see :mod:`jopd.models.lora`)."""
    if LORA not in params:
        return {"params": params}
    return {"params": {k: v for k, v in params.items() if k != LORA}, LORA: params[LORA]}


def hidden_states(params: dict, config: ModelConfig, tokens: Array, positions: Array | None = None,
                  segment_ids: Array | None = None, dropout_rng: Array | None = None) -> Array:
    """Final-norm hidden states ``[B, T, D]`` of ``tokens`` ``[B, T]`` (no cache).

    Unpacked (``segment_ids`` None): right-padded rows, one sequence each, ``positions`` default to
    ``0..T-1``. Packed: ``segment_ids`` ``[B, T]`` (see :func:`segment_mask`) and ``positions`` ``[B, T]``
    (each token's position within its own sequence, which RoPE needs) are both required; each sequence then
    sees only itself, exactly as if it were alone in a row. ``params`` may carry LoRA adapters
    (``params["lora"]``, with ``config.lora``); ``dropout_rng`` turns their dropout on (training steps only).
    """
    b, t = tokens.shape
    if segment_ids is None:
        mask = causal_mask(b, t)
    else:
        if positions is None:
            raise ValueError("packed rows (segment_ids) need the per-sequence positions too")
        mask = segment_mask(segment_ids)
        if config.attention_impl == "cudnn":
            # The cudnn branch is plain causal attention (is_causal=True, mask ignored); a general
            # same-segment mask there is untested, so packed batches take the exact masked xla path.
            config = config.replace(attention_impl="xla")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    h, _ = Decoder(config).apply(decoder_variables(params), tokens, positions, mask, rngs=rngs)
    return h


def _shape_config(config: ModelConfig) -> ModelConfig:
    # Parameter shapes do not depend on the attention kernel; tracing with "xla" lets a CPU host plan a
    # config that will run with cudnn on GPUs; nor on LoRA adapters (not created by init: jopd.models.lora).
    if config.attention_impl != "xla" or config.lora is not None:
        return config.replace(attention_impl="xla", lora=None)
    return config


@functools.lru_cache(maxsize=16)
def _init_fn(config: ModelConfig):
    config = _shape_config(config)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return jax.jit(lambda rng: Decoder(config).init(rng, tokens, tokens, causal_mask(1, 2))["params"])


def init_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random parameters (normal(0.02) kernels, unit norms, zero biases) in ``config.param_dtype``."""
    return _init_fn(config)(jax.random.PRNGKey(seed))


def param_shapes(config: ModelConfig) -> dict:
    """Pytree of ``jax.ShapeDtypeStruct`` matching :func:`init_params` (no allocation)."""
    config = _shape_config(config)
    tokens = jnp.zeros((1, 2), jnp.int32)
    variables = jax.eval_shape(
        lambda: Decoder(config).init(jax.random.PRNGKey(0), tokens, tokens, causal_mask(1, 2))
    )
    return variables["params"]


# Logical axes of every parameter, keyed by leaf name (the ``layers`` axis is prepended for stacked ones).
_LEAF_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("", "embedding"): ("vocab", "embed"),
    ("", "lm_head"): ("embed", "vocab"),
    ("", "final_norm"): ("norm",),
    ("layers", "attn_norm"): ("norm",),
    ("layers", "mlp_norm"): ("norm",),
    ("attn", "q_kernel"): ("embed", "q_heads", "head_dim"),
    ("attn", "k_kernel"): ("embed", "kv_heads", "head_dim"),
    ("attn", "v_kernel"): ("embed", "kv_heads", "head_dim"),
    ("attn", "o_kernel"): ("q_heads", "head_dim", "embed"),
    ("attn", "q_bias"): ("q_heads", "head_dim"),
    ("attn", "k_bias"): ("kv_heads", "head_dim"),
    ("attn", "v_bias"): ("kv_heads", "head_dim"),
    ("attn", "q_norm"): ("head_dim",),
    ("attn", "k_norm"): ("head_dim",),
    ("mlp", "gate_kernel"): ("embed", "mlp"),
    ("mlp", "up_kernel"): ("embed", "mlp"),
    ("mlp", "down_kernel"): ("mlp", "embed"),
    ("moe", "router_kernel"): ("embed", "router_out"),
    ("moe", "gate_kernel"): ("experts", "embed", "expert_mlp"),
    ("moe", "up_kernel"): ("experts", "embed", "expert_mlp"),
    ("moe", "down_kernel"): ("experts", "expert_mlp", "embed"),
}


def param_logical_axes(config: ModelConfig) -> dict:
    """Pytree (same structure as the params) of logical-axis tuples."""

    def axes_for(path, _leaf):
        keys = [p.key for p in path]
        parent = keys[-2] if len(keys) > 1 else ""
        axes = _LEAF_AXES[(parent, keys[-1])]
        return (("layers",) + axes) if keys[0] == "layers" else axes

    return jax.tree_util.tree_map_with_path(axes_for, param_shapes(config))


def param_shardings(config: ModelConfig, mesh) -> dict:
    """NamedSharding for every parameter on ``mesh``."""
    return sharding.tree_shardings(param_logical_axes(config), param_shapes(config), mesh)
