"""Output head fused with a token-local loss: the backward pass never recomputes logits.

:func:`jopd.models.logprobs.logprobs_from_hidden` rematerialises each ``[B, c, V]`` chunk of logits in the
backward pass: four ``[.., V]`` matmuls per chunk (logits, their recomputation, d hidden, d W). When the loss
is a sum of per-token terms whose derivative w.r.t. the token's log-prob ``g_t = d loss / d lp_t`` depends only
on quantities of that token (the fused OPD and SFT losses, :mod:`jopd.losses`), ``g_t`` is known as soon as
``lp_t`` is, so the forward pass can finish the head's backward on the chunk it already holds:

    d loss / d logits = g[..., None] * (onehot(target) - softmax(logits))        [B, c, V]
    d hidden = (d loss / d logits) @ W^T,   d W += hidden^T @ (d loss / d logits)

three ``[.., V]`` matmuls per chunk instead of four; the backward pass only scales the stored ``d hidden``
``[B, T, D]`` and ``d W`` (``[D, V]``, or ``[V, D]`` for a tied embedding) by the loss cotangent. Peak memory
of the head stays one ``[B, c, V]`` chunk (plus ``d W``). Without differentiation (evaluation) only the forward matmul runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jopd.models.logprobs import _chunked, _unchunk

Array = jax.Array
PerTokenLoss = Callable[[Array, Any], Array]


def fused_head_loss(hidden: Array, w_out: Array, tokens: Array, valid: Array, per_token_loss: PerTokenLoss,
                    aux: Any, *, chunk: int, vocab_major: bool = False) -> tuple[Array, Array]:
    """``sum_t per_token_loss(lp, aux)[:, t]`` over all ``T`` positions, and the log-probs ``lp``.

    ``lp[:, t] = log softmax(hidden[:, t - 1] @ w_out)[tokens[:, t]]`` where ``valid[:, t]``, else 0 (always
    at t = 0), exactly as :func:`jopd.models.logprobs.logprobs_from_hidden` computes it: build ``valid``
    with :func:`jopd.models.logprobs.prediction_mask` (mask and a previous token in the same sequence).
    The matmul runs in ``hidden``'s dtype with float32 (or wider) accumulation.

    Args:
      hidden: [B, T, D] final hidden states (compute dtype).
      w_out: [D, V] output projection, or [V, D] with ``vocab_major`` (a tied embedding, passed as it is
        stored: its gradient is then accumulated in the embedding's own layout, with no [D, V] transpose copy
        of it in the backward pass).
      tokens: int [B, T] the tokens scored.
      valid: [B, T] 1 where token t has a prediction.
      per_token_loss: ``(lp [B, c], aux chunk) -> [B, c]``, evaluated on sequence chunks (and on position 0
        alone, with ``lp = 0``). Token-local: its value at a position depends only on ``lp`` and ``aux`` there
        (it is differentiated through ``lp`` chunk by chunk). It must not close over arrays that are being
        differentiated; pass per-token data (teacher log-probs, token weights, ...) through ``aux``.
      aux: pytree of [B, T] arrays, sliced along T like ``lp``. No gradient flows to them.
      chunk: sequence positions per chunk (static); the last chunk is zero-padded.
      vocab_major: ``w_out`` is [V, D] (static).

    Returns:
      ``(loss, lp)``: the loss scalar (float32, or wider for wider inputs), differentiable w.r.t. ``hidden``
      and ``w_out``; and float32 ``lp`` [B, T] for metrics only: it is returned through ``stop_gradient``
      (this function's VJP ignores any cotangent of ``lp``).
    """
    loss, lp = _fused(per_token_loss, chunk, vocab_major, hidden, w_out, tokens, valid.astype(bool), aux)
    return loss, jax.lax.stop_gradient(lp)


def _contract(x: Array, y: Array, x_dim: int, y_dim: int, acc) -> Array:
    """2-D matmul contracting ``x``'s axis ``x_dim`` with ``y``'s axis ``y_dim`` (no transposed copies)."""
    return jax.lax.dot_general(x, y, (((x_dim,), (y_dim,)), ((), ())), preferred_element_type=acc)


def _head(per_token_loss: PerTokenLoss, chunk: int, vocab_major: bool, hidden: Array, w_out: Array,
          tokens: Array, valid: Array, aux: Any,
          with_grads: bool) -> tuple[Array, Array, tuple[Array, Array] | None]:
    """(loss, lp [B, T], (d hidden [B, T, D], d w_out in ``w_out``'s layout) if ``with_grads``)."""
    b, t, d = hidden.shape
    w = w_out.astype(hidden.dtype)
    vocab = w.shape[0] if vocab_major else w.shape[-1]
    w_d = 1 if vocab_major else 0  # w's hidden axis
    acc = jnp.promote_types(hidden.dtype, jnp.float32)
    # Chunk i, row j predicts position i * chunk + j + 1 from the hidden state before it (the shift of
    # logprobs_from_hidden, with the same chunk boundaries); position 0 has no prediction.
    h_chunks, n = _chunked(hidden[:, :-1], chunk)
    tgt_chunks, _ = _chunked(tokens[:, 1:], chunk)
    ok_chunks, _ = _chunked(valid[:, 1:], chunk)
    inside_chunks, _ = _chunked(jnp.ones((b, n), bool), chunk)  # False on the last chunk's padding
    aux_chunks = jax.tree.map(lambda x: _chunked(x[:, 1:], chunk)[0], aux)

    def chunk_loss(lp: Array, a: Any, inside: Array) -> Array:
        return jnp.sum(jnp.where(inside, per_token_loss(lp, a), 0))

    def body(dw, xs):
        h, tgt, ok, inside, a = xs
        h2 = h.reshape(-1, d)
        # One flattened 2-D matmul (see decoder.dense): much faster on XLA:CPU.
        logits = _contract(h2, w, 1, w_d, acc).reshape(h.shape[:-1] + (vocab,))
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.where(ok, jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - lse, 0)
        if not with_grads:
            return dw, (lp, chunk_loss(lp, a, inside))
        loss, g = jax.value_and_grad(chunk_loss)(lp, a, inside)
        g = jnp.where(ok, g, 0)  # lp is a constant 0 where there is no prediction
        # d lp / d logits = onehot(target) - softmax(logits)
        g_logits = g[..., None] * (jax.nn.one_hot(tgt, vocab, dtype=acc) - jnp.exp(logits - lse[..., None]))
        g2 = g_logits.reshape(-1, vocab).astype(w.dtype)
        dh = _contract(g2, w, 1, 1 - w_d, acc).reshape(h.shape).astype(hidden.dtype)
        dw = dw + (_contract(g2, h2, 0, 0, acc) if vocab_major else _contract(h2, g2, 0, 0, acc))
        return dw, (lp, loss, dh)

    dw0 = jnp.zeros(w.shape, acc) if with_grads else None
    dw, out = jax.lax.scan(body, dw0, (h_chunks, tgt_chunks, ok_chunks, inside_chunks, aux_chunks))
    lp = _unchunk(out[0], n)
    lp = jnp.concatenate([jnp.zeros((b, 1), lp.dtype), lp], axis=1)
    loss0 = jnp.sum(per_token_loss(lp[:, :1], jax.tree.map(lambda x: x[:, :1], aux)))
    loss = loss0 + jnp.sum(out[1])
    if not with_grads:
        return loss, lp, None
    dh = jnp.pad(_unchunk(out[2], n), ((0, 0), (0, 1), (0, 0)))  # the last hidden state predicts nothing
    return loss, lp, (dh, dw.astype(w_out.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(per_token_loss: PerTokenLoss, chunk: int, vocab_major: bool, hidden: Array, w_out: Array,
           tokens: Array, valid: Array, aux: Any) -> tuple[Array, Array]:
    loss, lp, _ = _head(per_token_loss, chunk, vocab_major, hidden, w_out, tokens, valid, aux, with_grads=False)
    return loss, lp


def _fused_fwd(per_token_loss, chunk, vocab_major, hidden, w_out, tokens, valid, aux):
    loss, lp, grads = _head(per_token_loss, chunk, vocab_major, hidden, w_out, tokens, valid, aux,
                            with_grads=True)
    return (loss, lp), grads


def _fused_bwd(per_token_loss, chunk, vocab_major, grads, cotangents):
    dh, dw = grads
    ct_loss = cotangents[0]  # lp is metrics-only: its cotangent is ignored
    return ct_loss.astype(dh.dtype) * dh, ct_loss.astype(dw.dtype) * dw, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
