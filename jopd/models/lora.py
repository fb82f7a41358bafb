"""LoRA: low-rank adapters on the decoder's projections, for students trained with a frozen base (docs/lora.md).

A LoRA model is a :class:`jopd.models.Model` whose ``config.lora`` is a :class:`LoraSpec` and whose params carry
the adapters under ``params["lora"]``. Each targeted projection ``W`` (jopd layout ``[in..., out...]``) then
computes ``x @ W + (alpha / rank) * (dropout(x) @ A) @ B`` (:func:`jopd.models.decoder.project`): ``A`` has the
kernel's input dimensions and ``rank``, ``B`` has ``rank`` and the kernel's output dimensions. ``B`` starts at
zero, so a fresh LoRA model computes exactly what its base does; ``A`` starts like PEFT's
(``kaiming_uniform(a=sqrt(5))``: uniform in ``±1 / sqrt(fan_in)``). Adapters are float32 master weights even on a
bfloat16 base (:func:`adapter_dtype`; they are cast to the compute dtype like the kernels). Training takes gradients and keeps optimizer
state for ``params["lora"]`` only (jopd.training); the base is never copied or changed.

Adapter tree (``L`` layers, ``r`` rank, ``E`` experts; leaf names follow the kernels')::

    layers/attn/{q_lora_a [L, D, r], q_lora_b [L, r, H, Dh], k_lora_a, v_lora_a [L, D, r],
                 k_lora_b, v_lora_b [L, r, K, Dh], o_lora_a [L, H, Dh, r], o_lora_b [L, r, D]}
    layers/mlp/{gate_lora_a, up_lora_a [L, D, r], gate_lora_b, up_lora_b [L, r, F],
                down_lora_a [L, F, r], down_lora_b [L, r, D]}                                        (dense)
    layers/moe/{gate_lora_a [L, E, D, r], gate_lora_b [L, E, r, F], ..., down_lora_b [L, E, r, D]}  (qwen3_moe:
                one pair per expert, applied with the experts' grouped matmuls; the router is never adapted)

Each adapter dimension carries the logical axis of the kernel dimension it mirrors (``embed``, ``q_heads``,
``mlp``, ``experts``, ...) and ``lora_rank`` (replicated), so adapters shard like their kernels on any mesh.

Merging (:func:`merge`, and the HF export, which merges on the host in float64) gives a plain model with
``W + (alpha / rank) * A @ B``; :func:`jopd.models.hf.save_adapter` writes the adapters alone in PEFT's format.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jopd import sharding
from jopd.models.config import LORA_TARGETS, LoraSpec, ModelConfig
from jopd.models.decoder import LORA

__all__ = ["LORA", "LORA_TARGETS", "LoraSpec", "adapter_logical_axes", "adapter_shapes", "adapter_shardings",
           "adapter_dtype", "count", "describe", "init_adapters", "is_lora", "merge", "merged_kernel", "split", "with_adapters"]


@dataclasses.dataclass(frozen=True)
class _Target:
    """Where one target's adapter lives and what its kernel's dimensions are (per layer)."""

    module: str  # "attn", "mlp" or "moe"
    lead: tuple[tuple[int, str], ...]  # (size, logical axis) of dims shared by A and B: experts
    inputs: tuple[tuple[int, str], ...]  # the kernel's input dims
    outputs: tuple[tuple[int, str], ...]  # the kernel's output dims


def _targets(config: ModelConfig) -> dict[str, _Target]:
    d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    out = {
        "q": _Target("attn", (), ((d, "embed"),), ((h, "q_heads"), (hd, "head_dim"))),
        "k": _Target("attn", (), ((d, "embed"),), ((k, "kv_heads"), (hd, "head_dim"))),
        "v": _Target("attn", (), ((d, "embed"),), ((k, "kv_heads"), (hd, "head_dim"))),
        "o": _Target("attn", (), ((h, "q_heads"), (hd, "head_dim")), ((d, "embed"),)),
    }
    if config.is_moe:
        e, f = ((config.num_experts, "experts"),), config.moe_intermediate_size
        out.update(gate=_Target("moe", e, ((d, "embed"),), ((f, "expert_mlp"),)),
                   up=_Target("moe", e, ((d, "embed"),), ((f, "expert_mlp"),)),
                   down=_Target("moe", e, ((f, "expert_mlp"),), ((d, "embed"),)))
    else:
        f = config.intermediate_size
        out.update(gate=_Target("mlp", (), ((d, "embed"),), ((f, "mlp"),)),
                   up=_Target("mlp", (), ((d, "embed"),), ((f, "mlp"),)),
                   down=_Target("mlp", (), ((f, "mlp"),), ((d, "embed"),)))
    return out


def _spec(config: ModelConfig) -> LoraSpec:
    if config.lora is None:
        raise ValueError("the model config has no LoRA spec (config.lora is None)")
    return config.lora


def _tree(config: ModelConfig, leaf) -> dict:
    """``{"layers": {module: {f"{t}_lora_a": leaf(t, "a", dims), f"{t}_lora_b": ...}}}`` over the spec's targets;
    ``dims``: (size, logical axis) per dimension, the layer axis first."""
    spec, targets, r = _spec(config), _targets(config), _spec(config).rank
    layers: dict[str, dict[str, Any]] = {}
    layer = ((config.num_layers, "layers"),)
    for name in spec.targets:
        t = targets[name]
        a = layer + t.lead + t.inputs + ((r, "lora_rank"),)
        b = layer + t.lead + ((r, "lora_rank"),) + t.outputs
        layers.setdefault(t.module, {})[f"{name}_lora_a"] = leaf(name, "a", a)
        layers[t.module][f"{name}_lora_b"] = leaf(name, "b", b)
    return {"layers": layers}


def adapter_dtype(config: ModelConfig) -> Any:
    """The adapters' (master) dtype: float32, or the params' when wider (float64 reference tests). A bfloat16
    base keeps float32 adapters: they are small, and their Adam updates need the precision."""
    return jnp.promote_types(jnp.dtype(config.param_dtype), jnp.float32)


def adapter_shapes(config: ModelConfig) -> dict:
    """``jax.ShapeDtypeStruct`` of every adapter of ``config.lora`` (:func:`adapter_dtype`), no allocation."""
    dtype = adapter_dtype(config)
    return _tree(config, lambda _t, _w, dims: jax.ShapeDtypeStruct(tuple(s for s, _ in dims), dtype))


def adapter_logical_axes(config: ModelConfig) -> dict:
    """The logical axes of every adapter (same structure as :func:`adapter_shapes`)."""
    return _tree(config, lambda _t, _w, dims: tuple(a for _, a in dims))


def adapter_shardings(config: ModelConfig, mesh) -> dict:
    """NamedSharding of every adapter on ``mesh``: each dimension sharded like the kernel dimension it mirrors."""
    return sharding.tree_shardings(adapter_logical_axes(config), adapter_shapes(config), mesh)


def init_adapters(config: ModelConfig, seed: int = 0, mesh=None) -> dict:
    """Fresh adapters for ``config.lora``: every ``A`` uniform in ``±1 / sqrt(fan_in)`` (PEFT's default, fan_in =
    the kernel's input size), every ``B`` zero, in :func:`adapter_dtype`; placed on ``mesh`` (sharded like the
    kernels) when given. Target ``t``'s ``A`` is drawn from ``fold_in(PRNGKey(seed), index of t in
    LORA_TARGETS)``, so a target's adapter does not depend on which other targets are on."""
    dtype = adapter_dtype(config)
    key = jax.random.PRNGKey(seed)

    def leaf(name: str, which: str, dims) -> Any:
        shape = tuple(s for s, _ in dims)
        if which == "b":
            return jnp.zeros(shape, dtype)
        fan_in = math.prod(s for s, a in dims if a not in ("layers", "experts", "lora_rank"))
        bound = 1.0 / math.sqrt(fan_in)
        k = jax.random.fold_in(key, LORA_TARGETS.index(name))
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(dtype)

    shardings = adapter_shardings(config, mesh) if mesh is not None else None
    make = jax.jit(lambda: _tree(config, leaf), out_shardings=shardings)
    with sharding.use_mesh(mesh):
        return make()


def with_adapters(model: Any, spec: LoraSpec, seed: int = 0) -> Any:
    """``model`` (a plain :class:`jopd.models.Model`) as a LoRA model: ``config.lora = spec`` and fresh adapters
    (:func:`init_adapters`) beside its params, on its mesh. Its outputs equal the base's until ``B`` moves."""
    if is_lora(model.params):
        raise ValueError("the model already carries LoRA adapters (merge them first: jopd.models.lora.merge)")
    config = model.config.replace(lora=spec)
    return dataclasses.replace(model, config=config,
                               params={**model.params, LORA: init_adapters(config, seed, model.mesh)})


def is_lora(params: Any) -> bool:
    """Whether ``params`` (a model's) carry LoRA adapters."""
    return isinstance(params, dict) and LORA in params


def split(params: dict) -> tuple[dict, dict | None]:
    """``(base params, adapters or None)`` of a model's params."""
    if not is_lora(params):
        return params, None
    return {k: v for k, v in params.items() if k != LORA}, params[LORA]


def count(tree: Any) -> int:
    """Number of parameters in a pytree of arrays / ShapeDtypeStructs."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def describe(model: Any) -> dict[str, Any]:
    """A LoRA model's settings and sizes, as recorded in meta.json: rank, alpha, targets, dropout, trainable
    (adapter) and frozen (base) parameter counts."""
    base, adapters = split(model.params)
    spec = _spec(model.config)
    trainable, frozen = count(adapters), count(base)
    return {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets), "dropout": spec.dropout,
            "trainable_params": trainable, "frozen_params": frozen, "trainable_fraction": trainable / max(frozen, 1)}


def merged_kernel(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, lead: int) -> np.ndarray:
    """``kernel + scale * A @ B`` on the host, accumulated in float64 and rounded once to the kernel's dtype.

    ``kernel`` ``[lead..., in..., out...]``, ``a`` ``[lead..., in..., r]``, ``b`` ``[lead..., r, out...]``;
    ``lead``: the number of leading dims they share (layers, and experts)."""
    shared = kernel.shape[:lead]
    r = a.shape[-1]
    fan_in = math.prod(a.shape[lead:-1])
    delta = np.matmul(np.asarray(a, np.float64).reshape(shared + (fan_in, r)),
                      np.asarray(b, np.float64).reshape(shared + (r, -1)))
    return (np.asarray(kernel, np.float64) + scale * delta.reshape(kernel.shape)).astype(kernel.dtype)


def merge_kernel_at(kernel: np.ndarray, adapters: dict, config: ModelConfig, path: tuple[str, ...]) -> np.ndarray:
    """The merged host value of the kernel at ``path`` (e.g. ``("layers", "attn", "q_kernel")``): unchanged when
    the kernel has no adapter."""
    if len(path) != 3 or not path[2].endswith("_kernel"):
        return kernel
    name = path[2][: -len("_kernel")]
    module = adapters.get(path[0], {}).get(path[1], {})
    if f"{name}_lora_a" not in module:
        return kernel
    a, b = sharding.to_host((module[f"{name}_lora_a"], module[f"{name}_lora_b"]))
    return merged_kernel(kernel, a, b, _spec(config).scale, lead=2 if path[1] == "moe" else 1)


def merge(model: Any) -> Any:
    """A plain model (``config.lora = None``, no adapters) whose targeted kernels are ``W + scale * A @ B``
    (host float64, rounded once to the params' dtype), placed on the model's mesh like the base params. A plain
    model is returned as it is."""
    base, adapters = split(model.params)
    if adapters is None:
        return model

    def merged(path, x):
        keys = tuple(str(p.key) for p in path)
        if keys[-1].endswith("_kernel") and len(keys) == 3:
            return jax.device_put(merge_kernel_at(sharding.to_host(x), adapters, model.config, keys), x.sharding)
        return x

    return dataclasses.replace(model, config=model.config.replace(lora=None),
                               params=jax.tree_util.tree_map_with_path(merged, base))
