"""jopd.models against transformers references (tests/fixtures, made by scripts/make_reference_fixtures.py).

* every tiny architecture: log-probs and batched greedy generation match transformers (fp32), on one device
  and on an 8-device fsdp=4 x tensor=2 mesh;
* the real SmolLM2-135M-Instruct (``$JOPD_SMOLLM2_DIR``): log-probs and greedy tokens;
* export: load -> save_pretrained -> load is bit-exact and transformers reads the export;
* config / checkpoint errors name what is wrong;
* the chunked log-prob head equals the naive full-logits one (values and gradients), with remat, bf16 and
  an output layer larger than the ids in use.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CASES, compare_len, eight_devices, gen_prompts, hf_dir, load_ref, one_device

from jopd.models import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    ConfigError,
    ModelConfig,
    hidden_states,
    init_params,
    load_pretrained,
    logprobs_and_topk_fn,
    logprobs_fn,
    naive_logprobs_fn,
    output_kernel,
    save_pretrained,
    token_logprobs,
)
from jopd.sampling import generate
from jopd.sharding import MeshConfig, make_mesh

TOL = 2e-4  # vs transformers fp32 (observed ~1e-6 on the tiny models, ~4e-5 on SmolLM2)
MESHES = ("single", "sharded")


# ----------------------------------------------------------------------------------------------------------
# shared, module-scoped state: each (case, mesh) model is loaded once and its log-probs computed once
# ----------------------------------------------------------------------------------------------------------
class _Loaded:
    def __init__(self):
        self.meshes = {
            "single": make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, expert=1), devices=one_device()),
            "sharded": make_mesh(MeshConfig(data=1, fsdp=4, tensor=2, expert=1), devices=eight_devices()),
        }
        self._models: dict = {}
        self._logprobs: dict = {}
        self._refs: dict = {}

    def ref(self, case):
        if case not in self._refs:
            self._refs[case] = load_ref(case)
        return self._refs[case]

    def model(self, case, mesh):
        if (case, mesh) not in self._models:
            self._models[case, mesh] = load_pretrained(hf_dir(case), mesh=self.meshes[mesh])
        return self._models[case, mesh]

    def logprobs(self, case, mesh):
        if (case, mesh) not in self._logprobs:
            ref = self.ref(case)
            lp = token_logprobs(self.model(case, mesh), ref["tokens"], ref["mask"])
            self._logprobs[case, mesh] = np.asarray(jax.device_get(lp))
        return self._logprobs[case, mesh]


@pytest.fixture(scope="module")
def loaded() -> _Loaded:
    return _Loaded()


# ----------------------------------------------------------------------------------------------------------
# tiny architectures vs transformers
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("case", TINY_CASES)
def test_logprobs_match_transformers(loaded, case, mesh):
    ref = loaded.ref(case)
    lp = loaded.logprobs(case, mesh)
    assert lp.shape == ref["tokens"].shape and lp.dtype == np.float32
    # rows have different lengths (24, 17, 9, 2); padding and t = 0 must be exactly 0
    assert len(set(ref["mask"].sum(1).tolist())) > 1
    assert np.all(lp[ref["mask"] == 0] == 0) and np.all(lp[:, 0] == 0)
    err = np.abs(lp - ref["logprobs"]).max()
    print(f"{case} [{mesh}] max |logprob - transformers| = {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("case", TINY_CASES)
def test_sharded_equals_single_device(loaded, case):
    model = loaded.model(case, "sharded")
    # the 8-device model really is sharded (not silently replicated)
    assert len(model.params["embedding"].sharding.device_set) == 8
    assert not model.params["embedding"].sharding.is_fully_replicated
    np.testing.assert_allclose(loaded.logprobs(case, "sharded"), loaded.logprobs(case, "single"), rtol=0, atol=2e-5)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("case", TINY_CASES)
def test_greedy_matches_transformers(loaded, case, mesh):
    """All prompts (lengths 3, 7, 12) in one batch vs transformers run on each prompt alone."""
    ref = loaded.ref(case)
    prompts = gen_prompts(ref)
    assert len({len(p) for p in prompts}) == len(prompts)
    out = generate(loaded.model(case, mesh), prompts, max_new_tokens=32)
    assert not out.ended_with_eos.any() and out.lengths.tolist() == [32] * len(prompts)
    for i, toks in enumerate(out.tokens):
        n = compare_len(ref["gen_logits_margin"][i])
        assert n >= 24, f"prompt {i}: reference near-tie at step {n}"
        np.testing.assert_array_equal(np.asarray(toks[:n]), ref["gen_tokens"][i, :n], err_msg=f"prompt {i}")
        # greedy returns the model's log-prob of each chosen token
        np.testing.assert_allclose(out.logprobs[i][:n], ref["gen_logprobs"][i, :n], rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real weights), loaded once
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, expert=1), devices=one_device())
    return load_pretrained(smollm2_dir, mesh=mesh), load_ref("smollm2")


def test_smollm2_logprobs(smollm2):
    model, ref = smollm2
    lp = np.asarray(token_logprobs(model, ref["tokens"], ref["mask"]))
    err = np.abs(lp - ref["logprobs"]).max()
    print(f"smollm2 max |logprob - transformers| = {err:.2e}")
    assert err < TOL
    assert np.all(lp[ref["mask"] == 0] == 0)


def test_smollm2_greedy(smollm2):
    model, ref = smollm2
    out = generate(model, gen_prompts(ref), max_new_tokens=32)
    for i, toks in enumerate(out.tokens):
        n = compare_len(ref["gen_logits_margin"][i])
        assert n >= 24, f"prompt {i}: reference near-tie at step {n}, too early to be a useful test"
        np.testing.assert_array_equal(np.asarray(toks[:n]), ref["gen_tokens"][i, :n], err_msg=f"prompt {i}")
        np.testing.assert_allclose(out.logprobs[i][:n], ref["gen_logprobs"][i, :n], rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------
def _transformers_logprobs(path, tokens, mask) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, torch.as_tensor(tokens[:, 1:, None], dtype=torch.long))
    lp = np.concatenate([np.zeros((tokens.shape[0], 1), np.float32), lp[..., 0].numpy()], axis=1)
    return np.where(mask.astype(bool), lp, 0.0)


@pytest.mark.parametrize("case", TINY_CASES)
def test_export_roundtrip(loaded, case, tmp_path):
    """Save the *sharded* model (gathers), reload on one device: every parameter bit-identical, the exported
    tensors are bit-identical to the original checkpoint, and transformers loads the export."""
    from safetensors.numpy import load_file

    out = save_pretrained(loaded.model(case, "sharded"), tmp_path / "export")
    again = load_pretrained(out, mesh=loaded.meshes["single"])
    orig = loaded.model(case, "single")
    assert again.config == orig.config
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(orig.params)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(again.params)
    assert tree_a == tree_b
    for (path, a), (_, b) in zip(flat_a, flat_b):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))

    src, dst = load_file(hf_dir(case) / "model.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
    assert sorted(src) == sorted(dst)
    for key in src:
        assert src[key].dtype == dst[key].dtype and src[key].shape == dst[key].shape, key
        np.testing.assert_array_equal(src[key], dst[key], err_msg=key)
    assert (tmp_path / "export" / "generation_config.json").is_file()

    ref = loaded.ref(case)
    lp = _transformers_logprobs(out, ref["tokens"], ref["mask"])
    assert np.abs(lp - ref["logprobs"]).max() < TOL


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------
def _copy_case(case, tmp_path, edit_config=None):
    dst = tmp_path / case
    shutil.copytree(hf_dir(case), dst)
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _edit_tensors(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def one_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, expert=1), devices=one_device())


def test_unsupported_model_type(tmp_path, one_mesh):
    path = _copy_case("llama_tied", tmp_path, lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ConfigError, match="gpt2") as info:
        load_pretrained(path, mesh=one_mesh)
    for name in SUPPORTED_MODEL_TYPES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("case", "edit", "match"),
    [
        ("qwen3_moe", lambda c: c.update(mlp_only_layers=[0]), "mlp_only_layers"),
        ("qwen3_moe", lambda c: c.update(decoder_sparse_step=2), "decoder_sparse_step"),
        ("llama_tied", lambda c: c["rope_parameters"].update(rope_type="yarn", factor=4.0), "yarn"),
        # transformers 4.x spelling
        ("llama_tied", lambda c: (c.pop("rope_parameters"), c.update(
            rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 4.0})), "yarn"),
        ("llama_tied", lambda c: c.update(hidden_act="gelu"), "gelu"),
        ("qwen2_bias", lambda c: c.update(use_sliding_window=True), "sliding_window"),
    ],
    ids=["mlp_only_layers", "decoder_sparse_step", "rope_yarn", "rope_scaling_yarn_4x", "gelu", "sliding_window"],
)
def test_unsupported_config_field(tmp_path, one_mesh, case, edit, match):
    path = _copy_case(case, tmp_path, edit)
    with pytest.raises(ConfigError, match=match):
        load_pretrained(path, mesh=one_mesh)


@pytest.mark.parametrize(
    ("case", "edit", "name"),
    [
        ("llama_tied", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
         "model.layers.1.self_attn.k_proj.weight"),
        ("qwen3_moe", lambda t: t.pop("model.layers.0.mlp.experts.3.up_proj.weight"),
         "model.layers.0.mlp.experts.3.up_proj.weight"),
        ("qwen2_bias", lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((127, 64), np.float32)}),
         "model.layers.0.mlp.up_proj.weight"),
        ("llama_untied_rope3", lambda t: t.update({"lm_head.weight": np.zeros((64, 320), np.float32)}),
         "lm_head.weight"),
        ("llama_tied", lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}),
         "model.layers.0.self_attn.o_proj.bias"),
        # the same number of elements, stored transposed: refused, never reshaped into scrambled weights
        ("llama_tied", lambda t: t.update({"model.layers.1.self_attn.k_proj.weight":
                                           t["model.layers.1.self_attn.k_proj.weight"].T.copy()}),
         "model.layers.1.self_attn.k_proj.weight"),
        ("qwen3_moe", lambda t: t.update({"model.layers.0.mlp.experts.2.down_proj.weight":
                                          t["model.layers.0.mlp.experts.2.down_proj.weight"].T.copy()}),
         "model.layers.0.mlp.experts.2.down_proj.weight"),
    ],
    ids=["missing", "missing_expert", "wrong_shape", "transposed_lm_head", "extra", "transposed_k_proj",
         "transposed_expert"],
)
def test_checkpoint_errors(tmp_path, one_mesh, case, edit, name):
    path = _copy_case(case, tmp_path)
    _edit_tensors(path, edit)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path, mesh=one_mesh)
    assert name in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# chunked head vs naive full logits
# ----------------------------------------------------------------------------------------------------------
B, T = 3, 12
CHUNK = 5  # does not divide T - 1 = 11


def _tiny_config(**kw) -> ModelConfig:
    base = dict(model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, logits_chunk_size=CHUNK)
    return ModelConfig(**{**base, **kw})


def _batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.int32)
    for b, n in enumerate((T, 7, 2)):
        mask[b, :n] = 1
    tokens = tokens * mask
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(rng.normal(size=(B, T)).astype(np.float32))


def _value_and_grad(fn, config):
    def loss(params, tokens, mask, w):
        lp = fn(params, config, tokens, mask)
        return jnp.sum(lp * w), lp

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def tiny():
    config = _tiny_config()
    params = init_params(config, seed=1)
    # larger output weights so the distribution is far from uniform (a stronger comparison)
    params = {**params, "lm_head": params["lm_head"] * 30.0}
    tokens, mask, w = _batch(config.vocab_size)
    (_, lp), grads = _value_and_grad(naive_logprobs_fn, config)(params, tokens, mask, w)
    return config, params, (tokens, mask, w), lp, grads


def _assert_trees_close(a, b, rel):
    """Every leaf equal up to ``rel`` times that leaf's largest magnitude (fp32 summation-order noise)."""
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        np.testing.assert_allclose(x, y, rtol=0, atol=rel * float(np.abs(y).max()) + 1e-8,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", ["none", "attention", "dots", "full"])
def test_chunked_equals_naive(tiny, remat):
    config, params, batch, lp_naive, g_naive = tiny
    (_, lp), grads = _value_and_grad(logprobs_fn, config.replace(remat=remat))(params, *batch)
    assert float(jnp.abs(lp_naive).max()) > 1.0  # non-trivial values
    np.testing.assert_allclose(np.asarray(lp), np.asarray(lp_naive), rtol=0, atol=2e-5)
    _assert_trees_close(grads, g_naive, rel=1e-5)
    assert float(jnp.abs(grads["lm_head"]).max()) > 0 and float(jnp.abs(grads["embedding"]).max()) > 0


def test_bf16_compute_close_to_fp32(tiny):
    config, params, (tokens, mask, _), lp_naive, _ = tiny
    lp = jax.jit(logprobs_fn, static_argnums=1)(params, config.replace(compute_dtype="bfloat16"), tokens, mask)
    assert lp.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(lp)))
    err = np.abs(np.asarray(lp) - np.asarray(lp_naive))
    scale = np.abs(np.asarray(lp_naive)).max()
    assert err.max() < 0.01 * scale + 0.05, (err.max(), scale)  # observed ~0.04 at scale ~18
    assert np.all(np.asarray(lp)[np.asarray(mask) == 0] == 0)


def test_padded_vocab_uses_full_output_layer():
    """vocab_size (output rows) 64 while ids only go up to 40: the softmax still spans all 64 outputs."""
    used = 40
    config = _tiny_config(vocab_size=64, model_type="llama", qk_norm=False)
    params = init_params(config, seed=2)
    params = {**params, "lm_head": params["lm_head"].at[:, used:].multiply(60.0)}  # unused rows carry mass
    tokens, mask, _ = _batch(used, seed=3)
    assert int(tokens.max()) < used

    lp = np.asarray(jax.jit(logprobs_fn, static_argnums=1)(params, config, tokens, mask))
    naive = np.asarray(jax.jit(naive_logprobs_fn, static_argnums=1)(params, config, tokens, mask))
    np.testing.assert_allclose(lp, naive, rtol=0, atol=2e-5)

    h = np.asarray(jax.jit(hidden_states, static_argnums=1)(params, config, tokens), np.float64)
    logits = h @ np.asarray(output_kernel(params, config), np.float64)  # [B, T, 64]

    def ref_lp(lg):
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        out = np.take_along_axis(lg[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0] - lse[:, :-1]
        out = np.concatenate([np.zeros((B, 1)), out], 1)
        return np.where(np.asarray(mask).astype(bool), out, 0.0)

    np.testing.assert_allclose(lp, ref_lp(logits), rtol=0, atol=2e-5)
    assert np.abs(ref_lp(logits[..., :used]) - lp).max() > 0.1  # the test can tell the difference

    # top-k variant: same log-probs, and the top ids/log-probs of the full distribution
    lp2, ids, vals = jax.jit(logprobs_and_topk_fn, static_argnums=(1, 4))(params, config, tokens, mask, 4)
    np.testing.assert_allclose(np.asarray(lp2), lp, rtol=0, atol=1e-6)
    full = logits[:, :-1] - (np.log(np.exp(logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)).sum(-1))
                             + logits[:, :-1].max(-1))[..., None]
    valid = np.asarray(mask)[:, 1:].astype(bool)
    ref_ids = np.argsort(-full, axis=-1)[..., :4]
    np.testing.assert_array_equal(np.asarray(ids)[:, 1:][valid], ref_ids[valid])
    np.testing.assert_allclose(np.asarray(vals)[:, 1:][valid], np.take_along_axis(full, ref_ids, -1)[valid],
                               rtol=0, atol=2e-5)
    assert np.any(ref_ids[valid] >= used)


def test_custom_vjp_norm_and_swiglu_match_autodiff():
    """rms_norm and swiglu keep fewer residuals through custom VJPs: their gradients equal plain autodiff of
    the textbook formulas (float64, random data, a random cotangent)."""
    from jopd.models.decoder import rms_norm, swiglu

    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        x = jnp.asarray(rng.normal(size=(3, 5, 16)) * 2.0)
        scale = jnp.asarray(rng.normal(size=(16,)))
        up = jnp.asarray(rng.normal(size=(3, 5, 16)))
        ct = jnp.asarray(rng.normal(size=(3, 5, 16)))

        def norm_ref(x, scale):
            return scale * x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

        def swiglu_ref(g, u):
            return g / (1 + jnp.exp(-g)) * u

        for fn, ref, args in ((lambda a, b: rms_norm(a, b, 1e-6), norm_ref, (x, scale)),
                              (swiglu, swiglu_ref, (x, up))):
            out, vjp = jax.vjp(fn, *args)
            out_ref, vjp_ref = jax.vjp(ref, *args)
            np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), rtol=1e-12, atol=1e-12)
            for g, g_ref in zip(vjp(ct), vjp_ref(ct)):
                assert float(jnp.abs(g_ref).max()) > 0.1
                np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-10, atol=1e-10)
