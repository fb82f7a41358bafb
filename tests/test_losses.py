"""Tests for jopd.losses against independent float64 numpy references.

Float64 JAX computations run inside ``jax.enable_x64(True)`` so the global config stays untouched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jopd.losses import (
    aggregate,
    loss_denominators,
    low_var_kl,
    opd_loss,
    opd_token_loss,
    sft_loss,
    token_weights,
)

B, T = 6, 11
EPS = 0.2


# ----------------------------------------------------------------------------------------------------------
# fixtures / data
# ----------------------------------------------------------------------------------------------------------
def _ragged_mask() -> np.ndarray:
    """[B, T] response mask: varying prompt lengths and response lengths; row 2 has no response token."""
    spans = [(2, 11), (4, 9), (0, 0), (1, 4), (3, 11), (5, 6)]
    m = np.zeros((B, T), np.float64)
    for b, (s, e) in enumerate(spans):
        m[b, s:e] = 1.0
    return m


def _logprobs(rng: np.random.Generator, scale: float = 1.5) -> np.ndarray:
    """Strictly negative, never-zero log-probs (also on padding, so masking is actually exercised)."""
    return -(0.05 + rng.exponential(scale, size=(B, T)))


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    student = _logprobs(rng)
    # old differs from student by log-ratios up to +-0.6, so many ratios leave [1 - eps, 1 + eps]; keep them
    # away from the clip boundaries so central finite differences never straddle a kink.
    delta = rng.uniform(-0.6, 0.6, size=(B, T))
    for bound in (np.log(1 - EPS), np.log(1 + EPS)):
        near = np.abs(delta - bound) < 0.02
        delta[near] += 0.05
    old = student - delta
    return {
        "student": student,
        "teacher": _logprobs(rng),
        "old": old,
        "behaviour": student + rng.normal(0.0, 0.4, size=(B, T)),
        "ref": student + rng.normal(0.0, 0.5, size=(B, T)),
        "mask": _ragged_mask(),
    }


# ----------------------------------------------------------------------------------------------------------
# independent float64 references
# ----------------------------------------------------------------------------------------------------------
def np_aggregate(x, m, mode, num_tokens=None, num_seqs=None) -> float:
    x = np.where(m > 0, x, 0.0)
    if mode == "token_mean":
        den = m.sum() if num_tokens is None else num_tokens
        return float((x * m).sum() / den) if den > 0 else 0.0
    total, count = 0.0, 0
    for b in range(x.shape[0]):
        n = m[b].sum()
        if n > 0:
            total += (x[b] * m[b]).sum() / n
            count += 1
    den = count if num_seqs is None else num_seqs
    return total / den if den > 0 else 0.0


def np_denominator(m, mode, num_tokens=None, num_seqs=None) -> np.ndarray:
    """[B, T] per-token weight d(aggregate)/d(x_t)."""
    if mode == "token_mean":
        return m / (m.sum() if num_tokens is None else num_tokens)
    lens = m.sum(axis=1, keepdims=True)
    n_seqs = (lens > 0).sum() if num_seqs is None else num_seqs
    return np.where(lens > 0, m / np.maximum(lens, 1) / n_seqs, 0.0)


def np_opd(d, *, old=None, behaviour=None, ref=None, eps_low=EPS, eps_high=EPS, mode="seq_mean",
           normalize=False, tis_cap=None, kl_coef=0.0, num_tokens=None, num_seqs=None) -> float:
    m, s, t = d["mask"], d["student"], d["teacher"]
    o = s if old is None else old
    adv = (t - o) * m
    if normalize:
        n = m.sum()
        mean = (adv * m).sum() / n
        var = (((adv - mean) ** 2) * m).sum() / n
        adv = (adv - mean) / np.sqrt(var + 1e-8) * m
    r = np.exp(s - o)
    surr = -np.minimum(r * adv, np.clip(r, 1 - eps_low, 1 + eps_high) * adv)
    if tis_cap is not None:
        surr = surr * np.minimum(np.exp(o - behaviour), tis_cap)
    if kl_coef:
        lr = np.clip(ref - s, -20, 20)
        surr = surr + kl_coef * np.clip(np.exp(lr) - lr - 1, -10, 10)
    return np_aggregate(surr, m, mode, num_tokens, num_seqs)


def _j(x):
    return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# aggregate
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_aggregate_matches_numpy(data, mode):
    x = data["teacher"]
    got = aggregate(_j(x), _j(data["mask"]), mode)
    np.testing.assert_allclose(float(got), np_aggregate(x, data["mask"], mode), rtol=1e-6)


def test_aggregate_seq_mean_excludes_empty_sequence(data):
    m = data["mask"]
    x = np.ones((B, T))
    # every non-empty sequence has token-mean 1, so the result is 1 only if the empty row is not counted
    assert float(aggregate(_j(x), _j(m), "seq_mean")) == pytest.approx(1.0)
    assert float(aggregate(_j(x), _j(m), "token_mean")) == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_aggregate_empty_mask_and_nonfinite_padding(mode):
    m = jnp.zeros((2, 3))
    x = jnp.full((2, 3), -jnp.inf)
    assert float(aggregate(x, m, mode)) == 0.0
    assert float(jnp.sum(jax.grad(lambda v: aggregate(v, m, mode))(x))) == 0.0


def test_aggregate_rejects_unknown_mode_and_bad_shapes():
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(jnp.zeros((2, 3)), jnp.ones((2, 3)), "sum")
    with pytest.raises(ValueError, match="shape"):
        aggregate(jnp.zeros((2, 4)), jnp.ones((2, 3)))



# ----------------------------------------------------------------------------------------------------------
# packed rows (segment ids)
# ----------------------------------------------------------------------------------------------------------
def _packed_rows(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[B, T] segment ids (1..k per row, 0 on trailing padding) and a random response mask inside segments;
    segment 2 of row 0 has no response token, and padding carries response-mask 1 in row 1 (to be ignored)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        used = T - int(rng.integers(0, 4))
        cuts = np.sort(rng.choice(np.arange(1, used), size=int(rng.integers(1, 4)), replace=False))
        seg[b, :used] = np.searchsorted(cuts, np.arange(used), side="right") + 1
    seg[0] = np.repeat([1, 2, 3, 0], [4, 3, 3, T - 10])
    m = (rng.random((B, T)) < 0.7) & (seg > 0)
    m[0, seg[0] == 2] = False
    seg[1, -2:] = 0
    m[1, -2:] = True
    return seg, m.astype(np.float64)


def np_packed_seq_mean(x, m, seg) -> tuple[float, int, np.ndarray]:
    """seq_mean over (row, segment > 0) sequences: value, number of counted sequences, d(value)/dx."""
    means, lens = [], np.zeros_like(m)
    for b in range(x.shape[0]):
        for s in np.unique(seg[b][seg[b] > 0]):
            sel = seg[b] == s
            n = m[b, sel].sum()
            lens[b, sel] = n
            if n > 0:
                means.append((x[b, sel] * m[b, sel]).sum() / n)
    grad = np.where((lens > 0) & (seg > 0), m / np.maximum(lens, 1) / len(means), 0.0)
    return float(np.mean(means)), len(means), grad


def test_packed_seq_mean_matches_numpy_and_accumulates():
    rng = np.random.default_rng(1)
    seg, m = _packed_rows(rng)
    x = rng.normal(size=(B, T))
    value, count, grad = np_packed_seq_mean(x, m, seg)
    agg = functools.partial(aggregate, mode="seq_mean", segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(float(agg(_j(x), _j(m))), value, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(agg)(_j(x), _j(m))), grad, rtol=1e-5, atol=1e-9)
    num_tokens, num_seqs = loss_denominators(_j(m), jnp.asarray(seg))
    assert float(num_seqs) == count and float(num_tokens) == m.sum()
    # token_mean ignores segments; one segment per row is the unpacked seq_mean
    np.testing.assert_allclose(float(aggregate(_j(x), _j(m), "token_mean", segment_ids=jnp.asarray(seg))),
                               np_aggregate(x, m, "token_mean"), rtol=1e-6)
    ones = jnp.ones((B, T), jnp.int32)
    np.testing.assert_allclose(float(aggregate(_j(x), _j(m), "seq_mean", segment_ids=ones)),
                               np_aggregate(x, m, "seq_mean"), rtol=1e-6)

    # micro-batches split rows, never sequences: the summed shares are the full-batch value and gradient
    def part(v, rows):
        return sft_loss(v, _j(m[rows]), aggregation="seq_mean", num_tokens=num_tokens, num_seqs=num_seqs,
                        segment_ids=jnp.asarray(seg[rows]))[0]

    rows = (slice(0, 4), slice(4, B))
    shares = [jax.value_and_grad(part)(_j(-x[r]), r) for r in rows]
    np.testing.assert_allclose(sum(float(s[0]) for s in shares), value, rtol=1e-5)
    np.testing.assert_allclose(-np.concatenate([np.asarray(s[1]) for s in shares]), grad, rtol=1e-5, atol=1e-9)
    _, metrics = opd_loss(_j(x), _j(x + 1.0), _j(m), segment_ids=jnp.asarray(seg))
    assert float(metrics["num_seqs"]) == count


def test_segment_ids_shape_is_checked():
    with pytest.raises(ValueError, match="segment_ids"):
        aggregate(jnp.zeros((2, 3)), jnp.ones((2, 3)), "seq_mean", segment_ids=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        token_weights(jnp.ones((2, 3)), "seq_mean", segment_ids=jnp.ones((2, 4), jnp.int32))


# ----------------------------------------------------------------------------------------------------------
# token weights: aggregate(x) == sum(token_weights * x)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"num_tokens": 37.0, "num_seqs": 7.0}], ids=["local", "overrides"])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_token_weights_match_aggregate(data, mode, overrides):
    m, x = data["mask"], data["teacher"]
    w = token_weights(_j(m), mode, **overrides)
    assert w.shape == (B, T) and w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(w), np_denominator(m, mode, **overrides), rtol=1e-6, atol=0)
    np.testing.assert_allclose(float(jnp.sum(w * _j(x))), float(aggregate(_j(x), _j(m), mode, **overrides)),
                               rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(w * _j(x))), np_aggregate(x, m, mode, **overrides), rtol=1e-6)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_token_weights_empty_mask_is_zero(mode):
    np.testing.assert_array_equal(np.asarray(token_weights(jnp.zeros((2, 3)), mode)), 0.0)
    np.testing.assert_array_equal(np.asarray(token_weights(jnp.ones((2, 3)), mode, num_seqs=0.0,
                                                           num_tokens=0.0)), 0.0)


def test_packed_token_weights_match_aggregate_and_split_into_micro_batches():
    rng = np.random.default_rng(2)
    seg, m = _packed_rows(rng)
    x = rng.normal(size=(B, T))
    _, _, grad = np_packed_seq_mean(x, m, seg)
    segj = jnp.asarray(seg)
    w = token_weights(_j(m), "seq_mean", segment_ids=segj)
    np.testing.assert_allclose(np.asarray(w), grad, rtol=1e-6, atol=0)  # padding (row 1) and empty segment: 0
    np.testing.assert_allclose(float(jnp.sum(w * _j(x))),
                               float(aggregate(_j(x), _j(m), "seq_mean", segment_ids=segj)), rtol=1e-6)
    w_tok = token_weights(_j(m), "token_mean", segment_ids=segj)
    np.testing.assert_allclose(np.asarray(w_tok), np_denominator(m, "token_mean"), rtol=1e-6, atol=0)
    # micro-batches of rows with the full-batch denominators: exactly the full batch's weights
    num_tokens, num_seqs = loss_denominators(_j(m), segj)
    for mode, full in (("seq_mean", w), ("token_mean", w_tok)):
        parts = [token_weights(_j(m[r]), mode, num_tokens=num_tokens, num_seqs=num_seqs, segment_ids=segj[r])
                 for r in (slice(0, 4), slice(4, B))]
        np.testing.assert_allclose(np.concatenate([np.asarray(p) for p in parts]), np.asarray(full), rtol=1e-6)

# ----------------------------------------------------------------------------------------------------------
# opd_loss values
# ----------------------------------------------------------------------------------------------------------
VALUE_CASES = {
    "fused": {},
    "clipped": {"old": True},
    "clipped_asym": {"old": True, "eps_low": 0.1, "eps_high": 0.28},
    "normalized": {"old": True, "normalize": True},
    "tis": {"old": True, "behaviour": True, "tis_cap": 1.5},
    "kl": {"ref": True, "kl_coef": 0.3},
    "all": {"old": True, "behaviour": True, "tis_cap": 2.0, "ref": True, "kl_coef": 0.1, "normalize": True},
}


def _call_kwargs(d, case):
    """Translate a VALUE_CASES entry into (opd_loss kwargs, np_opd kwargs)."""
    jk, nk = {}, {}
    for name in ("old", "behaviour", "ref"):
        if case.get(name):
            jk[f"{name}_logprobs" if name != "old" else "old_logprobs"] = _j(d[name])
            nk[name] = d[name]
    for name in ("eps_low", "eps_high", "tis_cap", "kl_coef"):
        if name in case:
            jk[name] = nk[name] = case[name]
    if case.get("normalize"):
        jk["normalize_advantages"] = nk["normalize"] = True
    return jk, nk


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_opd_loss_value_matches_numpy(data, case, mode):
    jk, nk = _call_kwargs(data, VALUE_CASES[case])
    loss, _ = opd_loss(_j(data["student"]), _j(data["teacher"]), _j(data["mask"]), aggregation=mode, **jk)
    want = np_opd(data, mode=mode, **nk)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)


def test_clipping_is_active_in_the_clipped_case(data):
    """Guard against a vacuous test: the chosen old log-probs really make the clip bind on some tokens."""
    _, metrics = opd_loss(
        _j(data["student"]), _j(data["teacher"]), _j(data["mask"]), old_logprobs=_j(data["old"])
    )
    assert 0.1 < float(metrics["clip_frac"]) < 0.9


# ----------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.2, 0.0])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_fused_gradient_matches_analytic(data, mode, eps):
    """d loss / d student_t = -A_t m_t / denom; also with eps = 0, where r == 1 sits exactly on the clip bounds."""
    m = data["mask"]

    def f(s):
        return opd_loss(s, _j(data["teacher"]), _j(m), aggregation=mode, eps_low=eps, eps_high=eps)[0]

    g = np.asarray(jax.grad(f)(_j(data["student"])), np.float64)
    want = -(data["teacher"] - data["student"]) * m * np_denominator(m, mode)  # r == 1 in the fused pass
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-8)
    assert np.all(g[m == 0] == 0.0)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_fused_tis_gradient_matches_analytic(data, mode):
    m, cap = data["mask"], 1.3

    def f(s):
        return opd_loss(
            s, _j(data["teacher"]), _j(m), behaviour_logprobs=_j(data["behaviour"]), tis_cap=cap,
            aggregation=mode,
        )[0]

    g = np.asarray(jax.grad(f)(_j(data["student"])), np.float64)
    w = np.minimum(np.exp(data["student"] - data["behaviour"]), cap)
    want = -w * (data["teacher"] - data["student"]) * np_denominator(m, mode)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-8)


def _central_fd(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of scalar f at every entry of x (all perturbations in one vmapped call)."""
    eye = np.eye(x.size).reshape(x.size, *x.shape) * h
    xs = jnp.asarray(np.concatenate([x + eye, x - eye]))
    vals = np.asarray(jax.jit(jax.vmap(f))(xs))
    return ((vals[: x.size] - vals[x.size:]) / (2 * h)).reshape(x.shape)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("case", ["clipped", "clipped_asym", "normalized", "tis", "kl", "all"])
def test_gradient_matches_finite_differences_float64(data, case, mode):
    with jax.enable_x64(True):
        jk, _ = _call_kwargs(data, VALUE_CASES[case])
        # The fused loss is not a function of `student` alone in the FD sense (old = stop_gradient(student)
        # moves with it), so fused cases are checked with old pinned to the student's values as constants,
        # which is what the fused pass differentiates (test_fused_equals_pinned_old checks that equivalence).
        jk.setdefault("old_logprobs", data["student"])
        jk = {k: (jnp.asarray(np.asarray(v), jnp.float64) if isinstance(v, (jax.Array, np.ndarray)) else v)
              for k, v in jk.items()}
        teacher = jnp.asarray(data["teacher"], jnp.float64)
        mask = jnp.asarray(data["mask"], jnp.float64)

        def f(s):
            return opd_loss(s, teacher, mask, aggregation=mode, **jk)[0]

        s = jnp.asarray(data["student"], jnp.float64)
        assert f(s).dtype == jnp.float64
        g = np.asarray(jax.grad(f)(s))
        fd = _central_fd(f, data["student"])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


TOKEN_LOSS_CASES = {
    "plain": {},
    "tis": {"behaviour": True, "tis_cap": 1.5},
    "kl": {"ref": True, "kl_coef": 0.3},
    "tis_kl_asym": {"behaviour": True, "tis_cap": 1.2, "ref": True, "kl_coef": 0.1, "eps_low": 0.1,
                    "eps_high": 0.28},
}


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("case", list(TOKEN_LOSS_CASES))
def test_opd_token_loss_times_weights_is_the_fused_opd_loss(data, case, mode):
    """sum(token_weights * opd_token_loss) equals opd_loss (fused) in value and gradient, also with
    full-batch denominator overrides, and each token's term only depends on that token."""
    jk, nk = _call_kwargs(data, TOKEN_LOSS_CASES[case])
    m = _j(data["mask"])
    overrides = {"num_tokens": jnp.float32(41.0), "num_seqs": jnp.float32(6.0)}

    def fused(s):
        return opd_loss(s, _j(data["teacher"]), m, aggregation=mode, **jk, **overrides)[0]

    def factored(s):
        per_token = opd_token_loss(s, _j(data["teacher"]), m, **jk)
        return jnp.sum(token_weights(m, mode, **overrides) * per_token)

    s = _j(data["student"])
    np.testing.assert_allclose(float(factored(s)), float(fused(s)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(factored)(s)), np.asarray(jax.grad(fused)(s)), rtol=1e-6,
                               atol=1e-9)
    num_tokens = float(overrides["num_tokens"]) if mode == "token_mean" else None
    num_seqs = float(overrides["num_seqs"]) if mode == "seq_mean" else None
    np.testing.assert_allclose(float(factored(s)), np_opd(data, mode=mode, num_tokens=num_tokens,
                                                          num_seqs=num_seqs, **nk), rtol=2e-5)
    per_token = np.asarray(opd_token_loss(s, _j(data["teacher"]), m, **jk))
    assert np.all(per_token[data["mask"] == 0] == 0.0)
    cols = slice(3, 8)  # any slice of positions gives the same per-token values
    part = opd_token_loss(s[:, cols], _j(data["teacher"])[:, cols], m[:, cols],
                          **{k: (v[:, cols] if isinstance(v, jax.Array) else v) for k, v in jk.items()})
    np.testing.assert_array_equal(np.asarray(part), per_token[:, cols])


def test_opd_token_loss_validates():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        opd_token_loss(x, x, jnp.ones((2, 3)), tis_cap=2.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        opd_token_loss(x, x, jnp.ones((2, 3)), kl_coef=0.1)
    with pytest.raises(ValueError, match="shape"):
        opd_token_loss(x, jnp.zeros((2, 4)), jnp.ones((2, 3)))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_fused_equals_pinned_old(data, mode):
    """old_logprobs=None (fused) gives the same loss, gradient and metrics as passing the student's values."""
    kw = {"ref_logprobs": _j(data["ref"]), "kl_coef": 0.2, "behaviour_logprobs": _j(data["behaviour"]),
          "tis_cap": 1.5, "aggregation": mode}
    s = _j(data["student"])

    def f(x, **extra):
        return opd_loss(x, _j(data["teacher"]), _j(data["mask"]), **kw, **extra)

    (l0, m0), g0 = jax.value_and_grad(f, has_aux=True)(s)
    (l1, m1), g1 = jax.value_and_grad(lambda x: f(x, old_logprobs=s), has_aux=True)(s)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(g0), np.asarray(g1), rtol=1e-6, atol=1e-10)
    for k in m0:
        np.testing.assert_allclose(float(m0[k]), float(m1[k]), rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_clipped_gradient_matches_analytic(data, mode):
    """Unclipped tokens get -r A m / denom, tokens whose clipped branch is selected get exactly 0."""
    m, s, o, t = data["mask"], data["student"], data["old"], data["teacher"]

    def f(x):
        return opd_loss(x, _j(t), _j(m), old_logprobs=_j(o), aggregation=mode)[0]

    g = np.asarray(jax.grad(f)(_j(s)), np.float64)
    adv, r = (t - o) * m, np.exp(s - o)
    clipped = ((adv > 0) & (r > 1 + EPS)) | ((adv < 0) & (r < 1 - EPS))
    want = np.where(clipped, 0.0, -r * adv * np_denominator(m, mode))
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-8)
    assert np.all(g[clipped] == 0.0)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_student_equals_teacher_gives_exact_zero(data, mode):
    s = _j(data["student"])

    def f(x):
        return opd_loss(x, s, _j(data["mask"]), aggregation=mode)

    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(s)
    assert float(loss) == 0.0
    assert float(metrics["advantage_mean"]) == 0.0
    assert float(metrics["reverse_kl"]) == 0.0
    assert np.all(np.asarray(g) == 0.0)


def test_nonfinite_padding_does_not_leak(data):
    """Padding positions may hold -inf / NaN (unspecified); loss and gradient must stay finite and equal."""
    m = data["mask"]
    off = m == 0
    clean_kw = {"old_logprobs": data["old"], "behaviour_logprobs": data["behaviour"], "ref_logprobs": data["ref"]}
    dirty_kw = {k: np.where(off, np.nan, v) for k, v in clean_kw.items()}

    def run(s, t, extra):
        def f(x):
            return opd_loss(x, _j(t), _j(m), **{k: _j(v) for k, v in extra.items()}, tis_cap=2.0, kl_coef=0.1)[0]

        return jax.value_and_grad(f)(_j(s))

    l0, g0 = run(data["student"], data["teacher"], clean_kw)
    l1, g1 = run(np.where(off, -np.inf, data["student"]), np.where(off, np.nan, data["teacher"]), dirty_kw)
    assert np.isfinite(float(l1)) and np.all(np.isfinite(np.asarray(g1)))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# gradient accumulation
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("fused", [True, False])
def test_accumulation_equals_full_batch(data, mode, fused):
    m = data["mask"]
    extra = {} if fused else {"old_logprobs": data["old"], "behaviour_logprobs": data["behaviour"],
                              "ref_logprobs": data["ref"], "tis_cap": 1.5, "kl_coef": 0.2}

    def loss_fn(s, rows, num_tokens=None, num_seqs=None):
        kw = {k: (_j(v[rows]) if isinstance(v, np.ndarray) else v) for k, v in extra.items()}
        return opd_loss(s, _j(data["teacher"][rows]), _j(m[rows]), aggregation=mode,
                        num_tokens=num_tokens, num_seqs=num_seqs, **kw)[0]

    full = slice(0, B)
    l_full, g_full = jax.value_and_grad(loss_fn)(_j(data["student"]), full)

    num_tokens, num_seqs = loss_denominators(_j(m))
    assert float(num_tokens) == m.sum() and float(num_seqs) == B - 1
    # uneven split; the empty sequence (row 2) lands in the first micro-batch
    parts = [slice(0, 4), slice(4, B)]
    l_acc, g_parts = 0.0, []
    for rows in parts:
        loss_part, g = jax.value_and_grad(loss_fn)(_j(data["student"][rows]), rows, num_tokens, num_seqs)
        l_acc += float(loss_part)
        g_parts.append(np.asarray(g))
    np.testing.assert_allclose(l_acc, float(l_full), rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(g_parts), np.asarray(g_full), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_sft_accumulation_and_value(data, mode):
    m, lp = data["mask"], data["student"]
    loss, metrics = sft_loss(_j(lp), _j(m), aggregation=mode)
    np.testing.assert_allclose(float(loss), np_aggregate(-lp, m, mode), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["nll"]), np_aggregate(-lp, m, "token_mean"), rtol=1e-6)

    g_full = jax.grad(lambda x: sft_loss(x, _j(m), aggregation=mode)[0])(_j(lp))
    np.testing.assert_allclose(np.asarray(g_full), -np_denominator(m, mode), rtol=1e-5, atol=1e-9)
    nt, ns = loss_denominators(_j(m))
    g_parts = [
        jax.grad(lambda x, r=rows: sft_loss(x, _j(m[r]), aggregation=mode, num_tokens=nt, num_seqs=ns)[0])(
            _j(lp[rows])
        )
        for rows in (slice(0, 3), slice(3, B))
    ]
    np.testing.assert_allclose(np.concatenate(g_parts), np.asarray(g_full), rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------
def test_metrics_match_numpy(data):
    m, s, t, o, beh, ref = (data[k] for k in ("mask", "student", "teacher", "old", "behaviour", "ref"))
    cap = 1.5
    _, met = opd_loss(_j(s), _j(t), _j(m), old_logprobs=_j(o), behaviour_logprobs=_j(beh), ref_logprobs=_j(ref),
                      tis_cap=cap)
    on = m > 0
    adv, r = (t - o)[on], np.exp(s - o)[on]
    clipped = ((adv > 0) & (r > 1 + EPS)) | ((adv < 0) & (r < 1 - EPS))
    w = np.exp(o - beh)[on]
    lr = np.clip(ref - s, -20, 20)[on]
    want = {
        "advantage_mean": adv.mean(),
        "reverse_kl": (o - t)[on].mean(),
        "clip_frac": clipped.mean(),
        "ratio_mean": r.mean(),
        "entropy_est": -s[on].mean(),
        "kl_ref": np.clip(np.exp(lr) - lr - 1, -10, 10).mean(),
        "behaviour_ratio_mean": w.mean(),
        "behaviour_ratio_max": w.max(),
        "behaviour_ess": w.sum() ** 2 / (w.size * (w**2).sum()),
        "tis_clip_frac": (w > cap).mean(),
        "num_tokens": m.sum(),
        "num_seqs": B - 1,
    }
    assert set(met) == set(want)
    for k, v in want.items():
        assert met[k].dtype == jnp.float32 and met[k].shape == (), k
        np.testing.assert_allclose(float(met[k]), v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert 0.0 < float(met["tis_clip_frac"]) < 1.0 and 0.0 < float(met["behaviour_ess"]) < 1.0


def test_fused_metrics_and_optional_keys(data):
    _, met = opd_loss(_j(data["student"]), _j(data["teacher"]), _j(data["mask"]))
    assert float(met["clip_frac"]) == 0.0 and float(met["ratio_mean"]) == 1.0
    np.testing.assert_allclose(float(met["advantage_mean"]), -float(met["reverse_kl"]), rtol=1e-6)
    assert not {"kl_ref", "behaviour_ess", "behaviour_ratio_mean", "tis_clip_frac"} & set(met)


def test_ess_survives_huge_ratios(data):
    """Log-space ESS: one dominating weight (exp(200) overflows float32) gives ESS ~ 1/n, not NaN."""
    m = data["mask"]
    beh = data["student"].copy()
    beh[0, 5] -= 200.0
    _, met = opd_loss(_j(data["student"]), _j(data["teacher"]), _j(m), behaviour_logprobs=_j(beh), tis_cap=2.0)
    np.testing.assert_allclose(float(met["behaviour_ess"]), 1.0 / m.sum(), rtol=1e-4)


def test_low_var_kl_matches_numpy(data):
    s, ref = data["student"], data["ref"] * 3.0
    lr = np.clip(ref - s, -20, 20)
    want = np.clip(np.exp(lr) - lr - 1, -10, 10)
    np.testing.assert_allclose(np.asarray(low_var_kl(_j(s), _j(ref))), want, rtol=1e-5, atol=1e-6)
    assert np.all(want >= 0)


# ----------------------------------------------------------------------------------------------------------
# jit & validation
# ----------------------------------------------------------------------------------------------------------
def test_jit_matches_eager(data):
    args = (_j(data["student"]), _j(data["teacher"]), _j(data["mask"]))
    kw = {"old_logprobs": _j(data["old"]), "ref_logprobs": _j(data["ref"]), "num_seqs": jnp.float32(B - 1)}
    fn = functools.partial(opd_loss, aggregation="seq_mean", kl_coef=0.1)
    eager, jitted = fn(*args, **kw), jax.jit(fn)(*args, **kw)
    np.testing.assert_allclose(float(jitted[0]), float(eager[0]), rtol=1e-6)
    for k in eager[1]:
        np.testing.assert_allclose(float(jitted[1][k]), float(eager[1][k]), rtol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aggregation": "mean"}, "aggregation"),
        ({"eps_low": -0.1}, "eps_low"),
        ({"eps_low": 1.0}, "eps_low"),
        ({"eps_high": -0.2}, "eps_high"),
        ({"tis_cap": 2.0}, "behaviour_logprobs"),
        ({"tis_cap": 0.0, "behaviour_logprobs": jnp.zeros((2, 3))}, "tis_cap"),
        ({"kl_coef": 0.1}, "ref_logprobs"),
        ({"kl_coef": -1.0}, "kl_coef"),
        ({"old_logprobs": jnp.zeros((2, 4))}, "shape"),
    ],
)
def test_opd_loss_validates_static_arguments(kwargs, match):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=match):
        opd_loss(x, x, jnp.ones((2, 3)), **kwargs)


def test_sft_loss_validates():
    with pytest.raises(ValueError, match="aggregation"):
        sft_loss(jnp.zeros((2, 3)), jnp.ones((2, 3)), aggregation="sum")
