"""Hugging Face checkpoints: load straight into sharded arrays, export back to an HF directory.

Loading reads ``model.safetensors`` or a sharded ``model.safetensors.index.json`` through a zero-copy mmap
reader, one HF tensor at a time. For each jopd parameter it allocates host buffers only for the *distinct
shards this process's devices hold*, fills them layer by layer, and places each on its device: no replicated
host copy of the model is ever built, and on a multi-host mesh each process reads only what it needs.

Export writes config.json + safetensors (split into ≤ ``max_shard_bytes`` files with an index when large) +
the tokenizer files, into a temporary directory renamed into place (a crash never leaves half a model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jopd import sharding
from jopd.io import current_umask
from jopd.models import lora
from jopd.models.config import ConfigError, ModelConfig
from jopd.models.decoder import param_shapes, param_shardings

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint directory that does not match its config (missing, extra or mis-shaped tensors)."""


@dataclasses.dataclass
class Model:
    """A decoder's static config and its parameters (a pytree of, possibly sharded, jax arrays)."""

    config: ModelConfig
    params: dict
    mesh: Any = None
    source: str | None = None


# --- safetensors reading ------------------------------------------------------------------------------
class SafetensorsReader:
    """Random access to the tensors of one HF directory (single file or sharded index), via mmap."""

    def __init__(self, path: str, filename: str = "model.safetensors"):
        self.path = path
        single = os.path.join(path, filename)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files, weight_map = [filename], None
        else:
            raise FileNotFoundError(f"{path}: neither {filename} nor model.safetensors.index.json found")
        self._entries: dict[str, tuple[mmap.mmap, int, dict]] = {}
        self._maps: list[mmap.mmap] = []
        for name in files:
            fpath = os.path.join(path, name)
            with open(fpath, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps.append(mm)
            if len(mm) < 8:
                raise CheckpointError(f"{fpath}: truncated safetensors file")
            (header_len,) = struct.unpack("<Q", mm[:8])
            try:
                header = json.loads(mm[8:8 + header_len])
            except ValueError as e:
                raise CheckpointError(f"{fpath}: corrupt safetensors header: {e}") from e
            base = 8 + header_len
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                if base + end > len(mm):
                    raise CheckpointError(f"{fpath}: tensor {key} extends past the end of the file (truncated?)")
                self._entries[key] = (mm, base, info)
        if weight_map is not None:
            missing = set(weight_map) - set(self._entries)
            if missing:
                raise CheckpointError(f"{index}: tensors listed but not found in shards: {sorted(missing)[:5]}")

    def keys(self) -> set[str]:
        return set(self._entries)

    def info(self, key: str) -> dict:
        """The header entry of ``key``: {"dtype", "shape", "data_offsets"} (no data read)."""
        return self._entries[key][2]

    def get(self, key: str) -> np.ndarray:
        if key not in self._entries:
            raise CheckpointError(f"{self.path}: tensor {key!r} not found in the checkpoint")
        mm, base, info = self._entries[key]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        arr = np.frombuffer(mm, dtype=_ST_DTYPES[info["dtype"]], count=(end - start) //
                            np.dtype(_ST_DTYPES[info["dtype"]]).itemsize, offset=base + start)
        return arr.reshape(info["shape"])

    def close(self) -> None:
        self._entries.clear()
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a numpy view still references it; the OS frees it with the last view
                pass


# --- the HF <-> jopd mapping -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Rule:
    """How one jopd parameter is built from HF tensors.

    hf: HF key (``{i}`` = layer, ``{e}`` = expert). to_jopd maps one HF tensor (of one layer / expert) to
    the jopd layout; to_hf is its exact inverse.
    """

    path: tuple[str, ...]
    hf: str
    to_jopd: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    per_layer: bool = True
    per_expert: bool = False


def _rules(cfg: ModelConfig) -> list[_Rule]:
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ident = lambda w: w  # noqa: E731
    T = lambda w: np.ascontiguousarray(w.T)  # noqa: E731

    def heads_in(n):  # HF [n*hd, D] -> [D, n, hd]
        return (lambda w: np.ascontiguousarray(w.T).reshape(d, n, hd),
                lambda w: np.ascontiguousarray(w.reshape(d, n * hd).T))

    def bias(n):
        return (lambda w: w.reshape(n, hd), lambda w: w.reshape(n * hd))

    pre = "model.layers.{i}."
    rules = [
        _Rule(("embedding",), "model.embed_tokens.weight", ident, ident, per_layer=False),
        _Rule(("final_norm",), "model.norm.weight", ident, ident, per_layer=False),
        _Rule(("layers", "attn_norm"), pre + "input_layernorm.weight", ident, ident),
        _Rule(("layers", "mlp_norm"), pre + "post_attention_layernorm.weight", ident, ident),
        _Rule(("layers", "attn", "q_kernel"), pre + "self_attn.q_proj.weight", *heads_in(h)),
        _Rule(("layers", "attn", "k_kernel"), pre + "self_attn.k_proj.weight", *heads_in(k)),
        _Rule(("layers", "attn", "v_kernel"), pre + "self_attn.v_proj.weight", *heads_in(k)),
        _Rule(("layers", "attn", "o_kernel"), pre + "self_attn.o_proj.weight",
              lambda w: np.ascontiguousarray(w.T).reshape(h, hd, d),
              lambda w: np.ascontiguousarray(w.reshape(h * hd, d).T)),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(_Rule(("lm_head",), "lm_head.weight", T, T, per_layer=False))
    if cfg.attention_bias:
        rules += [
            _Rule(("layers", "attn", "q_bias"), pre + "self_attn.q_proj.bias", *bias(h)),
            _Rule(("layers", "attn", "k_bias"), pre + "self_attn.k_proj.bias", *bias(k)),
            _Rule(("layers", "attn", "v_bias"), pre + "self_attn.v_proj.bias", *bias(k)),
        ]
    if cfg.qk_norm:
        rules += [
            _Rule(("layers", "attn", "q_norm"), pre + "self_attn.q_norm.weight", ident, ident),
            _Rule(("layers", "attn", "k_norm"), pre + "self_attn.k_norm.weight", ident, ident),
        ]
    if cfg.is_moe:
        ex = pre + "mlp.experts.{e}."
        rules += [
            _Rule(("layers", "moe", "router_kernel"), pre + "mlp.gate.weight", T, T),
            _Rule(("layers", "moe", "gate_kernel"), ex + "gate_proj.weight", T, T, per_expert=True),
            _Rule(("layers", "moe", "up_kernel"), ex + "up_proj.weight", T, T, per_expert=True),
            _Rule(("layers", "moe", "down_kernel"), ex + "down_proj.weight", T, T, per_expert=True),
        ]
    else:
        rules += [
            _Rule(("layers", "mlp", "gate_kernel"), pre + "mlp.gate_proj.weight", T, T),
            _Rule(("layers", "mlp", "up_kernel"), pre + "mlp.up_proj.weight", T, T),
            _Rule(("layers", "mlp", "down_kernel"), pre + "mlp.down_proj.weight", T, T),
        ]
    return rules


def _get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _index_units(rule: _Rule, cfg: ModelConfig) -> Iterator[tuple[tuple[int, ...], str]]:
    """(leading index into the jopd param, HF key) for every HF tensor that makes up the param."""
    if not rule.per_layer:
        yield (), rule.hf
        return
    for i in range(cfg.num_layers):
        if rule.per_expert:
            for e in range(cfg.num_experts):
                yield (i, e), rule.hf.format(i=i, e=e)
        else:
            yield (i,), rule.hf.format(i=i)


def _slice_key(idx: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, shape[d] if s.stop is None else s.stop) for d, s in enumerate(idx))


def _hf_shape(rule: _Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape the config implies for one layer / expert of a jopd param of ``shape``."""
    lead = (1 if rule.per_layer else 0) + (1 if rule.per_expert else 0)
    return tuple(rule.to_hf(np.zeros(shape[lead:], np.int8)).shape)


def checkpoint_problems(path: str | os.PathLike) -> list[str]:
    """What would stop :func:`load_pretrained` from loading ``path``, found from config.json and the safetensors
    headers alone (no tensor data is read): a config.json that does not parse or names an unsupported
    architecture, missing or truncated safetensors files, missing / unexpected tensors, tensors whose shape
    differs from the one the config implies (also when only the layout differs, e.g. stored transposed), and
    dtypes that are not floating point. Empty when the directory loads."""
    path = os.fspath(path)
    try:
        cfg = ModelConfig.from_pretrained(path)
    except (ConfigError, OSError) as e:
        return [str(e)]
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a config.json of the wrong shape
        return [f"{os.path.join(path, 'config.json')}: not a usable model config ({type(e).__name__}: {e})"]
    try:
        reader = SafetensorsReader(path)
    except (CheckpointError, OSError) as e:
        return [str(e)]
    except (KeyError, TypeError, ValueError) as e:  # an index file of the wrong shape
        return [f"{path}: unreadable safetensors index or header ({type(e).__name__}: {e})"]
    problems: list[str] = []
    try:
        shapes = param_shapes(cfg)
        expected_keys: set[str] = set()
        for rule in _rules(cfg):
            hf_shape = _hf_shape(rule, tuple(_get_path(shapes, rule.path).shape))
            for _, hf_key in _index_units(rule, cfg):
                expected_keys.add(hf_key)
                if hf_key not in reader.keys():
                    problems.append(f"{path}: tensor {hf_key} is missing (the {cfg.model_type} config.json "
                                    f"implies it, shape {hf_shape})")
                    continue
                info = reader.info(hf_key)
                if tuple(info["shape"]) != hf_shape:
                    problems.append(f"{path}: tensor {hf_key} has shape {tuple(info['shape'])}; the config "
                                    f"({cfg.model_type}, hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
                                    f"{cfg.num_kv_heads} x {cfg.head_dim}) implies {hf_shape}")
                if info["dtype"] not in ("F64", "F32", "F16", "BF16"):
                    problems.append(f"{path}: tensor {hf_key} has dtype {info['dtype']}; expected a floating "
                                    "point dtype (F32, BF16, F16 or F64)")
        ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        unexpected = sorted(k for k in reader.keys() - expected_keys - ignorable
                            if not k.endswith("rotary_emb.inv_freq"))
        if unexpected:
            problems.append(f"{path}: checkpoint has tensors this {cfg.model_type} config does not use: "
                            f"{unexpected[:8]}" + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    finally:
        reader.close()
    if len(problems) > 6:
        problems = problems[:6] + [f"{path}: ... and {len(problems) - 6} more tensor problems"]
    return problems


def _load_param(reader: SafetensorsReader, rule: _Rule, cfg: ModelConfig, shape: tuple[int, ...],
                dtype: np.dtype, param_sharding) -> jax.Array:
    # Distinct shards held by this process's devices (replicas share one host buffer).
    dev_index = param_sharding.addressable_devices_indices_map(shape)
    buffers: dict[tuple, np.ndarray] = {}
    for idx in dev_index.values():
        key = _slice_key(idx, shape)
        if key not in buffers:
            buffers[key] = np.empty(tuple(b - a for a, b in key), dtype=dtype)
    hf_expected = _hf_shape(rule, shape)
    for lead, hf_key in _index_units(rule, cfg):
        raw = reader.get(hf_key)
        expected = shape[len(lead):]
        # Checked before the reshape: a tensor stored transposed ([48, 24] for [24, 48]) has the right number
        # of elements and would otherwise load scrambled.
        if tuple(raw.shape) != hf_expected:
            raise CheckpointError(
                f"{reader.path}: tensor {hf_key} has shape {tuple(raw.shape)}; the config ({cfg.model_type}, "
                f"hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_dim}) implies "
                f"{hf_expected}")
        unit = rule.to_jopd(raw)
        if unit.shape != expected:
            raise CheckpointError(
                f"{reader.path}: tensor {hf_key} has shape {tuple(raw.shape)}, which maps to {unit.shape}; "
                f"the config implies {expected}"
            )
        for key, buf in buffers.items():
            inside = all(a <= i < b for i, (a, b) in zip(lead, key))
            if not inside:
                continue
            dst = tuple(i - key[n][0] for n, i in enumerate(lead))
            src = tuple(slice(a, b) for a, b in key[len(lead):])
            buf[dst] = unit[src].astype(dtype)
    arrays = [jax.device_put(buffers[_slice_key(idx, shape)], dev) for dev, idx in dev_index.items()]
    return jax.make_array_from_single_device_arrays(shape, param_sharding, arrays)


def load_pretrained(path: str | os.PathLike, dtype: str = "float32", *, mesh=None, **runtime: Any) -> Model:
    """Load an HF decoder directory into a :class:`Model` whose params are sharded over ``mesh``.

    ``dtype`` is the parameter (master) dtype; ``runtime`` sets other :class:`ModelConfig` runtime fields
    (``compute_dtype``, ``remat``, ``attention_impl``, ``logits_chunk_size``). ``mesh`` defaults to all
    devices on the fsdp axis.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_pretrained(path, param_dtype=dtype, **runtime)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    shapes = param_shapes(cfg)
    shardings = param_shardings(cfg, mesh)
    reader = SafetensorsReader(path)
    try:
        rules = _rules(cfg)
        expected = {hf for r in rules for _, hf in _index_units(r, cfg)}
        ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        unexpected = sorted(k for k in reader.keys() - expected - ignorable if not k.endswith("rotary_emb.inv_freq"))
        if unexpected:
            raise CheckpointError(
                f"{path}: checkpoint has tensors this {cfg.model_type} config does not use: {unexpected[:8]}"
                + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
            )
        params: dict = {}
        for rule in rules:
            shape = _get_path(shapes, rule.path)
            arr = _load_param(reader, rule, cfg, tuple(shape.shape), jnp.dtype(dtype),
                              _get_path(shardings, rule.path))
            _set_path(params, rule.path, arr)
    finally:
        reader.close()
    return Model(config=cfg, params=params, mesh=mesh, source=path)


# --- export -------------------------------------------------------------------------------------------
def hf_state_dict(model: Model, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF key, numpy tensor) pairs, one param (all its layers) on the host at a time. A LoRA model's
    adapters are merged into their kernels (``W + (alpha / rank) * A @ B`` in float64, rounded once)."""
    cfg = model.config
    out_dtype = jnp.dtype(dtype) if dtype else None
    base, adapters = lora.split(model.params)
    for rule in _rules(cfg):
        full = sharding.to_host(_get_path(base, rule.path))
        if adapters is not None:
            full = lora.merge_kernel_at(full, adapters, cfg, rule.path)
        for lead, hf_key in _index_units(rule, cfg):
            t = rule.to_hf(full[lead] if lead else full)
            yield hf_key, np.ascontiguousarray(t.astype(out_dtype) if out_dtype is not None else t)


def _write_safetensors(path: str, tensors: list[tuple[str, np.ndarray]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in tensors:
        header[key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in tensors:
            f.write(t.tobytes())


def save_pretrained(model: Model, out_dir: str | os.PathLike, *, tokenizer_dir: str | None = None,
                    dtype: str | None = None, max_shard_bytes: int = 4 << 30) -> str:
    """Write ``model`` as an HF directory (config.json, safetensors, tokenizer files) atomically.

    ``dtype`` (e.g. "bfloat16") converts the weights; default keeps the parameter dtype. Only process 0
    writes on a multi-host run (all processes must call it: gathering is collective).
    """
    out_dir = os.fspath(out_dir)
    tensors = list(hf_state_dict(model, dtype))
    if jax.process_index() != 0:
        return out_dir
    with _replaced_dir(out_dir) as tmp:
        hf = model.config.to_hf_dict()
        saved_dtype = str(jnp.dtype(dtype)) if dtype else model.config.param_dtype
        hf["torch_dtype"] = saved_dtype
        if "dtype" in hf:
            hf["dtype"] = saved_dtype
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
        shards: list[list[tuple[str, np.ndarray]]] = [[]]
        size = 0
        for key, t in tensors:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, t))
            size += t.nbytes
        if len(shards) == 1:
            _write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0])
        else:
            weight_map = {}
            for n, shard in enumerate(shards):
                name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(os.path.join(tmp, name), shard)
                weight_map.update({k: name for k, _ in shard})
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": sum(t.nbytes for _, t in tensors)},
                           "weight_map": weight_map}, f, indent=2)
        src_tok = tokenizer_dir or model.source
        if src_tok:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(src_tok, name)):
                    shutil.copy2(os.path.join(src_tok, name), os.path.join(tmp, name))
    return out_dir


@contextlib.contextmanager
def _replaced_dir(out_dir: str) -> Iterator[str]:
    """A temporary directory beside ``out_dir`` to write into; on success it replaces ``out_dir`` (an existing
    one is moved aside first), on failure it is removed: ``out_dir`` is never half-written."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: give it a normal directory's mode
    try:
        yield tmp
        if os.path.isdir(out_dir):
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- LoRA adapters alone, in PEFT's format ---------------------------------------------------------------
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# The HF (and PEFT target_modules) name of each LoRA target's projection.
_PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
               "down": "down_proj"}


def _adapter_units(cfg: ModelConfig, target: str) -> Iterator[tuple[tuple[int, ...], str]]:
    """(index into the adapter's leading dims, PEFT module prefix) of every layer (and expert) of ``target``."""
    attn = target in ("q", "k", "v", "o")
    for i in range(cfg.num_layers):
        pre = f"base_model.model.model.layers.{i}."
        if attn:
            yield (i,), f"{pre}self_attn.{_PEFT_NAMES[target]}"
        elif cfg.is_moe:
            for e in range(cfg.num_experts):
                yield (i, e), f"{pre}mlp.experts.{e}.{_PEFT_NAMES[target]}"
        else:
            yield (i,), f"{pre}mlp.{_PEFT_NAMES[target]}"


def _adapter_module(cfg: ModelConfig, target: str) -> str:
    return "attn" if target in ("q", "k", "v", "o") else ("moe" if cfg.is_moe else "mlp")


def adapter_state_dict(model: Model) -> Iterator[tuple[str, np.ndarray]]:
    """The adapters of a LoRA model as PEFT tensors: per layer (and expert) and target,
    ``<module>.lora_A.weight`` ``[r, in]`` and ``<module>.lora_B.weight`` ``[out, r]`` (HF's ``[out, in]``
    orientation, so the merged HF weight is ``W + (alpha / r) * lora_B @ lora_A``)."""
    cfg = model.config
    _, adapters = lora.split(model.params)
    if adapters is None or cfg.lora is None:
        raise ValueError("adapter_state_dict: the model carries no LoRA adapters")
    r = cfg.lora.rank
    for target in cfg.lora.targets:
        module = adapters["layers"][_adapter_module(cfg, target)]
        a_full, b_full = sharding.to_host((module[f"{target}_lora_a"], module[f"{target}_lora_b"]))
        for lead, prefix in _adapter_units(cfg, target):
            yield f"{prefix}.lora_A.weight", np.ascontiguousarray(a_full[lead].reshape(-1, r).T)
            yield f"{prefix}.lora_B.weight", np.ascontiguousarray(b_full[lead].reshape(r, -1).T)


def save_adapter(model: Model, out_dir: str | os.PathLike, *, base_model: str | None = None) -> str:
    """Write a LoRA model's adapters alone, in PEFT's format (docs/lora.md): ``adapter_config.json`` (``r``,
    ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``base_model_name_or_path`` = ``base_model``) and
    ``adapter_model.safetensors`` (:func:`adapter_state_dict`, the adapters' float32), atomically; process 0 writes
    (all processes must call it: gathering is collective)."""
    out_dir = os.fspath(out_dir)
    tensors = list(adapter_state_dict(model))
    if jax.process_index() != 0:
        return out_dir
    spec = model.config.lora
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
              "lora_dropout": spec.dropout, "target_modules": [_PEFT_NAMES[t] for t in spec.targets],
              "base_model_name_or_path": base_model, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "layers_to_transform": None, "revision": None}
    with _replaced_dir(out_dir) as tmp:
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        _write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS), tensors)
    return out_dir


def load_adapter(path: str | os.PathLike, model: Model) -> Model:
    """``model`` (a plain model: the adapter's base) with the PEFT-format adapter of ``path`` attached, as a LoRA
    model (adapters in :func:`jopd.models.lora.adapter_dtype`, sharded like their kernels). Refused with a
    :class:`CheckpointError` naming the problem: a PEFT variant jopd does not compute (rsLoRA, DoRA, biases,
    a subset of layers), an unknown target module, a missing, unexpected or mis-shaped tensor."""
    path = os.fspath(path)
    if lora.is_lora(model.params):
        raise ValueError("load_adapter: the model already carries adapters")
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(cfg_path) as f:
            pc = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read the adapter config: {e}") from e
    unsupported = {k: pc.get(k) for k, ok in (("peft_type", "LORA"), ("use_rslora", False), ("use_dora", False),
                                               ("bias", "none"), ("fan_in_fan_out", False),
                                               ("layers_to_transform", None), ("modules_to_save", None))
                   if pc.get(k, ok) != ok}
    if unsupported:
        raise CheckpointError(f"{cfg_path}: unsupported adapter settings {unsupported} (jopd computes plain LoRA "
                              "on all layers: W + lora_alpha / r * B A)")
    names = {v: k for k, v in _PEFT_NAMES.items()}
    modules = pc.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    unknown = [m for m in modules if m not in names]
    if unknown or not modules:
        raise CheckpointError(f"{cfg_path}: target_modules {modules} must be a list of {sorted(names)}")
    try:
        spec = lora.LoraSpec(rank=int(pc["r"]), alpha=float(pc["lora_alpha"]),
                             targets=tuple(t for t in lora.LORA_TARGETS if _PEFT_NAMES[t] in modules),
                             dropout=float(pc.get("lora_dropout") or 0.0))
    except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{cfg_path}: {e}") from e
    cfg = model.config.replace(lora=spec)
    shapes, shardings = lora.adapter_shapes(cfg), lora.adapter_shardings(cfg, model.mesh)
    reader = SafetensorsReader(path, ADAPTER_WEIGHTS)
    try:
        expected: set[str] = set()
        adapters: dict = {"layers": {}}
        for target in spec.targets:
            module = _adapter_module(cfg, target)
            for which, orient in (("a", "lora_A"), ("b", "lora_B")):
                name = f"{target}_lora_{which}"
                shape = tuple(shapes["layers"][module][name].shape)
                buf = np.empty(shape, lora.adapter_dtype(cfg))
                for lead, prefix in _adapter_units(cfg, target):
                    key = f"{prefix}.{orient}.weight"
                    expected.add(key)
                    unit = shape[len(lead):]
                    flat = (math.prod(unit[:-1]), unit[-1]) if which == "a" else (unit[0], math.prod(unit[1:]))
                    raw = reader.get(key)
                    if tuple(raw.shape) != flat[::-1]:
                        raise CheckpointError(f"{path}: tensor {key} has shape {tuple(raw.shape)}; rank {spec.rank} "
                                              f"on this model implies {flat[::-1]}")
                    buf[lead] = raw.T.reshape(unit)
                adapters["layers"].setdefault(module, {})[name] = jax.device_put(
                    buf, shardings["layers"][module][name])
        unexpected = sorted(reader.keys() - expected)
        if unexpected:
            raise CheckpointError(f"{path}: adapter tensors this model does not have: {unexpected[:4]}")
    finally:
        reader.close()
    return dataclasses.replace(model, config=cfg, params={**model.params, lora.LORA: adapters})


def from_params(config: ModelConfig, params: dict, *, mesh=None) -> Model:
    """Wrap existing params (e.g. :func:`init_params` output) as a Model placed on ``mesh``."""
    mesh = mesh if mesh is not None else sharding.make_mesh()
    shardings = param_shardings(config, mesh)
    params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
    return Model(config=config, params=params, mesh=mesh)
