"""Device meshes and logical-axis sharding rules.

Every parameter and activation is described by *logical* axis names (``"embed"``, ``"q_heads"``,
``"batch"``...). A table of rules maps each logical name to zero or more *mesh* axes (``data``, ``fsdp``,
``tensor``, ``expert``). Shardings are then derived, never written by hand, so one model runs on 1 device,
an 8-way simulated CPU mesh, a GPU node or a TPU slice by changing only :class:`MeshConfig`.

A logical axis whose size is not divisible by the mesh axes it maps to is replicated instead (tiny test
models have 2 KV heads; a tensor axis of 4 must not make them unshardable) — the fallback is logged once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axes. Batch is split over data and fsdp (FSDP is data parallelism whose weights are
# also sharded); weights shard their model dimension over fsdp and their head/ffn/vocab dimension over
# tensor; MoE experts over expert. Layer-stacked params keep the layer axis unsharded (it is scanned).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("seq", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("experts", ("expert",)),
    ("expert_mlp", ("tensor",)),
    ("layers", ()),
    ("norm", ()),
    ("router_out", ()),
    ("topk", ()),
    ("lora_rank", ()),  # LoRA adapters: their other dimension shards like the base kernel's (jopd/models/lora.py)
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes. One entry may be -1: it takes all remaining devices.

    data: pure data parallelism (replicated weights). fsdp: data parallelism with weights and optimizer state
    sharded. tensor: Megatron-style tensor parallelism over heads / ffn / vocab. expert: MoE expert
    parallelism (also splits the batch for non-expert layers).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1

    def resolve(self, num_devices: int) -> dict[str, int]:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        bad = [f"{a}={v}" for a, v in sizes.items() if v == 0 or v < -1]
        if bad:
            raise ValueError(f"mesh: axis sizes must be positive or -1, got {', '.join(bad)}")
        auto = [a for a, v in sizes.items() if v == -1]
        if len(auto) > 1:
            raise ValueError(f"mesh: at most one axis may be -1 (auto), got {auto}")
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if auto:
            if num_devices % fixed:
                raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {fixed}")
            sizes[auto[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(
                f"mesh: axes {sizes} use {math.prod(sizes.values())} devices but {num_devices} are available"
            )
        return sizes


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert) over ``devices`` (default: all global devices)."""
    config = config or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    sizes = config.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - CPU/simulated devices have no topology; a plain reshape is right there
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES)


def single_device_mesh() -> Mesh:
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, expert=1), devices=jax.devices()[:1])


_warned: set[tuple[str, int, str]] = set()


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, tuple[str, ...]]] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions carry ``logical_axes``.

    A mesh axis is used at most once per array (first dimension wins) and only if the product of the mesh
    axes assigned to a dimension divides that dimension; otherwise that dimension is replicated.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"no sharding rule for logical axis {name!r}; known: {sorted(table)}")
        axes = [a for a in table[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
        # Drop trailing mesh axes until the product divides the dimension.
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            dropped = axes.pop()
            key = (name, dim, dropped)
            if key not in _warned:
                _warned.add(key)
                log.info("logical axis %s (size %d) not divisible by mesh axis %s: not sharded on it",
                         name, dim, dropped)
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def named_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh) -> Any:
    """Map a pytree of logical-axis tuples and a matching pytree of shapes/arrays to NamedShardings."""
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
    return jax.tree.map(
        lambda axes, leaf: named_sharding(axes, leaf.shape, mesh), logical_tree, shape_tree, is_leaf=is_axes
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the mesh splits a batch (product of the mesh axes the ``batch`` rule uses)."""
    axes = dict(DEFAULT_RULES)["batch"]
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_size: int | None = None) -> NamedSharding:
    """Sharding for a ``[batch, ...]`` input: the batch over (data, fsdp, expert), the rest replicated."""
    shape = (batch_size if batch_size is not None else math.prod(mesh.devices.shape),) + (1,) * (ndim - 1)
    return named_sharding(("batch",) + (None,) * (ndim - 1), shape, mesh)


# --- activation constraints -------------------------------------------------------------------------
# Models call `constrain(x, axes)` on activations. It reads JAX's own mesh context (`jax.set_mesh`), so a
# constraint is active exactly when the caller runs under that mesh; every jitted entry point of jopd is
# returned already bound to its mesh (`bind_mesh`), and user code may equally write ``with use_mesh(mesh):``.
def use_mesh(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """JAX's mesh context for ``mesh`` (``jax.set_mesh``; ``jax.sharding.use_mesh`` on older JAX); no mesh: no-op."""
    if mesh is None:
        return contextlib.nullcontext()
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return jax.sharding.use_mesh(mesh)  # pragma: no cover - jax < 0.7


def bind_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
    """``fn`` (a jitted function) called under ``use_mesh(mesh)``; ``.lower`` is bound the same way (AOT)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with use_mesh(mesh):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):
        with use_mesh(mesh):
            return fn.lower(*args, **kwargs)

    call.lower = lower  # type: ignore[attr-defined]
    return call


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes on the current mesh context; no mesh or one device: ``x``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def to_host(x: Any) -> Any:
    """A pytree of (possibly multi-process sharded) arrays as numpy arrays, the whole of each on every process."""
    leaves = jax.tree.leaves(x)
    if all(getattr(a, "is_fully_addressable", True) for a in leaves):
        return jax.tree.map(np.asarray, jax.device_get(x))
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
                        if not getattr(a, "is_fully_addressable", True) else np.asarray(jax.device_get(a)), x)


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-int(n) // int(multiple)) * int(multiple)


def mesh_summary(mesh: Mesh) -> Mapping[str, int]:
    return dict(mesh.shape)
