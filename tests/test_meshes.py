"""Meshes that users will pick, each equal to one device (fp32):

* data=2 x fsdp=2 x tensor=2 for a dense model (qwen3_qknorm) and the MoE model (qwen3_moe);
* expert parallelism for qwen3_moe (8 routed experts, 4 per device): expert=2 x fsdp=2 x tensor=2 and
  data=2 x fsdp=2 x expert=2 (expert=8, one expert per device, also passes; left out to keep the file fast).

For each: the log-probs of a ragged batch, and one OPD train step (random tokens, a teacher whose log-probs
differ from the student's) — its loss metrics and resulting parameters — equal those on one device. On the
expert meshes the routed expert weights are really split over the expert axis, and the model's forward and
backward in the compiled step never gather the experts dimension of an expert weight back together, and the
Adam moments are sharded like the params (so the optimizer update does not gather them either).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import eight_devices, hf_dir, one_device
from jax.sharding import NamedSharding, PartitionSpec
from test_steps import ragged_batch

from jopd import sharding, steps
from jopd.models import load_pretrained, token_logprobs
from jopd.sharding import MeshConfig, make_mesh

B, T = 8, 12  # 8 rows: the batch splits evenly over every mesh below (4- or 8-way)
TOL = 1e-5  # fp32, vs one device (observed <= 4e-6 for log-probs, ~1e-7 for the stepped params)
DENSE, MOE = "qwen3_qknorm", "qwen3_moe"
EXPERT_KERNELS = ("gate_kernel", "up_kernel", "down_kernel")  # [layers, experts, ...]

MESHES = {
    "single": MeshConfig(data=1, fsdp=1, tensor=1, expert=1),
    "data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2, expert=1),
    "expert2_fsdp2_tensor2": MeshConfig(data=1, fsdp=2, tensor=2, expert=2),
    "data2_fsdp2_expert2": MeshConfig(data=2, fsdp=2, tensor=1, expert=2),
}
EXPERT_MESHES = ("expert2_fsdp2_tensor2", "data2_fsdp2_expert2")
CASES = [(DENSE, "data2_fsdp2_tensor2"), (MOE, "data2_fsdp2_tensor2")] + [(MOE, m) for m in EXPERT_MESHES]
IDS = [f"{case}-{mesh}" for case, mesh in CASES]


def _batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    return ragged_batch(vocab, seed, B, T)


def _gathered_expert_dims(hlo: str, n_experts: int, kernel_dims: set[tuple[int, int]],
                          scope: str | None = None) -> list[str]:
    """All-gathers in compiled HLO text that put an expert weight's experts dimension back together: the
    gathered dimension has all ``n_experts`` and the two dims after it are (a shard of) an expert kernel's.
    ``scope``: only ops whose ``op_name`` metadata contains it (e.g. ``"Decoder"``: the model's forward and
    backward, not the optimizer update)."""
    bad = []
    for line in hlo.splitlines():
        head, sep, _ = line.partition(" all-gather(")
        if not sep:
            head, sep, _ = line.partition(" all-gather-start(")
        dims = re.search(r"dimensions=\{(\d+)\}", line)
        if not sep or dims is None:
            continue
        if scope is not None:
            op_name = re.search(r'op_name="([^"]*)"', line)
            if op_name is None or scope not in op_name.group(1):
                continue
        dim = int(dims.group(1))
        for shape in re.findall(r"f32\[([\d,]+)\]", head.partition("=")[2]):
            s = tuple(int(v) for v in shape.split(","))
            if len(s) == dim + 3 and s[dim] == n_experts and any(
                    full[0] % s[dim + 1] == 0 and full[1] % s[dim + 2] == 0 for full in kernel_dims):
                bad.append(line.strip()[:300])
    return bad


class _Runs:
    """Each (case, mesh): the model loaded once, its log-probs, one OPD step (compiled ahead of time so its
    HLO can be read) — all computed once per module."""

    def __init__(self):
        self.meshes = {name: make_mesh(cfg, devices=one_device() if name == "single" else eight_devices())
                       for name, cfg in MESHES.items()}
        self._runs: dict = {}

    def get(self, case: str, mesh_name: str) -> dict:
        if (case, mesh_name) not in self._runs:
            self._runs[case, mesh_name] = self._run(case, mesh_name)
        return self._runs[case, mesh_name]

    def _run(self, case: str, mesh_name: str) -> dict:
        mesh = self.meshes[mesh_name]
        model = load_pretrained(hf_dir(case), mesh=mesh)
        batch = _batch(model.config.vocab_size)
        lp = np.asarray(jax.device_get(token_logprobs(model, batch["tokens"], batch["response_mask"])))
        # Adam's first update is lr * g / (|g| + eps): a large eps keeps it proportional to g (no sign flips of
        # near-zero entries from round-off); a large lr makes the update big enough to compare.
        opt = steps.make_optimizer(lr=0.5, total_steps=10, eps=1.0)
        # the step donates its state: give it copies, so that model.params stay usable
        state = steps.init_state(jax.tree.map(jnp.copy, model.params), opt)
        step = steps.make_opd_step(model.config, opt, steps.OPDLossConfig(), mesh=mesh, state=state,
                                   batch_size=B)
        sharded_batch = steps.shard_batch(batch, mesh)
        compiled = step.lower(state, sharded_batch).compile()
        state, metrics = compiled(state, sharded_batch)
        return {"model": model, "logprobs": lp, "state": state, "hlo": compiled.as_text(),
                "params": jax.device_get(model.params), "new_params": jax.device_get(state.params),
                "metrics": {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}}


@pytest.fixture(scope="module")
def runs() -> _Runs:
    return _Runs()


def _spec_axes(spec: PartitionSpec) -> set[str]:
    return {ax for dim in spec if dim for ax in ((dim,) if isinstance(dim, str) else dim)}


def _max_err(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a),
                                                                                 jax.tree.leaves(b)))


@pytest.mark.parametrize(("case", "mesh"), CASES, ids=IDS)
def test_logprobs_equal_single_device(runs, case, mesh):
    ref, got = runs.get(case, "single"), runs.get(case, mesh)
    assert sharding.batch_parallelism(runs.meshes[mesh]) in (4, 8)
    mask = _batch(ref["model"].config.vocab_size)["response_mask"]
    assert float(np.abs(ref["logprobs"]).max()) > 1.0 and np.all(ref["logprobs"][mask == 0] == 0)
    err = float(np.abs(got["logprobs"] - ref["logprobs"]).max())
    print(f"{case} [{mesh}] max |logprob - one device| = {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize(("case", "mesh"), CASES, ids=IDS)
def test_opd_step_equals_single_device(runs, case, mesh):
    ref, got = runs.get(case, "single"), runs.get(case, mesh)
    m_ref, m_got = ref["metrics"], got["metrics"]
    assert not bool(m_ref["nonfinite"]) and int(ref["state"].step) == int(got["state"].step) == 1
    assert float(m_ref["loss"]) != 0.0 and float(m_ref["grad_norm"]) > 1e-3  # a real signal
    assert sorted(m_got) == sorted(m_ref)
    metric_err = {k: abs(float(m_got[k]) - float(m_ref[k])) for k in m_ref if m_ref[k].dtype.kind == "f"}
    for k, e in metric_err.items():
        assert e <= TOL * max(1.0, abs(float(m_ref[k]))), (k, float(m_got[k]), float(m_ref[k]))

    update = _max_err(ref["new_params"], ref["params"])  # how far the step moved the single-device params
    assert update > 1e-3
    err = _max_err(got["new_params"], ref["new_params"])
    worst = max(metric_err, key=metric_err.get)
    print(f"{case} [{mesh}] one OPD step: max |param - one device| = {err:.2e} (max update {update:.2e}); "
          f"loss {float(m_ref['loss']):.4f}, grad_norm {float(m_ref['grad_norm']):.4f}, "
          f"max metric error {metric_err[worst]:.2e} ({worst})")
    assert err <= TOL


@pytest.mark.parametrize("mesh", ["data2_fsdp2_tensor2", "expert2_fsdp2_tensor2", "data2_fsdp2_expert2"])
def test_mesh_axes_are_used(runs, mesh):
    """The weights really are split over fsdp (and tensor when > 1) and replicated over data."""
    shape = runs.meshes[mesh].shape
    for case in (DENSE, MOE) if mesh == "data2_fsdp2_tensor2" else (MOE,):
        params = runs.get(case, mesh)["model"].params
        used = set().union(*(_spec_axes(a.sharding.spec) for a in jax.tree.leaves(params)))
        assert "data" not in used
        assert used >= {a for a in ("fsdp", "tensor") if shape[a] > 1}
        emb = params["embedding"]
        assert emb.addressable_shards[0].data.size * shape["fsdp"] * shape["tensor"] == emb.size


@pytest.mark.parametrize("mesh", EXPERT_MESHES)
def test_routed_experts_are_split_over_the_expert_axis(runs, mesh):
    run = runs.get(MOE, mesh)
    cfg = run["model"].config
    n_exp, ways = cfg.num_experts, runs.meshes[mesh].shape["expert"]
    assert n_exp % ways == 0 and n_exp // ways < n_exp
    trees = {"params": run["model"].params, "new params": run["state"].params}
    for where, tree in trees.items():
        for name in EXPERT_KERNELS:
            arr = tree["layers"]["moe"][name]
            assert arr.shape[1] == n_exp
            spec = arr.sharding.spec
            assert "expert" in _spec_axes(PartitionSpec(spec[1])), (where, name, spec)
            shards = arr.addressable_shards
            assert len(shards) == 8 and all(s.data.shape[1] == n_exp // ways for s in shards), (where, name)
            # every device holds n_exp / ways experts, and together they hold all of them exactly `ways` times
            slices = {(s.index[1].start, s.index[1].stop) for s in shards}
            assert len(slices) == ways, (where, name, slices)
    # the router and the rest of the layer are not split over expert
    assert "expert" not in _spec_axes(run["model"].params["layers"]["moe"]["router_kernel"].sharding.spec)

    # the model's forward and backward in the compiled train step keep the expert weights split: no all-gather
    # puts the experts dimension back together (the detector itself is checked on a function that does)
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    kernel_dims = {(d, f), (f, d)}
    bad = _gathered_expert_dims(run["hlo"], n_exp, kernel_dims, scope="Decoder")
    assert not bad, "\n".join(bad)
    w = run["model"].params["layers"]["moe"]["gate_kernel"]
    gather = jax.jit(lambda x: 2.0 * jax.lax.with_sharding_constraint(
        x, NamedSharding(w.sharding.mesh, PartitionSpec())))
    assert _gathered_expert_dims(gather.lower(w).compile().as_text(), n_exp, kernel_dims)


@pytest.mark.parametrize(("case", "mesh"), CASES)
def test_adam_moments_are_sharded_like_the_params(runs, case, mesh):
    """Adam's moments mirror the params' shardings (not a full copy per device), so on the expert meshes the
    whole step, optimizer update included, never gathers an expert weight's experts dimension."""
    run = runs.get(case, mesh)
    state, cfg = run["state"], run["model"].config
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
    for moments in (adam.mu, adam.nu):
        for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(moments)):
            assert m.sharding.spec == p.sharding.spec, (m.sharding.spec, p.sharding.spec)
    if mesh in EXPERT_MESHES:
        d, f = cfg.hidden_size, cfg.moe_intermediate_size
        bad = _gathered_expert_dims(run["hlo"], cfg.num_experts, {(d, f), (f, d)})
        assert not bad, "\n".join(bad)
