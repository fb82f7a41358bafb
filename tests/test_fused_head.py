"""The fused output head (jopd.models.fused_head) is exact: against a float64 full-logits reference on its own,
and inside the OPD / SFT objectives and train steps against the rematerialised head (``fused_head=False``),
which is the reference there -- same loss, gradients, metrics and parameters after a sharded step. The saving
(one ``[.., V]`` matmul per chunk fewer) is checked on the jaxpr so that it cannot silently regress."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import eight_devices, one_device

from jopd import losses, models, sharding, steps
from jopd.models import ModelConfig
from jopd.models.logprobs import prediction_mask

QWEN3_TIED = ModelConfig(model_type="qwen3", vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=4, qk_norm=True, tie_word_embeddings=True,
                         logits_chunk_size=5)
LLAMA_UNTIED = ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=False, rope_theta=500.0,
                           logits_chunk_size=4)
MODELS = {"qwen3_tied": QWEN3_TIED, "llama_untied": LLAMA_UNTIED}
B, T = 8, 12  # 11 predictions a row: neither chunk size divides them
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture
def x64():
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def _params(cfg: ModelConfig, seed: int) -> dict:
    # Larger than the init scale so that the log-probs (and their gradients) are far from uniform.
    return jax.tree.map(lambda x: x * 3.0, models.init_params(cfg, seed=seed))


def _batch(vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Right-padded rows with ragged prompts / responses: row 3 has no response token, row 5's response
    starts at token 0 (which has no prediction, yet its loss term counts)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.int32)
    for i in range(B):
        start = 0 if i == 5 else int(rng.integers(1, 5))
        stop = start if i == 3 else int(rng.integers(start + 1, T + 1))
        mask[i, start:stop] = 1
        tokens[i, stop:] = 0
    return {
        "tokens": tokens,
        "response_mask": mask,
        "teacher_logprobs": (-rng.exponential(1.5, (B, T)) - 0.05).astype(np.float32),
        "behaviour_logprobs": (-rng.exponential(1.5, (B, T)) - 0.05).astype(np.float32),
    }


def _packed_batch(vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Packed rows: 1-3 sequences each (prompt then response), segment ids, positions, trailing padding."""
    rng = np.random.default_rng(seed)
    batch = _batch(vocab, seed)
    batch["tokens"] = rng.integers(1, vocab, (B, T)).astype(np.int32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.int32)
    for i in range(B):
        offset = 0
        for s in range(1, int(rng.integers(1, 4)) + 1):
            n = int(rng.integers(2, 6))
            if offset + n > T:
                break
            seg[i, offset:offset + n] = s
            pos[i, offset:offset + n] = np.arange(n)
            mask[i, offset + int(rng.integers(1, n)):offset + n] = 1
            offset += n
        batch["tokens"][i, offset:] = 0
    return {**batch, "response_mask": mask, "segment_ids": seg, "positions": pos}


def _assert_tree_close(got, ref) -> None:
    """Leaf-wise ``|got - ref| <= 1e-5 * (|ref| + max|ref|)``: relative to each leaf's scale, because a float32
    gradient summed over many tokens is only that accurate whatever the order of summation."""
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(y))))


def _grads(objective, params, batch, micro_batches: int = 1):
    """(loss, grads, metrics) of the step's own accumulation over ``micro_batches`` micro-batches."""
    fn = jax.jit(lambda p, b: steps._accumulated_grads(objective, p, b, micro_batches))
    return jax.device_get(fn(params, batch))


def _compare(objective_for, params, batch, micro_batches: int = 1) -> None:
    """Fused (``objective_for(True)``) vs unfused: loss, gradients, metrics."""
    ref_loss, ref_grads, ref_metrics = _grads(objective_for(False), params, batch, micro_batches)
    loss, grads, metrics = _grads(objective_for(True), params, batch, micro_batches)
    assert float(ref_loss) != 0.0
    np.testing.assert_allclose(float(loss), float(ref_loss), **TOL)
    _assert_tree_close(grads, ref_grads)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:  # from the same opd_loss / sft_loss on the same log-probs
        np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=1e-6, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------------------------------------
# fused_head_loss alone vs float64 full logits
# ----------------------------------------------------------------------------------------------------------
def _head_inputs(seed: int, dtype) -> tuple:
    """Random hidden [2, 11, 6], w_out [6, 13], a packed row and a right-padded row, and an OPD per-token loss
    (seq_mean weights, TIS, KL) with its aux."""
    rng = np.random.default_rng(seed)
    b, t, d, v = 2, 11, 6, 13
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
    w_out = jnp.asarray(rng.normal(size=(d, v)), dtype)
    tokens = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    seg = jnp.asarray([[1] * 4 + [2] * 5 + [0] * 2, [1] * 9 + [0] * 2], jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) < 0.8) & (seg > 0)
    aux = {
        "weight": losses.token_weights(mask, "seq_mean", segment_ids=seg).astype(dtype),
        "teacher": jnp.asarray(-rng.exponential(1.5, (b, t)), dtype),
        "behaviour": jnp.asarray(-rng.exponential(1.5, (b, t)), dtype),
        "ref": jnp.asarray(-rng.exponential(1.5, (b, t)), dtype),
        "mask": mask,
    }

    def per_token(lp, a):
        return a["weight"] * losses.opd_token_loss(lp, a["teacher"], a["mask"], behaviour_logprobs=a["behaviour"],
                                                   ref_logprobs=a["ref"], tis_cap=1.5, kl_coef=0.3)

    return hidden, w_out, tokens, prediction_mask(mask, seg), per_token, aux


def _reference_loss(hidden, w_out, tokens, valid, per_token, aux):
    """Full [B, T, V] logits, log_softmax, shift, mask; then the plain per-token sum."""
    logits = jnp.einsum("btd,dv->btv", hidden, w_out)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), tokens[:, 1:, None], -1)[..., 0]
    lp = jnp.where(valid, jnp.pad(lp, ((0, 0), (1, 0))), 0)
    return jnp.sum(per_token(lp, aux)), lp


@pytest.mark.parametrize("vocab_major", [False, True])  # [D, V] kernel / a tied [V, D] embedding
@pytest.mark.parametrize("chunk", [4, 10, 16])  # 10 predictions a row: partial last chunk / exact / one
def test_fused_head_loss_matches_float64_full_logits(x64, chunk, vocab_major):
    args = _head_inputs(0, jnp.float64)
    hidden, w_out, tokens, valid, per_token, aux = args
    ref_fn = functools.partial(_reference_loss, tokens=tokens, valid=valid, per_token=per_token, aux=aux)
    # vocab_major: the kernel is given as [V, D] and its gradient must come back in that layout
    layout = (lambda w: w.T) if vocab_major else (lambda w: w)  # noqa: E731
    fused = jax.jit(lambda h, w: models.fused_head_loss(h, layout(w), tokens, valid, per_token, aux, chunk=chunk,
                                                        vocab_major=vocab_major))
    (ref_loss, ref_lp), ref_grads = jax.value_and_grad(ref_fn, (0, 1), has_aux=True)(hidden, w_out)
    (loss, lp), grads = jax.value_and_grad(fused, (0, 1), has_aux=True)(hidden, w_out)
    assert float(ref_loss) != 0.0 and np.all(np.asarray(ref_lp)[np.asarray(valid)] < 0)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), rtol=1e-12, atol=1e-14)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-10, atol=1e-12 * float(np.max(abs(r))))
    assert np.all(np.asarray(grads[0])[:, -1] == 0)  # the last hidden state predicts nothing

    # float32 inputs: within float32 round-off of the float64 reference
    args32 = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x, (hidden, w_out, aux))
    fused32 = jax.jit(lambda h, w: models.fused_head_loss(h, layout(w), tokens, valid, per_token, args32[2],
                                                         chunk=chunk, vocab_major=vocab_major)[0])
    loss32, grads32 = jax.value_and_grad(fused32, (0, 1))(*args32[:2])
    assert loss32.dtype == jnp.float32 and grads32[0].dtype == jnp.float32
    np.testing.assert_allclose(float(loss32), float(ref_loss), rtol=1e-5)
    _assert_tree_close(grads32, ref_grads)


def test_fused_head_lp_is_metrics_only(x64):
    hidden, w_out, tokens, valid, per_token, aux = _head_inputs(1, jnp.float64)
    grads = jax.grad(lambda h, w: jnp.sum(models.fused_head_loss(h, w, tokens, valid, per_token, aux,
                                                                 chunk=4)[1]), (0, 1))(hidden, w_out)
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)


# ----------------------------------------------------------------------------------------------------------
# inside the objectives: fused vs the rematerialised head
# ----------------------------------------------------------------------------------------------------------
OPD_CASES = {
    "token_mean": (steps.OPDLossConfig(aggregation="token_mean"), 1),
    "seq_mean": (steps.OPDLossConfig(aggregation="seq_mean"), 1),
    "tis": (steps.OPDLossConfig(aggregation="seq_mean", tis_cap=1.3), 1),
    "kl": (steps.OPDLossConfig(aggregation="token_mean", kl_coef=0.2), 1),
    "micro_tis_kl": (steps.OPDLossConfig(aggregation="seq_mean", tis_cap=1.3, kl_coef=0.2), 2),
    "micro_token_mean": (steps.OPDLossConfig(aggregation="token_mean", tis_cap=1.3), 4),
}


def _opd_objective_for(cfg: ModelConfig, loss_cfg: steps.OPDLossConfig, ref_params):
    def objective_for(fused: bool):
        lc = dataclasses.replace(loss_cfg, fused_head=fused)
        return lambda p, b, nt, ns: steps.opd_objective(p, cfg, b, lc, nt, ns, ref_params)

    return objective_for


@pytest.mark.parametrize(("model", "case"), [
    ("qwen3_tied", "token_mean"), ("qwen3_tied", "tis"), ("qwen3_tied", "micro_tis_kl"),
    ("qwen3_tied", "micro_token_mean"), ("llama_untied", "seq_mean"), ("llama_untied", "kl"),
    ("llama_untied", "micro_tis_kl"),
])
def test_opd_objective_fused_equals_unfused(model, case):
    cfg = MODELS[model]
    loss_cfg, micro = OPD_CASES[case]
    batch = _batch(cfg.vocab_size, seed=len(case))
    ref_params = _params(cfg, seed=9) if loss_cfg.kl_coef else None
    _compare(_opd_objective_for(cfg, loss_cfg, ref_params), _params(cfg, seed=2), batch, micro)


@pytest.mark.parametrize(("model", "micro"), [("qwen3_tied", 2), ("llama_untied", 1)])
def test_packed_opd_objective_fused_equals_unfused(model, micro):
    cfg = MODELS[model]
    loss_cfg = steps.OPDLossConfig(aggregation="seq_mean", tis_cap=1.3, kl_coef=0.1)
    batch = _packed_batch(cfg.vocab_size, seed=4)
    _compare(_opd_objective_for(cfg, loss_cfg, _params(cfg, seed=5)), _params(cfg, seed=3), batch, micro)


@pytest.mark.parametrize("chunk", [1, 11, 64])
def test_opd_objective_any_chunk_size(chunk):
    cfg = QWEN3_TIED.replace(logits_chunk_size=chunk)
    loss_cfg = steps.OPDLossConfig(aggregation="seq_mean", tis_cap=1.3)
    _compare(_opd_objective_for(cfg, loss_cfg, None), _params(cfg, seed=6), _batch(cfg.vocab_size, 7))


def test_normalized_advantages_keep_the_unfused_path():
    """Whitening needs all log-probs first: fused_head=True must give the unfused result exactly."""
    cfg = LLAMA_UNTIED
    loss_cfg = steps.OPDLossConfig(aggregation="seq_mean", normalize_advantages=True)
    batch, params = _batch(cfg.vocab_size, 8), _params(cfg, seed=8)
    objective_for = _opd_objective_for(cfg, loss_cfg, None)
    ref, got = (_grads(objective_for(f), params, batch) for f in (False, True))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(("model", "aggregation", "packed"), [
    ("qwen3_tied", "token_mean", False), ("qwen3_tied", "seq_mean", True), ("llama_untied", "token_mean", True),
    ("llama_untied", "seq_mean", False),
])
def test_sft_objective_fused_equals_unfused(model, aggregation, packed):
    cfg = MODELS[model]
    make = _packed_batch if packed else _batch
    batch = {k: v for k, v in make(cfg.vocab_size, 10).items() if "logprobs" not in k}

    def objective_for(fused: bool):
        return lambda p, b, nt, ns: steps.sft_objective(p, cfg, b, aggregation, nt, ns, fused_head=fused)

    _compare(objective_for, _params(cfg, seed=11), batch, micro_batches=2)
    eval_fns = [steps.make_eval_loss(cfg, mesh=None, aggregation=aggregation, fused_head=f) for f in (False, True)]
    ref, got = (jax.device_get(fn(_params(cfg, seed=11), batch)) for fn in eval_fns)
    for k in ref:
        np.testing.assert_allclose(float(got[k]), float(ref[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_bfloat16_compute_is_close_to_unfused():
    """bf16 matmuls with fp32 accumulation: the two heads round differently, so only bf16-close."""
    cfg = QWEN3_TIED.replace(compute_dtype="bfloat16")
    loss_cfg = steps.OPDLossConfig(aggregation="seq_mean", tis_cap=1.3)
    objective_for = _opd_objective_for(cfg, loss_cfg, None)
    batch, params = _batch(cfg.vocab_size, 12), _params(cfg, seed=12)
    ref_loss, ref_grads, _ = _grads(objective_for(False), params, batch)
    loss, grads, _ = _grads(objective_for(True), params, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-2)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert x.dtype == y.dtype == jnp.float32
        np.testing.assert_allclose(x, y, rtol=0, atol=5e-2 * float(np.max(np.abs(y))))


# ----------------------------------------------------------------------------------------------------------
# train steps
# ----------------------------------------------------------------------------------------------------------
def _one_step(make, cfg, mesh, batch, **kw):
    model = models.from_params(cfg, _params(cfg, seed=13), mesh=mesh)
    # eps=1: Adam's first update is ~ lr * g rather than lr * sign(g), so round-off in tiny gradient entries
    # cannot flip a sign and look like a mismatch.
    opt = steps.make_optimizer(lr=1e-2, total_steps=10, eps=1.0)
    state = steps.init_state(model.params, opt)
    step = make(cfg, opt, mesh=mesh, state=state, batch_size=batch["tokens"].shape[0], **kw)
    state, metrics = step(state, steps.shard_batch(batch, mesh))
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("model", list(MODELS))
def test_sharded_opd_step_fused_equals_unfused(model):
    cfg = MODELS[model]
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2), devices=eight_devices())
    batch = _batch(cfg.vocab_size, 14)
    out = {}
    for fused in (False, True):
        loss_cfg = steps.OPDLossConfig(aggregation="seq_mean", tis_cap=1.3, fused_head=fused)
        out[fused] = _one_step(functools.partial(steps.make_opd_step, loss_cfg=loss_cfg, with_behaviour=True),
                               cfg, mesh, batch)
    (ref_params, ref_metrics), (params, metrics) = out[False], out[True]
    assert not bool(metrics["nonfinite"])
    for k in ref_metrics:
        np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), err_msg=k, **TOL)
    _assert_tree_close(params, ref_params)


def test_sft_step_fused_equals_unfused():
    cfg = LLAMA_UNTIED
    batch = {k: v for k, v in _packed_batch(cfg.vocab_size, 15).items() if "logprobs" not in k}
    out = [_one_step(functools.partial(steps.make_sft_step, aggregation="seq_mean", packed=True,
                                       micro_batch_size=4, fused_head=f), cfg, _single_mesh(), batch)
           for f in (False, True)]
    np.testing.assert_allclose(float(out[1][1]["loss"]), float(out[0][1]["loss"]), **TOL)
    _assert_tree_close(out[1][0], out[0][0])


def _single_mesh():
    return sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=one_device())


# ----------------------------------------------------------------------------------------------------------
# the saving itself
# ----------------------------------------------------------------------------------------------------------
def _vocab_matmuls(jaxpr: jex.Jaxpr, vocab: int) -> int:
    """dot_general equations (in all nested jaxprs: scan bodies, remat, pjit) with a vocab-sized operand or
    output dimension; a scan body counts once, i.e. per chunk."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars)]
            count += any(vocab in s for s in shapes)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, tuple | list) else (p,)):
                if isinstance(sub, jex.ClosedJaxpr):
                    count += _vocab_matmuls(sub.jaxpr, vocab)
                elif isinstance(sub, jex.Jaxpr):
                    count += _vocab_matmuls(sub, vocab)
    return count


@pytest.mark.parametrize("model", list(MODELS))
def test_fused_step_has_three_vocab_matmuls_per_chunk_instead_of_four(model):
    cfg = MODELS[model]
    # the vocab size must not coincide with any other dimension of the program
    others = {B, T, T - 1, cfg.hidden_size, cfg.intermediate_size, B * cfg.logits_chunk_size}
    assert cfg.vocab_size not in others
    batch = jax.tree.map(jnp.asarray, _batch(cfg.vocab_size, 16))
    params = _params(cfg, seed=16)
    counts = {}
    for fused in (False, True):
        objective = _opd_objective_for(cfg, steps.OPDLossConfig(tis_cap=1.3), None)(fused)
        jaxpr = jax.make_jaxpr(lambda p, b: steps._accumulated_grads(objective, p, b, 1))(params, batch)  # noqa: B023
        counts[fused] = _vocab_matmuls(jaxpr.jaxpr, cfg.vocab_size)
    assert counts == {False: 4, True: 3}
