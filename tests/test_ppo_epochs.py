"""Several PPO updates per rollout batch (``opd.ppo_epochs``, ``opd.mini_batches``): the default is today's fused
step bit for bit; E epochs x M mini-batches equal a hand-written sequence of plain updates with the old log-probs
frozen at the batch's start; the clip then acts; sharded == one device; the config names bad values; and a
Lightning arm trains, logs clip_frac and resumes exactly with them."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_stages_train import (  # noqa: F401 - the stage test's fixtures
    LIGHT,
    Interrupt,
    InterruptAt,
    arm_params,
    assets,
    compilation_cache,
    make_run,
    mesh,
    metric_rows,
)
from test_steps import CFG, B, T
from test_steps import _batch as _steps_batch

from jopd import arms, losses, models, sharding, steps
from jopd.config import ConfigValidationError, load_config


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    """test_steps' ragged batch plus behaviour log-probs (TIS acts)."""
    batch = _steps_batch(seed)
    rng = np.random.default_rng([seed, 1])
    batch["behaviour_logprobs"] = (-rng.random((B, T)) * 4 - 0.1).astype(np.float32) * batch["response_mask"]
    return batch


def _single_mesh():
    return sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])


def _optimizer(lr: float):
    # eps=1: Adam's update stays proportional to the gradient (no lr * sign(g) of round-off-sized entries).
    return steps.make_optimizer(lr=lr, total_steps=100, eps=1.0)


def _run(dmesh, batch, *, lr: float = 0.5, loss_cfg: steps.OPDLossConfig | None = None, n_steps: int = 1,
         **kw):
    model = models.from_params(CFG, models.init_params(CFG, seed=0), mesh=dmesh)
    opt = _optimizer(lr)
    state = steps.init_state(model.params, opt)
    step = steps.make_opd_step(CFG, opt, loss_cfg or steps.OPDLossConfig(), mesh=dmesh, state=state, batch_size=B,
                               with_behaviour=True, **kw)
    all_metrics = []
    for _ in range(n_steps):
        state, metrics = step(state, steps.shard_batch(batch, dmesh))
        all_metrics.append(jax.device_get(metrics))
    return jax.device_get(state), all_metrics


def test_one_epoch_one_mini_batch_is_the_fused_step_exactly():
    dmesh = _single_mesh()
    batch = _batch(1)
    ref, ref_m = _run(dmesh, batch, n_steps=2)
    got, got_m = _run(dmesh, batch, n_steps=2, ppo_epochs=1, mini_batches=1, shuffle_seed=5)
    jax.tree.map(np.testing.assert_array_equal, ref, got)
    assert ref_m[1].keys() == got_m[1].keys() and not any(k.endswith("_per_update") for k in got_m[1])
    for k in ref_m[1]:
        np.testing.assert_array_equal(ref_m[1][k], got_m[1][k])
    assert float(got_m[1]["clip_frac"]) == 0.0 and int(got.step) == 2


def _reference(batch, *, epochs: int, mini: int, lr: float, seed: int, tis_cap: float | None,
               aggregation: str = "seq_mean") -> tuple[dict, list[dict]]:
    """E * M plain updates from the public pieces: old log-probs at the batch start, then opd_loss + grad + Adam
    on each mini-batch of ``steps.mini_batch_order``."""
    params = models.init_params(CFG, seed=0)
    opt = _optimizer(lr)
    opt_state = opt.init(params)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    old = jax.jit(lambda p: models.logprobs_fn(p, CFG, b["tokens"], b["response_mask"]))(params)
    order = steps.mini_batch_order(B, epochs, seed)
    rows = B // mini

    @jax.jit
    def update(params, opt_state, idx):
        def loss_fn(p):
            lp = models.logprobs_fn(p, CFG, b["tokens"][idx], b["response_mask"][idx])
            return losses.opd_loss(lp, b["teacher_logprobs"][idx], b["response_mask"][idx], old_logprobs=old[idx],
                                   behaviour_logprobs=b["behaviour_logprobs"][idx], tis_cap=tis_cap,
                                   aggregation=aggregation)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    per_update = []
    for e in range(epochs):
        for j in range(mini):
            params, opt_state, metrics = update(params, opt_state, jnp.asarray(order[e, j * rows:(j + 1) * rows]))
            per_update.append(jax.device_get(metrics))
    return jax.device_get(params), per_update


@pytest.mark.parametrize("fused_head", [True, False], ids=["fused", "unfused"])
def test_two_epochs_two_mini_batches_equal_four_plain_updates(fused_head: bool):
    batch = _batch(2)
    cfg = steps.OPDLossConfig(tis_cap=2.0, fused_head=fused_head)
    state, (metrics,) = _run(_single_mesh(), batch, lr=0.5, loss_cfg=cfg, ppo_epochs=2, mini_batches=2,
                             shuffle_seed=7)
    ref, ref_metrics = _reference(batch, epochs=2, mini=2, lr=0.5, seed=7, tis_cap=2.0)
    assert int(state.step) == 4  # optimizer updates
    assert metrics["clip_frac_per_update"][0] == 0 and np.all(metrics["clip_frac_per_update"][2:] > 0)
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state.params)))
    print(f"max |param - reference| = {err:.3g}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ref, state.params)
    for k in ("clip_frac", "ratio_mean", "reverse_kl", "tis_clip_frac"):
        np.testing.assert_allclose(metrics[f"{k}_per_update"], [m[k] for m in ref_metrics], rtol=1e-5, atol=1e-6)
    # The frozen old log-probs: the advantage is the same in both epochs, the ratio moves away from 1.
    np.testing.assert_allclose(np.sum(metrics["reverse_kl_per_update"][:2] * metrics["num_tokens_per_update"][:2]),
                               np.sum(metrics["reverse_kl_per_update"][2:] * metrics["num_tokens_per_update"][2:]),
                               rtol=1e-5)
    assert abs(float(metrics["ratio_mean_per_update"][0]) - 1.0) < 1e-5
    assert abs(float(metrics["ratio_mean_per_update"][-1]) - 1.0) > 1e-3
    assert float(metrics["num_tokens"]) == float(batch["response_mask"].sum())


def test_clipping_acts_in_the_later_updates():
    batch = _batch(3)
    state, (metrics,) = _run(_single_mesh(), batch, lr=3.0, ppo_epochs=3, mini_batches=1,
                             loss_cfg=steps.OPDLossConfig(eps_low=0.05, eps_high=0.05))
    clip = metrics["clip_frac_per_update"]
    print("clip_frac per update", clip)
    assert clip[0] == 0.0 and clip[1] > 0 and clip[2] > 0
    assert float(metrics["clip_frac"]) == pytest.approx(float(np.mean(clip)), rel=1e-6)  # same tokens each epoch
    assert not bool(metrics["nonfinite"]) and int(state.step) == 3


def test_sharded_equals_one_device():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by conftest)")
    batch = _batch(4)
    kw = {"lr": 0.5, "ppo_epochs": 2, "mini_batches": 2, "shuffle_seed": 1,
          "loss_cfg": steps.OPDLossConfig(aggregation="token_mean")}
    ref, (ref_m,) = _run(_single_mesh(), batch, **kw)
    mesh8 = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
    for micro in (None, 2):
        got, (got_m,) = _run(mesh8, batch, micro_batch_size=micro, **kw)
        err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ref.params),
                                                                jax.tree.leaves(got.params)))
        print(f"micro {micro}: max |sharded - one device| = {err:.3g}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ref.params, got.params)
        np.testing.assert_allclose(got_m["loss_per_update"], ref_m["loss_per_update"], rtol=1e-5, atol=1e-6)


def test_nonfinite_update_skips_the_rest_of_the_batch():
    batch = _batch(5)
    rows, cols = np.nonzero(batch["response_mask"])
    batch["teacher_logprobs"][rows[-1], cols[-1]] = np.nan  # a row of the second mini-batch (epoch 1 in order)
    state, (metrics,) = _run(_single_mesh(), batch, ppo_epochs=2, mini_batches=2)
    assert bool(metrics["nonfinite"])
    assert metrics["nonfinite_per_update"].tolist()[:2] == [False, True]
    assert int(state.step) == 1  # the first update only; everything after the bad one is skipped


def test_step_refuses_mini_batches_that_do_not_fit():
    dmesh = _single_mesh()
    opt = _optimizer(0.1)
    state = steps.init_state(models.from_params(CFG, models.init_params(CFG, seed=0), mesh=dmesh).params, opt)
    make = lambda **kw: steps.make_opd_step(CFG, opt, steps.OPDLossConfig(), mesh=dmesh, state=state,  # noqa: E731
                                            batch_size=B, **kw)
    with pytest.raises(ValueError, match="mini_batches 3"):
        make(mini_batches=3)
    with pytest.raises(ValueError, match="micro_batch_size 4"):
        make(mini_batches=4, micro_batch_size=4)
    with pytest.raises(ValueError, match="ppo_epochs"):
        make(ppo_epochs=0)


# ------------------------------------------------------------------------------------------------- config
def _cfg(**opd):
    return load_config("configs/tiny.yaml", [f"opd.{k}={v}" for k, v in opd.items()], check_files=False)


@pytest.mark.parametrize(("opd", "message"), [
    ({"ppo_epochs": 0}, "opd.ppo_epochs: must be > 0"),
    ({"mini_batches": 0}, "opd.mini_batches: must be > 0"),
    ({"mini_batches": 3}, "opd.mini_batches: must divide batch_size 8"),
    ({"mini_batches": 2, "micro_batch_size": 8}, "opd.mini_batches: a mini-batch of 4 rows"),
    ({"mini_batches": 3, "token_budget": 256, "row_len": 64}, "opd.mini_batches: must divide the packed rows"),
])
def test_config_names_the_field(opd, message):
    with pytest.raises(ConfigValidationError, match=message.replace("(", r"\(")):
        _cfg(**opd)


def test_defaults_keep_the_fingerprints_and_settings_enter_the_inputs():
    default, ppo = _cfg(), _cfg(ppo_epochs=2, mini_batches=4)
    assert "ppo" not in repr(default.opd) and "mini_batches" not in repr(default.opd)
    assert repr(default.opd) == repr(ppo.opd)  # the stage inputs name them instead:
    assert arms.ppo_inputs(types.SimpleNamespace(cfg=default)) == {}
    assert arms.ppo_inputs(types.SimpleNamespace(cfg=ppo)) == {"ppo": {"ppo_epochs": 2, "mini_batches": 4}}
    assert ppo.opd.ppo_updates() == 8 and default.opd.ppo_updates() == 1


# ---------------------------------------------------------------------------------------------- the stage
def test_lightning_arm_with_ppo_epochs_trains_logs_clip_frac_and_resumes_exactly(tmp_path, assets, mesh):  # noqa: F811
    from jopd.io import read_json
    from jopd.pipeline import Run, run_stage
    from jopd.stages import stage
    from jopd.stages import train as train_mod

    opd = {"ppo_epochs": 2, "mini_batches": 2, "micro_batch_size": 1}
    ref_ctx = make_run(tmp_path / "ref", assets, mesh, LIGHT, **opd)
    assert train_mod.inputs(ref_ctx)["ppo"] == {"ppo_epochs": 2, "mini_batches": 2}
    run_stage(stage("train"), ref_ctx)
    ref = arm_params(ref_ctx, "light")
    rows = [r for r in metric_rows(ref_ctx, "arm_light") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # steps count rollout batches
    assert all("clip_frac" in r and not any(k.endswith("_per_update") for k in r) for r in rows)
    assert max(r["clip_frac"] for r in rows) > 0  # lr 3e-3 on a tiny model: the later updates clip
    assert read_json(ref_ctx.layout.arm_meta("light"))["steps"] == 4

    ctx = make_run(tmp_path / "int", assets, mesh, LIGHT, **opd)
    with pytest.raises(Interrupt):
        run_stage(stage("train"), Run(ctx.cfg, ctx.layout, ctx.mesh, hooks=(InterruptAt(3),)))
    out = run_stage(stage("train"), ctx)  # resumes from the checkpoint of batch 2 (8 optimizer updates)
    assert out["arms"]["light"]["resumed_from_step"] == 2
    jax.tree.map(np.testing.assert_array_equal, ref, arm_params(ctx, "light"))
