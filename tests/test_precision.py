"""bf16 end to end: the ``precision`` settings of a GPU/TPU run (bf16 compute, fp32 master weights, fp32
log-probs and losses; optionally bf16-held teachers or bf16 master weights), on CPU.

Step level (a 2-layer qwen3, V=72, D=32, kernels scaled x3 so the log-probs are not uniform, random non-zero
teacher log-probs; one CPU device):

* ``compute_dtype: bfloat16`` with fp32 params, the OPD and SFT steps, fused and unfused output heads, tied and
  untied embeddings: the loss, log-probs and every metric are fp32; params and Adam moments stay fp32; and the
  step is within a stated tolerance of the fp32 step. The first Adam update is ~``lr * sign(g)``, whose sign
  flips on near-zero gradient entries; with ``eps=1`` (as in test_steps.py) it is ~``lr * g`` instead, so
  comparing updates compares gradients. Measured over the four cases: update cosine >= 0.99983 (asserted
  > 0.999), update relative L2 <= 0.019 (< 0.05), loss relative <= 2.2e-4 (< 5e-3), grad-norm relative <= 2e-3
  (< 1e-2), log-probs max abs <= 0.0094 at a scale of 5.1 (< 0.05).
* Five steps of the real optimizer (``eps=1e-8``, loss -1.94 -> -0.61): loss per step relative <= 2.3e-3
  (asserted < 2e-2), cosine of the total update 0.9974 (> 0.98).
* It really computes in bf16: in the lowered step every 2-D matmul (projections, MLP, output head, forward and
  backward) has bf16 operands; the fp32 step has no bf16 at all. (Lowered, not compiled, text: XLA:CPU may
  upcast bf16 dots when compiling; the program asks for bf16.) The attention core's two score-gradient
  einsums (d q, d k) and the unfused log-prob head's two backward ``[.., V]`` matmuls used to run on fp32
  operands (autodiff of a bf16 x bf16 -> f32 dot transposes with the fp32 cotangent); both now have custom
  VJPs (jopd/models/decoder.py ``_scores``, jopd/models/logprobs.py ``head_logits``), guarded here.
* ``param_dtype: bfloat16`` (bf16 master weights and Adam moments): the steps run, stay bf16, and the loss,
  log-probs and metrics (grad_norm included) are fp32. ``teacher_dtype: bfloat16`` under bf16 compute is
  bit-identical to an fp32-held teacher (its weights are cast to bf16 for every matmul either way); a
  bf16-held teacher's log-probs are within 0.0062 (bf16 compute) / 0.0048 (fp32 compute) of fp32 (< 0.05).

Pipeline level: configs/tiny.yaml (teacher A only, arms lightning_A and online_A, shrunk like
test_multiprocess.py) end to end, fp32 vs ``precision.compute_dtype=bfloat16 precision.teacher_dtype=bfloat16``,
both runs at once (70-95 s on 2 shared cores). Measured (asserted):

* sampled rollouts: 100 % of tokens equal (>= 75 %);
* in-run teacher params relative L2 1.1e-3 (< 1e-2); SFT student 6.7e-3, arms 7.2e-3 / 7.5e-3 (< 3e-2);
  OPD update of each arm (arm - SFT) cosine 0.981 / 0.976 (> 0.9);
* teacher log-probs on the rollouts: mean abs diff 2.4e-3 (< 0.02), max 0.015 (< 0.1); behaviour log-probs
  (the SFT student's, whose params differ as above) mean 6.2e-3 (< 0.05), max 0.25 (< 1);
* eval accuracy 0 for every policy in both (so: |diff| <= 0.25, two of the 8 prompts); reverse KL relative
  0.45 % (base), 3.8 % (sft), 0.58 % / 1.8 % (arms) (< 15 %); the teacher against itself ~0 in both (< 1e-4);
* everything persisted is fp32: saved models (master weights), teacher and behaviour log-probs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import tiny_shrink

from jopd import models, sharding, steps
from jopd.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(model_type="qwen3", vocab_size=72, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, tie_word_embeddings=False,
                  logits_chunk_size=7)
B, T = 8, 16
BF16 = {"compute_dtype": "bfloat16"}


def _batch(kind: str, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.int32)
    for i in range(B):
        start = int(rng.integers(2, 5))
        stop = int(rng.integers(start + 2, T + 1))
        mask[i, start:stop] = 1
        tokens[i, stop:] = 0
    batch = {"tokens": tokens, "response_mask": mask}
    if kind == "opd":
        batch["teacher_logprobs"] = (-rng.random((B, T)) * 5 - 0.1).astype(np.float32) * mask
    return batch


def _mesh():
    return sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])


def _params(cfg: ModelConfig) -> dict:
    """fp32 init with the weight matrices scaled x3 (norms left at 1), then cast to ``cfg.param_dtype``."""
    params = models.init_params(cfg.replace(param_dtype="float32", compute_dtype="float32"), seed=0)

    def scale(path, x):
        name = str(path[-1].key)
        big = name.endswith("kernel") or name in ("embedding", "lm_head")
        return (x * (3.0 if big else 1.0)).astype(cfg.param_dtype)

    return jax.tree_util.tree_map_with_path(scale, params)


def _make(cfg: ModelConfig, kind: str, *, fused: bool = True, eps: float = 1.0):
    mesh = _mesh()
    model = models.from_params(cfg, _params(cfg), mesh=mesh)
    opt = steps.make_optimizer(lr=1e-2, total_steps=10, eps=eps)
    state = steps.init_state(model.params, opt)
    if kind == "opd":
        step = steps.make_opd_step(cfg, opt, steps.OPDLossConfig(fused_head=fused), mesh=mesh, state=state,
                                   batch_size=B)
    else:
        step = steps.make_sft_step(cfg, opt, mesh=mesh, state=state, batch_size=B, fused_head=fused)
    return model, state, step, steps.shard_batch(_batch(kind), mesh)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _float_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def _assert_fp32_metrics(metrics: dict) -> None:
    for k, v in metrics.items():
        if k != "nonfinite":
            assert v.dtype == jnp.float32, (k, v.dtype)
    assert not bool(metrics["nonfinite"])


# A lowered-StableHLO matmul and its two operand types, e.g. ": (tensor<128x32xbf16>, tensor<32x48xbf16>) ->".
_DOT = re.compile(r"stablehlo\.dot_general .*: \(tensor<([0-9x]+)x(\w+)>, tensor<([0-9x]+)x(\w+)>\) ->")


def _dots(text: str) -> list[tuple[int, str, str]]:
    """(operand rank, lhs dtype, rhs dtype) of every dot_general of a lowered program."""
    out = []
    for m in _DOT.finditer(text):
        out.append((max(m.group(1).count("x"), m.group(3).count("x")) + 1, m.group(2), m.group(4)))
    return out


STEP_CASES = [("opd", True, False), ("opd", False, True), ("sft", True, True), ("sft", False, False)]


@pytest.mark.parametrize(("kind", "fused", "tied"), STEP_CASES,
                         ids=[f"{k}-{'fused' if f else 'unfused'}-{'tied' if t else 'untied'}"
                              for k, f, t in STEP_CASES])
def test_bf16_compute_step_close_to_fp32(kind, fused, tied):
    cfg32 = CFG.replace(tie_word_embeddings=tied)
    cfg16 = cfg32.replace(**BF16)
    out = {}
    for name, cfg in (("fp32", cfg32), ("bf16", cfg16)):
        model, state, step, batch = _make(cfg, kind, fused=fused)
        text = step.lower(state, batch).as_text()
        lp = models.token_logprobs(model, batch["tokens"], batch["response_mask"])
        before = _flat(jax.device_get(state.params))
        state, metrics = step(state, batch)
        out[name] = dict(text=text, lp=lp, update=_flat(jax.device_get(state.params)) - before,
                         metrics=jax.device_get(metrics), state=state)

    bf = out["bf16"]
    # fp32 log-probs, loss and metrics; fp32 master weights and Adam moments.
    assert bf["lp"].dtype == jnp.float32
    _assert_fp32_metrics(bf["metrics"])
    assert _float_dtypes(bf["state"].params) == {"float32"}
    assert _float_dtypes(bf["state"].opt_state) == {"float32"}

    # Really bf16: every 2-D (weight) matmul on bf16 operands, forward and backward; nothing bf16 in fp32.
    dots = _dots(bf["text"])
    weight_dots = [d for d in dots if d[0] == 2]
    assert len(weight_dots) >= 20, weight_dots
    assert all(lhs == rhs == "bf16" for _, lhs, rhs in weight_dots), weight_dots
    assert "bf16" not in out["fp32"]["text"] and len(_dots(out["fp32"]["text"])) == len(dots)

    # Close to fp32.
    lp32, lp16 = np.asarray(out["fp32"]["lp"]), np.asarray(bf["lp"])
    assert np.abs(lp16 - lp32).max() < 0.05, np.abs(lp16 - lp32).max()
    m32, m16 = out["fp32"]["metrics"], bf["metrics"]
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 5e-3 * abs(float(m32["loss"])), (m32["loss"], m16["loss"])
    assert abs(float(m16["grad_norm"]) / float(m32["grad_norm"]) - 1) < 1e-2, (m32["grad_norm"], m16["grad_norm"])
    u32, u16 = out["fp32"]["update"], bf["update"]
    assert _cos(u32, u16) > 0.999, _cos(u32, u16)
    assert np.linalg.norm(u16 - u32) < 0.05 * np.linalg.norm(u32), np.linalg.norm(u16 - u32) / np.linalg.norm(u32)


def test_bf16_compute_training_tracks_fp32():
    """Five OPD steps of the real optimizer (eps 1e-8: sign-like first updates) from the same start."""
    losses, updates = {}, {}
    for name, cfg in (("fp32", CFG), ("bf16", CFG.replace(**BF16))):
        _, state, step, batch = _make(cfg, "opd", eps=1e-8)
        before = _flat(jax.device_get(state.params))
        losses[name] = []
        for _ in range(5):
            state, metrics = step(state, batch)
            losses[name].append(float(metrics["loss"]))
        updates[name] = _flat(jax.device_get(state.params)) - before
    l32, l16 = np.array(losses["fp32"]), np.array(losses["bf16"])
    assert l32[-1] > l32[0] + 0.5  # it trains (-1.94 -> -0.61 measured)
    assert np.all(np.abs(l16 - l32) < 2e-2 * np.abs(l32)), (l32, l16)
    assert _cos(updates["fp32"], updates["bf16"]) > 0.98, _cos(updates["fp32"], updates["bf16"])


def test_bf16_compute_every_matmul_is_bf16():
    _, state, step, batch = _make(CFG.replace(**BF16), "opd")
    dots = _dots(step.lower(state, batch).as_text())
    assert all(lhs == rhs == "bf16" for _, lhs, rhs in dots), [d for d in dots if d[1:] != ("bf16", "bf16")]


@pytest.mark.parametrize("kind", ["opd", "sft"])
def test_bf16_params_run_with_fp32_logprobs_and_loss(kind):
    """param_dtype bfloat16 (and bf16 compute): bf16 master weights and Adam moments, fp32 losses/metrics."""
    cfg = CFG.replace(param_dtype="bfloat16", **BF16)
    model, state, step, batch = _make(cfg, kind, eps=1e-8)
    assert _float_dtypes(state.params) == {"bfloat16"}
    lp = models.token_logprobs(model, batch["tokens"], batch["response_mask"])
    assert lp.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(lp)))
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        _assert_fp32_metrics(metrics)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 3
    assert _float_dtypes(state.params) == {"bfloat16"} and _float_dtypes(state.opt_state) == {"bfloat16"}
    # It trains: the SFT loss falls, the OPD loss (-advantage, student below teacher) rises towards 0.
    assert abs(losses[-1]) < 0.9 * abs(losses[0]), losses


def test_bf16_teacher_matches_fp32_held_teacher_under_bf16_compute():
    """teacher_dtype bfloat16: a teacher held in bf16 scores exactly as the fp32-held one when compute is bf16
    (every weight is cast to bf16 before use anyway), and within bf16 tolerance of fp32 compute."""
    mesh = _mesh()
    batch = _batch("sft")
    params = _params(CFG)
    lp = {}
    for name, param_dtype, compute in (("fp32", "float32", "float32"), ("fp32-held", "float32", "bfloat16"),
                                       ("bf16-held", "bfloat16", "bfloat16"), ("bf16-held-fp32", "bfloat16",
                                                                               "float32")):
        cfg = CFG.replace(param_dtype=param_dtype, compute_dtype=compute)
        model = models.from_params(cfg, jax.tree.map(lambda x, d=param_dtype: x.astype(d), params), mesh=mesh)
        lp[name] = models.token_logprobs(model, batch["tokens"], batch["response_mask"])
        assert lp[name].dtype == jnp.float32, name
    np.testing.assert_array_equal(np.asarray(lp["bf16-held"]), np.asarray(lp["fp32-held"]))
    for name in ("bf16-held", "bf16-held-fp32"):
        err = np.abs(np.asarray(lp[name]) - np.asarray(lp["fp32"])).max()
        assert err < 0.05, (name, err)  # 0.0062 / 0.0048 measured


# ---- the tiny pipeline, fp32 vs bf16 --------------------------------------------------------------------
SHRINK = tiny_shrink(teachers="A", eval_every=0)
PIPELINE_BF16 = ["precision.compute_dtype=bfloat16", "precision.teacher_dtype=bfloat16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """configs/tiny.yaml with teacher A only (arms lightning_A, online_A), shrunk, in fp32 and in bf16."""
    base = tmp_path_factory.mktemp("precision")
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["teachers"] = {"A": data["teachers"]["A"]}
    data["precompute"]["teachers"] = ["A"]
    data["arms"] = [a for a in data["arms"] if a["teacher"] == "A"]
    config = base / "tiny_a.yaml"
    config.write_text(yaml.safe_dump(data))
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    procs = {}
    for name, extra in (("fp32", []), ("bf16", PIPELINE_BF16)):  # both at once: the comparison is not timed
        with open(base / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "jopd.main", "--config", str(config), "--run-dir", str(base / name),
                 *SHRINK, *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        try:
            code = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert code == 0, (base / f"{name}.log").read_text()[-4000:]
    return {name: base / name for name in procs}


def _model(run: Path, model: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / model / "model.safetensors"))


def _flat_model(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([params[k].astype(np.float64).ravel() for k in sorted(params)])


@pytest.mark.slow
def test_pipeline_bf16_saves_fp32(runs):
    from jopd.data.store import RolloutStore

    run = runs["bf16"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())["precision"]
    assert resolved["compute_dtype"] == "bfloat16" and resolved["teacher_dtype"] == "bfloat16"
    assert resolved["param_dtype"] == "float32"
    for model in ("prepare/teachers/A", "sft/model", "arms/lightning_A/model", "arms/online_A/model", "export"):
        assert {str(v.dtype) for v in _model(run, model).values()} == {"float32"}, model
    rows = RolloutStore.open(run / "precompute" / "A" / "store").read_rows(range(16), ["teacher_logprobs"])
    assert rows["teacher_logprobs"].dtype == np.float32
    rows = RolloutStore.open(run / "rollout" / "store").read_rows(range(16), ["behaviour_logprobs"])
    assert rows["behaviour_logprobs"].dtype == np.float32


@pytest.mark.slow
def test_pipeline_bf16_stores_close_to_fp32(runs):
    from jopd.data.store import RolloutStore

    def read(run, store, field):
        s = RolloutStore.open(run / store)
        return s.read_rows(range(s.num_rows), ["tokens", "response_mask", field])

    for store, field, mean_tol, max_tol in (("rollout/store", "behaviour_logprobs", 0.05, 1.0),
                                            ("precompute/A/store", "teacher_logprobs", 0.02, 0.1)):
        a, b = read(runs["fp32"], store, field), read(runs["bf16"], store, field)
        same = np.all(a["tokens"] == b["tokens"], axis=1)
        assert np.mean(a["tokens"] == b["tokens"]) >= 0.75 and same.any(), store
        mask = a["response_mask"][same].astype(bool)
        diff = np.abs(a[field][same] - b[field][same])[mask]
        assert diff.mean() < mean_tol and diff.max() < max_tol, (store, diff.mean(), diff.max())


@pytest.mark.slow
@pytest.mark.parametrize(("model", "tol"), [("prepare/teachers/A", 1e-2), ("sft/model", 3e-2),
                                            ("arms/lightning_A/model", 3e-2), ("arms/online_A/model", 3e-2)])
def test_pipeline_bf16_params_close_to_fp32(runs, model, tol):
    a, b = (_flat_model(_model(runs[k], model)) for k in ("fp32", "bf16"))
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert rel < tol, (model, rel)
    if model.startswith("arms/"):  # the OPD update itself points the same way
        da, db = (_flat_model(_model(runs[k], model)) - _flat_model(_model(runs[k], "sft/model"))
                  for k in ("fp32", "bf16"))
        assert _cos(da, db) > 0.9, (model, _cos(da, db))


@pytest.mark.slow
def test_pipeline_bf16_eval_close_to_fp32(runs):
    one, two = (json.loads((runs[k] / "eval" / "results.json").read_text()) for k in ("fp32", "bf16"))
    assert one.keys() == two.keys() == {"base", "sft", "teacher:A", "arm:lightning_A", "arm:online_A"}
    for policy in one:
        a, b = one[policy], two[policy]
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.25, policy
        if policy == "teacher:A":  # scored against itself
            assert abs(a["reverse_kl"]) < 1e-4 and abs(b["reverse_kl"]) < 1e-4
        else:
            assert abs(b["reverse_kl"] - a["reverse_kl"]) < 0.15 * abs(a["reverse_kl"]), (policy, a, b)
