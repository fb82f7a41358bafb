"""LoRA / frozen-base students (jopd/models/lora.py, docs/lora.md).

The adapted forward equals a float64 hand-written reference (the plain decoder on ``W + s * A @ B``, merged here
with explicit einsums) on random non-zero adapters, dense and MoE; gradients w.r.t. the adapters equal float64
finite differences; fresh adapters leave the model exactly as it was; an OPD step changes only the adapters (the
base bit-identical), its optimizer state holds only adapter leaves and it equals a hand-written update; a sharded
step equals one device; bf16 compute keeps every matmul bf16; dropout is on in training passes only; the merged
export equals the adapter model (jopd and transformers), the PEFT adapter round-trips and means
``W + s * lora_B @ lora_A``; a LoRA arm resumes bit for bit with checkpoints that hold no base weights; the config
validates and default runs keep their fingerprints; the CLI trains LoRA SFT and a LoRA arm on configs/tiny.yaml.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import eight_devices, tiny_shrink
from test_stages_train import (  # noqa: F401 - the stage test's fixtures
    Interrupt,
    InterruptAt,
    arm_params,
    assets,
    compilation_cache,
    make_run,
    mesh,
)
from test_steps import ragged_batch

from jopd import arms, losses, models, sharding, steps
from jopd.config import ConfigValidationError, load_config
from jopd.models import LoraSpec, ModelConfig, lora

ROOT = Path(__file__).resolve().parent.parent
DENSE = ModelConfig(model_type="qwen3", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=4, qk_norm=True, tie_word_embeddings=False,
                    logits_chunk_size=5)
MOE = ModelConfig(model_type="qwen3_moe", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=4, qk_norm=True, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=8, tie_word_embeddings=True, logits_chunk_size=5)
SPEC = LoraSpec(rank=3, alpha=5.0)
B, T = 8, 10


def _single():
    return sharding.single_device_mesh()


def _random_adapters(cfg: ModelConfig, seed: int, scale: float = 0.3) -> dict:
    """Adapters with non-zero A and B (fresh ones have B = 0)."""
    shapes = lora.adapter_shapes(cfg)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def _merged_reference(params: dict, adapters: dict, cfg: ModelConfig, scale: float) -> dict:
    """W + scale * A @ B in float64, written out per kernel layout (independent of jopd.models.lora)."""
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    ad = jax.tree.map(lambda x: np.asarray(x, np.float64), adapters)["layers"]
    layers = out["layers"]
    subs = {"q": "ldr,lrhk->ldhk", "k": "ldr,lrhk->ldhk", "v": "ldr,lrhk->ldhk", "o": "lhkr,lrd->lhkd"}
    mlp = "moe" if cfg.is_moe else "mlp"
    subs.update({t: ("ledr,lerf->ledf" if cfg.is_moe else "ldr,lrf->ldf") for t in ("gate", "up", "down")})
    for t in cfg.lora.targets:
        module = "attn" if t in ("q", "k", "v", "o") else mlp
        a, b = ad[module][f"{t}_lora_a"], ad[module][f"{t}_lora_b"]
        layers[module][f"{t}_kernel"] = layers[module][f"{t}_kernel"] + scale * np.einsum(subs[t], a, b)
    return out


def _tokens(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    batch = ragged_batch(vocab, seed, B, T)
    mask = (batch["tokens"] > 0).astype(np.int32)
    mask[:, 0] = 1
    return batch["tokens"], mask


# ------------------------------------------------------------------------------------------ the forward
@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("targets", [lora.LORA_TARGETS, ("q", "v", "down")], ids=["all", "q_v_down"])
def test_forward_equals_float64_merged_reference(cfg, targets):
    spec = LoraSpec(rank=3, alpha=5.0, targets=targets)
    tokens, mask = _tokens(cfg.vocab_size)
    with jax.enable_x64(True):
        c64 = cfg.replace(param_dtype="float64", compute_dtype="float64", lora=spec)
        base = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) * 4, models.init_params(cfg, seed=1))
        adapters = _random_adapters(c64, 2)
        got = models.logprobs_fn({**base, "lora": adapters}, c64, jnp.asarray(tokens), jnp.asarray(mask))
        ref_params = jax.tree.map(jnp.asarray, _merged_reference(base, adapters, c64, spec.alpha / spec.rank))
        ref = models.logprobs_fn(ref_params, c64.replace(lora=None), jnp.asarray(tokens), jnp.asarray(mask))
        plain = models.logprobs_fn(base, c64.replace(lora=None), jnp.asarray(tokens), jnp.asarray(mask))
        assert float(jnp.max(jnp.abs(ref - plain))) > 0.1  # the adapters matter
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-10)
    # fp32: the same model within fp32 rounding of the float64 reference
    c32 = cfg.replace(lora=spec)
    ad32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapters)
    base32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), base)
    got32 = models.logprobs_fn({**base32, "lora": ad32}, c32, jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got32), np.asarray(ref), atol=2e-4)


def test_fresh_adapters_leave_the_model_exactly_unchanged():
    model = models.from_params(DENSE, models.init_params(DENSE, seed=1), mesh=_single())
    tokens, mask = _tokens(DENSE.vocab_size)
    fresh = lora.with_adapters(model, SPEC, seed=4)
    ad = fresh.params["lora"]["layers"]
    assert float(jnp.max(jnp.abs(ad["attn"]["q_lora_a"]))) > 0  # A random (uniform in 1/sqrt(fan_in))
    assert float(jnp.max(jnp.abs(ad["attn"]["q_lora_a"]))) <= 1 / np.sqrt(DENSE.hidden_size)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for k, m in ad.items() for n, x in m.items() if n.endswith("_b"))
    np.testing.assert_array_equal(np.asarray(models.token_logprobs(model, tokens, mask)),
                                  np.asarray(models.token_logprobs(fresh, tokens, mask)))
    with pytest.raises(ValueError, match="already carries"):
        lora.with_adapters(fresh, SPEC)
    # a target's A does not depend on the other targets
    only_q = lora.with_adapters(model, LoraSpec(rank=3, alpha=5.0, targets=("q",)), seed=4)
    np.testing.assert_array_equal(np.asarray(only_q.params["lora"]["layers"]["attn"]["q_lora_a"]),
                                  np.asarray(ad["attn"]["q_lora_a"]))


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_adapter_gradients_match_float64_finite_differences(cfg):
    tokens, mask = _tokens(cfg.vocab_size, 3)
    with jax.enable_x64(True):
        c64 = cfg.replace(param_dtype="float64", compute_dtype="float64", lora=SPEC)
        base = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) * 4, models.init_params(cfg, seed=1))
        adapters = _random_adapters(c64, 5)
        weights = jnp.asarray(np.random.default_rng(6).standard_normal(tokens.shape))

        @jax.jit
        def loss(ad):
            lp = models.logprobs_fn({**base, "lora": ad}, c64, jnp.asarray(tokens), jnp.asarray(mask))
            return jnp.sum(lp * weights)

        grads = jax.jit(jax.grad(loss))(adapters)
        leaves, treedef = jax.tree.flatten(adapters)
        names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]]
        g_leaves = jax.tree.leaves(grads)
        rng = np.random.default_rng(7)
        eps = 1e-6
        for li in range(len(leaves)):
            idx = tuple(int(rng.integers(0, s)) for s in leaves[li].shape)
            bumped = []
            for sign in (1, -1):
                new = list(leaves)
                new[li] = new[li].at[idx].add(sign * eps)
                bumped.append(float(loss(jax.tree.unflatten(treedef, new))))
            fd = (bumped[0] - bumped[1]) / (2 * eps)
            np.testing.assert_allclose(float(g_leaves[li][idx]), fd, rtol=1e-5, atol=1e-8, err_msg=names[li])


# --------------------------------------------------------------------------------------------- the step
def _opd_batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    return ragged_batch(vocab, seed, B, T)


def _lora_step(model, *, micro=None, lr=1e-2, kl=0.0, dropout_seed=0):
    optimizer = steps.make_optimizer(lr=lr, total_steps=10)
    # a copy of the adapters: the step donates its state, and tests build several steps from one model
    trainable = {"lora": jax.tree.map(jnp.copy, model.params["lora"])}
    frozen = {k: v for k, v in model.params.items() if k != "lora"}
    state = steps.init_state(trainable, optimizer)
    step = steps.make_opd_step(model.config, optimizer, steps.OPDLossConfig(kl_coef=kl), mesh=model.mesh,
                               state=state, batch_size=B, micro_batch_size=micro, frozen=True, with_ref=kl > 0,
                               dropout_seed=dropout_seed)
    return optimizer, state, frozen, step


def _trained_adapters_model(cfg, on_mesh, seed=2):
    """A LoRA model with non-zero B (as after some training), on ``on_mesh``."""
    model = models.from_params(cfg, models.init_params(cfg, seed=1), mesh=on_mesh)
    model = lora.with_adapters(model, SPEC, seed=3)
    ad = jax.tree.map(lambda x, s: jax.device_put(x, s), _random_adapters(model.config, seed, 0.2),
                      lora.adapter_shardings(model.config, on_mesh))
    model.params["lora"] = ad
    return model


def test_opd_step_changes_only_the_adapters_and_equals_a_hand_written_update():
    model = _trained_adapters_model(DENSE, _single())
    host = jax.device_get(model.params)
    optimizer, state, frozen, step = _lora_step(model)
    # the optimizer state holds the adapters' moments only: no leaf of any base weight's shape
    adapter_leaves = jax.tree.leaves(state.params)
    opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert len(opt_arrays) == 2 * len(adapter_leaves)  # Adam mu and nu
    assert sorted(x.shape for x in opt_arrays) == sorted(2 * [x.shape for x in adapter_leaves])
    assert sum(x.size for x in opt_arrays) == 2 * lora.count(state.params)
    assert lora.count(state.params) < lora.count(frozen) / 3

    batch = steps.shard_batch(_opd_batch(DENSE.vocab_size), model.mesh)
    # the reference: plain autodiff of the OPD objective w.r.t. the adapters, then the same optimizer
    nt, ns = losses.loss_denominators(batch["response_mask"])
    cfg = model.config

    def objective(ad):
        return steps.opd_objective({**frozen, "lora": ad}, cfg, batch, steps.OPDLossConfig(), nt, ns)[0]

    grads = jax.jit(jax.grad(objective))(host["lora"])
    updates, _ = optimizer.update(grads, optimizer.init(host["lora"]), host["lora"])
    expected = optax.apply_updates(host["lora"], updates)

    new_state, metrics = step(state, batch, frozen)
    assert not bool(metrics["nonfinite"]) and int(new_state.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                 new_state.params["lora"], expected)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(host["lora"])))
    # the frozen base: not donated, not changed
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen),
                 {k: v for k, v in host.items() if k != "lora"})


def test_step_memory_holds_no_base_sized_state():
    """The compiled LoRA step's state (its donated input = output) is the adapters and their two moments; the full
    fine-tuning step's is the whole model three times."""
    model = _trained_adapters_model(DENSE.replace(vocab_size=512, intermediate_size=64), _single())
    batch = steps.shard_batch(_opd_batch(512), model.mesh)
    _, state, frozen, step = _lora_step(model)
    compiled = step.lower(state, batch, frozen).compile()
    lora_out = compiled.memory_analysis().output_size_in_bytes
    # nor is the frozen output head's [D, V] gradient computed (the fused head's accumulator is dead code)
    d, v = model.config.hidden_size, model.config.vocab_size
    assert not re.findall(rf"f32\[({d},{v}|{v},{d})\][^\n]*dot\(", compiled.as_text())
    base_model = lora.merge(model)
    optimizer = steps.make_optimizer(lr=1e-3, total_steps=10)
    full_state = steps.init_state(base_model.params, optimizer)
    full_step = steps.make_opd_step(base_model.config, optimizer, steps.OPDLossConfig(), mesh=model.mesh,
                                    state=full_state, batch_size=B)
    full_compiled = full_step.lower(full_state, batch).compile()
    full_out = full_compiled.memory_analysis().output_size_in_bytes
    assert re.findall(rf"f32\[({d},{v}|{v},{d})\][^\n]*dot\(", full_compiled.as_text())  # the check can fail
    adapter_bytes, base_bytes = 4 * lora.count(state.params), 4 * lora.count(frozen)
    assert 3 * adapter_bytes <= lora_out < 3 * adapter_bytes + 4096  # + the scalar metrics and step count
    assert 3 * base_bytes <= full_out and lora_out < full_out / 10


def test_micro_batches_and_kl_reference_with_frozen_base():
    """Gradient accumulation gives the full-batch update; the KL reference is the frozen base (the SFT policy):
    with adapters at B = 0 the KL penalty is exactly zero."""
    model = _trained_adapters_model(DENSE, _single())
    batch = steps.shard_batch(_opd_batch(DENSE.vocab_size, 1), model.mesh)
    _, s1, frozen, full = _lora_step(model)
    _, s2, _, micro = _lora_step(model, micro=2)
    a, _ = full(s1, batch, frozen)
    b, _ = micro(s2, batch, frozen)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6), a.params,
                 b.params)
    fresh = lora.with_adapters(models.from_params(DENSE, models.init_params(DENSE, seed=1), mesh=_single()), SPEC)
    _, st, frozen, with_kl = _lora_step(fresh, kl=0.5)
    _, metrics = with_kl(st, batch, frozen, frozen)
    assert float(metrics["kl_ref"]) == 0.0


def test_sharded_lora_step_equals_one_device():
    devices = eight_devices()
    mesh8 = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2, expert=1), devices=devices)
    results = {}
    for name, on_mesh in (("one", _single()), ("mesh8", mesh8)):
        model = _trained_adapters_model(MOE.replace(intermediate_size=32), on_mesh)
        batch = steps.shard_batch(_opd_batch(MOE.vocab_size, 2), on_mesh)
        _, state, frozen, step = _lora_step(model)
        if name == "mesh8":  # adapters shard like their kernels' dimensions
            sh = jax.tree.map(lambda x: x.sharding.spec, state.params["lora"]["layers"])
            assert sh["attn"]["q_lora_a"] == jax.sharding.PartitionSpec(None, "fsdp", None)
            assert sh["attn"]["q_lora_b"] == jax.sharding.PartitionSpec(None, None, "tensor", None)
            assert sh["attn"]["o_lora_b"] == jax.sharding.PartitionSpec(None, None, "fsdp")
            assert sh["moe"]["gate_lora_b"][-1] == "tensor"  # expert_mlp
            mu = state.opt_state[1][0].mu["lora"]["layers"]["attn"]["q_lora_b"]
            assert mu.sharding.spec == state.params["lora"]["layers"]["attn"]["q_lora_b"].sharding.spec
        new, metrics = step(state, batch, frozen)
        results[name] = (jax.device_get(new.params), float(metrics["loss"]))
    assert abs(results["one"][1] - results["mesh8"][1]) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), results["one"][0], results["mesh8"][0])


def test_bf16_compute_keeps_every_matmul_bf16():
    """A bf16 base keeps fp32 adapter master weights, cast like the kernels: the adapted step's matmuls are all
    bf16 (a library that adds an fp32 adapter product to a bf16 layer output would promote the residual stream)."""
    cfg = DENSE.replace(compute_dtype="bfloat16", param_dtype="bfloat16")  # a one-GPU user's bf16 base
    model = _trained_adapters_model(cfg, _single())
    assert {x.dtype for x in jax.tree.leaves(model.params["lora"])} == {jnp.dtype(jnp.float32)}  # fp32 masters
    batch = steps.shard_batch(_opd_batch(cfg.vocab_size), model.mesh)
    _, state, frozen, step = _lora_step(model)
    text = step.lower(state, batch, frozen).as_text()
    dots = re.findall(r"stablehlo\.dot_general .*: \(tensor<[0-9x]+x(\w+)>, tensor<[0-9x]+x(\w+)>\) ->", text)
    assert dots and all(d == ("bf16", "bf16") for d in dots), [d for d in dots if d != ("bf16", "bf16")]
    tokens, mask = _tokens(cfg.vocab_size)
    lp16 = np.asarray(models.token_logprobs(model, tokens, mask))
    lp32 = np.asarray(models.token_logprobs(
        models.Model(model.config.replace(compute_dtype="float32"), model.params, model.mesh), tokens, mask))
    assert np.max(np.abs(lp16 - lp32)) < 0.1


def test_dropout_acts_in_training_passes_only():
    spec = LoraSpec(rank=3, alpha=5.0, dropout=0.5)
    model = _trained_adapters_model(DENSE, _single())
    model.config = model.config.replace(lora=spec)
    tokens, mask = _tokens(DENSE.vocab_size)
    lp_fn = jax.jit(lambda p, rng, cfg: models.logprobs_fn(p, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                                           dropout_rng=rng), static_argnums=2)
    lp = lambda rng: np.asarray(lp_fn(model.params, rng, model.config))  # noqa: E731
    off = np.asarray(models.logprobs_fn(model.params, model.config, jnp.asarray(tokens), jnp.asarray(mask)))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    assert np.max(np.abs(lp(k1) - off)) > 1e-3 and np.array_equal(lp(k1), lp(k1))
    assert np.max(np.abs(lp(k1) - lp(k2))) > 1e-3
    # no dropout rate: an rng changes nothing
    no_rate = model.config.replace(lora=SPEC)
    np.testing.assert_array_equal(np.asarray(lp_fn(model.params, k1, no_rate)),
                                  np.asarray(models.token_logprobs(models.Model(no_rate, model.params, model.mesh),
                                                                   tokens, mask)))
    # evaluation / sampling passes take no rng: no dropout
    np.testing.assert_allclose(np.asarray(models.token_logprobs(model, tokens, mask)), off, atol=1e-6)
    # the step draws a key per update from (seed, step): same seed, same result; another seed, another
    batch = steps.shard_batch(_opd_batch(DENSE.vocab_size), model.mesh)
    outs = []
    for seed in (0, 1):
        _, state, frozen, step = _lora_step(model, dropout_seed=seed)
        again = jax.tree.map(jnp.copy, state)  # the step donates its state
        outs.append(jax.device_get(step(state, batch, frozen)[0].params))
        if seed == 0:
            outs.append(jax.device_get(step(again, batch, frozen)[0].params))
    jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[2])))


# ------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_merged_export_equals_the_adapter_model_and_the_adapter_round_trips(tmp_path, cfg):
    from jopd.stages.export import transformers_logprobs

    model = _trained_adapters_model(cfg, _single())
    tokens, mask = _tokens(cfg.vocab_size, 4)
    lp = np.asarray(models.token_logprobs(model, tokens, mask))
    models.save_pretrained(model, tmp_path / "merged")
    merged = models.load_pretrained(tmp_path / "merged", mesh=model.mesh)
    assert merged.config.lora is None and "lora" not in merged.params
    np.testing.assert_allclose(np.asarray(models.token_logprobs(merged, tokens, mask)), lp, atol=2e-5)
    in_memory = lora.merge(model)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(in_memory.params), jax.device_get(merged.params))
    if cfg is DENSE:  # transformers reads the merged directory as a normal model (its MoE layout varies by version)
        pytest.importorskip("torch")
        np.testing.assert_allclose(transformers_logprobs(tmp_path / "merged", tokens, mask), lp, atol=1e-4)

    models.save_adapter(model, tmp_path / "adapter", base_model="BASE")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (conf["peft_type"], conf["r"], conf["lora_alpha"], conf["base_model_name_or_path"]) == ("LORA", 3, 5.0,
                                                                                                     "BASE")
    assert conf["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = lora.split(model.params)[0]
    plain = models.Model(cfg, base, model.mesh)
    back = models.load_adapter(tmp_path / "adapter", plain)
    assert back.config.lora == SPEC
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back.params["lora"]), jax.device_get(model.params["lora"]))

    # PEFT's meaning, on HF tensors: merged W = W + (lora_alpha / r) * lora_B @ lora_A
    from jopd.models.hf import SafetensorsReader, hf_state_dict

    base_hf = dict(hf_state_dict(plain))
    reader = SafetensorsReader(str(tmp_path / "adapter"), "adapter_model.safetensors")
    merged_reader = SafetensorsReader(str(tmp_path / "merged"))
    proj = "mlp.experts.3.down_proj" if cfg.is_moe else "mlp.down_proj"
    for module in ("self_attn.q_proj", "self_attn.o_proj", proj):
        key = f"model.layers.1.{module}.weight"
        a = reader.get(f"base_model.model.model.layers.1.{module}.lora_A.weight").astype(np.float64)
        b = reader.get(f"base_model.model.model.layers.1.{module}.lora_B.weight").astype(np.float64)
        np.testing.assert_allclose(merged_reader.get(key), base_hf[key] + 5.0 / 3 * b @ a, atol=1e-6, err_msg=key)
    reader.close()
    merged_reader.close()


def test_adapter_loading_refuses_what_it_cannot_compute(tmp_path):
    from jopd.models import CheckpointError

    model = _trained_adapters_model(DENSE, _single())
    models.save_adapter(model, tmp_path / "adapter")
    plain = models.Model(DENSE, lora.split(model.params)[0], model.mesh)
    conf_path = tmp_path / "adapter" / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    for change, message in (({"use_rslora": True}, "unsupported adapter settings"),
                            ({"target_modules": ["q_proj", "lm_head"]}, "target_modules"),
                            ({"r": 4}, "rank 4 on this model implies"),
                            ({"target_modules": ["q_proj"]}, "adapter tensors this model does not have")):
        conf_path.write_text(json.dumps({**conf, **change}))
        with pytest.raises(CheckpointError, match=re.escape(message)):
            models.load_adapter(tmp_path / "adapter", plain)
    with pytest.raises(ValueError, match="already carries"):
        models.load_adapter(tmp_path / "adapter", model)


# ------------------------------------------------------------------------------------------- config
def test_config_validation_and_default_fingerprints():
    def problems(*overrides):
        with pytest.raises(ConfigValidationError) as e:
            load_config(str(ROOT / "configs" / "tiny.yaml"), list(overrides), check_files=False)
        return str(e.value)

    assert "opd.lora.rank: must be >= 0" in problems("opd.lora.rank=-1")
    assert "sft.lora.alpha: must be > 0" in problems("sft.lora.rank=2", "sft.lora.alpha=0")
    assert "unknown projection(s) ['router']" in problems("opd.lora.rank=2", "opd.lora.targets=[q, router]")
    assert "opd.lora.targets: must list at least one" in problems("opd.lora.rank=2", "opd.lora.targets=[]")
    assert "arms[1].lora.dropout: must be in [0, 1)" in problems("arms.1.lora={rank: 2, dropout: 1.0}")
    assert "export.adapter: the exported arm 'lightning_A' has no LoRA adapter" in problems("export.adapter=true")

    tiny = load_config(str(ROOT / "configs" / "tiny.yaml"), check_files=False)
    on = load_config(str(ROOT / "configs" / "tiny.yaml"), ["opd.lora.rank=4", "arms.1.lora={rank: 0}",
                                                           "sft.lora.rank=8", "export.adapter=true"],
                     check_files=False)
    # default runs keep their fingerprints: the new fields are out of the sections' reprs, and the stage inputs
    # name them only when on
    for section in ("sft", "opd", "export"):
        assert repr(getattr(tiny, section)) == repr(getattr(on, section))
    assert repr(tiny.arms) == repr(on.arms)
    assert arms.lora_inputs(types.SimpleNamespace(cfg=tiny), tiny.arms) == {}
    lora_on = arms.lora_inputs(types.SimpleNamespace(cfg=on), on.arms)["lora"]
    assert set(lora_on) == {"lightning_A", "online_A"} and lora_on["online_A"]["rank"] == 4
    assert on.arms[0].lora_section(on.opd).spec() == LoraSpec(rank=4, alpha=16.0)
    assert on.sft.lora.spec().rank == 8 and tiny.sft.lora.spec() is None


# ---------------------------------------------------------------------------------------------- the stage
LORA_ARM = [{"name": "light", "mode": "lightning", "teacher": "A",
             "lora": {"rank": 4, "alpha": 8.0, "targets": ["q", "v", "gate", "down"], "dropout": 0.1}}]


def test_lora_arm_trains_saves_merged_and_adapter_and_resumes_exactly(tmp_path, assets, mesh):  # noqa: F811
    from jopd.io import read_json
    from jopd.pipeline import Run, run_stage
    from jopd.stages import stage
    from jopd.stages import train as train_mod

    ref_ctx = make_run(tmp_path / "ref", assets, mesh, LORA_ARM)
    assert train_mod.inputs(ref_ctx)["lora"]["light"]["rank"] == 4
    run_stage(stage("train"), ref_ctx)
    ref = arm_params(ref_ctx, "light")
    sft = jax.device_get(models.load_pretrained(ref_ctx.layout.sft_model, mesh=mesh).params)
    changed = {k for k, _ in jax.tree_util.tree_flatten_with_path(ref)[0]
               if not np.array_equal(_at(ref, k), _at(sft, k))}
    targeted = {"q_kernel", "v_kernel", "gate_kernel", "down_kernel"}
    assert changed and {str(k[-1].key) for k in changed} == targeted  # only the adapted kernels moved
    meta = read_json(ref_ctx.layout.arm_meta("light"))
    assert meta["lora"]["rank"] == 4 and meta["lora"]["trainable_params"] < meta["lora"]["frozen_params"] / 5
    adapter_dir = ref_ctx.layout.arm_adapter("light")
    # the merged model = the SFT model + the saved adapter
    back = models.load_adapter(adapter_dir, models.load_pretrained(ref_ctx.layout.sft_model, mesh=mesh))
    tokens, mask = _tokens(back.config.vocab_size)
    merged = models.load_pretrained(ref_ctx.layout.arm_model("light"), mesh=mesh)
    np.testing.assert_allclose(np.asarray(models.token_logprobs(back, tokens, mask)),
                               np.asarray(models.token_logprobs(merged, tokens, mask)), atol=2e-5)
    # checkpoints hold the adapters and their moments, not the frozen base
    ckpt_files = " ".join(p.read_text(errors="ignore") for p in ref_ctx.layout.arm_ckpt("light").rglob("*")
                          if p.is_file() and p.stat().st_size < 1 << 20 and "METADATA" in p.name.upper())
    assert "q_lora_a" in ckpt_files and "embedding" not in ckpt_files and "q_kernel" not in ckpt_files

    ctx = make_run(tmp_path / "int", assets, mesh, LORA_ARM)
    with pytest.raises(Interrupt):
        run_stage(stage("train"), Run(ctx.cfg, ctx.layout, ctx.mesh, hooks=(InterruptAt(3),)))
    out = run_stage(stage("train"), ctx)  # resumes from the checkpoint of step 2
    assert out["arms"]["light"]["resumed_from_step"] == 2
    jax.tree.map(np.testing.assert_array_equal, ref, arm_params(ctx, "light"))
    assert (adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (ctx.layout.arm_adapter("light") / "adapter_model.safetensors").read_bytes()


def _at(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


# ---------------------------------------------------------------------------------------------- the CLI
LORA_OVERRIDES = [
    "sft.lora.rank=4", "sft.lora.alpha=8", "precompute.teachers=[A]", "export.adapter=true",
    "arms=[{name: lora_A, mode: lightning, teacher: A, lora: {rank: 4, alpha: 8, targets: [q, v, gate, up, down]}}]",
]


@pytest.mark.slow
def test_cli_trains_lora_sft_and_a_lora_arm(tmp_path):
    """configs/tiny.yaml with LoRA SFT and a LoRA lightning arm, exported merged plus its adapter."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jopd.main", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
         *tiny_shrink(), *LORA_OVERRIDES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sft_meta = json.loads((run_dir / "sft" / "meta.json").read_text())
    assert sft_meta["lora"]["rank"] == 4 and (run_dir / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    meta = json.loads((run_dir / "arms" / "lora_A" / "meta.json").read_text())
    assert meta["complete"] and meta["lora"]["targets"] == ["q", "v", "gate", "up", "down"]
    assert meta["lora"]["trainable_params"] < meta["lora"]["frozen_params"]
    check = json.loads((run_dir / "export" / "export_check.json").read_text())
    assert check["lora"]["adapter_vs_export_max_abs_diff"] < 1e-4, check
    assert check.get("transformers_check") in ("passed", "skipped: torch is not installed")
    assert json.loads((run_dir / "export" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert "arm:lora_A" in results
    done = json.loads((run_dir / "train" / "DONE.json").read_text())
    assert done["inputs"]["lora"]["lora_A"]["rank"] == 4
    assert "LoRA r=4 (q/v/gate/up/down)" in (run_dir / "report.md").read_text()


# ------------------------------------------------------------------------------------- the memory estimator
def test_memory_estimator_reports_lora_next_to_full_fine_tuning(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "scripts" / "memory_estimate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("memory_estimate", mod)
    spec.loader.exec_module(mod)
    est = mod.main(["--config", str(ROOT / "configs" / "qwen3-8b.yaml"), "--student-arch", "qwen3-8b",
                    "--teacher-arch", "qwen3-8b", "--devices", "1", "--mesh", "fsdp=1", "--lora", "16", "--quiet",
                    "--set", "precision.param_dtype=bfloat16", "--set", "precision.compute_dtype=bfloat16"])
    arch = mod.PRESETS["qwen3-8b"]
    d, f, h, k, hd, n = (arch["hidden_size"], arch["intermediate_size"], arch["num_heads"], arch["num_kv_heads"],
                         arch["head_dim"], arch["num_layers"])
    r = 16  # q, k, v, o, gate, up, down: r * (in + out) each
    adapters = n * r * ((d + h * hd) + 2 * (d + k * hd) + (h * hd + d) + 2 * (d + f) + (f + d))
    assert est["lora"]["opd"]["adapter_params"] == adapters and est["lora"]["opd"]["alpha"] == 32.0
    full, low = est["stages"]["opd train step"], est["stages"]["opd train step, LoRA r=16"]
    lines = {ln["name"]: ln["gib"] for ln in low["lines"]}
    full_lines = {ln["name"]: ln["gib"] for ln in full["lines"]}
    gib = 2 ** 30
    assert lines["LoRA adapters (trained, fp32)"] == pytest.approx(4 * adapters / gib)
    assert lines["Adam moments (adapters)"] == pytest.approx(2 * 4 * adapters / gib)
    assert lines["frozen base params"] == pytest.approx(full_lines["params (master)"])  # resident, bf16
    assert full_lines["Adam moments"] > 25 and lines["Adam moments (adapters)"] < 0.5
    assert low["total_gib"] < full["total_gib"] - 50
