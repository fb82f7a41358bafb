"""Model configuration read from a Hugging Face ``config.json``.

One decoder family covers ``llama`` (tied/untied embeddings, llama3 rope scaling), ``qwen2`` (q/k/v bias),
``qwen3`` (q/k RMSNorm, explicit head_dim) and ``qwen3_moe`` (routed top-k experts). Anything outside that
set is refused with an error naming what is supported, never silently approximated.

Both transformers 4.x (``rope_theta`` + ``rope_scaling``, ``num_experts``) and 5.x (``rope_parameters``,
``num_local_experts``) spellings are read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: reference tests (x64)
SUPPORTED_ATTENTION = ("xla", "cudnn")
# What a decoder layer keeps for the backward pass: everything ("none"), everything but the attention core's
# scores/probs ("attention": recomputed, as flash attention does), its input and the outputs of its weight
# matmuls ("dots": attention scores, softmax and elementwise ops are recomputed), or only its input ("full": all
# of the layer is recomputed).
SUPPORTED_REMAT = ("none", "attention", "dots", "full")
# Projections a LoRA adapter can target (jopd/models/lora.py). On qwen3_moe, gate/up/down are every expert's own
# projections (one adapter pair per expert); the router is never adapted.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


# Real Qwen3 dimensions (config.json of Qwen/Qwen3-*-Base and Qwen/Qwen3-*, which share their architecture), as
# ModelConfig keyword arguments: used by the benchmarks and the memory estimator.
QWEN3_ARCHS: dict[str, dict[str, Any]] = {
    "0.6b": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
               intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
               intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
    "14b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=8, head_dim=128,
                intermediate_size=17408, vocab_size=151936, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8, head_dim=128,
                intermediate_size=25600, vocab_size=151936, tie_word_embeddings=False),
}


class ConfigError(ValueError):
    """A model config.json that jopd cannot represent exactly."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters on the decoder's projections (docs/lora.md): each target projection ``W`` becomes
    ``W + (alpha / rank) * A @ B`` with ``A`` ``[in, rank]`` and ``B`` ``[rank, out]``; ``dropout`` drops the
    adapter path's input during training steps only. A runtime setting: the adapters themselves are params
    (``params["lora"]``), see :mod:`jopd.models.lora`."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.rank, int) or self.rank <= 0:
            errors.append(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            errors.append(f"LoRA alpha must be > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            errors.append(f"LoRA targets must be distinct names from {LORA_TARGETS}, got {self.targets!r}")
        if not 0 <= self.dropout < 1:
            errors.append(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def scale(self) -> float:
        """The adapter's multiplier ``alpha / rank`` (PEFT's default scaling)."""
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (from config.json) plus runtime settings (jopd's own, not written to config.json).

    Frozen and hashable: it is a static argument of every jitted function.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) for llama3; factor for linear.
    rope_scaling: tuple[tuple[str, float], ...] = ()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (qwen3)
    num_experts: int = 0  # > 0: every layer's MLP is a routed MoE (qwen3_moe)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # --- runtime (jopd) settings ---
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "attention"  # rematerialisation policy of each decoder layer (SUPPORTED_REMAT)
    attention_impl: str = "xla"  # "xla" (einsum, any backend) or "cudnn" (fused kernel on NVIDIA GPUs)
    logits_chunk_size: int = 128  # sequence positions per chunk of the log-prob head
    lora: LoraSpec | None = None  # adapters on the projections (params["lora"]); None = a plain model

    # The unmodified config.json, kept for export (json text so the dataclass stays hashable).
    hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def __post_init__(self) -> None:
        errors = []
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            errors.append(f"model_type {self.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            errors.append(f"rope type {self.rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                errors.append(f"{name} {getattr(self, name)!r} is not one of {SUPPORTED_DTYPES}")
        if self.remat not in SUPPORTED_REMAT:
            errors.append(f"remat {self.remat!r} is not one of {SUPPORTED_REMAT}")
        if self.attention_impl not in SUPPORTED_ATTENTION:
            errors.append(f"attention_impl {self.attention_impl!r} is not one of {SUPPORTED_ATTENTION}")
        if self.num_heads % max(self.num_kv_heads, 1):
            errors.append(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                          f"{self.num_kv_heads}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            errors.append(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}")
        if self.logits_chunk_size <= 0:
            errors.append("logits_chunk_size must be positive")
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def hf_config(self) -> dict[str, Any]:
        return json.loads(self.hf_config_json)

    def num_params(self) -> int:
        d, f, h, k, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * hd * (2 * h + 2 * k) + (hd * (h + 2 * k) if self.attention_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        if self.is_moe:
            mlp = d * self.num_experts + 3 * self.num_experts * d * self.moe_intermediate_size
        else:
            mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json", **runtime: Any) -> ModelConfig:
        """Build from a parsed HF config.json; ``runtime`` sets jopd's own fields (dtypes, remat...)."""
        where = source

        def need(key: str) -> Any:
            if key not in hf:
                raise ConfigError(f"{where}: required field {key!r} is missing")
            return hf[key]

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type {model_type!r} is not supported; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
        if hf.get("mlp_bias"):
            raise ConfigError(f"{where}: mlp_bias=true is not supported")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported (full attention only)")
        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        # Qwen3 configs default head_dim to 128 (not hidden / heads) when the field is absent.
        head_dim = hf.get("head_dim") or (128 if model_type in ("qwen3", "qwen3_moe") else hidden // num_heads)

        # rope: transformers 5 nests theta and scaling in rope_parameters; 4.x has rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        scaling_4x = dict(hf.get("rope_scaling") or {})
        rope = {**rope, **scaling_4x}
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        # An explicit 4.x rope_scaling type wins over a 5.x default rope_parameters entry.
        rope_type = (scaling_4x.get("rope_type") or scaling_4x.get("type") or rope.get("rope_type")
                     or rope.get("type") or "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{where}: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        scaling: dict[str, float] = {}
        if rope_type == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in rope:
                    raise ConfigError(f"{where}: llama3 rope scaling needs {key!r}")
                scaling[key] = float(rope[key])
        elif rope_type == "linear":
            scaling["factor"] = float(rope["factor"])
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported")

        num_experts = 0
        experts_per_tok = 0
        moe_inter = 0
        if model_type == "qwen3_moe":
            num_experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
            if num_experts <= 0:
                raise ConfigError(f"{where}: qwen3_moe needs num_experts (or num_local_experts) > 0")
            experts_per_tok = int(need("num_experts_per_tok"))
            moe_inter = int(need("moe_intermediate_size"))
            # Our layers are scanned and must be identical: mixed dense/sparse stacks are refused.
            if hf.get("mlp_only_layers"):
                raise ConfigError(f"{where}: mlp_only_layers={hf['mlp_only_layers']} is not supported "
                                  "(every layer must be a sparse MoE layer)")
            if int(hf.get("decoder_sparse_step", 1)) != 1:
                raise ConfigError(f"{where}: decoder_sparse_step={hf['decoder_sparse_step']} is not supported "
                                  "(only 1: every layer sparse)")

        eos = hf.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        # Qwen2 always has q/k/v bias; llama/qwen3's attention_bias would also add an o_proj bias.
        if hf.get("attention_bias") and model_type != "qwen2":
            raise ConfigError(f"{where}: attention_bias=true is not supported for {model_type}")
        tie = bool(hf.get("tie_word_embeddings", False))
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(hf.get("intermediate_size") or 0),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_scaling=tuple(sorted(scaling.items())),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(tie),
            attention_bias=model_type == "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            num_experts=num_experts,
            num_experts_per_tok=experts_per_tok,
            moe_intermediate_size=moe_inter,
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            hf_config_json=json.dumps(hf, sort_keys=True),
            **runtime,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **runtime: Any) -> ModelConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: no config.json (expected a Hugging Face model directory)")
        try:
            with open(cfg_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path}: invalid JSON: {e}") from e
        if not isinstance(hf, dict):
            raise ConfigError(f"{cfg_path}: expected a JSON object (a Hugging Face model config), got "
                              f"{type(hf).__name__}")
        return cls.from_hf_dict(hf, source=cfg_path, **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json for this architecture: the original one if loaded from HF, else a fresh one."""
        hf = self.hf_config
        if hf:
            return hf
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM"}[self.model_type]
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type, **dict(self.rope_scaling)}
        if "original_max_position_embeddings" in rope:
            rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if len(self.eos_token_id) > 1
                             else (self.eos_token_id[0] if self.eos_token_id else None)),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if rope["rope_type"] != "default":
            out["rope_scaling"] = dict(rope)
        if self.is_moe:
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                       decoder_sparse_step=1, mlp_only_layers=[])
        return out


def rope_inv_freq(config: ModelConfig):
    """Inverse frequencies [head_dim // 2] as float64 numpy, with llama3/linear scaling applied like HF."""
    import numpy as np

    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))
    scaling = dict(config.rope_scaling)
    if config.rope_type == "linear":
        inv = inv / scaling["factor"]
    elif config.rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(is_medium, smoothed, scaled)
    return inv
