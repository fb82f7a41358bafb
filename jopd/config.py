"""The run configuration: typed dataclasses, read from YAML, with dotted command-line overrides.

Every value is documented once, in its field's ``doc`` (``python -m jopd.config`` prints the reference that is
kept in docs/config.md). Loading validates everything before any work starts and reports *all* problems at
once: unknown keys, wrong types, bad values, missing files, cross-field mistakes (e.g. an arm naming a teacher
that does not exist).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

STAGES = ("prepare", "teacher_data", "sft", "rollout", "precompute", "train", "online", "eval", "export",
          "report")


def doc(text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING, *,
        repr: bool = True) -> Any:  # noqa: A002 - dataclasses.field's own name
    """A dataclass field carrying its documentation (``repr=False``: left out of the section's repr)."""
    kw: dict[str, Any] = {"metadata": {"doc": text}, "repr": repr}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    return field(**kw)


class ConfigValidationError(ValueError):
    """All problems found in a config, one per line."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) in the config:\n  - " + "\n  - ".join(problems))


# ---- value checks shared by the sections' `problems` methods --------------------------------------------
def _positive(where: str, value: Any, allow_zero: bool = False) -> list[str]:
    """``where: must be > 0`` (or ``>= 0``); non-numbers are left to the type check that already reported them."""
    if isinstance(value, int | float) and (value < 0 or (value == 0 and not allow_zero)):
        return [f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}"]
    return []


def _sampling_problems(where: str, temperature: float, top_p: float, max_new_tokens: int) -> list[str]:
    """Bounds every sampler shares (teacher data, rollouts, evaluation)."""
    errors = _positive(f"{where}.temperature", temperature, allow_zero=True)
    if not 0 < top_p <= 1:
        errors.append(f"{where}.top_p: must be in (0, 1], got {top_p}")
    return errors + _positive(f"{where}.max_new_tokens", max_new_tokens)


# ----------------------------------------------------------------------------------------------------
@dataclass
class MeshSection:
    data: int = doc("Pure data-parallel axis size (weights replicated).", 1)
    fsdp: int = doc("FSDP axis size (batch split, weights/optimizer state sharded); -1 = all remaining devices.", -1)
    tensor: int = doc("Tensor-parallel axis size (heads, MLP width, vocabulary split).", 1)
    expert: int = doc("Expert-parallel axis size for MoE models.", 1)

    def problems(self, where: str) -> list[str]:
        sizes = dataclasses.asdict(self)
        errors = [f"{where}.{axis}: must be positive or -1 (all remaining devices), got {v}"
                  for axis, v in sizes.items() if v == 0 or v < -1]
        auto = [axis for axis, v in sizes.items() if v == -1]
        if len(auto) > 1:
            errors.append(f"{where}: at most one axis may be -1 (all remaining devices), got {', '.join(auto)}")
        return errors


@dataclass
class DistributedSection:
    initialize: bool | Literal["auto"] = doc(
        "Call jax.distributed.initialize() before anything else (multi-host runs): true, false, or auto (only "
        "where JAX detects a cluster environment: Cloud TPU VM, SLURM, Open MPI, Kubernetes, or "
        "JAX_COORDINATOR_ADDRESS set; a laptop or a single GPU box runs as one process).", False)
    coordinator_address: str | None = doc("host:port of process 0; null = auto-detect (TPU/SLURM).", None)
    num_processes: int | None = doc("Total number of processes; null = auto-detect.", None)
    process_id: int | None = doc("This process's index; null = auto-detect.", None)
    heartbeat_timeout_s: int = doc(
        "Seconds without a heartbeat after which the coordination service declares a process dead and every "
        "other process of the job exits with that error (instead of waiting in a collective).", 100)

    def problems(self, where: str) -> list[str]:
        errors = [] if self.num_processes is None else _positive(f"{where}.num_processes", self.num_processes)
        errors += _positive(f"{where}.heartbeat_timeout_s", self.heartbeat_timeout_s)
        if self.process_id is not None:
            errors += _positive(f"{where}.process_id", self.process_id, allow_zero=True)
            if self.num_processes is not None and self.process_id >= self.num_processes > 0:
                errors.append(f"{where}.process_id: must be < num_processes {self.num_processes}, "
                              f"got {self.process_id}")
        return errors


@dataclass
class PrecisionSection:
    param_dtype: Literal["float32", "bfloat16"] = doc("Dtype of the trained (master) weights.", "float32")
    compute_dtype: Literal["float32", "bfloat16"] = doc(
        "Dtype of matmuls/activations (bfloat16 on accelerators; log-probs and losses are always fp32).", "float32")
    remat: Literal["none", "attention", "dots", "full"] = doc(
        "What each decoder layer keeps for the backward pass: none = everything; attention = everything but the "
        "attention core's [B, H, T, T] scores/probs, recomputed in the backward as flash attention does (the "
        "layer's matmul outputs are kept: little extra compute, most of the memory saved at long T); dots = its "
        "input and its weight-matmul outputs (attention and elementwise ops recomputed); full = only its input "
        "(the whole layer is recomputed).", "attention")
    teacher_dtype: Literal["float32", "bfloat16"] | None = doc(
        "Dtype teachers are held in (never trained: bfloat16 halves their memory); null = param_dtype.", None)
    attention_impl: Literal["xla", "cudnn"] = doc("Attention kernel: xla (any backend) or cudnn (NVIDIA).", "xla")
    logits_chunk_size: int = doc(
        "Sequence positions per chunk of the log-prob head: its working memory is a few [batch, chunk, vocab] "
        "fp32 buffers (at vocab 151936 and 2 rows, 128 positions are 155 MB each).", 128)

    def problems(self, where: str) -> list[str]:
        return _positive(f"{where}.logits_chunk_size", self.logits_chunk_size)


@dataclass
class TaskSection:
    kind: Literal["arithmetic", "prompt_file"] = doc(
        "arithmetic: the built-in generated math task; prompt_file: prompts/labels from files.", "arithmetic")
    prompt_file: str | None = doc(
        "JSONL/Parquet with prompts and labels for SFT and OPD (kind=prompt_file); split by a seeded shuffle into "
        "num_sft_prompts, then num_opd_prompts. Feeds only the splits whose own file below is null.", None)
    sft_prompt_file: str | None = doc(
        "JSONL/Parquet of the SFT-data prompts (the paper: OpenThoughts3); null = `prompt_file`.", None)
    opd_prompt_file: str | None = doc(
        "JSONL/Parquet of the OPD rollout prompts (the paper: DAPO-Math-17k); null = `prompt_file`.", None)
    eval_prompt_file: str | None = doc(
        "JSONL/Parquet of held-out eval prompts (kind=prompt_file); null = hold out num_eval_prompts of the OPD "
        "prompt source. Eval prompts are removed from the SFT and OPD prompts either way.", None)
    difficulty: list[int] = doc(
        "Arithmetic: difficulty levels to draw problems from (jopd.data.arithmetic.DIFFICULTY_LEVELS): 1-3 mix "
        "+ - * expressions and word problems with up to 1, 2, 3 operations; 4 = sums of 3-5 terms 1..29.",
        default_factory=lambda: [1, 2])
    sft_difficulty: list[int] | None = doc(
        "Arithmetic: levels of the SFT prompts only (null = `difficulty`). Lets the OPD/eval prompts reach beyond "
        "what the SFT data covered, as in the paper (SFT and OPD prompts from different sources).", None)
    num_sft_prompts: int = doc("Prompts the SFT-data teacher answers.", 256)
    num_opd_prompts: int = doc("Prompts the SFT student makes rollouts for.", 128)
    num_eval_prompts: int = doc("Held-out prompts for evaluation (disjoint from the others).", 64)
    seed: int = doc("Seed of the problem generator / prompt-file shuffling.", 0)

    def problems(self, where: str) -> list[str]:
        """Own fields only; whether the prompt files exist is checked by `validate` (``check_files``)."""
        errors: list[str] = []
        if self.kind == "prompt_file":
            for split in ("sft", "opd"):
                if not (self.prompt_file or getattr(self, f"{split}_prompt_file")):
                    errors.append(f"{where}.prompt_file: required when {where}.kind is prompt_file and "
                                  f"{where}.{split}_prompt_file is not set")
                    break
        from jopd.data.arithmetic import DIFFICULTY_LEVELS

        known = f"{min(DIFFICULTY_LEVELS)}..{max(DIFFICULTY_LEVELS)}"
        for name in ("difficulty", "sft_difficulty"):
            levels = getattr(self, name)
            if levels is not None and not levels:
                errors.append(f"{where}.{name}: must list at least one level ({known})")
            for d in levels or []:
                if not isinstance(d, int) or isinstance(d, bool) or d not in DIFFICULTY_LEVELS:
                    errors.append(f"{where}.{name}: values must be {known}, got {d!r}")
        return errors


@dataclass
class RoutingSection:
    """Multi-teacher OPD (docs/multi-teacher.md): every prompt carries a route, the value of one of its fields, and
    each route has its teacher, which writes the SFT data of the route's prompts, scores their rollouts and is
    distilled on them."""

    field: str | None = doc(
        "The prompt field whose value is each prompt's route. Prompt files: a field of every row (a dotted path "
        "into nested objects allowed, e.g. `teacher`, `domain`, `data_source`, `extra_info.subject`; a string or "
        "integer). The arithmetic task: `level` (the difficulty level 1..4 the problem was drawn from), `kind` "
        "(`expr` or `word`) or `num_ops` (1..4). null = no routing: `sft_teacher` writes every SFT response and "
        "each arm has one `teacher`.", None)
    teachers: dict[str, str] = doc(
        "Route value -> teacher: the teacher that writes the SFT data of the route's prompts (the consistent "
        "teacher of that route), and the teacher every arm without its own `teachers` distils the route's "
        "prompts from. Every route value found in the prompts must be listed, and every listed route must have "
        "SFT, OPD and eval prompts.", default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.field is not None

    def problems(self, where: str) -> list[str]:
        """Own fields only; `validate` checks the teacher names and the task's fields."""
        if self.field is None:
            return [f"{where}.teachers: routes need {where}.field (the prompt field that holds each prompt's "
                    "route)"] if self.teachers else []
        errors = [] if self.field.strip() else [f"{where}.field: must name a prompt field, got {self.field!r}"]
        if not self.teachers:
            errors.append(f"{where}.teachers: must map at least one route value of {where}.field "
                          f"{self.field!r} to a teacher")
        return errors


@dataclass
class ArchSection:
    """A decoder built from scratch (teachers and students in the demo); vocab comes from the tokenizer."""

    model_type: Literal["llama", "qwen2", "qwen3", "qwen3_moe"] = doc("Decoder family.", "qwen3")
    hidden_size: int = doc("Model width.", 64)
    intermediate_size: int = doc("MLP width.", 192)
    num_layers: int = doc("Number of decoder layers.", 2)
    num_heads: int = doc("Query heads.", 4)
    num_kv_heads: int = doc("Key/value heads (GQA).", 2)
    head_dim: int = doc("Per-head width.", 16)
    tie_word_embeddings: bool = doc("Share the input embedding and output projection.", True)
    rope_theta: float = doc("RoPE base.", 10000.0)
    max_position_embeddings: int = doc("Longest sequence the model is meant for.", 512)
    rms_norm_eps: float = doc("RMSNorm epsilon (a student seeded from a teacher takes the teacher's).", 1e-6)
    num_experts: int = doc("qwen3_moe: routed experts.", 0)
    num_experts_per_tok: int = doc("qwen3_moe: experts per token.", 0)
    moe_intermediate_size: int = doc("qwen3_moe: expert MLP width.", 0)

    def problems(self, where: str) -> list[str]:
        errors: list[str] = []
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings"):
            errors += _positive(f"{where}.{name}", getattr(self, name))
        errors += _positive(f"{where}.rope_theta", self.rope_theta) + _positive(f"{where}.rms_norm_eps",
                                                                                 self.rms_norm_eps)
        if isinstance(self.num_heads, int) and isinstance(self.num_kv_heads, int) and self.num_kv_heads > 0 \
                and self.num_heads % self.num_kv_heads:
            errors.append(f"{where}.num_heads: must be a multiple of num_kv_heads {self.num_kv_heads}, "
                          f"got {self.num_heads}")
        if self.model_type == "qwen3_moe":
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
                errors += _positive(f"{where}.{name}", getattr(self, name))
            if self.num_experts_per_tok > self.num_experts > 0:
                errors.append(f"{where}.num_experts_per_tok: must be <= num_experts {self.num_experts}, "
                              f"got {self.num_experts_per_tok}")
        return errors


@dataclass
class OptimSection:
    lr: float = doc("Peak learning rate.", 1e-3)
    schedule: Literal["constant", "cosine", "linear"] = doc("Decay after warm-up.", "cosine")
    warmup_steps: int = doc("Linear warm-up steps.", 0)
    min_lr_ratio: float = doc("Final lr as a fraction of the peak (cosine/linear).", 0.1)
    weight_decay: float = doc("AdamW decoupled weight decay.", 0.0)
    b1: float = doc("Adam beta1.", 0.9)
    b2: float = doc("Adam beta2.", 0.98)
    eps: float = doc("Adam epsilon.", 1e-8)
    grad_clip: float = doc("Global gradient-norm clip (0 = off).", 1.0)

    def problems(self, where: str) -> list[str]:
        errors = (_positive(f"{where}.lr", self.lr)
                  + _positive(f"{where}.warmup_steps", self.warmup_steps, allow_zero=True)
                  + _positive(f"{where}.weight_decay", self.weight_decay, allow_zero=True)
                  + _positive(f"{where}.eps", self.eps)
                  + _positive(f"{where}.grad_clip", self.grad_clip, allow_zero=True))
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"{where}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for name, beta in (("b1", self.b1), ("b2", self.b2)):
            if not 0 <= beta < 1:
                errors.append(f"{where}.{name}: must be in [0, 1), got {beta}")
        return errors


@dataclass
class TrainLoop:
    steps: int = doc("Optimizer steps.", 100)
    batch_size: int = doc("Global batch size (sequences per optimizer step).", 16)
    micro_batch_size: int | None = doc(
        "Sequences per forward/backward; < batch_size = gradient accumulation. With token_budget: packed rows per "
        "forward/backward.", None)
    token_budget: int | None = doc(
        "Packed batches: token slots per optimizer step, as rows of `row_len` tokens each holding several whole "
        "sequences (segment-aware attention, per-sequence positions; the loss is the same estimator). The number "
        "of sequences per step then varies. null = `batch_size` sequences per step, each padded to the "
        "store's longest sequence (rounded up to 16).", None)
    row_len: int | None = doc("Tokens per packed row (with token_budget); null = the longest sequence rounded up "
                              "to 16.", None)
    checkpoint_every: int = doc("Save an Orbax checkpoint every N steps (and at the end).", 50)
    keep_checkpoints: int = doc("Checkpoints kept (older ones are deleted).", 2)
    async_checkpointing: bool = doc("Write checkpoints in a background thread.", True)
    log_every: int = doc("Log metrics every N steps.", 10)
    eval_every: int = doc("Evaluate (held-out loss / accuracy) every N steps; 0 = only at the end.", 0)

    def problems(self, where: str) -> list[str]:
        errors = (_positive(f"{where}.steps", self.steps) + _positive(f"{where}.batch_size", self.batch_size)
                  + _positive(f"{where}.keep_checkpoints", self.keep_checkpoints)
                  + _positive(f"{where}.eval_every", self.eval_every, allow_zero=True))
        micro = self.micro_batch_size
        if self.token_budget is None:
            if self.row_len is not None:
                errors.append(f"{where}.row_len: needs {where}.token_budget (packed batches)")
            if micro is not None and (micro <= 0 or self.batch_size % micro):
                errors.append(f"{where}.micro_batch_size: must divide batch_size {self.batch_size}, got {micro}")
            return errors
        errors += _positive(f"{where}.token_budget", self.token_budget)
        if self.row_len is None:
            # Rows per step depend on the data's longest sequence, known only when the batches are built.
            return errors + ([] if micro is None else _positive(f"{where}.micro_batch_size", micro))
        errors += _positive(f"{where}.row_len", self.row_len)
        if self.token_budget > 0 and self.row_len > 0:
            rows = self.token_budget // self.row_len
            if self.token_budget % self.row_len:
                errors.append(f"{where}.token_budget: must be a multiple of row_len {self.row_len}, "
                              f"got {self.token_budget}")
            elif micro is not None and (micro <= 0 or rows % micro):
                errors.append(f"{where}.micro_batch_size: with token_budget it counts packed rows and must divide "
                              f"token_budget // row_len = {rows}, got {micro}")
        return errors


@dataclass
class TeacherSection:
    path: str | None = doc("HF directory of the teacher; null = build it in-run (see init/style).", None)
    init: ArchSection | None = doc("Architecture of a teacher built in-run from scratch.", None)
    style: Literal["A", "B", "A2"] = doc(
        "Arithmetic task: solution style an in-run teacher is trained to write: A (steps left to right, "
        "`answer: X`), B (the expression rewritten after each step, `#### X`) or A2 (style A, with the terms of a "
        "sum of 3+ terms added left to right or right to left, one order per solution at random: a multi-modal "
        "teacher).", "A")
    pretrain: TrainLoop = doc("Training loop of an in-run teacher.", default_factory=TrainLoop)
    pretrain_optim: OptimSection = doc("Optimizer of an in-run teacher.", default_factory=OptimSection)
    pretrain_examples: int = doc("Solved problems an in-run teacher is trained on.", 4096)

    def problems(self, where: str) -> list[str]:
        """Own fields only; whether ``path`` is a model directory is checked by `validate` (``check_files``)."""
        errors: list[str] = []
        if self.path is None and self.init is None:
            errors.append(f"{where}: give either path (HF directory) or init (build in-run)")
        if self.path is not None and self.init is not None:
            errors.append(f"{where}: give path or init, not both")
        if self.init is not None:
            errors += self.init.problems(f"{where}.init")
        return (errors + self.pretrain.problems(f"{where}.pretrain")
                + self.pretrain_optim.problems(f"{where}.pretrain_optim")
                + _positive(f"{where}.pretrain_examples", self.pretrain_examples))


@dataclass
class StudentSection:
    path: str | None = doc("HF directory of the base student; null = random init from `init`.", None)
    init: ArchSection | None = doc("Architecture of a from-scratch student.", None)
    init_from_teacher_layers: str | None = doc(
        "Initialise the student from this teacher's embedding, norms and first num_layers layers.", None)

    def problems(self, where: str) -> list[str]:
        if self.path is None and self.init is None:
            return [f"{where}: give either path (HF directory) or init (random init)"]
        return self.init.problems(f"{where}.init") if self.init is not None else []


@dataclass
class SamplingSection:
    temperature: float = doc("Sampling temperature (0 = greedy).", 1.0)
    top_p: float = doc("Nucleus mass (1 = off).", 1.0)
    top_k: int = doc("Top-k (0 = off).", 0)
    max_new_tokens: int = doc("Response length limit (tokens, EOS included).", 64)
    batch_size: int = doc("Prompts per generate call.", 64)
    seed: int = doc("Sampling seed.", 0)

    def problems(self, where: str) -> list[str]:
        return (_sampling_problems(where, self.temperature, self.top_p, self.max_new_tokens)
                + _positive(f"{where}.top_k", self.top_k, allow_zero=True)
                + _positive(f"{where}.batch_size", self.batch_size))


@dataclass
class RolloutSection(SamplingSection):
    samples_per_prompt: int = doc("Responses sampled per OPD prompt.", 1)
    rows_per_chunk: int = doc("Store rows per TensorStore chunk (unit of writing and resuming).", 64)

    def problems(self, where: str) -> list[str]:
        return (super().problems(where) + _positive(f"{where}.samples_per_prompt", self.samples_per_prompt)
                + _positive(f"{where}.rows_per_chunk", self.rows_per_chunk))


@dataclass
class PrecomputeSection:
    teachers: list[str] = doc("Teachers that score the rollouts (each gets its own store).", default_factory=list)
    topk: int = doc("Also store the teacher's top-k (id, log-prob) per response position (0 = off), for the "
                    "top-k objectives (opd.loss_weights.topk_*): 4 + 8 k bytes per response token (516 at k = 64).",
                    0)
    batch_size: int = doc("Rows scored per forward pass.", 32)

    def problems(self, where: str) -> list[str]:
        """Own fields only; `validate` checks the teacher names."""
        return (_positive(f"{where}.topk", self.topk, allow_zero=True)
                + _positive(f"{where}.batch_size", self.batch_size))


@dataclass
class LoraSection:
    """LoRA / frozen-base training (docs/lora.md): each targeted projection W of the student becomes
    W + (alpha / rank) * A B and only the adapters A, B are trained (the base gets no gradient and no optimizer
    state); the trained student is saved merged (a normal HF directory) and its adapter alone (PEFT format)."""

    rank: int = doc("Adapter rank r; 0 = off (full fine-tuning).", 0)
    alpha: float = doc("The adapter adds (alpha / rank) * x A B (PEFT's lora_alpha).", 16.0)
    targets: list[str] = doc(
        "Projections adapted: any of q, k, v, o (attention) and gate, up, down (MLP; on qwen3_moe each expert's "
        "own projections, one adapter pair per expert; the router is never adapted).",
        default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    dropout: float = doc("Dropout on the adapter path's input in training updates (PEFT's lora_dropout; 0 = off).",
                         0.0)

    @property
    def enabled(self) -> bool:
        return isinstance(self.rank, int) and self.rank > 0

    def spec(self) -> Any:
        """The model-level :class:`jopd.models.config.LoraSpec` (None when off)."""
        from jopd.models.config import LoraSpec

        if not self.enabled:
            return None
        return LoraSpec(rank=self.rank, alpha=float(self.alpha), targets=tuple(self.targets),
                        dropout=float(self.dropout))

    def problems(self, where: str) -> list[str]:
        from jopd.models.config import LORA_TARGETS

        errors = _positive(f"{where}.rank", self.rank, allow_zero=True)
        if not self.enabled:
            return errors
        errors += _positive(f"{where}.alpha", self.alpha)
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            errors.append(f"{where}.targets: unknown projection(s) {unknown} (known: {', '.join(LORA_TARGETS)})")
        if not self.targets:
            errors.append(f"{where}.targets: must list at least one projection ({', '.join(LORA_TARGETS)})")
        if len(set(self.targets)) != len(self.targets):
            errors.append(f"{where}.targets: each projection at most once, got {self.targets}")
        if isinstance(self.dropout, int | float) and not 0 <= self.dropout < 1:
            errors.append(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        return errors


@dataclass
class SFTSection(TrainLoop):
    optim: OptimSection = doc("Optimizer.", default_factory=OptimSection)
    holdout_fraction: float = doc("Fraction of SFT examples held out for the held-out loss.", 0.05)
    # Out of the repr (the form in which the section enters the stage's fingerprint): the sft stage records it
    # when on, so existing run directories keep their fingerprints.
    lora: LoraSection = doc("LoRA SFT: the base student's adapters are trained, then merged into sft/model "
                            "(sft/adapter: the adapter alone); rank 0 = full fine-tuning.",
                            default_factory=LoraSection, repr=False)

    def problems(self, where: str) -> list[str]:
        errors = super().problems(where) + self.optim.problems(f"{where}.optim") + self.lora.problems(f"{where}.lora")
        if not 0 <= self.holdout_fraction < 1:
            errors.append(f"{where}.holdout_fraction: must be in [0, 1), got {self.holdout_fraction}")
        return errors


@dataclass
class LossWeightsSection:
    """Weights of an OPD arm's objectives: ``loss = sampled * surrogate + sum_kind topk_kind * D_kind``, every term
    aggregated over the response tokens with `opd.aggregation` (docs/topk-objectives.md)."""

    sampled: float = doc(
        "Sampled-token OPD (the paper's): a policy-gradient estimator. The PPO-clipped surrogate with the "
        "per-token advantage log p_teacher - log p_student of the ROLLOUT token, i.e. a single-sample "
        "(score-function) estimate of the reverse-KL gradient; uses only `teacher_logprobs`.", 1.0)
    topk_fkl: float = doc(
        "Direct (differentiable) forward KL(teacher ‖ student) at every response position over k + 1 buckets: "
        "the teacher's stored top-k ids and one tail bucket (exact gradient of that bucketed divergence, no "
        "sampling). Needs precompute.topk > 0; lightning arms only.", 0.0)
    topk_rkl: float = doc(
        "Direct reverse KL(student ‖ teacher) over the same top-k + tail buckets (the exact, not sampled, "
        "counterpart of `sampled`'s divergence on those buckets). Needs precompute.topk > 0; lightning arms "
        "only.", 0.0)
    topk_jsd: float = doc(
        "Direct generalized JSD(beta) = beta KL(T ‖ M) + (1 - beta) KL(S ‖ M), M = beta T + (1 - beta) S, over "
        "the same buckets (GKD/TRL convention; beta = `jsd_beta`). Needs precompute.topk > 0; lightning arms "
        "only.", 0.0)

    def problems(self, where: str) -> list[str]:
        errors: list[str] = []
        for name, value in dataclasses.asdict(self).items():
            errors += _positive(f"{where}.{name}", value, allow_zero=True)
        if all(isinstance(v, int | float) and v == 0 for v in dataclasses.asdict(self).values()):
            errors.append(f"{where}: at least one weight must be > 0")
        return errors

    @property
    def uses_topk(self) -> bool:
        return any(isinstance(v, int | float) and v > 0 for v in (self.topk_fkl, self.topk_rkl, self.topk_jsd))


def _jsd_beta_problems(where: str, beta: Any) -> list[str]:
    if isinstance(beta, int | float) and not 0 < beta < 1:
        return [f"{where}: must be in (0, 1) (the JSD vanishes at both ends; use topk_fkl / topk_rkl there), "
                f"got {beta}"]
    return []


@dataclass
class OPDSection(TrainLoop):
    optim: OptimSection = doc("Optimizer (paper: lr 2e-6 constant, b2 0.98, wd 0.1, clip 1).",
                              default_factory=lambda: OptimSection(lr=1e-4, schedule="constant", weight_decay=0.0))
    eps_low: float = doc("PPO clip: ratio lower bound 1 - eps_low.", 0.2)
    eps_high: float = doc("PPO clip: ratio upper bound 1 + eps_high.", 0.2)
    aggregation: Literal["token_mean", "seq_mean"] = doc(
        "Loss aggregation: token_mean over the batch or seq_mean (per-sequence token-mean, the paper's).", "seq_mean")
    normalize_advantages: bool = doc("Standardise advantages over the batch's response tokens.", False)
    kl_coef: float = doc("Coefficient of a k3 KL penalty to the SFT (reference) policy (0 = off, no ref pass).", 0.0)
    tis_cap: float | None = doc("Truncated importance weight cap to the behaviour policy (null = off).", None)
    shuffle: bool = doc("Shuffle the fixed rollouts each epoch (lightning arms).", True)
    # The objective fields stay out of the repr, the form in which the section enters stage fingerprints: the
    # stages record each arm's effective objective instead (jopd.arms.objective_inputs).
    loss_weights: LossWeightsSection = doc(
        "Objectives of every arm (an arm's own `loss_weights` replaces them): the sampled-token surrogate and/or "
        "the direct top-k divergences.", default_factory=LossWeightsSection, repr=False)
    jsd_beta: float = doc("beta of loss_weights.topk_jsd, in (0, 1): the mixture M = beta teacher + (1 - beta) "
                          "student; small beta ~ beta * forward KL, beta near 1 ~ (1 - beta) * reverse KL.", 0.5,
                          repr=False)
    # Out of the repr too (a run made before they existed keeps its fingerprints); the stages record them when
    # set (jopd.arms.ppo_inputs).
    ppo_epochs: int = doc(
        "PPO epochs per rollout batch: with ppo_epochs * mini_batches > 1 each batch gets that many optimizer "
        "updates, the PPO ratio taken against the log-probs at the batch's start (so the clip acts); 1 with "
        "mini_batches 1 = one fused update (ratio 1, the paper's). `steps` still counts batches; the lr "
        "schedule (and optim.warmup_steps) counts updates: steps * ppo_epochs * mini_batches. Epoch 1 takes "
        "the batch's rows in order, each later epoch a fixed permutation of them (from the run's seed).", 1,
        repr=False)
    mini_batches: int = doc(
        "Mini-batches (optimizer updates) per PPO epoch; must divide the batch's rows (batch_size, or packed "
        "rows token_budget // row_len), and micro_batch_size must divide a mini-batch's rows.", 1, repr=False)
    refresh_every: int = doc(
        "Refresh schedule of the lightning arms (an arm's own `refresh_every` replaces it): every N optimizer "
        "steps the CURRENT student re-samples rollouts (the `rollout` sampling settings, one per prompt, "
        "N * batch_size rows: the OPD prompts online steps sN+1 .. (s+1)N would take) and its teacher re-scores "
        "them, into a new store generation (arms/NAME/generations/GGGG/store, written, resumed and verified "
        "like the first). 0 = Lightning OPD (the fixed rollouts throughout); 1 = online OPD through stores. "
        "Steps 1 .. N train on the precomputed store (generation 0).", 0, repr=False)
    # Out of the repr too; the stages record each arm's adapters when on (jopd.arms.lora_inputs).
    lora: LoraSection = doc(
        "LoRA students for every arm (an arm's own `lora` replaces it): the SFT student's projections get fresh "
        "adapters and only they are trained; arms/NAME/model is the merged student (a normal HF directory), "
        "arms/NAME/adapter the adapter alone. rank 0 = full fine-tuning.", default_factory=LoraSection, repr=False)
    # Out of the repr too; the stages record it when set (jopd.arms.periodic_eval_inputs).
    eval_prompts: int | None = doc(
        "Held-out prompts of the periodic evaluation inside the arms (every `eval_every` steps, for the curves): "
        "the first N eval prompts; null = all of them. The eval stage evaluates every final model on all of "
        "them either way.", None, repr=False)

    def ppo_updates(self) -> int:
        """Optimizer updates per rollout batch."""
        return self.ppo_epochs * self.mini_batches

    def _ppo_problems(self, where: str) -> list[str]:
        errors = (_positive(f"{where}.ppo_epochs", self.ppo_epochs)
                  + _positive(f"{where}.mini_batches", self.mini_batches))
        m = self.mini_batches
        if errors or not isinstance(m, int) or m == 1:
            return errors
        if self.token_budget is None:
            rows, what = self.batch_size, f"batch_size {self.batch_size}"
        elif self.row_len and self.token_budget > 0 and self.row_len > 0:
            rows = self.token_budget // self.row_len
            what = f"the packed rows token_budget // row_len = {rows}"
        else:  # packed rows depend on the data; the step checks them when it is built
            return errors
        if not isinstance(rows, int) or rows <= 0:  # reported by TrainLoop's checks
            return errors
        if rows % m:
            return errors + [f"{where}.mini_batches: must divide {what}, got {m}"]
        micro = self.micro_batch_size
        if isinstance(micro, int) and micro > 0 and (rows // m) % micro:
            errors.append(f"{where}.mini_batches: a mini-batch of {rows // m} rows ({what} / mini_batches {m}) "
                          f"must be a multiple of {where}.micro_batch_size {micro}")
        return errors

    def problems(self, where: str) -> list[str]:
        return (super().problems(where) + self.optim.problems(f"{where}.optim") + self._ppo_problems(where)
                + self.loss_weights.problems(f"{where}.loss_weights")
                + _jsd_beta_problems(f"{where}.jsd_beta", self.jsd_beta)
                + _positive(f"{where}.eps_low", self.eps_low, allow_zero=True)
                + _positive(f"{where}.eps_high", self.eps_high, allow_zero=True)
                + _positive(f"{where}.kl_coef", self.kl_coef, allow_zero=True)
                + _positive(f"{where}.refresh_every", self.refresh_every, allow_zero=True)
                + ([] if self.eval_prompts is None else _positive(f"{where}.eval_prompts", self.eval_prompts))
                + self.lora.problems(f"{where}.lora")
                + ([] if self.tis_cap is None else _positive(f"{where}.tis_cap", self.tis_cap)))


@dataclass
class ArmSection:
    name: str = doc("Arm name (its outputs go to RUN_DIR/arms/NAME).", "lightning")
    mode: Literal["lightning", "online"] = doc("lightning: fixed rollouts + stored teacher log-probs; "
                                               "online: fresh rollouts scored by a live teacher each step.",
                                               "lightning")
    teacher: str = doc("Teacher whose log-probs define the advantage.", "A")
    allow_inconsistent_teacher: bool = doc(
        "Allow a teacher other than the SFT-data teacher (ablation): warn and record instead of refusing.", False)
    # Out of the repr like OPDSection's (the stages fingerprint the effective objective).
    loss_weights: LossWeightsSection | None = doc(
        "This arm's objectives, replacing opd.loss_weights (all four weights; omitted ones take their defaults); "
        "null = opd.loss_weights.", None, repr=False)
    jsd_beta: float | None = doc("This arm's JSD beta; null = opd.jsd_beta.", None, repr=False)
    refresh_every: int | None = doc("This lightning arm's refresh schedule (see opd.refresh_every); null = "
                                    "opd.refresh_every.", None, repr=False)
    # Out of the repr too: the stages record an arm's routes only when routing is on (jopd.multi_teacher).
    teachers: dict[str, str] | None = doc(
        "Multi-teacher runs (routing.field set): this arm's route -> teacher map, replacing routing.teachers (the "
        "same routes); `teacher` is then unused. A route whose teacher is not the one that wrote its SFT data is "
        "the inconsistent-teacher ablation (needs allow_inconsistent_teacher). null = routing.teachers.", None,
        repr=False)
    lora: LoraSection | None = doc("This arm's LoRA settings, replacing opd.lora (all four fields; omitted ones "
                                   "take their defaults, rank 0 = full fine-tuning); null = opd.lora.", None,
                                   repr=False)

    def refresh(self, opd: OPDSection) -> int:
        """Steps between refreshes of this arm's rollouts (0: never; online arms are not refreshed: they sample
        every step by construction)."""
        if self.mode != "lightning":
            return 0
        return self.refresh_every if self.refresh_every is not None else opd.refresh_every

    def lora_section(self, opd: OPDSection) -> LoraSection:
        """The arm's effective LoRA settings: its own, else opd's."""
        return self.lora if self.lora is not None else opd.lora

    def routes(self, routing: RoutingSection) -> dict[str, str]:
        """This arm's route -> teacher map ({} without routing)."""
        if not routing.enabled:
            return {}
        return dict(self.teachers if self.teachers is not None else routing.teachers)

    def objective(self, opd: OPDSection) -> tuple[LossWeightsSection, float]:
        """The arm's effective (loss_weights, jsd_beta): its own, else opd's."""
        return (self.loss_weights if self.loss_weights is not None else opd.loss_weights,
                self.jsd_beta if self.jsd_beta is not None else opd.jsd_beta)


@dataclass
class EvalSection:
    max_new_tokens: int = doc("Response length for evaluation.", 64)
    temperature: float = doc("Sampling temperature for accuracy (0 = greedy).", 0.0)
    top_p: float = doc("Nucleus (top-p) truncation of the accuracy samples (1 = off).", 1.0)
    samples_per_prompt: int = doc("Responses per prompt for accuracy (avg@k, as the paper reports); needs "
                                  "temperature > 0 when > 1.", 1)
    kl_samples: int = doc("Student samples per held-out prompt for the reverse-KL estimate (temperature 1).", 1)
    kl_teacher: str | None = doc("Teacher for reverse KL(student ‖ teacher); default: the SFT-data teacher.", None)
    batch_size: int = doc("Prompts per generate call.", 64)
    models: list[str] = doc("What to evaluate: base, sft, teacher:NAME, arm:NAME; empty = everything present.",
                            default_factory=list)

    def problems(self, where: str) -> list[str]:
        """Own fields only; `validate` checks the teacher named by ``kl_teacher``."""
        errors = _sampling_problems(where, self.temperature, self.top_p, self.max_new_tokens)
        if self.samples_per_prompt < 1:
            errors.append(f"{where}.samples_per_prompt: must be >= 1, got {self.samples_per_prompt}")
        elif self.samples_per_prompt > 1 and self.temperature == 0:
            errors.append(f"{where}.samples_per_prompt: {self.samples_per_prompt} responses per prompt need "
                          f"{where}.temperature > 0 (temperature 0 is greedy: one response)")
        if self.kl_samples < 1:
            errors.append(f"{where}.kl_samples: must be >= 1, got {self.kl_samples}")
        return errors + _positive(f"{where}.batch_size", self.batch_size)


@dataclass
class ExportSection:
    arm: str | None = doc("Arm whose final student is exported (default: the first arm).", None)
    dtype: Literal["float32", "bfloat16"] | None = doc("Weight dtype of the export (default: param dtype).", None)
    adapter: bool = doc("A LoRA arm: also write its adapter alone (PEFT format, for the SFT model) to "
                        "RUN_DIR/export/adapter; the export itself is always the merged model.", False, repr=False)


@dataclass
class WandbSection:
    enabled: bool = doc("Also log every training loop's metrics to Weights & Biases (needs `pip install "
                        "'jopd[wandb]'`); the JSONL and TensorBoard files are written either way.", False)
    project: str = doc("W&B project.", "jopd")
    entity: str | None = doc("W&B entity (user or team); null = your default.", None)
    group: str | None = doc("W&B group of the run's loops (one W&B run per loop: teacher_A, sft, arm_NAME); "
                            "null = the run directory's name.", None)
    mode: Literal["online", "offline"] = doc(
        "online: stream to the server; offline: write under RUN_DIR/wandb only (upload later with `wandb sync`).",
        "online")
    tags: list[str] = doc("W&B tags of every loop's run.", default_factory=list)

    def problems(self, where: str) -> list[str]:
        import importlib.util

        if self.enabled and importlib.util.find_spec("wandb") is None:
            return [f"{where}.enabled: the wandb package is not installed (pip install 'jopd[wandb]')"]
        return []


@dataclass
class LoggingSection:
    wandb: WandbSection = doc("Weights & Biases.", default_factory=WandbSection)

    def problems(self, where: str) -> list[str]:
        return self.wandb.problems(f"{where}.wandb")


@dataclass
class TokenizerSection:
    path: str | None = doc("HF tokenizer directory; null = the student's directory, else a built-in char "
                           "tokenizer for the arithmetic task.", None)


@dataclass
class Config:
    run_dir: str = doc("Directory of every stage's outputs, logs, metrics and the resolved config.", "runs/default")
    seed: int = doc("Global seed (initialisation, shuffling).", 0)
    seeds: list[int] = doc(
        "Replicates: run the whole pipeline once per seed S into RUN_DIR/seed_S with `seed` = S (in-run teachers, "
        "student, SFT, rollouts and arms all re-drawn; the prompts stay those of task.seed), then write "
        "RUN_DIR/report.md over them: mean +- 95% t interval over seeds and each arm's paired difference to the "
        "SFT student. Empty = one run with `seed` in RUN_DIR.", default_factory=list)
    stages: list[str] = doc(f"Stages to run, in pipeline order; any of {', '.join(STAGES)}.",
                            default_factory=lambda: list(STAGES))
    mesh: MeshSection = doc("Device mesh.", default_factory=MeshSection)
    distributed: DistributedSection = doc("Multi-process runtime.", default_factory=DistributedSection)
    precision: PrecisionSection = doc("Dtypes and memory settings of every model.", default_factory=PrecisionSection)
    tokenizer: TokenizerSection = doc("Tokenizer.", default_factory=TokenizerSection)
    task: TaskSection = doc("Prompts and answer checking.", default_factory=TaskSection)
    teachers: dict[str, TeacherSection] = doc("Teachers by name.", default_factory=dict)
    student: StudentSection = doc("The base student.", default_factory=StudentSection)
    sft_teacher: str = doc("The teacher that writes the SFT data (the consistent teacher); with routing, "
                           "routing.teachers names one per route instead.", "A")
    teacher_data: SamplingSection = doc("Teacher sampling of SFT responses.",
                                        default_factory=lambda: SamplingSection(temperature=0.7, top_p=0.9))
    sft: SFTSection = doc("SFT of the base student on the teacher's responses.", default_factory=SFTSection)
    rollout: RolloutSection = doc("The SFT student's rollouts for the OPD prompts.", default_factory=RolloutSection)
    precompute: PrecomputeSection = doc("Teacher scoring of every rollout token.", default_factory=PrecomputeSection)
    opd: OPDSection = doc("OPD training settings shared by every arm.", default_factory=OPDSection)
    routing: RoutingSection = doc("Multi-teacher OPD: prompts routed to teachers by one of their fields.",
                                  default_factory=RoutingSection)
    arms: list[ArmSection] = doc("OPD arms (lightning and/or online).", default_factory=lambda: [ArmSection()])
    eval: EvalSection = doc("Evaluation.", default_factory=EvalSection)
    export: ExportSection = doc("HF export of a trained student.", default_factory=ExportSection)
    logging: LoggingSection = doc("Experiment tracking beside the JSONL/TensorBoard metrics (never a stage input).",
                                  default_factory=LoggingSection)

    def for_seed(self, seed: int) -> Config:
        """Seed ``seed`` of a seeds run: the same config with ``seed`` set, in RUN_DIR/seed_S, without ``seeds``."""
        return dataclasses.replace(self, seed=seed, seeds=[], run_dir=os.path.join(self.run_dir, f"seed_{seed}"))

    def arm(self, name: str) -> ArmSection:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"no arm named {name!r}; arms: {[a.name for a in self.arms]}")


# ---- generic dataclass <- dict conversion with error collection ---------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, where, errors)
        for a in non_none:
            trial: list[str] = []
            out = _convert(a, value, where, trial)
            if not trial:
                return out
        errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping ({tp.__name__}), got {type(value).__name__}")
            return tp()
        return _from_dict(tp, value, where, errors)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {value!r}")
            return []
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return {}
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{where}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _from_dict(cls: type, data: dict, where: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            errors.append(f"{where + '.' if where else ''}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where + '.' if where else ''}{f.name}", errors)
    try:
        return cls(**kwargs)
    except TypeError as e:
        errors.append(f"{where or 'config'}: {e}")
        return cls()


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


# ---- overrides ----------------------------------------------------------------------------------------
def apply_override(data: dict, assignment: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) into the nested dict ``data``; list items by index (arms.0.teacher)."""
    if "=" not in assignment:
        raise ConfigValidationError("command line", [f"override {assignment!r}: expected key.sub=value"])
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as err:
        detail = str(getattr(err, "problem", None) or err).strip()
        raise ConfigValidationError("command line", [
            f"override {assignment!r}: the value {raw!r} is not valid YAML ({detail}); quote it to pass a "
            "string"]) from None
    node: Any = data
    parts = key.strip().split(".")
    try:
        for p in parts[:-1]:
            if isinstance(node, list):
                node = node[int(p)]
            else:
                if not isinstance(node.get(p), dict | list):
                    node[p] = {}
                node = node[p]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    except (ValueError, IndexError, AttributeError, TypeError):
        raise ConfigValidationError("command line", [
            f"override {assignment!r}: {key.strip()!r} does not name a config field (list items by index, "
            "e.g. arms.0.teacher, within the list's length)"]) from None


def _run_dir_problems(run_dir: str) -> list[str]:
    """The run directory must be a directory, or creatable: its nearest existing ancestor a writable directory."""
    if os.path.exists(run_dir):
        if not os.path.isdir(run_dir):
            return [f"run_dir: {run_dir!r} exists and is not a directory"]
        if not os.access(run_dir, os.W_OK):
            return [f"run_dir: {run_dir!r} is not writable"]
        return []
    parent = os.path.dirname(os.path.abspath(run_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return [f"run_dir: {run_dir!r} cannot be created: {parent!r} is a file, not a directory"]
    if not os.access(parent, os.W_OK):
        return [f"run_dir: {run_dir!r} cannot be created: {parent!r} is not writable"]
    return []


# ---- cross-section checks ----------------------------------------------------------------------------------
def _section_problems(cfg: Config) -> list[str]:
    """Every section's checks of its own fields, each problem under its dotted path."""
    errors: list[str] = []
    for name in ("mesh", "distributed", "precision", "task", "student", "teacher_data", "sft", "rollout",
                 "precompute", "opd", "routing", "eval", "logging"):
        errors += getattr(cfg, name).problems(name)
    for name, t in cfg.teachers.items():
        errors += t.problems(f"teachers.{name}")
    return errors


def _routing_problems(cfg: Config) -> list[str]:
    """Multi-teacher runs: the route maps name known teachers and the same routes, the task can route on the
    field, and every teacher that scores rollouts is given some route."""
    r = cfg.routing
    if not r.enabled:
        return [f"arms[{i}].teachers: a route -> teacher map needs routing.field (multi-teacher OPD); use "
                "`teacher` for a one-teacher arm" for i, a in enumerate(cfg.arms) if a.teachers is not None]
    errors = [f"routing.teachers.{route}: unknown teacher {t!r} (teachers: {sorted(cfg.teachers)})"
              for route, t in r.teachers.items() if t not in cfg.teachers]
    if cfg.task.kind == "arithmetic" and r.field and r.field.strip():
        from jopd.data.arithmetic import ROUTE_FIELDS

        values = ROUTE_FIELDS.get(r.field)
        if values is None:
            errors.append(f"routing.field: the arithmetic task routes by {', '.join(sorted(ROUTE_FIELDS))}, "
                          f"got {r.field!r}")
        else:
            errors += [f"routing.teachers.{route}: {route!r} is not a value of the arithmetic task's "
                       f"{r.field!r} (values: {', '.join(values)})" for route in r.teachers if route not in values]
    scored: set[str] = set(r.teachers.values())
    for i, a in enumerate(cfg.arms):
        if a.teachers is None:
            continue
        for route, t in a.teachers.items():
            if t not in cfg.teachers:
                errors.append(f"arms[{i}].teachers.{route}: unknown teacher {t!r} (teachers: {sorted(cfg.teachers)})")
        if set(a.teachers) != set(r.teachers):
            missing, extra = sorted(set(r.teachers) - set(a.teachers)), sorted(set(a.teachers) - set(r.teachers))
            errors.append(f"arms[{i}].teachers: must map the routes of routing.teachers ({sorted(r.teachers)})"
                          + (f"; missing {missing}" if missing else "") + (f"; not routes: {extra}" if extra else ""))
        if a.mode == "lightning":
            scored |= set(a.teachers.values())
    if "precompute" in cfg.stages and r.teachers:
        for t in cfg.precompute.teachers:
            if t in cfg.teachers and t not in scored:
                errors.append(f"precompute.teachers: teacher {t!r} is given no route (routing.teachers, the "
                              "lightning arms' teachers), so it would score no rollout; remove it")
    return errors


def validate(cfg: Config, base_dir: str = ".", check_files: bool = True) -> list[str]:
    """Each section's own checks, the checks across sections and (with ``check_files``) file existence.

    Returns the problems, each starting with its dotted path (empty = valid)."""
    errors: list[str] = []
    for s in cfg.stages:
        if s not in STAGES:
            errors.append(f"stages: unknown stage {s!r} (known: {', '.join(STAGES)})")
    order = [s for s in STAGES if s in cfg.stages]
    if order != [s for s in cfg.stages if s in STAGES]:
        errors.append(f"stages: must be in pipeline order {list(STAGES)}")
    errors += _section_problems(cfg)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in cfg.seeds):
        errors.append(f"seeds: must be non-negative integers, got {cfg.seeds}")
    elif len(set(cfg.seeds)) != len(cfg.seeds):
        errors.append(f"seeds: each seed at most once, got {cfg.seeds}")

    def path_ok(where: str, p: str | None, kind: str = "any") -> None:
        if p is None or not check_files:
            return
        full = p if os.path.isabs(p) else os.path.join(base_dir, p)
        if kind == "dir" and not os.path.isdir(full):
            errors.append(f"{where}: directory {p!r} does not exist")
        elif kind == "file" and not os.path.isfile(full):
            errors.append(f"{where}: file {p!r} does not exist")
        elif kind == "hf" and not os.path.isfile(os.path.join(full, "config.json")):
            errors.append(f"{where}: {p!r} is not a Hugging Face model directory (no config.json)")

    if check_files:
        errors += _run_dir_problems(cfg.run_dir if os.path.isabs(cfg.run_dir) else os.path.join(base_dir, cfg.run_dir))
    path_ok("tokenizer.path", cfg.tokenizer.path, "dir")
    if cfg.task.kind == "prompt_file":
        for key in ("prompt_file", "sft_prompt_file", "opd_prompt_file", "eval_prompt_file"):
            path_ok(f"task.{key}", getattr(cfg.task, key), "file")
    if not cfg.teachers:
        errors.append("teachers: at least one teacher is required")
    for name, t in cfg.teachers.items():
        path_ok(f"teachers.{name}.path", t.path, "hf")
        if t.init is not None and cfg.task.kind != "arithmetic":
            errors.append(f"teachers.{name}.init: in-run teachers need task.kind=arithmetic")
    path_ok("student.path", cfg.student.path, "hf")
    if cfg.student.init_from_teacher_layers and cfg.student.init_from_teacher_layers not in cfg.teachers:
        errors.append(f"student.init_from_teacher_layers: unknown teacher {cfg.student.init_from_teacher_layers!r}")
    routed = cfg.routing.enabled
    if cfg.teachers and cfg.sft_teacher not in cfg.teachers and not routed:
        errors.append(f"sft_teacher: {cfg.sft_teacher!r} is not one of the teachers {sorted(cfg.teachers)}")
    errors += _routing_problems(cfg)
    for t in cfg.precompute.teachers:
        if t not in cfg.teachers:
            errors.append(f"precompute.teachers: unknown teacher {t!r} (teachers: {sorted(cfg.teachers)})")
    names = [a.name for a in cfg.arms]
    if len(set(names)) != len(names):
        errors.append(f"arms: names must be unique, got {names}")
    for i, a in enumerate(cfg.arms):
        if a.teacher not in cfg.teachers and not routed:
            errors.append(f"arms[{i}].teacher: unknown teacher {a.teacher!r}")
        if a.loss_weights is not None:
            errors += a.loss_weights.problems(f"arms[{i}].loss_weights")
        if a.jsd_beta is not None:
            errors += _jsd_beta_problems(f"arms[{i}].jsd_beta", a.jsd_beta)
        if a.refresh_every is not None:
            errors += _positive(f"arms[{i}].refresh_every", a.refresh_every, allow_zero=True)
            if a.mode != "lightning" and a.refresh_every:
                errors.append(f"arms[{i}].refresh_every: a refresh schedule is for lightning arms; an online arm "
                              f"({a.name}) samples fresh rollouts every step already (use mode: lightning with "
                              "refresh_every: 1 for online OPD through stores)")
        weights, _ = a.objective(cfg.opd)
        if weights.uses_topk:
            where = f"arms[{i}] ({a.name}): top-k objectives (loss_weights.topk_*)"
            if a.mode != "lightning":
                errors.append(f"{where} need the stored teacher top-k of lightning arms; an online arm's live "
                              "teacher scores only the sampled tokens (set its topk_* weights to 0)")
            elif cfg.precompute.topk <= 0:
                errors.append(f"{where} need precompute.topk > 0 (the teacher's stored top-k ids/log-probs)")
        if a.mode == "lightning" and "train" in cfg.stages:
            for route, t in (a.routes(cfg.routing).items() if routed else [(None, a.teacher)]):
                if t not in cfg.precompute.teachers:
                    what = f"teacher {t!r} of route {route!r}" if routed else f"teacher {a.teacher!r}"
                    errors.append(f"arms[{i}] ({a.name}): lightning arm's {what} is not in precompute.teachers")
    if cfg.export.arm is not None and cfg.export.arm not in names:
        errors.append(f"export.arm: unknown arm {cfg.export.arm!r} (arms: {names})")
    for i, a in enumerate(cfg.arms):
        if a.lora is not None:
            errors += a.lora.problems(f"arms[{i}].lora")
    exported = next((a for a in cfg.arms if a.name == (cfg.export.arm or names[0])), None) if names else None
    if cfg.export.adapter and exported is not None and not exported.lora_section(cfg.opd).enabled:
        errors.append(f"export.adapter: the exported arm {exported.name!r} has no LoRA adapter (its lora.rank is 0; "
                      "set opd.lora or the arm's lora)")
    if cfg.eval.kl_teacher is not None and cfg.eval.kl_teacher not in cfg.teachers:
        errors.append(f"eval.kl_teacher: unknown teacher {cfg.eval.kl_teacher!r}")
    return errors


def load_config(path: str | None = None, overrides: Sequence[str] = (), *, data: dict | None = None,
                check_files: bool = True) -> Config:
    """Read, override, type-check and validate a config. Raises ConfigValidationError listing every problem."""
    source = path or "config"
    if data is None:
        if path is None:
            raise ValueError("load_config needs a path or data")
        if not os.path.isfile(path):
            raise ConfigValidationError(source, [f"config file {path!r} does not exist"])
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigValidationError(source, [f"invalid YAML: {e}"]) from e
    if not isinstance(data, dict):
        raise ConfigValidationError(source, ["top level must be a mapping"])
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    problems: list[str] = []
    for o in overrides:
        try:
            apply_override(data, o)
        except ConfigValidationError as e:
            problems += e.problems
    cfg = _from_dict(Config, data, "", problems)
    if not problems:
        # Relative paths in a config are relative to the working directory the CLI runs in.
        problems += validate(cfg, base_dir=".", check_files=check_files)
    if problems:
        raise ConfigValidationError(source, problems)
    return cfg


def config_reference(cls: type = Config, prefix: str = "") -> list[str]:
    """Markdown table rows documenting every field (docs/config.md)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        default = (f.default if f.default is not dataclasses.MISSING else
                   (f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
        inner = [a for a in (typing.get_args(tp) or ()) if dataclasses.is_dataclass(a)]
        nested = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if nested is not None:
            rows.append(f"| `{key}` | {_type_name(tp).replace('|', 'or')} | | {f.metadata.get('doc', '')} |")
            rows += config_reference(nested, key + ("[].", ".", ".NAME.")[
                2 if typing.get_origin(tp) is dict else (0 if typing.get_origin(tp) is list else 1)])
        else:
            d = "" if dataclasses.is_dataclass(default) else f"`{default!r}`".replace("|", "\\|")
            rows.append(f"| `{key}` | {_type_name(tp).replace('|', 'or')} | {d} | {f.metadata.get('doc', '')} |")
    return rows


def main() -> None:
    print("# Configuration reference\n")
    print("Generated by `python -m jopd.config`. Keys are dotted paths in the YAML; any can be overridden on the")
    print("command line as `key.sub=value` (list items by index: `arms.0.teacher=B`).\n")
    print("| key | type | default | meaning |\n|---|---|---|---|")
    print("\n".join(config_reference()))


if __name__ == "__main__":
    main()
    sys.exit(0)
