"""jopd.sampling on a tiny random model (vocab 16) whose next-token distributions are computed independently
(full forward without cache + numpy truncation):

* sampled tokens follow softmax(logits / T) (chi-square), with top-k / top-p truncation and temperature;
* the returned behaviour log-probs are those of the (truncated, tempered) sampling distribution;
* ``truncated_logits`` against a numpy reference;
* EOS handling, seeding, independence from batch chunking and from the mesh, batched vs alone prompts;
* ``sequences``: prompt + response rows aligned with the behaviour log-probs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import eight_devices, one_device

from jopd.models import ModelConfig, from_params, hidden_states, init_params, output_kernel
from jopd.sampling import GenerationResult, SamplingParams, generate, sequences, truncated_logits
from jopd.sharding import MeshConfig, make_mesh

VOCAB = 16
N_DRAWS = 4000
P_MIN = 1e-3


def _config() -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def params():
    p = init_params(_config(), seed=0)
    # spread the logits (std ~1.7) so distributions are far from uniform and truncation matters
    return {**p, "lm_head": p["lm_head"] * 15.0}


@pytest.fixture(scope="module")
def model(params):
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, expert=1), devices=one_device())
    return from_params(_config(), params, mesh=mesh)


REF_LEN = 32  # one compiled shape for all reference forwards


@jax.jit
def _ref_hidden(params, tokens):
    return hidden_states(params, _config(), tokens)


def all_logits(params, seq) -> np.ndarray:
    """float64 logits ``[len(seq), V]`` after every prefix of ``seq`` (full causal forward, no KV cache;
    right padding to REF_LEN cannot affect earlier positions)."""
    assert len(seq) <= REF_LEN
    tokens = np.zeros((1, REF_LEN), np.int32)
    tokens[0, :len(seq)] = seq
    h = np.asarray(_ref_hidden(params, jnp.asarray(tokens))[0, :len(seq)], np.float64)
    return h @ np.asarray(output_kernel(params, _config()), np.float64)


def next_logits(params, prompt) -> np.ndarray:
    """float64 logits of the token following ``prompt``."""
    return all_logits(params, prompt)[-1]


def np_truncated(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """numpy reference of the sampling distribution's logits (-inf outside the support), transformers'
    order: temperature, then top-k, then top-p (smallest prefix whose mass reaches top_p)."""
    x = np.array(logits, np.float64) / temperature
    if top_k and top_k < x.shape[-1]:
        kth = np.sort(x, axis=-1)[..., -top_k, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        out = np.full_like(x, -np.inf)
        for idx in np.ndindex(x.shape[:-1]):
            row = x[idx]
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - row[order[0]])
            p /= p.sum()
            before = np.cumsum(p) - p
            keep = order[before < top_p]
            out[idx + (keep,)] = row[keep]
        x = out
    return x


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def chi_square_passes(counts: np.ndarray, probs: np.ndarray, p_min: float = P_MIN) -> tuple[bool, float]:
    """Pearson chi-square goodness of fit (bins with expected count < 5 merged). Returns (p > p_min, stat)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big]) + ([counts[~big].sum()] if (~big).any() else [])
    exp = list(expected[big]) + ([expected[~big].sum()] if (~big).any() else [])
    obs, exp = np.asarray(obs, np.float64), np.asarray(exp, np.float64)
    if np.any(obs[exp == 0] > 0):
        return False, math.inf
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    dof = int(keep.sum()) - 1
    if dof <= 0:
        return True, stat
    try:
        from scipy.stats import chi2

        return bool(chi2.sf(stat, dof) > p_min), stat
    except ImportError:  # Wilson-Hilferty approximation of the chi2 quantile at 1 - 1e-3 (z = 3.0902)
        z = 3.0902
        crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
        return stat < crit, stat


PROMPT = [3, 1, 4, 1, 5]


# ----------------------------------------------------------------------------------------------------------
# distribution of sampled tokens
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.7), (1.5, 6, 0.8)],
    ids=["t1", "t0.6", "topk4", "topp0.7", "t1.5_topk6_topp0.8"],
)
def test_sampled_distribution(model, params, temperature, top_k, top_p):
    logits = next_logits(params, PROMPT)
    ref = np_truncated(logits, temperature, top_k, top_p)
    probs = np.exp(np_log_softmax(ref))
    support = np.isfinite(ref)
    assert 2 <= support.sum() <= VOCAB
    if top_k or top_p < 1:
        assert support.sum() < VOCAB  # truncation actually removes tokens here

    out = generate(model, [PROMPT] * N_DRAWS, max_new_tokens=1, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=11, batch_size=N_DRAWS)
    toks, lps = out.tokens[:, 0], out.logprobs[:, 0]
    assert out.tokens.shape == (N_DRAWS, 1) and (out.lengths == 1).all() and not out.ended_with_eos.any()

    assert support[toks].all(), f"sampled outside the support: {sorted(set(toks[~support[toks]]))}"
    counts = np.bincount(toks, minlength=VOCAB)
    ok, stat = chi_square_passes(counts, probs)
    assert ok, f"chi-square {stat:.1f}: counts {counts.tolist()} vs expected {(probs * N_DRAWS).round(1).tolist()}"
    # the returned log-prob is under the (renormalised, truncated, tempered) sampling distribution
    np.testing.assert_allclose(lps, np_log_softmax(ref)[toks], rtol=0, atol=1e-4)

    if (temperature, top_k, top_p) == (1.0, 0, 1.0):
        # the test has power: a visibly different distribution is rejected
        sharper = np.exp(np_log_softmax(logits / 0.8))
        assert not chi_square_passes(counts, sharper)[0]


def test_greedy_logprob_is_untempered(model, params):
    prompts = [PROMPT, [7, 7, 2]]
    out = generate(model, prompts, max_new_tokens=1)
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
        logits = next_logits(params, p)
        assert toks[0] == int(np.argmax(logits))
        np.testing.assert_allclose(lps[0], np_log_softmax(logits)[toks[0]], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 1, 1.0), (1.0, 0, 0.5), (1.0, 0, 0.999),
     (2.0, 10, 0.3), (0.5, 3, 0.9), (1.0, 50, 1.0)],
)
def test_truncated_logits_matches_numpy(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(7, 40)) * 2.0).astype(np.float32)
    got = np.asarray(truncated_logits(jnp.asarray(logits), SamplingParams(temperature, top_p, top_k)))
    ref = np_truncated(logits.astype(np.float64), temperature, top_k, top_p)
    support = np.isfinite(ref)
    np.testing.assert_array_equal(got > -1e29, support)
    np.testing.assert_allclose(got[support], ref[support], rtol=1e-6, atol=1e-6)
    assert support.sum(-1).min() >= 1
    if top_k:
        assert support.sum(-1).max() <= top_k


def test_invalid_arguments(model):
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [PROMPT], max_new_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [PROMPT, []], max_new_tokens=2)
    empty = generate(model, [], max_new_tokens=2)
    assert empty.tokens.shape == empty.logprobs.shape == (0, 2) and empty.lengths.shape == (0,)


# ----------------------------------------------------------------------------------------------------------
# eos, seeds, chunking, meshes
# ----------------------------------------------------------------------------------------------------------
def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(rng.integers(1, 15))).tolist() for _ in range(n)]


EOS = [2, 9]
MAX_NEW = 8


def _check_eos(out, eos, max_new):
    assert out.tokens.shape == out.logprobs.shape == (len(out.lengths), max_new)
    for i, (n, ended) in enumerate(zip(out.lengths, out.ended_with_eos)):
        toks = out.response(i)
        assert len(toks) == n and 1 <= n <= max_new
        assert not out.tokens[i, n:].any() and not out.logprobs[i, n:].any()  # zero padding after the response
        assert not any(t in eos for t in toks[:-1])  # nothing after an eos
        if ended:
            assert toks[-1] in eos
        else:
            assert len(toks) == max_new and toks[-1] not in eos


def test_eos_seed_chunking_and_mesh(model, params):
    prompts = _prompts(24)
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, eos_token_id=EOS, seed=3)
    out = generate(model, prompts, batch_size=32, **kw)
    _check_eos(out, EOS, MAX_NEW)
    assert any(out.ended_with_eos) and not all(out.ended_with_eos)
    assert len(set(out.lengths.tolist())) > 2

    def same_rows(a, b):
        return (np.array_equal(a.tokens, b.tokens) and np.array_equal(a.lengths, b.lengths)
                and np.array_equal(a.ended_with_eos, b.ended_with_eos))

    again = generate(model, prompts, batch_size=32, **kw)
    assert same_rows(again, out) and np.array_equal(again.logprobs, out.logprobs)
    other = generate(model, prompts, batch_size=32, **{**kw, "seed": 4})
    assert not np.array_equal(other.tokens, out.tokens)

    # per-row keys: the same results whatever the batch chunking ...
    chunked = generate(model, prompts, batch_size=8, **kw)
    assert same_rows(chunked, out)
    np.testing.assert_allclose(chunked.logprobs, out.logprobs, rtol=0, atol=1e-5)
    # ... and on an 8-device mesh (batch sharded over fsdp=4, weights over fsdp x tensor)
    sharded = from_params(_config(), params, mesh=make_mesh(MeshConfig(fsdp=4, tensor=2), devices=eight_devices()))
    on_mesh = generate(sharded, prompts, batch_size=32, **kw)
    assert same_rows(on_mesh, out)
    np.testing.assert_allclose(on_mesh.logprobs, out.logprobs, rtol=0, atol=1e-5)


def test_greedy_eos_at_first_token(model):
    """A row whose very first token (sampled in prefill) is eos stops there; the others run to the limit."""
    prompts = _prompts(6, seed=5)
    free = generate(model, prompts, max_new_tokens=4)
    eos = int(free.tokens[0, 0])
    out = generate(model, prompts, max_new_tokens=4, eos_token_id=eos)
    _check_eos(out, [eos], 4)
    assert out.response(0) == [eos] and out.ended_with_eos[0]
    for i, ended in enumerate(out.ended_with_eos):
        f, o = free.response(i), out.response(i)
        n = f.index(eos) + 1 if eos in f else len(f)
        assert o == f[:n] and ended == (eos in f)
    assert not all(out.ended_with_eos)


def test_batched_prompts_equal_alone(model):
    """Different prompt lengths (crossing the 16-token bucket) in one batch == each prompt run alone."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in (1, 5, 16, 17, 30)]
    batched = generate(model, prompts, max_new_tokens=12)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=12)
        assert alone.response(0) == batched.response(i), f"prompt of length {len(p)}"
        np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[i], rtol=0, atol=1e-5)


def test_generate_matches_full_forward(model, params):
    """Greedy decode with the KV cache == argmax of a full (cache-free) forward at every step."""
    prompt = [5, 3, 8, 1, 1, 12]
    out = generate(model, [prompt], max_new_tokens=10)
    toks = out.response(0)
    assert len(toks) == 10
    logits = all_logits(params, prompt + toks)[len(prompt) - 1:-1]  # the distribution each token came from
    np.testing.assert_array_equal(toks, np.argmax(logits, axis=-1))
    np.testing.assert_allclose(out.logprobs[0], np_log_softmax(logits)[np.arange(len(toks)), toks],
                               rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# sequences
# ----------------------------------------------------------------------------------------------------------
def test_sequences_aligns_responses_and_log_probs():
    prompts = [[7, 8, 9], [5], [1, 2]]
    result = GenerationResult(
        tokens=np.array([[4, 2, 0], [6, 6, 6], [2, 0, 0]], np.int32),
        logprobs=np.array([[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0], [-0.125, 0.0, 0.0]], np.float32),
        lengths=np.array([2, 3, 1], np.int32), ended_with_eos=np.array([True, False, True]))
    assert result.response(0) == [4, 2] and result.response(2) == [2]
    seq = sequences(prompts, result)
    np.testing.assert_array_equal(seq["tokens"], [[7, 8, 9, 4, 2], [5, 6, 6, 6, 0], [1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(seq["mask"], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(seq["response_mask"], [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(seq["behaviour_logprobs"], [[0, 0, 0, -0.5, -0.25], [0, -1, -2, -3, 0],
                                                              [0, 0, -0.125, 0, 0]])
    np.testing.assert_array_equal(seq["prompt_len"], [3, 1, 2])
    np.testing.assert_array_equal(seq["response_len"], [2, 3, 1])
    assert {k: v.dtype for k, v in seq.items()} == {
        "tokens": np.int32, "mask": np.int32, "response_mask": np.int32, "behaviour_logprobs": np.float32,
        "prompt_len": np.int32, "response_len": np.int32}

    wide = sequences(prompts, result, length=8)
    assert wide["tokens"].shape == (3, 8)
    for k in ("tokens", "mask", "response_mask", "behaviour_logprobs"):
        np.testing.assert_array_equal(wide[k][:, :5], seq[k])
        assert not wide[k][:, 5:].any()
    with pytest.raises(ValueError, match="row 0: 5 tokens do not fit in length 4"):
        sequences(prompts, result, length=4)
    with pytest.raises(ValueError, match="2 prompts but 3"):
        sequences(prompts[:2], result)


def test_sequences_of_generated_rows(model):
    prompts = _prompts(5, seed=2)
    out = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=1.0, eos_token_id=EOS, seed=1)
    seq = sequences(prompts, out)
    for i, p in enumerate(prompts):
        n = len(p) + out.lengths[i]
        assert seq["tokens"][i, :n].tolist() == p + out.response(i) and not seq["mask"][i, n:].any()
        np.testing.assert_array_equal(seq["behaviour_logprobs"][i, len(p):n], out.logprobs[i, :out.lengths[i]])
