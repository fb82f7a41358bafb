"""Decoder models (llama / qwen2 / qwen3 / qwen3_moe) loaded from and exported to Hugging Face directories."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jopd import sharding
from jopd.models.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig
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
from jopd.models.hf import CheckpointError, Model, from_params, load_pretrained, save_pretrained
from jopd.models.logprobs import logprobs_and_topk_fn, logprobs_fn, logprobs_from_hidden, naive_logprobs_fn

__all__ = [
    "SUPPORTED_MODEL_TYPES", "CheckpointError", "ConfigError", "Decoder", "KVCache", "Model", "ModelConfig",
    "from_params", "hidden_states", "init_params", "load_pretrained", "logprobs_and_topk_fn", "logprobs_fn",
    "logprobs_from_hidden", "naive_logprobs_fn", "output_kernel", "param_logical_axes", "param_shapes",
    "param_shardings", "save_pretrained", "token_logprobs",
]

_JIT_CACHE: dict = {}


def token_logprobs(model: Model, tokens, mask) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) as float32 ``[B, T]`` (0 at t = 0 and at padding).

    tokens int32 ``[B, T]`` right-padded, mask ``[B, T]`` (1 = real token). Jitted once per
    (config, mesh, shape); the batch is sharded over the mesh's batch axes when it divides evenly.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.asarray(mask, jnp.int32)
    mesh = model.mesh
    key = (model.config, id(mesh))
    fn = _JIT_CACHE.get(key)
    if fn is None:
        config = model.config

        def run(params, tokens, mask):
            with sharding.activate(mesh):
                return logprobs_fn(params, config, tokens, mask)

        fn = jax.jit(run)
        _JIT_CACHE[key] = fn
    if mesh is not None:
        batch_sh = sharding.batch_sharding(mesh, 2, tokens.shape[0])
        tokens, mask = jax.device_put(tokens, batch_sh), jax.device_put(mask, batch_sh)
    return fn(model.params, tokens, mask)
