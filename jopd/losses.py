"""Loss functions for Lightning OPD (offline on-policy distillation) and SFT.

All per-token inputs are ``[B, T]`` arrays aligned with token positions (see ``docs/CONTRACTS.md``):
``x[:, t]`` refers to token ``t`` and ``response_mask[:, t] == 1`` marks the response tokens, which are the
only ones that count. Values at non-response positions are ignored entirely (they are replaced by 0 before
any arithmetic, so padding may even hold ``-inf``/NaN without poisoning the loss or its gradient).

On-policy distillation uses the per-token advantage

    A_t = log p_teacher(y_t | s_t) - log p_old(y_t | s_t),

i.e. the negative of the single-sample reverse-KL estimate ``log p_old - log p_teacher``, as a policy-gradient
advantage inside a PPO-style clipped surrogate. In Lightning OPD the teacher log-probs are precomputed and the
rollouts are fixed (sampled once by the SFT student, the *behaviour* policy). With one optimizer update per
batch the "old" policy is the current one, so ``opd_loss`` defaults to ``old = stop_gradient(student)``: the
ratio is exactly 1 in the forward pass and the whole step is one fused forward/backward pass.

Gradient accumulation
---------------------
Both aggregations are means, so naively averaging micro-batch losses does not reproduce the full-batch loss
when micro-batches hold different numbers of tokens / sequences. Instead, compute the full-batch
denominators once with :func:`loss_denominators` and pass them as ``num_tokens`` / ``num_seqs`` to every
micro-batch call; each call then returns that micro-batch's *share* of the full-batch loss, and the **sum**
(not the mean) of the micro-batch losses and gradients equals the full-batch loss and gradient exactly.

Packed rows
-----------
A row may hold several sequences back to back, told apart by ``segment_ids`` ``[B, T]`` (1, 2, ... per
sequence of the row, 0 on trailing padding, which belongs to no sequence). Only ``seq_mean`` cares: its
"sequence" is then a (row, segment id > 0) pair instead of a row, so a packed batch gives the same loss and
gradient as the same sequences unpacked. Micro-batches split rows, so a sequence still never spans two.

Per-token form (fused output heads)
-----------------------------------
Both aggregations are linear in the per-token values, so ``aggregate(x, ...) == sum(token_weights(...) * x)``
with the weights of :func:`token_weights`, and the fused OPD loss is ``sum(token_weights * opd_token_loss)``
(SFT: ``sum(token_weights * -lp)``). A head that knows ``d loss / d lp_t`` per token in its forward pass (see
:func:`jopd.models.fused_head.fused_head_loss`) takes the loss in this form.

All functions are pure and jit-friendly: string / float options are static Python values (validated eagerly,
so pass them via ``functools.partial`` or ``static_argnames`` under ``jax.jit``); ``num_tokens`` / ``num_seqs``
may be traced arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

__all__ = [
    "TOPK_KINDS",
    "Aggregation",
    "LossWeights",
    "aggregate",
    "loss_denominators",
    "low_var_kl",
    "opd_loss",
    "opd_token_loss",
    "sft_loss",
    "token_weights",
    "topk_buckets",
    "topk_divergence",
]

Aggregation = Literal["token_mean", "seq_mean"]
_AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)

# Added to the advantage variance before the rsqrt so that a (near-)constant advantage does not blow up.
_NORM_EPS = 1e-8


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _check_aggregation(mode: str) -> None:
    if mode not in _AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {_AGGREGATIONS}")


def _check_shapes(response_mask: jax.Array, **arrays: jax.Array | None) -> None:
    """Shapes are static, so mismatches are reported eagerly (also under ``jit``)."""
    if jnp.ndim(response_mask) != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {jnp.shape(response_mask)}")
    for name, x in arrays.items():
        if x is not None and jnp.shape(x) != jnp.shape(response_mask):
            raise ValueError(
                f"{name} has shape {jnp.shape(x)} but response_mask has shape {jnp.shape(response_mask)}"
            )


def _compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
    """At least float32; float64 inputs (under x64) stay float64 so tests can check gradients precisely."""
    dtype = jnp.dtype(jnp.float32)
    for x in arrays:
        if x is not None:
            dtype = jnp.promote_types(dtype, jnp.result_type(x))
    return dtype


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den > 0``, else 0 -- with a finite gradient in both branches (double-where)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x`` over ``mask`` (both [B, T]); 0 when the mask is empty."""
    return _safe_div(jnp.sum(x * mask), jnp.sum(mask))


def _metric(x: jax.Array) -> jax.Array:
    """Metrics are logged, never differentiated, and always float32 scalars."""
    return jax.lax.stop_gradient(x).astype(jnp.float32)


def _sequence_sum(x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Per-sequence sums of ``x`` [B, T]: ``[B, 1]`` (one sequence a row) or, packed, ``[B, T]`` with slot
    ``s`` holding segment ``s + 1`` of the row (unused slots 0).

    A per-row segment sum: O(B*T), and the batch axis stays a batch axis for sharding. Segment 0 (padding)
    is sent out of range, where ``segment_sum`` drops it.
    """
    if segment_ids is None:
        return jnp.sum(x, axis=-1, keepdims=True)
    t = x.shape[-1]
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    slots = jnp.where(seg > 0, seg - 1, t)
    return jax.vmap(lambda v, k: jax.ops.segment_sum(v, k, num_segments=t))(x, slots)


def loss_denominators(response_mask: jax.Array,
                      segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Full-batch denominators for exact gradient accumulation.

    Call this on the *full* batch's mask before splitting it into micro-batches, and pass the results as
    ``num_tokens`` / ``num_seqs`` to every micro-batch call of :func:`aggregate`, :func:`opd_loss` or
    :func:`sft_loss`; then sum (do not average) the micro-batch losses and gradients.

    Args:
      response_mask: [B, T] full-batch response mask (bool / int / float, 1 on response tokens).
      segment_ids: [B, T] segment ids of packed rows (see the module docstring); None = one sequence a row.

    Returns:
      ``(num_tokens, num_seqs)``: float32 scalars -- the number of response tokens, and the number of
      sequences that have at least one response token (the only ones ``seq_mean`` counts).
    """
    _check_shapes(response_mask, segment_ids=segment_ids)
    m = jnp.asarray(response_mask).astype(jnp.float32)
    num_tokens = jnp.sum(m)
    tokens_per_seq = _sequence_sum(m, segment_ids)
    num_seqs = jnp.sum((tokens_per_seq > 0).astype(jnp.float32))
    return num_tokens, num_seqs


# ----------------------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------------------
def aggregate(
    per_token: jax.Array,
    response_mask: jax.Array,
    mode: Aggregation = "token_mean",
    *,
    num_tokens: jax.Array | float | None = None,
    num_seqs: jax.Array | float | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Reduce a per-token quantity to a scalar over the response tokens.

    Modes:
      * ``"token_mean"``: ``sum(x * m) / sum(m)`` over the whole batch -- every token weighs the same.
      * ``"seq_mean"``: each sequence's token-mean ``sum_t(x * m) / sum_t(m)``, then the mean over sequences
        ("per-sample token-mean", the Lightning OPD setting) -- every sequence weighs the same. Sequences with
        no response token contribute 0 and are not counted in the denominator. A sequence is a row, or with
        ``segment_ids`` a (row, segment id > 0) pair (tokens of segment 0 belong to none and are ignored).

    An empty mask gives 0 (not NaN) in both modes.

    Gradient accumulation (see the module docstring): with the full batch split into micro-batches, pass
      * ``token_mean``: ``num_tokens`` = number of response tokens in the *full* batch;
      * ``seq_mean``: ``num_seqs`` = number of sequences with >= 1 response token in the *full* batch. A
        sequence's own token count needs no override: a sequence is never split across micro-batches, so its
        token-mean is local to the micro-batch that holds it.
    :func:`loss_denominators` computes both. The override irrelevant to ``mode`` is ignored, so callers may
    always pass both. With an override the result is this micro-batch's share of the full-batch mean.

    Args:
      per_token: [B, T] values (float).
      response_mask: [B, T] mask, 1 on response tokens.
      mode: ``"token_mean"`` or ``"seq_mean"`` (static).
      num_tokens: optional scalar override of the token-mean denominator.
      num_seqs: optional scalar override of the seq-mean denominator.
      segment_ids: [B, T] segment ids of packed rows; None = one sequence a row.

    Returns:
      Scalar in the dtype of ``per_token`` (promoted to at least float32).
    """
    _check_aggregation(mode)
    _check_shapes(response_mask, per_token=per_token, segment_ids=segment_ids)
    dtype = _compute_dtype(per_token)
    m = jnp.asarray(response_mask).astype(dtype)
    # where (not just multiply) so non-finite values in padding cannot leak into the sum or its gradient.
    x = jnp.where(m > 0, jnp.asarray(per_token).astype(dtype), 0) * m

    if mode == "token_mean":
        den = jnp.sum(m) if num_tokens is None else jnp.asarray(num_tokens, dtype)
        return _safe_div(jnp.sum(x), den)

    tokens_per_seq = _sequence_sum(m, segment_ids)  # [B, 1] or [B, T]
    seq_means = _safe_div(_sequence_sum(x, segment_ids), tokens_per_seq)  # 0 for empty sequences / slots
    if num_seqs is None:
        den = jnp.sum((tokens_per_seq > 0).astype(dtype))
    else:
        den = jnp.asarray(num_seqs, dtype)
    return _safe_div(jnp.sum(seq_means), den)


def token_weights(
    response_mask: jax.Array,
    aggregation: Aggregation = "token_mean",
    *,
    num_tokens: jax.Array | float | None = None,
    num_seqs: jax.Array | float | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Per-token weights ``[B, T]`` of :func:`aggregate`: ``aggregate(x, ...) == sum(token_weights(...) * x)``.

    ``token_mean``: ``m_t / num_tokens``; ``seq_mean``: ``m_t / (len(seq(t)) * num_seqs)``, with the same
    denominators, overrides, sequences (rows, or (row, segment id > 0) pairs) and empty-case zeros as
    :func:`aggregate` (tokens of segment 0 weigh 0). Arguments as there; the weights do not depend on ``x``.

    Returns:
      [B, T] weights in the mask's dtype promoted to at least float32.
    """
    _check_aggregation(aggregation)
    _check_shapes(response_mask, segment_ids=segment_ids)
    dtype = _compute_dtype(response_mask)
    m = jnp.asarray(response_mask).astype(dtype)

    if aggregation == "token_mean":
        den = jnp.sum(m) if num_tokens is None else jnp.asarray(num_tokens, dtype)
        return _safe_div(m, den)

    tokens_per_seq = _sequence_sum(m, segment_ids)  # [B, 1] or [B, T] (slot s = segment s + 1)
    if num_seqs is None:
        den = jnp.sum((tokens_per_seq > 0).astype(dtype))
    else:
        den = jnp.asarray(num_seqs, dtype)
    if segment_ids is None:
        seq_len = tokens_per_seq
    else:
        seg = jnp.asarray(segment_ids).astype(jnp.int32)
        own = jnp.take_along_axis(tokens_per_seq, jnp.maximum(seg - 1, 0), axis=1)
        seq_len = jnp.where(seg > 0, own, 0)  # padding belongs to no sequence: weight 0
    return _safe_div(_safe_div(m, seq_len), den)


# ----------------------------------------------------------------------------------------------------------
# KL estimator
# ----------------------------------------------------------------------------------------------------------
def low_var_kl(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """Per-token k3 ("low_var_kl") estimate of KL(pi || pi_ref) on tokens sampled from pi.

    ``k3 = exp(ref - logp) - (ref - logp) - 1`` (Schulman, "Approximating KL divergence", 2020): non-negative
    and unbiased for samples from pi. Clamped like verl / slime for numerical stability: the log-ratio to
    [-20, 20] before the exp, the result to [-10, 10] (gradients vanish where a clamp is active).

    Args:
      logprobs: [B, T] log-probs of the sampled tokens under the trained policy.
      ref_logprobs: [B, T] log-probs of the same tokens under the reference policy.

    Returns:
      [B, T] per-token estimate (unmasked).
    """
    log_ratio = jnp.clip(ref_logprobs - logprobs, -20.0, 20.0)
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0)


# ----------------------------------------------------------------------------------------------------------
# OPD loss
# ----------------------------------------------------------------------------------------------------------
def _check_opd_options(eps_low: float, eps_high: float, tis_cap: float | None, kl_coef: float,
                       has_behaviour: bool, has_ref: bool) -> None:
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if tis_cap is not None:
        if not tis_cap > 0.0:
            raise ValueError(f"tis_cap must be > 0 or None, got {tis_cap}")
        if not has_behaviour:
            raise ValueError("tis_cap is set but behaviour_logprobs is None")
    if not kl_coef >= 0.0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0.0 and not has_ref:
        raise ValueError("kl_coef > 0 requires ref_logprobs")


def _clean(x: jax.Array, *, on: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Zero non-response positions first: their values are unspecified (possibly -inf), and the where also
    zeroes the gradient that flows back to them."""
    return jnp.where(on, jnp.asarray(x).astype(dtype), 0)


class _OPDTerms(NamedTuple):
    per_token: jax.Array  # [B, T] loss per token, before aggregation
    ratio: jax.Array  # [B, T] exp(student - old)
    clipped: jax.Array  # [B, T] bool: the clipped branch is active and selected
    behaviour_ratio: jax.Array | None  # [B, T] untruncated exp(old - behaviour), if behaviour is given
    kl: jax.Array | None  # [B, T] low_var_kl(student, ref) (0 off the response), if ref is given


def _opd_terms(student: jax.Array, old: jax.Array, adv: jax.Array, on: jax.Array, *,
               behaviour: jax.Array | None, ref: jax.Array | None, eps_low: float, eps_high: float,
               tis_cap: float | None, kl_coef: float) -> _OPDTerms:
    """The per-token OPD terms on cleaned ``[B, T]`` inputs (``old``, ``adv``, ``behaviour`` stop-gradient)."""
    # ---- clipped surrogate ------------------------------------------------------------------------------
    ratio = jnp.exp(student - old)
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    clipped = on & (((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo)))
    clipped_value = jax.lax.stop_gradient(-adv * jnp.clip(ratio, lo, hi))
    surrogate = jnp.where(clipped, clipped_value, -adv * ratio)

    # ---- truncated importance sampling (behaviour policy != student sampling distribution) ------------
    w = None
    if behaviour is not None:
        w = jnp.exp(old - behaviour)
        if tis_cap is not None:
            surrogate = surrogate * jnp.minimum(w, tis_cap)

    # ---- KL penalty to the reference policy -------------------------------------------------------------
    per_token = surrogate
    kl = None
    if ref is not None:
        kl = jnp.where(on, low_var_kl(student, ref), 0)
        if kl_coef > 0.0:
            per_token = per_token + kl_coef * kl
    return _OPDTerms(per_token, ratio, clipped, w, kl)


def opd_loss(
    student_logprobs: jax.Array,
    teacher_logprobs: jax.Array,
    response_mask: jax.Array,
    *,
    old_logprobs: jax.Array | None = None,
    behaviour_logprobs: jax.Array | None = None,
    ref_logprobs: jax.Array | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: Aggregation = "seq_mean",
    normalize_advantages: bool = False,
    tis_cap: float | None = None,
    kl_coef: float = 0.0,
    num_tokens: jax.Array | float | None = None,
    num_seqs: jax.Array | float | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """On-policy distillation loss: PPO clipped surrogate with the teacher-minus-student advantage.

    Per response token t (everything below is 0 on non-response tokens):

      * ``old = stop_gradient(student)`` when ``old_logprobs`` is None (fused single pass: ratio == 1);
      * advantage ``A = stop_gradient(teacher - old)``; optionally whitened with the masked mean / population
        std over this call's response tokens (``normalize_advantages``, off in Lightning OPD);
      * ratio ``r = exp(student - old)``;
      * surrogate ``-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)``. It is implemented as an explicit
        selection: where the clipped branch is strictly active and selected (``A > 0, r > 1 + eps_high`` or
        ``A < 0, r < 1 - eps_low``) the token contributes a constant (zero gradient), elsewhere ``-r * A``.
        This equals the min in value and gives the standard PPO gradient ``-r * A * d(student)`` at ties too
        (``jnp.minimum`` would split a tie's gradient in half, which matters when an eps is 0);
      * optional truncated importance sampling (``tis_cap``): the surrogate is multiplied by
        ``w = stop_gradient(min(exp(old - behaviour), tis_cap))``. Use it when the rollouts were sampled from
        a distribution other than the student's own (temperature != 1, top-p / top-k), with
        ``behaviour_logprobs`` the log-probs under that sampling distribution (``behaviour_logprobs``
        without ``tis_cap`` only adds the ``behaviour_*`` diagnostics, it does not reweight);
      * optional KL penalty to a reference (SFT) policy: ``+ kl_coef * low_var_kl(student, ref)``.

    The per-token total is reduced with :func:`aggregate` (``aggregation``, ``num_tokens``, ``num_seqs``,
    ``segment_ids``; see there for gradient accumulation). In the fused default the gradient w.r.t.
    ``student_t`` is ``-w_t * A_t * m_t / denom`` (``denom`` = token count, or ``num_seqs * len`` of the
    token's sequence for ``seq_mean``) plus the KL term's.

    Metrics (float32 scalars, stop-gradient, masked means over this call's response tokens; to combine
    micro-batches weight them by ``num_tokens``, except ``behaviour_ratio_max`` (take the max) and
    ``behaviour_ess`` (per call only)):
      * ``advantage_mean``: mean of the raw (unnormalised) ``A`` = ``-reverse_kl``; it rises towards 0 as
        the student approaches the teacher.
      * ``reverse_kl``: ``mean(old - teacher)``, the single-sample estimate of KL(student || teacher) per token
        (exact in expectation only for tokens sampled from the old/student policy).
      * ``clip_frac``: fraction of tokens whose clipped branch is active and selected (0 in the fused case).
      * ``ratio_mean``: mean of ``r`` (1 in the fused case).
      * ``entropy_est``: ``-mean(student)``. A Monte-Carlo estimate of the student's per-token entropy only if
        the tokens were sampled from the current student; with fixed offline rollouts it is the
        cross-entropy of the student on the behaviour policy's samples (>= the behaviour policy's entropy),
        so read it as a trend, not as an entropy.
      * ``kl_ref`` (if ``ref_logprobs``): mean of ``low_var_kl(student, ref)``, logged even when
        ``kl_coef == 0``.
      * if ``behaviour_logprobs``: ``behaviour_ratio_mean`` / ``behaviour_ratio_max`` of the *untruncated*
        ``w = exp(old - behaviour)``, ``behaviour_ess`` = ``(sum w)^2 / (n * sum w^2)`` in (0, 1] (computed
        in log space so huge ratios do not overflow), and ``tis_clip_frac`` (fraction with ``w > tis_cap``)
        when ``tis_cap`` is set.
      * ``num_tokens`` / ``num_seqs``: this call's response-token count and number of sequences with >= 1
        response token (local counts, not the overrides).

    Args:
      student_logprobs: [B, T] log-probs of the rollout tokens under the trained student (differentiated).
      teacher_logprobs: [B, T] precomputed teacher log-probs of the same tokens.
      response_mask: [B, T] 1 on response tokens.
      old_logprobs: [B, T] log-probs under the policy that the PPO ratio is taken against; None = fused.
      behaviour_logprobs: [B, T] log-probs under the distribution the rollouts were sampled from.
      ref_logprobs: [B, T] reference-policy log-probs for the KL penalty / ``kl_ref`` metric.
      eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``; ``0 <= eps_low < 1``, ``eps_high >= 0``.
      aggregation: ``"seq_mean"`` (Lightning OPD's per-sample token-mean) or ``"token_mean"``.
      normalize_advantages: whiten ``A`` over this call's response tokens (micro-batch statistics under
        accumulation, so the accumulated gradient then differs from the full-batch one).
      tis_cap: truncation of the importance weight (> 0); requires ``behaviour_logprobs``; None = no TIS.
      kl_coef: weight of the KL penalty (>= 0); > 0 requires ``ref_logprobs``.
      num_tokens, num_seqs: full-batch denominators for gradient accumulation (:func:`loss_denominators`).
      segment_ids: [B, T] segment ids of packed rows (``seq_mean`` and ``num_seqs`` only; the advantage
        normalisation and the other metrics are per token already).

    Returns:
      ``(loss, metrics)``: scalar loss (float32 for float32 inputs) and a dict of float32 scalar metrics.
    """
    # ---- eager validation of static arguments ---------------------------------------------------------
    _check_aggregation(aggregation)
    _check_shapes(
        response_mask,
        student_logprobs=student_logprobs,
        teacher_logprobs=teacher_logprobs,
        old_logprobs=old_logprobs,
        behaviour_logprobs=behaviour_logprobs,
        ref_logprobs=ref_logprobs,
        segment_ids=segment_ids,
    )
    _check_opd_options(eps_low, eps_high, tis_cap, kl_coef, behaviour_logprobs is not None,
                       ref_logprobs is not None)

    dtype = _compute_dtype(student_logprobs, teacher_logprobs, old_logprobs, behaviour_logprobs, ref_logprobs)
    m = jnp.asarray(response_mask).astype(dtype)
    on = m > 0
    clean = functools.partial(_clean, on=on, dtype=dtype)

    student = clean(student_logprobs)
    teacher = clean(teacher_logprobs)
    old = jax.lax.stop_gradient(student if old_logprobs is None else clean(old_logprobs))

    # ---- advantage --------------------------------------------------------------------------------------
    raw_adv = jax.lax.stop_gradient(teacher - old)  # already 0 off the response
    adv = raw_adv
    if normalize_advantages:
        mean = _masked_mean(adv, m)
        var = _masked_mean(jnp.square(adv - mean), m)
        adv = jnp.where(on, (adv - mean) * jax.lax.rsqrt(var + _NORM_EPS), 0)

    behaviour = None if behaviour_logprobs is None else jax.lax.stop_gradient(clean(behaviour_logprobs))
    ref = None if ref_logprobs is None else clean(ref_logprobs)
    terms = _opd_terms(student, old, adv, on, behaviour=behaviour, ref=ref, eps_low=eps_low,
                       eps_high=eps_high, tis_cap=tis_cap, kl_coef=kl_coef)

    metrics: dict[str, jax.Array] = {}
    if terms.behaviour_ratio is not None:
        w = terms.behaviour_ratio
        if tis_cap is not None:
            metrics["tis_clip_frac"] = _metric(_masked_mean((w > tis_cap).astype(dtype), m))
        log_w = old - behaviour  # [B, T], 0 off the response
        n = jnp.sum(m)
        # ESS fraction (sum w)^2 / (n sum w^2) in log space: exp(2 lse(log w) - lse(2 log w) - log n).
        lse_w = jax.nn.logsumexp(log_w, b=m)
        lse_w2 = jax.nn.logsumexp(2.0 * log_w, b=m)
        ess = jnp.where(n > 0, jnp.exp(2.0 * lse_w - lse_w2 - jnp.log(jnp.maximum(n, 1))), 0)
        metrics["behaviour_ratio_mean"] = _metric(_masked_mean(w, m))
        metrics["behaviour_ratio_max"] = _metric(jnp.max(jnp.where(on, w, 0)))
        metrics["behaviour_ess"] = _metric(ess)
    if terms.kl is not None:
        metrics["kl_ref"] = _metric(_masked_mean(terms.kl, m))

    loss = aggregate(terms.per_token, m, aggregation, num_tokens=num_tokens, num_seqs=num_seqs,
                     segment_ids=segment_ids)

    num_tok, num_seq = loss_denominators(m, segment_ids)
    metrics.update(
        advantage_mean=_metric(_masked_mean(raw_adv, m)),
        reverse_kl=_metric(_masked_mean(old - teacher, m)),
        clip_frac=_metric(_masked_mean(terms.clipped.astype(dtype), m)),
        ratio_mean=_metric(_masked_mean(terms.ratio, m)),
        entropy_est=_metric(-_masked_mean(student, m)),
        num_tokens=_metric(num_tok),
        num_seqs=_metric(num_seq),
    )
    return loss, metrics


def opd_token_loss(
    student_logprobs: jax.Array,
    teacher_logprobs: jax.Array,
    response_mask: jax.Array,
    *,
    old_logprobs: jax.Array | None = None,
    behaviour_logprobs: jax.Array | None = None,
    ref_logprobs: jax.Array | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    tis_cap: float | None = None,
    kl_coef: float = 0.0,
) -> jax.Array:
    """Per-token fused OPD loss ``[B, T]``: the value :func:`opd_loss` aggregates when ``normalize_advantages``
    is off, so that ``opd_loss(...)[0] == sum(token_weights(...) * opd_token_loss(...))`` (same
    ``old_logprobs``).

    Per response token (0 elsewhere): ``-w * A * exp(student - stop_gradient(student))
    [+ kl_coef * low_var_kl(student, ref)]`` with ``A = stop_gradient(teacher - student)`` and the TIS weight
    ``w = stop_gradient(min(exp(student - behaviour), tis_cap))`` (1 without ``tis_cap``). The ratio is 1,
    so the clip is never active; the gradient w.r.t. ``student_t`` is ``-w_t * A_t`` plus the KL term's.
    Token-local, so it may be evaluated on any slice of the positions (e.g. a sequence chunk ``[B, c]``).
    With ``old_logprobs`` (several PPO updates per batch) ``old`` is those instead, ``A = teacher - old``, and
    the ratio ``exp(student - old)`` is clipped as in :func:`opd_loss` (still token-local).

    Args: as :func:`opd_loss` (``behaviour_logprobs`` only matters with ``tis_cap``, ``ref_logprobs`` only
    with ``kl_coef > 0``).
    """
    _check_shapes(response_mask, student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs,
                  old_logprobs=old_logprobs, behaviour_logprobs=behaviour_logprobs, ref_logprobs=ref_logprobs)
    _check_opd_options(eps_low, eps_high, tis_cap, kl_coef, behaviour_logprobs is not None,
                       ref_logprobs is not None)
    behaviour = behaviour_logprobs if tis_cap is not None else None
    ref = ref_logprobs if kl_coef > 0.0 else None
    dtype = _compute_dtype(student_logprobs, teacher_logprobs, old_logprobs, behaviour, ref)
    on = jnp.asarray(response_mask) > 0
    clean = functools.partial(_clean, on=on, dtype=dtype)
    student = clean(student_logprobs)
    old = jax.lax.stop_gradient(student if old_logprobs is None else clean(old_logprobs))
    adv = jax.lax.stop_gradient(clean(teacher_logprobs) - old)
    terms = _opd_terms(student, old, adv, on,
                       behaviour=None if behaviour is None else jax.lax.stop_gradient(clean(behaviour)),
                       ref=None if ref is None else clean(ref), eps_low=eps_low, eps_high=eps_high,
                       tis_cap=tis_cap, kl_coef=kl_coef)
    return terms.per_token


# ----------------------------------------------------------------------------------------------------------
# SFT loss
# ----------------------------------------------------------------------------------------------------------
def sft_loss(
    logprobs: jax.Array,
    response_mask: jax.Array,
    *,
    aggregation: Aggregation = "token_mean",
    num_tokens: jax.Array | float | None = None,
    num_seqs: jax.Array | float | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative log-likelihood of the response tokens.

    Args:
      logprobs: [B, T] log-probs of the target tokens under the trained model (differentiated).
      response_mask: [B, T] 1 on response (target) tokens.
      aggregation: ``"token_mean"`` (default) or ``"seq_mean"``; see :func:`aggregate`.
      num_tokens, num_seqs: full-batch denominators for gradient accumulation (:func:`loss_denominators`).
      segment_ids: [B, T] segment ids of packed rows; None = one sequence a row (see :func:`aggregate`).

    Returns:
      ``(loss, metrics)`` with float32 scalar metrics ``nll`` (token-mean NLL over this call's response
      tokens, independent of ``aggregation`` and of the overrides), ``num_tokens`` and ``num_seqs`` (local).
    """
    _check_aggregation(aggregation)
    _check_shapes(response_mask, logprobs=logprobs, segment_ids=segment_ids)
    dtype = _compute_dtype(logprobs)
    m = jnp.asarray(response_mask).astype(dtype)
    nll = jnp.where(m > 0, -jnp.asarray(logprobs).astype(dtype), 0)
    loss = aggregate(nll, m, aggregation, num_tokens=num_tokens, num_seqs=num_seqs, segment_ids=segment_ids)
    num_tok, num_seq = loss_denominators(m, segment_ids)
    metrics = {
        "nll": _metric(_masked_mean(nll, m)),
        "num_tokens": _metric(num_tok),
        "num_seqs": _metric(num_seq),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Top-k distillation objectives (the teacher's offline top-k cache)
# ----------------------------------------------------------------------------------------------------------
TopkKind = Literal["fkl", "rkl", "jsd"]
TOPK_KINDS: tuple[str, ...] = get_args(TopkKind)

# Floor of a tail bucket's mass: the teacher's tail is 1 - sum of its stored top-k probabilities (rounding can
# make that <= 0), and the student's is exactly 0 when the ids cover the whole vocabulary (k = V). A bucket at
# the floor contributes ~1e-30 * (log-ratio), i.e. nothing, to any of the divergences.
TAIL_FLOOR = 1e-30


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the OPD step's objectives (static): ``loss = sampled * opd_loss + sum_kind topk_kind *
    aggregate(topk_divergence(kind))``, every term aggregated with the same :func:`token_weights`.

    ``sampled``: the policy-gradient surrogate of :func:`opd_loss` on the rollout token (a single-sample
    estimate of the reverse-KL gradient). ``topk_fkl`` / ``topk_rkl`` / ``topk_jsd``: the direct,
    differentiable divergences of :func:`topk_divergence` over the teacher's top-k + tail buckets.
    """

    sampled: float = 1.0
    topk_fkl: float = 0.0
    topk_rkl: float = 0.0
    topk_jsd: float = 0.0

    def __post_init__(self) -> None:
        values = dataclasses.asdict(self)
        bad = {k: v for k, v in values.items() if not v >= 0}
        if bad:
            raise ValueError(f"loss weights must be >= 0, got {bad}")
        if not any(v > 0 for v in values.values()):
            raise ValueError("at least one loss weight must be > 0")

    @property
    def topk(self) -> dict[str, float]:
        """``{kind: weight}`` of the active top-k objectives (kinds of :data:`TOPK_KINDS`)."""
        return {k: w for k in TOPK_KINDS if (w := getattr(self, f"topk_{k}")) > 0}


def topk_buckets(student_topk_logprobs: jax.Array, student_tail_logprob: jax.Array,
                 teacher_topk_logprobs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-masses ``(log S, log T)`` ``[..., k + 1]`` of the student and teacher over the k + 1 buckets.

    Buckets: the teacher's k top ids (student ``p_i``, teacher ``q_i``: the stored log-probs), then the tail,
    every other id: student ``log S_tail`` as given (a log-sum-exp, see
    :func:`jopd.models.topk_head.topk_student_logprobs`; -inf, an empty tail, becomes ``log TAIL_FLOOR``), teacher
    ``log T_tail = log max(1 - sum_i exp(q_i), TAIL_FLOOR)`` (the teacher's values are used as stored: no
    renormalisation). No gradient flows to the teacher.
    """
    dtype = _compute_dtype(student_topk_logprobs, student_tail_logprob, teacher_topk_logprobs)
    q = jax.lax.stop_gradient(jnp.asarray(teacher_topk_logprobs).astype(dtype))
    p = jnp.asarray(student_topk_logprobs).astype(dtype)
    s_tail = jnp.asarray(student_tail_logprob).astype(dtype)
    floor = jnp.log(jnp.asarray(TAIL_FLOOR, dtype))
    # An empty tail (-inf) takes the floor; a finite one is kept however small, so its gradient survives.
    s_tail = jnp.where(s_tail == -jnp.inf, floor, s_tail)
    t_tail = jnp.log(jnp.maximum(1 - jnp.sum(jnp.exp(q), axis=-1), TAIL_FLOOR))
    return (jnp.concatenate([p, s_tail[..., None]], axis=-1),
            jnp.concatenate([q, t_tail[..., None]], axis=-1))


def _kl_buckets(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """``sum_j a_j (log a_j - log b_j)`` over the last axis."""
    return jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)


def topk_divergence(
    student_topk_logprobs: jax.Array,
    student_tail_logprob: jax.Array,
    teacher_topk_logprobs: jax.Array,
    kind: TopkKind,
    beta: float = 0.5,
    *,
    response_mask: jax.Array | None = None,
) -> jax.Array:
    """Per-token divergence ``[B, T]`` between teacher T and student S over the top-k + tail buckets.

    With ``log S``, ``log T`` from :func:`topk_buckets` (k teacher ids + one tail bucket):

      * ``"fkl"``: forward KL(T || S) = ``sum_i T_i (q_i - p_i) + T_tail (log T_tail - log S_tail)``;
      * ``"rkl"``: reverse KL(S || T) = ``sum_i S_i (p_i - q_i) + S_tail (log S_tail - log T_tail)``;
      * ``"jsd"``: generalized Jensen-Shannon ``beta KL(T || M) + (1 - beta) KL(S || M)`` with the mixture
        ``M = beta T + (1 - beta) S`` over the same buckets (the GKD paper's / TRL's convention). Both limits
        beta -> 0 and beta -> 1 go to 0 (``JSD / beta -> FKL``, ``JSD / (1 - beta) -> RKL``), so ``beta`` must
        be in (0, 1); use ``"fkl"`` / ``"rkl"`` for the endpoints.

    With k = V (every id is a top id) the tail is empty and these are the exact full-vocabulary divergences;
    with k < V they are those of the coarse-grained (k + 1 bucket) distributions, which never exceed the
    full-vocabulary ones (data-processing inequality: all three are f-divergences). Direct losses: the
    gradient w.r.t. the student's log-probs is the exact gradient of the bucketed divergence at each position,
    not a policy-gradient estimate.

    Args:
      student_topk_logprobs: ``[B, T, k]`` student log-probs at the teacher's top-k ids (differentiated).
      student_tail_logprob: ``[B, T]`` student log-mass of the other ids (differentiated).
      teacher_topk_logprobs: ``[B, T, k]`` the stored teacher top-k log-probs (no gradient).
      kind: ``"fkl"``, ``"rkl"`` or ``"jsd"`` (static).
      beta: the JSD interpolation, in (0, 1) (static; ignored by the KLs).
      response_mask: ``[B, T]`` optional; positions where it is 0 give 0 (their inputs, possibly garbage, are
        replaced before any arithmetic, so they cannot poison the value or the gradient).

    Returns:
      ``[B, T]`` per-token divergence (promoted to at least float32).
    """
    if kind not in TOPK_KINDS:
        raise ValueError(f"unknown top-k divergence {kind!r}; expected one of {TOPK_KINDS}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    shape = jnp.shape(student_topk_logprobs)
    if jnp.shape(teacher_topk_logprobs) != shape or jnp.shape(student_tail_logprob) != shape[:-1]:
        raise ValueError(f"top-k shapes disagree: student {shape}, tail {jnp.shape(student_tail_logprob)}, "
                         f"teacher {jnp.shape(teacher_topk_logprobs)}")
    p, tail, q = student_topk_logprobs, student_tail_logprob, teacher_topk_logprobs
    on = None
    if response_mask is not None:
        on = jnp.asarray(response_mask) > 0
        uniform = -jnp.log(jnp.asarray(shape[-1] + 1.0))  # any valid distribution: its terms are dropped below
        p = jnp.where(on[..., None], p, uniform)
        q = jnp.where(on[..., None], q, uniform)
        tail = jnp.where(on, tail, uniform)
    log_s, log_t = topk_buckets(p, tail, q)
    if kind == "fkl":
        out = _kl_buckets(log_t, log_s)
    elif kind == "rkl":
        out = _kl_buckets(log_s, log_t)
    else:
        log_m = jnp.logaddexp(jnp.log(beta) + log_t, jnp.log1p(-beta) + log_s)
        out = beta * _kl_buckets(log_t, log_m) + (1 - beta) * _kl_buckets(log_s, log_m)
    return out if on is None else jnp.where(on, out, 0)


def topk_metric(per_token: jax.Array, response_mask: jax.Array) -> jax.Array:
    """The logged value of a top-k divergence: its mean over the response tokens (float32, stop-gradient)."""
    m = jnp.asarray(response_mask).astype(per_token.dtype)
    return _metric(_masked_mean(per_token, m))
