"""The student's side of the top-k distillation objectives, without materialising ``[B, T, V]`` logits.

The teacher's top-k cache (``precompute.topk: k``) stores, per response position t, the k ids ``I_t`` of the
teacher distribution that predicts token t and their log-probs. The top-k objectives of
:func:`jopd.losses.topk_divergence` compare the two distributions over ``k + 1`` buckets, the k ids and one tail
bucket (every other id), so the student must supply, per position, its log-probs at the teacher's ids and the
log-mass of its own tail.

:func:`topk_student_logprobs` runs the output projection over sequence chunks inside a ``lax.scan`` whose body is
rematerialised (``jax.checkpoint``), exactly like :func:`jopd.models.logprobs.logprobs_from_hidden`: one
``[B, c, V]`` fp32 chunk of logits (plus its masked copy for the tail) is alive at a time in the forward pass and
again in the backward pass, whatever the sequence length. Plain autodiff differentiates through it (the loss is
not token-local in one log-prob, so the fused custom-VJP head does not apply).

Alignment: position t is predicted by ``hidden[:, t - 1]``, so the values at index t are those of the
distribution over token t given tokens ``< t`` -- the convention of ``logprobs_from_hidden`` and of the stored
``teacher_topk_ids[:, t]`` (precompute writes the top-k of that same distribution at index t).

The tail log-mass is a log-sum-exp over the logits with the k ids masked out (set to -inf), minus the full
log-partition: stable however much mass the top-k holds, never ``log(1 - sum p_i)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jopd.models.logprobs import _chunked, head_logits, place_predictions, prediction_mask

Array = jax.Array


def tail_logsumexp(logits: Array, ids: Array) -> Array:
    """``log sum_{v not in ids} exp(logits[..., v])`` ``[...]``; -inf where ``ids`` covers the whole vocabulary.

    ``logits`` ``[B, c, V]``, ``ids`` int ``[B, c, k]`` (repeated ids are fine: masked once). Finite gradient
    everywhere: the masked entries get none, an empty tail gets none (double ``where``).
    """
    b, c, _ = logits.shape
    masked = logits.at[jnp.arange(b)[:, None, None], jnp.arange(c)[None, :, None], ids].set(-jnp.inf)
    mx = jnp.max(masked, axis=-1)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0))
    s = jnp.sum(jnp.exp(masked - shift[..., None]), axis=-1)
    nonempty = s > 0
    return jnp.where(nonempty, jnp.log(jnp.where(nonempty, s, 1)) + shift, -jnp.inf)


def topk_student_logprobs(hidden: Array, w_out: Array, tokens: Array, mask: Array, topk_ids: Array, *,
                          chunk: int = 256, segment_ids: Array | None = None,
                          vocab_major: bool = False) -> tuple[Array, Array, Array]:
    """The student's sampled-token log-probs, log-probs at the teacher's top-k ids and tail log-mass.

    Args:
      hidden: ``[B, T, D]`` final hidden states (compute dtype).
      w_out: ``[D, V]`` output projection, or ``[V, D]`` with ``vocab_major`` (a tied embedding as stored).
      tokens: int ``[B, T]`` the rollout tokens.
      mask: ``[B, T]`` 1 on the positions to score (the response).
      topk_ids: int ``[B, T, k]`` the teacher's top-k ids; index t holds the ids of the distribution over
        token t (the store's ``teacher_topk_ids``). Ids must be in ``[0, V)``.
      chunk: sequence positions per chunk (static).
      segment_ids: ``[B, T]`` segment ids of packed rows (a sequence's first token has no prediction).
      vocab_major: ``w_out`` is ``[V, D]`` (static).

    Returns:
      float32 (or wider, for wider ``hidden``) ``(lp [B, T], topk_lp [B, T, k], tail_lp [B, T])``:
      ``lp[:, t] = log p(tokens[:, t] | tokens[:, :t])``, ``topk_lp[:, t, j] = log p(topk_ids[:, t, j] | ...)``
      and ``tail_lp[:, t] = log sum_{v not in topk_ids[:, t]} p(v | ...)`` (-inf when the ids cover the whole
      vocabulary) where token t has a prediction and ``mask`` is 1; 0 elsewhere (t = 0 always).
    """
    d = hidden.shape[-1]
    vocab = w_out.shape[0] if vocab_major else w_out.shape[-1]
    h_chunks, n = _chunked(hidden[:, :-1], chunk)
    tgt_chunks, _ = _chunked(tokens[:, 1:], chunk)
    ids_chunks, _ = _chunked(topk_ids[:, 1:].astype(jnp.int32), chunk)

    @jax.checkpoint
    def body(_, xs):
        h, tgt, ids = xs
        # One flattened 2-D matmul (see decoder.dense): much faster on XLA:CPU.
        logits = head_logits(h.reshape(-1, d), w_out, vocab_major).reshape(h.shape[:-1] + (vocab,))
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - lse
        topk_lp = jnp.take_along_axis(logits, ids, axis=-1) - lse[..., None]
        tail_lp = tail_logsumexp(logits, ids) - lse
        return None, (lp, topk_lp, tail_lp)

    _, out = jax.lax.scan(body, None, (h_chunks, tgt_chunks, ids_chunks))
    valid = prediction_mask(mask, segment_ids)
    place = functools.partial(place_predictions, n=n, valid=valid)

    lp, topk_lp, tail_lp = out
    return place(lp), place(topk_lp), place(tail_lp)
