"""Per-token log-probs without materialising ``[B, T, V]`` logits.

The output projection and log-softmax run over sequence chunks of ``config.logits_chunk_size`` positions
inside a ``lax.scan`` whose body is rematerialised (``jax.checkpoint``): the forward keeps one ``[B, C, V]``
fp32 chunk alive at a time, and the backward recomputes each chunk's logits instead of storing them, so peak
memory of the head is ``B * C * V * 4`` bytes in both directions, whatever the sequence length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jopd.models.config import ModelConfig
from jopd.models.decoder import hidden_states, output_kernel

Array = jax.Array


def _chunked(x: Array, chunk: int) -> tuple[Array, int]:
    """[B, N, ...] -> [n_chunks, B, chunk, ...] (zero-padded), and N."""
    n = x.shape[1]
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((x.shape[0], n_chunks, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0), n


def _unchunk(y: Array, n: int) -> Array:
    """[n_chunks, B, chunk, ...] -> [B, n, ...]."""
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape((y.shape[0], -1) + y.shape[3:])[:, :n]


def prediction_mask(mask: Array, segment_ids: Array | None = None) -> Array:
    """bool ``[B, T]``: 1 where ``mask`` is 1 and token t has a prediction, i.e. a previous token of its own
    sequence (t > 0, and in packed rows the same segment id at t - 1)."""
    b = mask.shape[0]
    if segment_ids is None:
        has_prev = jnp.ones((b, mask.shape[1] - 1), bool)
    else:
        has_prev = segment_ids[:, 1:] == segment_ids[:, :-1]
    return mask.astype(bool) & jnp.concatenate([jnp.zeros((b, 1), bool), has_prev], 1)


def _contract(x: Array, y: Array, x_dim: int, y_dim: int, acc) -> Array:
    """2-D matmul contracting ``x``'s axis ``x_dim`` with ``y``'s axis ``y_dim`` (no transposed copies)."""
    return jax.lax.dot_general(x, y, (((x_dim,), (y_dim,)), ((), ())), preferred_element_type=acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def head_logits(h: Array, w: Array, vocab_major: bool = False) -> Array:
    """Logits ``h [N, D] @ w`` (``w`` ``[D, V]``, or ``[V, D]`` with ``vocab_major``): operands in ``h``'s
    (compute) dtype, float32 (or wider) accumulation and output. The backward runs both of its matmuls on
    compute-dtype operands too: plain autodiff would upcast them to the float32 logits cotangent, i.e. run the
    two largest backward matmuls in fp32 with an fp32 copy of the kernel under bf16 compute. ``d w`` comes back
    in ``w``'s own layout and dtype (fp32 master weights: the sum over sequence chunks then accumulates in
    fp32), as in :mod:`jopd.models.fused_head`."""
    return _head_logits_fwd(h, w, vocab_major)[0]


def _head_logits_fwd(h: Array, w: Array, vocab_major: bool) -> tuple[Array, tuple[Array, Array]]:
    acc = jnp.promote_types(h.dtype, jnp.float32)
    return _contract(h, w.astype(h.dtype), 1, 1 if vocab_major else 0, acc), (h, w)


def _head_logits_bwd(vocab_major: bool, res: tuple[Array, Array], ct: Array) -> tuple[Array, Array]:
    h, w = res
    acc = jnp.promote_types(h.dtype, jnp.float32)
    ct = ct.astype(h.dtype)
    wc = w.astype(h.dtype)
    dh = _contract(ct, wc, 1, 0 if vocab_major else 1, acc).astype(h.dtype)
    dw = _contract(ct, h, 0, 0, acc) if vocab_major else _contract(h, ct, 0, 0, acc)
    return dh, dw.astype(w.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def place_predictions(y: Array, n: int, valid: Array) -> Array:
    """Chunked per-prediction values ``[n_chunks, B, c, ...]`` back to ``[B, T, ...]``: unchunked to the
    ``n = T - 1`` predictions, shifted so that index t holds the prediction of token t (index 0 gets 0), and 0
    wherever ``valid`` ``[B, T]`` is False."""
    y = _unchunk(y, n)
    y = jnp.concatenate([jnp.zeros((y.shape[0], 1) + y.shape[2:], y.dtype), y], axis=1)
    keep = valid.reshape(valid.shape + (1,) * (y.ndim - 2))
    return jnp.where(keep, y, jnp.zeros((), y.dtype))


def logprobs_from_hidden(hidden: Array, w_out: Array, tokens: Array, mask: Array, *, chunk: int = 256,
                         topk: int = 0,
                         segment_ids: Array | None = None) -> Array | tuple[Array, Array, Array]:
    """Token log-probs from final hidden states.

    hidden ``[B, T, D]``, w_out ``[D, V]``, tokens/mask ``[B, T]`` → float32 ``[B, T]`` with
    ``out[:, t] = log p(tokens[:, t] | tokens[:, :t])`` for t ≥ 1 where mask is 1, else 0.
    With ``topk > 0`` also returns the top-k (ids int32, log-probs float32) ``[B, T, k]`` of the distribution
    that predicts position t (zeros where out is 0).
    Packed rows (``segment_ids`` ``[B, T]``): position t-1 predicts t only within one sequence, so a
    sequence's first token gets 0 like t = 0 of an unpacked row.
    """
    h_chunks, n = _chunked(hidden[:, :-1], chunk)
    tgt_chunks, _ = _chunked(tokens[:, 1:], chunk)

    @jax.checkpoint
    def body(_, inputs):
        h, tgt = inputs
        # One flattened 2-D matmul (see decoder.dense): much faster backward on XLA:CPU.
        logits = head_logits(h.reshape(-1, h.shape[-1]), w_out)
        logits = logits.reshape(h.shape[:-1] + (w_out.shape[-1],))
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - lse
        if topk:
            top_vals, top_ids = jax.lax.top_k(logits, topk)
            return None, (lp, top_ids.astype(jnp.int32), top_vals - lse[..., None])
        return None, lp

    _, out = jax.lax.scan(body, None, (h_chunks, tgt_chunks))
    valid = prediction_mask(mask, segment_ids)
    place = functools.partial(place_predictions, n=n, valid=valid)

    if topk:
        lp, ids, vals = out
        return place(lp), place(ids), place(vals)
    return place(out)


def logprobs_fn(params: dict, config: ModelConfig, tokens: Array, mask: Array, *,
                segment_ids: Array | None = None, positions: Array | None = None,
                dropout_rng: Array | None = None) -> Array:
    """Pure, differentiable per-token log-probs ``[B, T]`` (float32) of ``tokens`` ``[B, T]``.

    Right-padded rows, or packed rows with ``segment_ids`` and ``positions`` ``[B, T]`` (see
    :func:`jopd.models.decoder.hidden_states`); a packed sequence's log-probs equal those it gets unpacked.
    ``dropout_rng``: LoRA dropout on (a LoRA model's training passes).
    """
    h = hidden_states(params, config, tokens, positions, segment_ids, dropout_rng=dropout_rng)
    return logprobs_from_hidden(h, output_kernel(params, config), tokens, mask,
                                chunk=config.logits_chunk_size, segment_ids=segment_ids)


def logprobs_and_topk_fn(params: dict, config: ModelConfig, tokens: Array, mask: Array, topk: int, *,
                         segment_ids: Array | None = None, positions: Array | None = None):
    """Like :func:`logprobs_fn`, plus the top-k (ids, log-probs) ``[B, T, k]`` at every position."""
    h = hidden_states(params, config, tokens, positions, segment_ids)
    return logprobs_from_hidden(h, output_kernel(params, config), tokens, mask,
                                chunk=config.logits_chunk_size, topk=topk, segment_ids=segment_ids)


def naive_logprobs_fn(params: dict, config: ModelConfig, tokens: Array, mask: Array) -> Array:
    """Reference: full ``[B, T, V]`` fp32 logits then log_softmax (used by tests and the memory benchmark)."""
    h = hidden_states(params, config, tokens)
    logits = jnp.einsum("btd,dv->btv", h, output_kernel(params, config).astype(h.dtype),
                        preferred_element_type=jnp.float32)
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    lp = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    lp = jnp.concatenate([jnp.zeros((tokens.shape[0], 1), lp.dtype), lp], axis=1)
    return jnp.where(mask.astype(bool), lp, 0.0)
