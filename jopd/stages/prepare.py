"""Stage ``prepare``: tokenizer, prompt splits, teachers and the base student, as files in RUN_DIR/prepare.

- tokenizer: the configured one, else the student's, else a character tokenizer built for the arithmetic task;
- prompts/{sft,opd,eval}.jsonl: ``{"prompt", "label", "prompt_ids"}`` (chat-templated ids: the exact ids every
  later stage uses; text is never re-tokenised downstream);
- teachers/NAME: in-run teachers (``init`` set) are trained from scratch on solutions written in their
  ``style`` and saved as HF directories, then loaded back through the normal HF path like any teacher;
- student_base: a from-scratch student (``student.init``), randomly initialised or seeded from a teacher's
  embedding, norms and first layers (``student.init_from_teacher_layers``).
Every model's tokenizer must map the same ids to the same tokens as the run's tokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jopd.config import ArchSection, Config
from jopd.data import tasks
from jopd.data import tokenizer as toklib
from jopd.models import ModelConfig, from_params, init_params, save_pretrained
from jopd.stages.base import RunContext, Stage, StageError, atomic_write_json

log = logging.getLogger("jopd")


def arch_to_config(arch: ArchSection, tokenizer: Any, precision: Any) -> ModelConfig:
    """A ModelConfig for a from-scratch model whose vocabulary is the tokenizer's (rows padded to 16)."""
    vocab = len(tokenizer)
    eos = toklib.end_of_turn_id(tokenizer)
    eos_ids = tuple(sorted({eos} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())))
    return ModelConfig(
        model_type=arch.model_type, vocab_size=-(-vocab // 16) * 16, hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_layers=arch.num_layers, num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_norm_eps,
        max_position_embeddings=arch.max_position_embeddings, tie_word_embeddings=arch.tie_word_embeddings,
        attention_bias=arch.model_type == "qwen2", qk_norm=arch.model_type in ("qwen3", "qwen3_moe"),
        num_experts=arch.num_experts, num_experts_per_tok=arch.num_experts_per_tok,
        moe_intermediate_size=arch.moe_intermediate_size, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, param_dtype=precision.param_dtype,
        compute_dtype=precision.compute_dtype, remat=precision.remat, attention_impl=precision.attention_impl,
        logits_chunk_size=precision.logits_chunk_size,
    )


def load_problems(cfg: Config) -> dict[str, list[tasks.Problem]]:
    """SFT / OPD / eval problems for the configured task (eval always disjoint from the others)."""
    t = cfg.task
    if t.kind == "arithmetic":
        out: dict[str, list[tasks.Problem]] = {}
        counts = {"sft": t.num_sft_prompts, "opd": t.num_opd_prompts, "eval": t.num_eval_prompts}
        for split, n in counts.items():
            levels = t.sft_difficulty if split == "sft" and t.sft_difficulty else t.difficulty
            # Spread the problems evenly over the configured difficulty levels.
            per = [n // len(levels) + (i < n % len(levels)) for i in range(len(levels))]
            probs: list[tasks.Problem] = []
            for level, k in zip(levels, per):
                probs += tasks.make_problems(split, k, t.seed * 1000 + level, level)
            rng = np.random.default_rng(t.seed)
            out[split] = [probs[i] for i in rng.permutation(len(probs))]
        return out
    train = tasks.load_prompt_file(t.prompt_file, dedupe=True)
    rng = np.random.default_rng(t.seed)
    order = rng.permutation(len(train))
    train = [train[i] for i in order]
    if t.eval_prompt_file:
        evals = tasks.load_prompt_file(t.eval_prompt_file, dedupe=True)[: t.num_eval_prompts]
    else:
        evals, train = train[: t.num_eval_prompts], train[t.num_eval_prompts:]
    eval_prompts = {p.prompt for p in evals}
    train = [p for p in train if p.prompt not in eval_prompts]
    need = t.num_sft_prompts + t.num_opd_prompts
    if len(train) < min(need, 1):
        raise StageError(f"task.prompt_file {t.prompt_file}: no training prompts left after the eval split")
    sft = train[: t.num_sft_prompts]
    opd = train[t.num_sft_prompts: t.num_sft_prompts + t.num_opd_prompts] or train[: t.num_opd_prompts]
    return {"sft": sft, "opd": opd, "eval": evals}


def read_prompts(ctx: RunContext, split: str) -> list[dict[str, Any]]:
    """Rows ``{"prompt", "label", "prompt_ids"}`` of a prompt split written by this stage."""
    path = ctx.stage_dir("prepare") / "prompts" / f"{split}.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def _check_tokenizer(ctx: RunContext, model_dir: Path, what: str) -> None:
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        return  # weights only: the run's tokenizer is used with it
    other = toklib.load_tokenizer(str(model_dir))
    try:
        toklib.check_same_vocab(ctx.tokenizer, other, name_a=f"run tokenizer ({ctx.tokenizer_dir()})",
                                name_b=f"{what} ({model_dir})")
    except toklib.VocabMismatchError as e:
        raise StageError(str(e)) from e


def _student_from_teacher(cfg_student: ModelConfig, teacher_dir: Path, ctx: RunContext) -> dict:
    """Student params seeded with a teacher's embedding/norms/first layers (widths must match)."""
    teacher = ctx.load_model(teacher_dir)
    tcfg = teacher.config
    for field in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        if getattr(tcfg, field) != getattr(cfg_student, field):
            raise StageError(f"student.init_from_teacher_layers: student {field}={getattr(cfg_student, field)} "
                             f"differs from the teacher's {getattr(tcfg, field)}")
    if cfg_student.num_layers > tcfg.num_layers:
        raise StageError("student.init_from_teacher_layers: the student has more layers than the teacher")
    host = jax.device_get(teacher.params)
    params = {k: v for k, v in host.items() if k != "layers"}
    params["layers"] = jax.tree.map(lambda x: x[: cfg_student.num_layers], host["layers"])
    if cfg_student.tie_word_embeddings:
        params.pop("lm_head", None)
    elif "lm_head" not in params:
        params["lm_head"] = host["embedding"].T.copy()
    return params


class PrepareStage(Stage):
    name = "prepare"

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        c = ctx.cfg
        external = {f"teacher:{n}": ctx.model_fingerprint(t.path) for n, t in c.teachers.items() if t.path}
        if c.student.path:
            external["student"] = ctx.model_fingerprint(c.student.path)
        return {"seed": c.seed, "tokenizer": c.tokenizer, "task": c.task, "teachers": c.teachers,
                "student": c.student, "param_dtype": c.precision.param_dtype, "external_models": external}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg = ctx.cfg
        sdir = ctx.stage_dir(self.name)
        if not cfg.tokenizer.path and not cfg.student.path:
            tok_dir = sdir / "tokenizer"
            if not (tok_dir / "tokenizer.json").is_file() and ctx.is_main_process:
                toklib.build_char_tokenizer(tok_dir)
            ctx.sync("tokenizer")
        tok = ctx.tokenizer

        # Prompt splits, encoded once with the chat template.
        problems = load_problems(cfg)
        if ctx.is_main_process:
            for split, probs in problems.items():
                rows = [{"prompt": p.prompt, "label": p.answer,
                         "prompt_ids": toklib.encode_chat_prompt(tok, p.prompt)} for p in probs]
                _write_jsonl(sdir / "prompts" / f"{split}.jsonl", rows)

        # Teachers: external ones are checked, in-run ones trained (resumably) and exported.
        from jopd.stages.sft import train_supervised

        summary: dict[str, Any] = {"teachers": {}}
        for name, t in cfg.teachers.items():
            out_dir = ctx.teacher_dir(name)
            if t.path is None and not (out_dir / "config.json").is_file():
                mcfg = arch_to_config(t.init, tok, cfg.precision)
                rng_seed = cfg.seed * 7919 + sum(map(ord, name))
                model = from_params(mcfg, init_params(mcfg, rng_seed), mesh=ctx.mesh)
                train_probs = tasks.make_problems("sft", t.pretrain_examples, 10_000 + rng_seed,
                                                  max(cfg.task.difficulty + (cfg.task.sft_difficulty or [])))
                examples = [(toklib.encode_chat_prompt(tok, p.prompt),
                             toklib.encode_response(tok, tasks.solve(p, t.style))) for p in train_probs]
                log.info("prepare: training in-run teacher %s (style %s, %d params, %d examples)",
                         name, t.style, mcfg.num_params(), len(examples))
                model, _ = train_supervised(ctx, name=f"teacher_{name}", model=model, examples=examples,
                                            loop=t.pretrain, optim=t.pretrain_optim,
                                            work_dir=sdir / "work" / f"teacher_{name}", holdout_fraction=0.05,
                                            seed=rng_seed)
                save_pretrained(model, out_dir, tokenizer_dir=str(ctx.tokenizer_dir()))
                ctx.sync(f"teacher-{name}")
            _check_tokenizer(ctx, out_dir, f"teacher {name!r}")
            summary["teachers"][name] = {"path": str(out_dir), "fingerprint": ctx.teacher_fingerprint(name)}

        # Base student.
        student_dir = ctx.student_base_dir()
        if cfg.student.path is None and not (student_dir / "config.json").is_file():
            scfg = arch_to_config(cfg.student.init, tok, cfg.precision)
            if cfg.student.init_from_teacher_layers:
                tdir = ctx.teacher_dir(cfg.student.init_from_teacher_layers)
                # The copied layers only make sense with the teacher's normalisation and positions.
                tcfg = ModelConfig.from_pretrained(tdir)
                scfg = scfg.replace(rms_norm_eps=tcfg.rms_norm_eps, rope_theta=tcfg.rope_theta,
                                    rope_type=tcfg.rope_type, rope_scaling=tcfg.rope_scaling)
                params = _student_from_teacher(scfg, tdir, ctx)
            else:
                params = init_params(scfg, cfg.seed)
            save_pretrained(from_params(scfg, params, mesh=ctx.mesh), student_dir,
                            tokenizer_dir=str(ctx.tokenizer_dir()))
            ctx.sync("student-base")
        _check_tokenizer(ctx, student_dir, "student")
        summary["student_base"] = {"path": str(student_dir), "fingerprint": ctx.model_fingerprint(student_dir)}
        summary["tokenizer"] = {"path": str(ctx.tokenizer_dir()), "fingerprint": toklib.tokenizer_fingerprint(tok)}
        summary["prompts"] = {k: len(v) for k, v in problems.items()}
        if ctx.is_main_process:
            atomic_write_json(sdir / "summary.json", summary)
        return summary


STAGE = PrepareStage()
