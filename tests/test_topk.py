"""Top-k distillation objectives (``precompute.topk``, ``loss_weights.topk_*``) against a float64 full-vocabulary
reference: k = V gives the exact divergences, k < V the top-k + tail formula (computed independently here, the
tail as a plain sum of probabilities), gradients match finite differences, the chunked head equals one chunk
and is aligned with the teacher's stored top-k, the step is the same sharded and on one device, and the CLI
trains top-k FKL and JSD arms on the tiny pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_shrink

from jopd import losses, models, sharding, steps
from jopd.config import ConfigValidationError, load_config
from jopd.models import ModelConfig
from jopd.models.decoder import hidden_states, output_kernel, stored_output_kernel
from jopd.models.logprobs import logprobs_and_topk_fn, logprobs_fn
from jopd.models.topk_head import topk_student_logprobs

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("fkl", "rkl", "jsd")
BETA = 0.3


# ---- float64 numpy reference ---------------------------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _div(kind: str, t: np.ndarray, s: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Divergence of probability vectors t (teacher), s (student) over the last axis (float64)."""
    if kind == "fkl":
        return np.sum(t * (np.log(t) - np.log(s)), -1)
    if kind == "rkl":
        return np.sum(s * (np.log(s) - np.log(t)), -1)
    m = beta * t + (1 - beta) * s
    return beta * np.sum(t * (np.log(t) - np.log(m)), -1) + (1 - beta) * np.sum(s * (np.log(s) - np.log(m)), -1)


def _problem(k: int, *, b: int = 2, t: int = 10, d: int = 6, v: int = 13, seed: int = 0) -> dict[str, np.ndarray]:
    """Random student (hidden, kernel), a random non-zero teacher distribution per position and its top-k."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, d))
    w = rng.normal(size=(d, v)) * 1.5
    tokens = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.int32)
    mask[0, 3:] = 1
    mask[1, 2:8] = 1
    teacher_lp = _log_softmax(rng.normal(size=(b, t, v)) * 2.0)
    ids = np.argsort(-teacher_lp, axis=-1)[..., :k].astype(np.int32)
    q = np.take_along_axis(teacher_lp, ids, -1)
    on = mask.astype(bool)[..., None]
    return {"hidden": hidden, "w": w, "tokens": tokens, "mask": mask, "teacher_lp": teacher_lp,
            "ids": np.where(on, ids, 0), "q": np.where(on, q, 0.0)}


def _student_lp(p: dict[str, np.ndarray]) -> np.ndarray:
    """Full student log-probs [B, T, V]: position t from hidden t - 1 (position 0: unused)."""
    logits = np.einsum("btd,dv->btv", p["hidden"], p["w"])
    lp = _log_softmax(logits)
    return np.concatenate([np.zeros_like(lp[:, :1]), lp[:, :-1]], 1)


def _reference_topk(p: dict[str, np.ndarray], kind: str) -> np.ndarray:
    """The top-k + tail formula, independently: buckets of probabilities, tails as plain sums."""
    s_full = np.exp(_student_lp(p))
    ids = p["ids"]
    s_top = np.take_along_axis(s_full, ids, -1)
    in_top = np.zeros(s_full.shape, bool)
    np.put_along_axis(in_top, ids, True, -1)
    s_tail = np.where(in_top, 0.0, s_full).sum(-1)
    t_top = np.exp(p["q"])
    t_tail = 1 - t_top.sum(-1)
    floor = losses.TAIL_FLOOR
    s_b = np.concatenate([s_top, np.maximum(s_tail, floor)[..., None]], -1)
    t_b = np.concatenate([t_top, np.maximum(t_tail, floor)[..., None]], -1)
    return np.where(p["mask"] > 0, _div(kind, t_b, s_b), 0.0)


def _reference_exact(p: dict[str, np.ndarray], kind: str) -> np.ndarray:
    s_full, t_full = np.exp(_student_lp(p)), np.exp(p["teacher_lp"])
    return np.where(p["mask"] > 0, _div(kind, t_full, s_full), 0.0)


def _jax_divergence(p: dict[str, np.ndarray], kind: str, dtype, *, chunk: int = 4, beta: float = BETA):
    lp, top, tail = topk_student_logprobs(jnp.asarray(p["hidden"], dtype), jnp.asarray(p["w"], dtype),
                                          jnp.asarray(p["tokens"]), jnp.asarray(p["mask"]), jnp.asarray(p["ids"]),
                                          chunk=chunk)
    return losses.topk_divergence(top, tail, jnp.asarray(p["q"], dtype), kind, beta,
                                  response_mask=jnp.asarray(p["mask"]))


# ---- (a), (b): values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_k_equal_to_vocab_gives_the_exact_divergence(kind):
    p = _problem(k=13)
    ref = _reference_exact(p, kind)
    with jax.enable_x64(True):
        got = np.asarray(_jax_divergence(p, kind, jnp.float64))
    assert ref[p["mask"] > 0].min() > 1e-3  # non-trivial values
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    # fp32 (the training precision) from the same float64 problem
    np.testing.assert_allclose(np.asarray(_jax_divergence(p, kind, jnp.float32)), ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 4])
def test_k_below_vocab_gives_the_topk_plus_tail_formula(kind, k):
    p = _problem(k=k, seed=k)
    ref = _reference_topk(p, kind)
    with jax.enable_x64(True):
        got = np.asarray(_jax_divergence(p, kind, jnp.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(np.asarray(_jax_divergence(p, kind, jnp.float32)), ref, rtol=2e-5, atol=2e-6)
    # coarse-graining never increases an f-divergence (data-processing inequality)
    exact = _reference_exact(p, kind)
    assert np.all(ref <= exact + 1e-12) and np.any(ref < exact - 1e-6)


def test_jsd_limits_and_bad_arguments():
    p = _problem(k=4)
    with jax.enable_x64(True):
        fkl = np.asarray(_jax_divergence(p, "fkl", jnp.float64))
        rkl = np.asarray(_jax_divergence(p, "rkl", jnp.float64))
        # the approach is O(beta * max ratio of the two distributions), up to e^10 here
        small = np.asarray(_jax_divergence(p, "jsd", jnp.float64, beta=1e-10)) / 1e-10
        large = np.asarray(_jax_divergence(p, "jsd", jnp.float64, beta=1 - 1e-10)) / (1e-10)
    np.testing.assert_allclose(small, fkl, rtol=1e-4, atol=1e-9)  # JSD(beta) / beta -> forward KL
    np.testing.assert_allclose(large, rkl, rtol=1e-4, atol=1e-9)  # JSD(beta) / (1 - beta) -> reverse KL
    z = jnp.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="beta"):
        losses.topk_divergence(z, z[..., 0], z, "jsd", 1.0)
    with pytest.raises(ValueError, match="unknown"):
        losses.topk_divergence(z, z[..., 0], z, "kl", 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        losses.LossWeights(sampled=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        losses.LossWeights(sampled=0.0)


def test_garbage_outside_the_response_is_ignored():
    p = _problem(k=4)
    dirty = dict(p, q=np.where(p["mask"][..., None] > 0, p["q"], np.nan))
    for kind in KINDS:
        clean = _jax_divergence(p, kind, jnp.float32)
        np.testing.assert_array_equal(np.asarray(_jax_divergence(dirty, kind, jnp.float32)), np.asarray(clean))


# ---- (c): gradients ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab_major", [False, True])
def test_gradients_match_float64_finite_differences(vocab_major):
    p = _problem(k=4, t=7, v=11, seed=5)
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        tokens, mask, ids = (jnp.asarray(p[k]) for k in ("tokens", "mask", "ids"))
        q = jnp.asarray(p["q"])
        weights = jnp.asarray(rng.random(mask.shape)) * mask

        def loss(hidden, w):
            _, top, tail = topk_student_logprobs(hidden, w.T if vocab_major else w, tokens, mask, ids, chunk=4,
                                                 vocab_major=vocab_major)
            return sum(jnp.sum(weights * losses.topk_divergence(top, tail, q, kind, BETA, response_mask=mask))
                       * c for kind, c in zip(KINDS, (1.0, 0.7, 1.3)))

        loss = jax.jit(loss)
        args = [jnp.asarray(p["hidden"]), jnp.asarray(p["w"])]
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(*args)
        eps = 1e-6  # float64 round-off of the difference quotient: ~1e-9 (measured max |error| 4.5e-9)
        for i, g in enumerate(grads):
            for _ in range(6):
                idx = tuple(int(rng.integers(0, s)) for s in args[i].shape)
                if i == 0:  # hidden states that predict a response position
                    idx = (0, int(rng.integers(2, 7)), idx[2])
                plus, minus = list(args), list(args)
                plus[i] = plus[i].at[idx].add(eps)
                minus[i] = minus[i].at[idx].add(-eps)
                fd = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
                np.testing.assert_allclose(float(g[idx]), fd, rtol=1e-5, atol=2e-8)
        assert float(jnp.abs(grads[1]).max()) > 1e-3


# ---- (d): the chunked head ---------------------------------------------------------------------------------
def test_chunking_does_not_change_values_or_gradients():
    p = _problem(k=4, t=10)  # 9 predicted positions: chunk 4 does not divide them

    def run(chunk):
        def f(h, w):
            lp, top, tail = topk_student_logprobs(h, w, jnp.asarray(p["tokens"]), jnp.asarray(p["mask"]),
                                                  jnp.asarray(p["ids"]), chunk=chunk)
            div = losses.topk_divergence(top, tail, jnp.asarray(p["q"], jnp.float32), "jsd", BETA,
                                         response_mask=jnp.asarray(p["mask"]))
            return jnp.sum(div) + jnp.sum(lp), (lp, top, tail)

        h, w = jnp.asarray(p["hidden"], jnp.float32), jnp.asarray(p["w"], jnp.float32)
        (_, outs), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)
        return outs, grads

    (outs4, grads4), (outs_one, grads_one) = run(4), run(64)
    for a, b in zip(outs4 + grads4, outs_one + grads_one):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    lp, top, tail = outs4
    # the sampled-token log-probs are those of the existing head, the others those of the float64 reference
    ref_lp = logprobs_fn_like(p)
    np.testing.assert_allclose(np.asarray(lp), ref_lp, rtol=1e-5, atol=1e-5)
    ref_top = np.take_along_axis(_student_lp(p), p["ids"], -1)
    on = p["mask"] > 0
    np.testing.assert_allclose(np.asarray(top)[on], ref_top[on], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(top)[~on] == 0) and np.all(np.asarray(tail)[~on] == 0)


def logprobs_fn_like(p: dict[str, np.ndarray]) -> np.ndarray:
    from jopd.models.logprobs import logprobs_from_hidden

    return np.asarray(logprobs_from_hidden(jnp.asarray(p["hidden"], jnp.float32), jnp.asarray(p["w"], jnp.float32),
                                           jnp.asarray(p["tokens"]), jnp.asarray(p["mask"]), chunk=4))


CFG = ModelConfig(model_type="qwen3", vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=4, qk_norm=True, tie_word_embeddings=False,
                  logits_chunk_size=7)
B, T, K = 8, 12, 5


def _batch(seed: int = 0, k: int = K) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.int32)
    for i in range(B):  # ragged prompts / responses, one row without response tokens
        start = int(rng.integers(2, 5))
        stop = start if i == 3 else int(rng.integers(start + 1, T + 1))
        mask[i, start:stop] = 1
        tokens[i, stop:] = 0
    teacher = _log_softmax(rng.normal(size=(B, T, CFG.vocab_size)) * 2)
    ids = np.argsort(-teacher, -1)[..., :k]
    on = mask[..., None] > 0
    return {"tokens": tokens, "response_mask": mask,
            "teacher_logprobs": (np.take_along_axis(teacher, tokens[..., None], -1)[..., 0] * mask).astype(np.float32),
            "teacher_topk_ids": np.where(on, ids, 0).astype(np.int32),
            "teacher_topk_logprobs": np.where(on, np.take_along_axis(teacher, ids, -1), 0).astype(np.float32)}


@pytest.mark.parametrize("tied", [False, True])
def test_student_head_is_aligned_with_the_teachers_stored_topk(tied):
    """The top-k that precompute stores (logprobs_and_topk_fn) of a model, read back by the student head of the
    same model: identical log-probs at the ids, the sampled-token log-probs of logprobs_fn, zero divergences."""
    cfg = CFG.replace(tie_word_embeddings=tied)
    params = models.init_params(cfg, seed=1)
    params = jax.tree.map(lambda x: x * 4.0, params)  # peaked distributions
    batch = _batch(2)
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["response_mask"])
    t_lp, t_ids, t_vals = logprobs_and_topk_fn(params, cfg, tokens, mask, K)
    h = hidden_states(params, cfg, tokens)
    w_out, vocab_major = stored_output_kernel(params, cfg)
    lp, top, tail = topk_student_logprobs(h, w_out, tokens, mask, t_ids, chunk=cfg.logits_chunk_size,
                                          vocab_major=vocab_major)
    np.testing.assert_allclose(np.asarray(top), np.asarray(t_vals), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(logprobs_fn(params, cfg, tokens, mask)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(t_lp), atol=1e-6)
    # the tail is the complement of the top-k mass
    on = np.asarray(mask) > 0
    np.testing.assert_allclose(np.exp(np.asarray(tail))[on] + np.exp(np.asarray(top)).sum(-1)[on], 1, atol=1e-5)
    # full-vocabulary reference of the same distribution, position t from hidden t - 1
    logits = np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(output_kernel(params, cfg), np.float64))
    full = np.concatenate([np.zeros_like(logits[:, :1]), _log_softmax(logits[:, :-1])], 1)
    ref = np.take_along_axis(full, np.asarray(t_ids), -1)
    np.testing.assert_allclose(np.asarray(top)[on], ref[on], atol=2e-5)
    for kind in KINDS:
        div = losses.topk_divergence(top, tail, t_vals, kind, BETA, response_mask=mask)
        assert float(jnp.max(jnp.abs(div))) < 1e-5


def _grads(loss_cfg: steps.OPDLossConfig, batch: dict[str, np.ndarray], params) -> tuple[float, object, dict]:
    nt, ns = losses.loss_denominators(jnp.asarray(batch["response_mask"]))

    def f(p):
        return steps.opd_objective(p, CFG, {k: jnp.asarray(v) for k, v in batch.items()}, loss_cfg, nt, ns)

    (loss, metrics), g = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return float(loss), g, jax.device_get(metrics)


def test_objective_is_the_weighted_sum_and_the_sampled_part_equals_the_fused_head(aggregation="seq_mean"):
    params = models.init_params(CFG, seed=0)
    batch = _batch(3)
    cfg = lambda **w: steps.OPDLossConfig(aggregation=aggregation, loss_weights=losses.LossWeights(**w))  # noqa: E731
    fused_loss, fused_g, _ = _grads(cfg(sampled=1.0), batch, params)  # the default, fused path
    fkl_loss, fkl_g, fkl_m = _grads(cfg(sampled=0.0, topk_fkl=1.0), batch, params)
    mix_loss, mix_g, mix_m = _grads(cfg(sampled=0.5, topk_fkl=2.0, topk_jsd=0.5), batch, params)
    jsd_loss, jsd_g, _ = _grads(cfg(sampled=0.0, topk_jsd=1.0), batch, params)
    assert set(mix_m) >= {"topk_fkl", "topk_jsd", "reverse_kl"} and "topk_rkl" not in mix_m
    assert "topk_fkl" in fkl_m and fkl_m["topk_fkl"] > 0.1
    np.testing.assert_allclose(mix_loss, 0.5 * fused_loss + 2 * fkl_loss + 0.5 * jsd_loss, rtol=1e-5)
    for a, b, c, d in zip(*(jax.tree.leaves(x) for x in (mix_g, fused_g, fkl_g, jsd_g))):
        np.testing.assert_allclose(np.asarray(a), 0.5 * np.asarray(b) + 2 * np.asarray(c) + 0.5 * np.asarray(d),
                                   rtol=1e-4, atol=1e-7)
    # a sampled weight alone scales the fused loss
    half_loss, half_g, _ = _grads(cfg(sampled=0.5), batch, params)
    np.testing.assert_allclose(half_loss, 0.5 * fused_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(half_g), jax.tree.leaves(fused_g)):
        np.testing.assert_allclose(np.asarray(a), 0.5 * np.asarray(b), rtol=1e-5, atol=1e-8)


def _objective(loss_cfg: steps.OPDLossConfig, batch: dict[str, np.ndarray], params):
    def f(p, b):
        nt, ns = losses.loss_denominators(b["response_mask"], b.get("segment_ids"))
        return steps.opd_objective(p, CFG, b, loss_cfg, nt, ns)

    return jax.jit(f)(params, batch)


def test_packed_rows_give_the_unpacked_objective():
    params = models.init_params(CFG, seed=0)
    batch = _batch(4)
    rows = [0, 1]
    lens = [int(np.max(np.nonzero(batch["response_mask"][i])[0])) + 1 for i in rows]
    packed = {k: np.zeros((1, sum(lens)) + v.shape[2:], v.dtype) for k, v in batch.items()}
    packed["segment_ids"] = np.zeros((1, sum(lens)), np.int32)
    packed["positions"] = np.zeros((1, sum(lens)), np.int32)
    t0 = 0
    for seg, (i, n) in enumerate(zip(rows, lens), start=1):
        for k, v in batch.items():
            packed[k][0, t0:t0 + n] = v[i, :n]
        packed["segment_ids"][0, t0:t0 + n] = seg
        packed["positions"][0, t0:t0 + n] = np.arange(n)
        t0 += n
    unpacked = {k: v[rows] for k, v in batch.items()}
    for aggregation in ("token_mean", "seq_mean"):
        lc = steps.OPDLossConfig(aggregation=aggregation,
                                 loss_weights=losses.LossWeights(sampled=0.3, topk_fkl=1.0, topk_rkl=0.2))
        a, ma = _objective(lc, packed, params)
        b, mb = _objective(lc, unpacked, params)
        np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
        np.testing.assert_allclose(float(ma["topk_rkl"]), float(mb["topk_rkl"]), rtol=1e-5)


# ---- (e): the jitted step, sharded ---------------------------------------------------------------------------
def _run_step(mesh, batch, loss_cfg, micro=None):
    model = models.from_params(CFG, models.init_params(CFG, seed=0), mesh=mesh)
    opt = steps.make_optimizer(lr=1e-2, total_steps=10, eps=1.0)
    state = steps.init_state(model.params, opt)
    step = steps.make_opd_step(CFG, opt, loss_cfg, mesh=mesh, state=state, batch_size=B, micro_batch_size=micro)
    state, metrics = step(state, steps.shard_batch(batch, mesh))
    return jax.device_get(state.params), jax.device_get(metrics)


def test_topk_step_sharded_equals_single_device_and_accumulation_equals_full_batch():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by conftest)")
    batch = _batch(5)
    lc = steps.OPDLossConfig(loss_weights=losses.LossWeights(sampled=0.5, topk_fkl=1.0, topk_jsd=0.5), jsd_beta=BETA)
    assert lc.uses_topk
    ref_params, ref_m = _run_step(sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1]),
                                  batch, lc)
    assert not ref_m["nonfinite"] and ref_m["topk_fkl"] > 0.1 and ref_m["topk_jsd"] > 0
    mesh8 = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
    for micro in (None, 4):
        params, m = _run_step(mesh8, batch, lc, micro)
        for key in ("loss", "topk_fkl", "topk_jsd", "reverse_kl"):
            np.testing.assert_allclose(float(m[key]), float(ref_m[key]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(m["grad_norm"]), float(ref_m["grad_norm"]), rtol=1e-4)
        for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_compute_topk_step_runs_bf16_matmuls_and_stays_close_to_fp32(tied):
    """Under bf16 compute every matmul of the top-k step (forward and backward, the head's included) takes bf16
    operands; log-probs, divergences and the loss stay fp32 and close to the fp32 step."""
    import re

    dot = re.compile(r"stablehlo\.dot_general .*: \(tensor<[0-9x]+x(\w+)>, tensor<[0-9x]+x(\w+)>\) ->")
    batch = _batch(6)
    lc = steps.OPDLossConfig(loss_weights=losses.LossWeights(sampled=1.0, topk_fkl=1.0, topk_rkl=0.5, topk_jsd=0.5))
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])
    out = {}
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        cfg = CFG.replace(tie_word_embeddings=tied, compute_dtype=dtype)
        model = models.from_params(cfg, models.init_params(cfg, seed=0), mesh=mesh)
        opt = steps.make_optimizer(lr=1e-2, total_steps=10, eps=1.0)
        state = steps.init_state(model.params, opt)
        step = steps.make_opd_step(cfg, opt, lc, mesh=mesh, state=state, batch_size=B)
        placed = steps.shard_batch(batch, mesh)
        text = step.lower(state, placed).as_text()
        _, metrics = step(state, placed)
        out[name] = (text, jax.device_get(metrics))
    operands = dot.findall(out["bf16"][0])
    assert len(operands) >= 20 and all(a == b == "bf16" for a, b in operands), operands
    m32, m16 = out["fp32"][1], out["bf16"][1]
    for key in ("loss", "topk_fkl", "topk_rkl", "topk_jsd", "grad_norm"):
        assert m16[key].dtype == np.float32
        assert abs(float(m16[key]) / float(m32[key]) - 1) < 2e-2, (key, m32[key], m16[key])


# ---- config ------------------------------------------------------------------------------------------------
TOPK_ARMS = ("arms=[{name: topk_fkl_A, mode: lightning, teacher: A, loss_weights: {sampled: 0, topk_fkl: 1}}, "
             "{name: jsd_A, mode: lightning, teacher: A, loss_weights: {sampled: 1, topk_jsd: 1}, jsd_beta: 0.5}]")


def test_config_validation_and_the_effective_objective():
    from jopd import arms, training

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["precompute.topk=8", TOPK_ARMS], check_files=False)
    fkl, jsd = cfg.arms
    assert fkl.objective(cfg.opd)[0].topk_fkl == 1 and jsd.objective(cfg.opd)[1] == 0.5
    lc = training.opd_loss_config(cfg.opd, fkl)
    assert lc.loss_weights == losses.LossWeights(sampled=0.0, topk_fkl=1.0) and lc.uses_topk
    assert not training.opd_loss_config(cfg.opd).uses_topk
    run = types.SimpleNamespace(cfg=cfg)
    assert arms.objective_inputs(run, cfg.arms) == {"objectives": {
        "topk_fkl_A": {"loss_weights": {"sampled": 0.0, "topk_fkl": 1.0, "topk_rkl": 0.0, "topk_jsd": 0.0}},
        "jsd_A": {"loss_weights": {"sampled": 1.0, "topk_fkl": 0.0, "topk_rkl": 0.0, "topk_jsd": 1.0},
                  "jsd_beta": 0.5}}}
    # the default objective adds nothing to the stages' inputs, and the sections' reprs (the form in which they
    # enter the fingerprints) do not mention it: run directories of earlier versions stay valid
    tiny = load_config(str(ROOT / "configs" / "tiny.yaml"), check_files=False)
    assert arms.objective_inputs(types.SimpleNamespace(cfg=tiny), tiny.arms) == {}
    assert "loss_weights" not in repr(tiny.opd) and "jsd_beta" not in repr(tiny.arms[0])
    changed = load_config(str(ROOT / "configs" / "tiny.yaml"), ["precompute.topk=8", TOPK_ARMS,
                                                                 "arms.1.jsd_beta=0.25"], check_files=False)
    assert arms.objective_inputs(types.SimpleNamespace(cfg=changed), changed.arms)["objectives"]["jsd_A"][
        "jsd_beta"] == 0.25

    def problems(*overrides):
        with pytest.raises(ConfigValidationError) as e:
            load_config(str(ROOT / "configs" / "tiny.yaml"), list(overrides), check_files=False)
        return "\n".join(e.value.problems)

    assert "need precompute.topk > 0" in problems(TOPK_ARMS)
    assert "online arm" in problems("precompute.topk=8", "opd.loss_weights.topk_rkl=1")  # tiny's online_A
    assert "opd.loss_weights.topk_fkl: must be >= 0" in problems("opd.loss_weights.topk_fkl=-1")
    assert "opd.loss_weights: at least one weight must be > 0" in problems("opd.loss_weights.sampled=0")
    assert "arms[0].jsd_beta: must be in (0, 1)" in problems("arms.0.jsd_beta=1.0")
    assert "opd.jsd_beta: must be in (0, 1)" in problems("opd.jsd_beta=0")


def test_storage_cost_figures():
    from jopd.stages.precompute import bytes_per_token

    assert bytes_per_token(0) == 4 and bytes_per_token(64) == 516
    # the paper's rollouts (docs/topk-objectives.md): 17,398 x 4,096 response tokens at k = 64
    assert 17398 * 4096 * bytes_per_token(64) == 36_771_299_328


# ---- the CLI ---------------------------------------------------------------------------------------------------
SHRINK = tiny_shrink()
TOPK_OVERRIDES = ["precompute.topk=8", "precompute.teachers=[A]", TOPK_ARMS]


@pytest.mark.slow
def test_cli_trains_topk_fkl_and_jsd_arms(tmp_path):
    """configs/tiny.yaml with the teacher's top-8 stored and two arms: top-k FKL alone, sampled + JSD."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jopd.main", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir), *SHRINK,
         *TOPK_OVERRIDES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "bytes per response token" in out and "68 bytes per response token" in out  # 4 + 8 * 8
    done = json.loads((run_dir / "precompute" / "DONE.json").read_text())
    storage = done["outputs"]["teachers"]["A"]["storage"]
    assert storage["bytes_per_response_token"] == 68 and storage["on_disk_bytes"] > 0
    for arm, keys in (("topk_fkl_A", {"topk_fkl"}), ("jsd_A", {"topk_jsd"})):
        meta = json.loads((run_dir / "arms" / arm / "meta.json").read_text())
        assert meta["complete"] and meta["steps"] == 2, meta
        assert meta["objective"]["loss_weights"][f"topk_{next(iter(keys))[5:]}"] == 1.0
        rows = [json.loads(line) for line in (run_dir / "metrics" / f"arm_{arm}.jsonl").read_text().splitlines()]
        steps_rows = [r for r in rows if "loss" in r]
        assert steps_rows and all(keys <= set(r) for r in steps_rows), rows
        assert all(np.isfinite(r[k]) for r in steps_rows for k in keys)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert {"arm:topk_fkl_A", "arm:jsd_A"} <= set(results), sorted(results)
