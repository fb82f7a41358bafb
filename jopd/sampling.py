"""Batched autoregressive sampling with a KV cache.

Prompts of different lengths are left-padded into a power-of-two length bucket and the batch into a
power-of-two row bucket, so a new set of prompts reuses the compiled programs. One jitted *prefill* fills the
cache and samples the first token; one jitted *decode* runs the rest in a ``lax.while_loop`` that stops as soon
as every row has emitted EOS. Each row draws from its own key ``fold_in(fold_in(seed, row), step)``, so results
do not depend on how prompts are batched.

Sampling distribution (as transformers): logits / temperature → top-k → top-p. The returned log-prob of each
token is under that (truncated, tempered) distribution — the *behaviour* log-prob needed for importance
weighting. With temperature 0 (greedy) the behaviour policy is a point mass; the model's untempered log-prob
of the chosen token is returned instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jopd import sharding
from jopd.models.config import ModelConfig
from jopd.models.decoder import Decoder, KVCache, decoder_variables, output_kernel
from jopd.models.hf import Model

Array = jax.Array
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """The responses of one `generate` call: one row per prompt, right-padded with zeros."""

    tokens: np.ndarray          # int32 [N, max_new_tokens]: new ids (the stop id included when emitted)
    logprobs: np.ndarray        # float32 [N, max_new_tokens]: behaviour log-probs of those ids
    lengths: np.ndarray         # int32 [N]: real ids per row; tokens and logprobs are 0 after them
    ended_with_eos: np.ndarray  # bool [N]: False = truncated at max_new_tokens

    def response(self, i: int) -> list[int]:
        """Row ``i``'s new ids without padding (what a tokenizer decodes)."""
        return self.tokens[i, :self.lengths[i]].tolist()


class DecodeState(NamedTuple):
    """What the decode loop carries, for ``B`` rows, ``P`` prompt slots and ``M`` new tokens at most."""

    cache: KVCache     # k, v [layers, B, P + M, kv_heads, head_dim]
    key_valid: Array   # bool [B, P + M]: slots holding a real token
    next_pos: Array    # int32 [B]: position id of the token fed next
    tokens: Array      # int32 [B, M]: sampled ids, 0 once a row is done
    logprobs: Array    # float32 [B, M]: their behaviour log-probs, 0 once a row is done
    done: Array        # bool [B]: the row has emitted a stop id
    lengths: Array     # int32 [B]: ids sampled before the row was done (the stop id included)
    step: Array        # int32 []: index of the next id to sample


def truncated_logits(logits: Array, params: SamplingParams) -> Array:
    """fp32 ``[..., V]`` logits of the sampling distribution (tempered, top-k/top-p masked to -1e30)."""
    x = logits.astype(jnp.float32) / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, params.top_k)[0][..., -1:]
        x = jnp.where(x < kth, _NEG, x)
    if params.top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (the token crossing the threshold included).
        keep = mass_before < params.top_p
        threshold = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, _NEG, x)
    return x


def sample_tokens(logits: Array, keys: Array, params: SamplingParams) -> tuple[Array, Array]:
    """logits ``[B, V]``, keys ``[B, 2]`` → (token ids ``[B]`` int32, behaviour log-probs ``[B]`` f32)."""
    logits = logits.astype(jnp.float32)
    if params.temperature == 0.0:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        lp = jax.nn.log_softmax(logits, axis=-1)
    else:
        x = truncated_logits(logits, params)
        tok = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)
        lp = jax.nn.log_softmax(x, axis=-1)
    return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]


def _row_keys(base_key: Array, row_ids: Array, step) -> Array:
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base_key, r), step))(row_ids)


def _prefill(params, tokens, mask, row_ids, base_key, *, config: ModelConfig, max_new: int,
             sp: SamplingParams, eos_ids: tuple[int, ...]) -> DecodeState:
    """tokens/mask ``[B, P]`` left-padded, row_ids ``[B]`` → decode state with the first new token sampled."""
    b, p = tokens.shape
    s = p + max_new
    dt = jnp.dtype(config.compute_dtype)
    cache_shape = (config.num_layers, b, s, config.num_kv_heads, config.head_dim)
    axes = ("layers", "batch", None, "kv_heads", "head_dim")
    cache = KVCache(sharding.constrain(jnp.zeros(cache_shape, dt), axes),
                    sharding.constrain(jnp.zeros(cache_shape, dt), axes))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    key_valid = jnp.concatenate([mask.astype(bool), jnp.zeros((b, max_new), bool)], axis=1)
    slots = jnp.arange(s)
    attn = (slots[None, :] <= jnp.arange(p)[:, None])[None] & key_valid[:, None, :]
    hidden, cache = Decoder(config).apply(decoder_variables(params), tokens, positions, attn, cache,
                                         jnp.zeros((), jnp.int32))
    logits = jnp.einsum("bd,dv->bv", hidden[:, -1], output_kernel(params, config).astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    tok, lp = sample_tokens(logits, _row_keys(base_key, row_ids, 0), sp)
    done = jnp.isin(tok, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros((b,), bool)
    return DecodeState(
        cache=cache, key_valid=key_valid, next_pos=positions[:, -1] + 1,
        tokens=jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(tok),
        logprobs=jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(lp),
        done=done, lengths=jnp.ones((b,), jnp.int32), step=jnp.ones((), jnp.int32),
    )


def _decode(params, state: DecodeState, row_ids, base_key, *, config: ModelConfig, prompt_len: int, max_new: int,
            sp: SamplingParams, eos_ids: tuple[int, ...]) -> DecodeState:
    """Run the while-loop decode from ``state`` until every row is done or max_new tokens exist.

    The whole final state is returned, cache included: an output for every donated input buffer is what lets
    XLA alias them, so the loop updates the cache in place instead of copying it first.
    """
    decoder = Decoder(config)
    w_out = output_kernel(params, config)
    eos = jnp.asarray(eos_ids, jnp.int32) if eos_ids else None
    s = prompt_len + max_new
    slots = jnp.arange(s)

    def cond(st: DecodeState):
        return (st.step < max_new) & ~jnp.all(st.done)

    def body(st: DecodeState) -> DecodeState:
        i = st.step
        slot = prompt_len + i - 1  # the previous token's slot
        prev = jax.lax.dynamic_index_in_dim(st.tokens, i - 1, axis=1, keepdims=True)  # [B, 1]
        key_valid = st.key_valid.at[:, slot].set(True)
        attn = ((slots <= slot)[None, None, :] & key_valid[:, None, :])
        hidden, cache = decoder.apply(decoder_variables(params), prev, st.next_pos[:, None], attn,
                                      st.cache, slot.astype(jnp.int32))
        logits = jnp.einsum("bd,dv->bv", hidden[:, 0], w_out.astype(hidden.dtype),
                            preferred_element_type=jnp.float32)
        tok, lp = sample_tokens(logits, _row_keys(base_key, row_ids, i), sp)
        active = ~st.done
        tok = jnp.where(active, tok, 0)
        lp = jnp.where(active, lp, 0.0)
        done = st.done | (active & jnp.isin(tok, eos)) if eos is not None else st.done
        return DecodeState(
            cache=cache, key_valid=key_valid, next_pos=st.next_pos + 1,
            tokens=jax.lax.dynamic_update_index_in_dim(st.tokens, tok, i, axis=1),
            logprobs=jax.lax.dynamic_update_index_in_dim(st.logprobs, lp, i, axis=1),
            done=done, lengths=st.lengths + active.astype(jnp.int32), step=i + 1,
        )

    return jax.lax.while_loop(cond, body, state)


_COMPILED: dict[Any, tuple[Any, Any]] = {}


def _compiled(config: ModelConfig, mesh: Mesh | None, prompt_len: int, max_new: int, sp: SamplingParams,
              eos_ids: tuple[int, ...]):
    """The jitted (prefill, decode) pair for one shape and sampling setting, bound to ``mesh``."""
    key = (config, mesh, prompt_len, max_new, sp, eos_ids)
    if key not in _COMPILED:
        common = dict(config=config, max_new=max_new, sp=sp, eos_ids=eos_ids)
        prefill = sharding.bind_mesh(jax.jit(functools.partial(_prefill, **common)), mesh)
        decode = sharding.bind_mesh(
            jax.jit(functools.partial(_decode, prompt_len=prompt_len, **common), donate_argnums=(1,)), mesh)
        _COMPILED[key] = (prefill, decode)
    return _COMPILED[key]


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): padding sizes to it keeps the compiled shapes few."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts into ``[rows, length]`` tokens and mask (extra rows hold a 1-token dummy prompt)."""
    tokens = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    mask[len(prompts):, -1] = 1
    return tokens, mask


def sequences(prompts: Sequence[Sequence[int]], result: GenerationResult, length: int | None = None
              ) -> dict[str, np.ndarray]:
    """Right-padded prompt + response rows ``[N, length]`` (length None = longest row).

    Keys: ``tokens`` int32, ``mask`` int32 (1 = real token), ``response_mask`` int32, ``behaviour_logprobs``
    float32 (aligned with token positions, 0 outside the response), ``prompt_len`` int32 ``[N]``,
    ``response_len`` int32 ``[N]``. Raises ValueError if a row does not fit in ``length``.
    """
    n, max_new = result.tokens.shape
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts but {n} generated rows")
    prompt_len = np.array([len(p) for p in prompts], np.int32)
    response_len = result.lengths.astype(np.int32)
    total = prompt_len + response_len
    width = int(total.max(initial=0)) if length is None else int(length)
    too_long = np.flatnonzero(total > width)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"row {i}: {int(total[i])} tokens do not fit in length {width}")
    cols = np.arange(width)[None, :]
    mask = cols < total[:, None]
    response_mask = mask & (cols >= prompt_len[:, None])
    # Response token j of row i sits at column prompt_len[i] + j; columns outside the response gather a
    # clipped index and are masked out.
    src = np.clip(cols - prompt_len[:, None], 0, max_new - 1)
    tokens = np.zeros((n, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    tokens = np.where(response_mask, np.take_along_axis(result.tokens, src, axis=1), tokens)
    behaviour = np.where(response_mask, np.take_along_axis(result.logprobs, src, axis=1), 0.0)
    return {"tokens": tokens.astype(np.int32), "mask": mask.astype(np.int32),
            "response_mask": response_mask.astype(np.int32), "behaviour_logprobs": behaviour.astype(np.float32),
            "prompt_len": prompt_len, "response_len": response_len}


def generate(model: Model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_token_id: int | Sequence[int] | None = None, seed: int = 0,
             batch_size: int = 64, min_prompt_bucket: int = 16) -> GenerationResult:
    """Sample up to ``max_new_tokens`` new tokens for each prompt (a list of token-id lists).

    Rows are processed ``batch_size`` at a time (one compiled shape per bucket); a row stops after emitting
    any of ``eos_token_id`` (included in its output). Deterministic given ``seed``. The result holds
    ``[len(prompts), max_new_tokens]`` arrays right-padded after each row's length; :func:`sequences` joins them
    to the prompts.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
    sp = SamplingParams(float(temperature), float(top_p), int(top_k))
    if eos_token_id is None:
        eos_ids: tuple[int, ...] = ()
    elif isinstance(eos_token_id, int | np.integer):
        eos_ids = (int(eos_token_id),)
    else:
        eos_ids = tuple(int(e) for e in eos_token_id)
    mesh = model.mesh
    cfg = model.config
    base_key = jax.random.PRNGKey(seed)
    mesh_rows = 1 if mesh is None else sharding.batch_parallelism(mesh)

    chunks: list[tuple[np.ndarray, ...]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rows = sharding.round_up(bucket(len(chunk)), mesh_rows)
        plen = bucket(max(len(p) for p in chunk), min_prompt_bucket)
        tokens, mask = left_pad(chunk, plen, rows)
        row_ids = np.arange(start, start + rows, dtype=np.int32)
        prefill, decode = _compiled(cfg, mesh, plen, max_new_tokens, sp, eos_ids)
        args = [tokens, mask, row_ids]
        if mesh is not None:
            args = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim, rows)) for a in args]
        state = prefill(model.params, *args, base_key)
        final = decode(model.params, state, args[2], base_key)
        out = sharding.to_host((final.tokens, final.logprobs, final.lengths, final.done))
        chunks.append(tuple(a[:len(chunk)] for a in out))
    if not chunks:
        return GenerationResult(np.zeros((0, max_new_tokens), np.int32), np.zeros((0, max_new_tokens), np.float32),
                                np.zeros((0,), np.int32), np.zeros((0,), bool))
    return GenerationResult(*(np.concatenate(parts) for parts in zip(*chunks)))
