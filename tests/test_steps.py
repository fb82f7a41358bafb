"""The jitted OPD step on a real (tiny) decoder: gradients vs float64 finite differences, exact zeros when the
student is the teacher, sharded == single device, accumulation == full batch, the non-finite guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jopd import losses, models, sharding, steps
from jopd.models import ModelConfig

CFG = ModelConfig(model_type="qwen3", vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=4, qk_norm=True, tie_word_embeddings=False,
                  logits_chunk_size=7)
B, T = 8, 12


def ragged_batch(vocab: int, seed: int = 0, b: int = B, t: int = T) -> dict[str, np.ndarray]:
    """Random tokens ``[b, t]`` with ragged prompts / responses (row 3 without response tokens) and a teacher
    whose log-probs are far from a random student's (non-zero advantages on every response token)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (b, t)).astype(np.int32)
    response_mask = np.zeros((b, t), np.int32)
    for i in range(b):
        start = int(rng.integers(2, 5))
        stop = start if i == 3 else int(rng.integers(start + 1, t + 1))
        response_mask[i, start:stop] = 1
        tokens[i, stop:] = 0
    teacher = (-rng.random((b, t)) * 5 - 0.1).astype(np.float32) * response_mask
    return {"tokens": tokens, "response_mask": response_mask, "teacher_logprobs": teacher}


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    return ragged_batch(CFG.vocab_size, seed)


def _single_mesh():
    return sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_gradient_matches_float64_finite_differences_with_clipping(aggregation):
    """d(loss)/d(params) through the decoder, with stale "old" log-probs so the clip is active."""
    batch = _batch(1)
    with jax.enable_x64(True):
        cfg64 = CFG.replace(param_dtype="float64", compute_dtype="float64")
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), models.init_params(CFG, seed=3))
        params = jax.tree.map(lambda x: x * 5.0, params)  # larger weights: non-trivial log-probs
        tokens = jnp.asarray(batch["tokens"])
        mask = jnp.asarray(batch["response_mask"])
        teacher = jnp.asarray(batch["teacher_logprobs"], jnp.float64)
        current = models.logprobs_fn(params, cfg64, tokens, mask)
        rng = np.random.default_rng(7)
        old = current + jnp.asarray(rng.normal(0, 0.4, current.shape)) * mask  # ratios leave [0.8, 1.2]

        def loss_fn(p):
            lp = models.logprobs_fn(p, cfg64, tokens, mask)
            loss, metrics = losses.opd_loss(lp, teacher, mask, old_logprobs=old, aggregation=aggregation)
            return loss, metrics

        loss_fn = jax.jit(loss_fn)
        (_, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
        assert 0.1 < float(metrics["clip_frac"]) < 0.9  # the clipped branch really is exercised
        leaves, treedef = jax.tree.flatten(params)
        grad_leaves = jax.tree.leaves(grads)
        eps = 1e-6
        for li in (0, 3, len(leaves) - 1):
            for _ in range(3):
                idx = tuple(int(rng.integers(0, s)) for s in leaves[li].shape)
                bumped = []
                for sign in (1, -1):
                    new = list(leaves)
                    new[li] = new[li].at[idx].add(sign * eps)
                    bumped.append(loss_fn(jax.tree.unflatten(treedef, new))[0])
                fd = (bumped[0] - bumped[1]) / (2 * eps)
                np.testing.assert_allclose(float(grad_leaves[li][idx]), float(fd), rtol=1e-5, atol=1e-9)


def test_student_equal_to_teacher_leaves_parameters_unchanged():
    """Teacher log-probs = the student's own: zero advantages and gradient, parameters unchanged.

    The stored teacher values come from a separately compiled program, so they can differ from the step's own
    forward in the last bit (~1e-7); exact zeros for identical inputs are shown at the loss level in
    test_losses.py. With eps=1 the Adam update is proportional to that round-off, not to its sign."""
    mesh = _single_mesh()
    model = models.from_params(CFG, models.init_params(CFG, seed=0), mesh=mesh)
    batch = _batch(2)
    own = np.asarray(models.token_logprobs(model, batch["tokens"], batch["response_mask"]))
    batch["teacher_logprobs"] = own * batch["response_mask"]
    opt = steps.make_optimizer(lr=1e-2, total_steps=10, weight_decay=0.0, eps=1.0)
    state = steps.init_state(model.params, opt)
    before = jax.device_get(state.params)
    step = steps.make_opd_step(CFG, opt, steps.OPDLossConfig(), mesh=mesh, state=state, batch_size=B)
    state, metrics = step(state, steps.shard_batch(batch, mesh))
    assert abs(float(metrics["advantage_mean"])) < 1e-6 and float(metrics["grad_norm"]) < 1e-5
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def _run_step(mesh, batch, micro: int | None = None, loss_cfg: steps.OPDLossConfig | None = None):
    model = models.from_params(CFG, models.init_params(CFG, seed=0), mesh=mesh)
    # Adam's first update is lr * sign(g): a large eps keeps it proportional to g so that round-off in
    # near-zero gradient entries cannot flip a sign and look like a mismatch.
    opt = steps.make_optimizer(lr=1e-2, total_steps=10, eps=1.0)
    state = steps.init_state(model.params, opt)
    step = steps.make_opd_step(CFG, opt, loss_cfg or steps.OPDLossConfig(), mesh=mesh, state=state,
                               batch_size=B, micro_batch_size=micro)
    state, metrics = step(state, steps.shard_batch(batch, mesh))
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_sharded_step_equals_single_device_and_accumulation_equals_full_batch(aggregation):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by conftest)")
    batch = _batch(3)
    cfg = steps.OPDLossConfig(aggregation=aggregation)
    ref_params, ref_metrics = _run_step(_single_mesh(), batch, loss_cfg=cfg)
    mesh8 = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
    for micro in (None, 4):
        params, metrics = _run_step(mesh8, batch, micro=micro, loss_cfg=cfg)
        np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]), rtol=1e-4)
        for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_nonfinite_teacher_logprob_skips_the_update():
    mesh = _single_mesh()
    batch = _batch(4)
    rows, cols = np.nonzero(batch["response_mask"])
    batch["teacher_logprobs"][rows[0], cols[0]] = np.nan
    model = models.from_params(CFG, models.init_params(CFG, seed=0), mesh=mesh)
    opt = steps.make_optimizer(lr=1e-2, total_steps=10)
    state = steps.init_state(model.params, opt)
    before = jax.device_get(state.params)
    step = steps.make_opd_step(CFG, opt, steps.OPDLossConfig(), mesh=mesh, state=state, batch_size=B)
    state, metrics = step(state, steps.shard_batch(batch, mesh))
    assert bool(metrics["nonfinite"]) and int(state.step) == 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
