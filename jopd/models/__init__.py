"""Decoder models (llama / qwen2 / qwen3 / qwen3_moe) loaded from and exported to Hugging Face directories."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jopd import sharding
from jopd.models import lora
from jopd.models.config import SUPPORTED_MODEL_TYPES, ConfigError, LoraSpec, ModelConfig
from jopd.models.decoder import (
    Decoder,
    KVCache,
    hidden_states,
    init_params,
    output_kernel,
    param_logical_axes,
    param_shapes,
    param_shardings,
)
from jopd.models.fused_head import fused_head_loss
from jopd.models.hf import (
    CheckpointError,
    Model,
    from_params,
    load_adapter,
    load_pretrained,
    save_adapter,
    save_pretrained,
)
from jopd.models.logprobs import logprobs_and_topk_fn, logprobs_fn, logprobs_from_hidden, naive_logprobs_fn

__all__ = [
    "SUPPORTED_MODEL_TYPES", "CheckpointError", "ConfigError", "Decoder", "KVCache", "LoraSpec", "Model",
    "ModelConfig", "from_params", "fused_head_loss", "hidden_states", "init_params", "load_adapter",
    "load_pretrained", "logprobs_and_topk_fn", "logprobs_fn", "logprobs_from_hidden", "lora", "naive_logprobs_fn",
    "output_kernel", "param_logical_axes", "param_shapes", "param_shardings", "save_adapter", "save_pretrained",
    "token_logprobs",
]

_JIT_CACHE: dict = {}


def token_logprobs(model: Model, tokens, mask, *, segment_ids=None, positions=None) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) as float32 ``[B, T]`` (0 at t = 0 and at padding).

    tokens int32 ``[B, T]`` right-padded, mask ``[B, T]`` (1 = real token); or packed rows with int32
    ``segment_ids`` and ``positions`` ``[B, T]`` (see :func:`hidden_states`; then 0 at each sequence's
    first token).
    Jitted once per (config, mesh, shape, packed or not); the batch is sharded over the mesh's batch axes
    when it divides evenly.
    """
    arrays = [tokens, mask, segment_ids, positions]
    arrays = [None if x is None else jnp.asarray(x, jnp.int32) for x in arrays]
    mesh = model.mesh
    key = (model.config, mesh)
    fn = _JIT_CACHE.get(key)
    if fn is None:
        config = model.config

        def run(params, tokens, mask, segment_ids, positions):
            return logprobs_fn(params, config, tokens, mask, segment_ids=segment_ids, positions=positions)

        fn = sharding.bind_mesh(jax.jit(run), mesh)
        _JIT_CACHE[key] = fn
    if mesh is not None:
        batch_sh = sharding.batch_sharding(mesh, 2, arrays[0].shape[0])
        arrays = [None if x is None else jax.device_put(x, batch_sh) for x in arrays]
    return fn(model.params, *arrays)
