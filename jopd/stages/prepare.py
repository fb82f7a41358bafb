"""Stage ``prepare``: tokenizer, prompt splits, in-run teachers and the base student, under RUN_DIR/prepare.

- tokenizer: the configured one, else the student's, else a character tokenizer built for the arithmetic task;
- prompts/{sft,opd,eval}.jsonl: ``{"prompt", "label", "prompt_ids"}`` (chat-templated ids: the exact ids every
  later stage uses; text is never re-tokenised downstream), plus ``"route"`` in multi-teacher runs
  (``routing.field``; jopd.data.routing.assign_routes refuses unmapped routes and routes without prompts);
- teachers/NAME: in-run teachers (``init`` set) are trained from scratch (``jopd.training.supervised``) on
  solutions written in their ``style``, saved as HF directories and loaded back like any teacher;
- student_base: a from-scratch student, randomly initialised or seeded from a teacher's embedding, norms and
  first layers (``student.init_from_teacher_layers``).
Every model's tokenizer must map the same ids to the same tokens as the run's tokenizer.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from jopd.data import arithmetic
from jopd.data import tokenizer as toklib
from jopd.data.routing import ROUTE, assign_routes
from jopd.data.splits import load_problems
from jopd.data.store import write_sequences
from jopd.io import atomic_write_json, atomic_write_jsonl
from jopd.models import ModelConfig, from_params, init_params, save_pretrained
from jopd.pipeline import Run, StageError, barrier, check_tokenizer
from jopd.training import supervised

log = logging.getLogger("jopd")


def arch_to_config(arch: Any, tokenizer: Any, precision: Any) -> ModelConfig:
    """A ModelConfig for a from-scratch model whose vocabulary is the tokenizer's (rows padded to 16)."""
    eos_ids = tuple(sorted({toklib.end_of_turn_id(tokenizer)}
                           | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())))
    return ModelConfig(
        model_type=arch.model_type, vocab_size=-(-len(tokenizer) // 16) * 16, hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_layers=arch.num_layers, num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_norm_eps, max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings, attention_bias=arch.model_type == "qwen2",
        qk_norm=arch.model_type in ("qwen3", "qwen3_moe"), num_experts=arch.num_experts,
        num_experts_per_tok=arch.num_experts_per_tok, moe_intermediate_size=arch.moe_intermediate_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
        param_dtype=precision.param_dtype, compute_dtype=precision.compute_dtype, remat=precision.remat,
        attention_impl=precision.attention_impl, logits_chunk_size=precision.logits_chunk_size)


def _refuse_unknown_tokens(tok: Any, problems: dict[str, list[arithmetic.Problem]],
                           encoded: dict[str, list[list[int]]]) -> None:
    """A prompt the tokenizer can only encode with its unknown token would train and score garbage: refused,
    naming the prompts (file and line when they come from a prompt file) and the characters."""
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return
    bad = [(split, p) for split, probs in problems.items() for p, ids in zip(probs, encoded[split]) if unk in ids]
    if not bad:
        return
    chars = sorted({c for _, p in bad for c in p.prompt if tok.convert_tokens_to_ids(c) == unk})
    where = []
    for split, p in bad[:3]:
        src = f"{p.meta['source']}:{p.meta['line']}" if "source" in p.meta and "line" in p.meta else repr(p.prompt[:40])
        where.append(f"{split} prompt {src}")
    raise StageError(
        f"{len(bad)} prompt(s) contain text the tokenizer has no token for (it would become {tok.unk_token!r}): "
        f"{', '.join(where)}{' ...' if len(bad) > 3 else ''}; characters {''.join(chars)!r}. Use a tokenizer "
        "that covers them (tokenizer.path) or remove them from the prompt file")


def _student_from_teacher(student_cfg: ModelConfig, run: Run, teacher: str) -> dict:
    """Student params seeded with a teacher's embedding/norms/first layers (widths must match)."""
    t = run.load_model(run.layout.teacher(teacher))
    for field in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        if getattr(t.config, field) != getattr(student_cfg, field):
            raise StageError(f"student.init_from_teacher_layers: student {field}={getattr(student_cfg, field)} "
                             f"differs from the teacher's {getattr(t.config, field)}")
    if student_cfg.num_layers > t.config.num_layers:
        raise StageError("student.init_from_teacher_layers: the student has more layers than the teacher")
    host = jax.device_get(t.params)
    params = {k: v for k, v in host.items() if k != "layers"}
    params["layers"] = jax.tree.map(lambda x: x[: student_cfg.num_layers], host["layers"])
    if student_cfg.tie_word_embeddings:
        params.pop("lm_head", None)
    elif "lm_head" not in params:
        params["lm_head"] = host["embedding"].T.copy()
    return params


def _train_teacher(run: Run, name: str, section: Any) -> None:
    """Train an in-run teacher from scratch on solutions in its style and save it as an HF directory."""
    cfg, tok, layout = run.cfg, run.tokenizer, run.layout
    mcfg = arch_to_config(section.init, tok, cfg.precision)
    seed = cfg.seed * 7919 + sum(map(ord, name))
    problems = arithmetic.make_problems("sft", section.pretrain_examples, 10_000 + seed,
                                        max(cfg.task.difficulty + (cfg.task.sft_difficulty or [])))
    prompts = [toklib.encode_chat_prompt(tok, p.prompt) for p in problems]
    responses = [toklib.encode_response(tok, arithmetic.solve(p, section.style)) for p in problems]
    work = layout.pretrain_work(name)
    n = len(prompts)
    held = np.random.default_rng([seed, 7]).permutation(n)[: min(max(round(n * 0.05), 1), n - 1)]
    train_rows = sorted(set(range(len(prompts))) - set(held.tolist()))
    if run.is_main:
        write_sequences(work / "store", [prompts[i] for i in train_rows], [responses[i] for i in train_rows])
        write_sequences(work / "heldout_store", [prompts[i] for i in held], [responses[i] for i in held])
    barrier(f"teacher-{name}-data")
    log.info("prepare: training in-run teacher %s (style %s, %d params, %d examples)", name, section.style,
             mcfg.num_params(), len(prompts))
    model = from_params(mcfg, init_params(mcfg, seed), mesh=run.mesh)
    model, _ = supervised(model, train_store=work / "store", heldout_store=work / "heldout_store",
                          loop=section.pretrain, optim=section.pretrain_optim, seed=seed, ckpt_dir=work / "ckpt",
                          logger=run.metrics_logger(f"teacher_{name}"),
                          name=f"teacher_{name}", hooks=run.hooks)
    save_pretrained(model, layout.teacher(name), tokenizer_dir=str(layout.tokenizer))
    barrier(f"teacher-{name}")


def inputs(run: Run) -> dict[str, Any]:
    c = run.cfg
    external = {f"teacher:{n}": run.fingerprint(t.path) for n, t in c.teachers.items() if t.path}
    if c.student.path:
        external["student"] = run.fingerprint(c.student.path)
    routing = {"routing": c.routing} if c.routing.enabled else {}  # one-teacher runs keep their fingerprint
    return {"seed": c.seed, "tokenizer": c.tokenizer, "task": c.task, "teachers": c.teachers,
            "student": c.student, "param_dtype": c.precision.param_dtype, "external_models": external, **routing}


def execute(run: Run) -> dict[str, Any]:
    cfg, layout = run.cfg, run.layout
    if layout.tokenizer == layout.built_tokenizer:
        if not (layout.built_tokenizer / "tokenizer.json").is_file() and run.is_main:
            toklib.build_char_tokenizer(layout.built_tokenizer)
        barrier("tokenizer")
    tok = run.tokenizer

    problems = load_problems(cfg)
    routes = {split: [None] * len(probs) for split, probs in problems.items()}
    if cfg.routing.enabled:  # multi-teacher: every prompt's route, each with a teacher and prompts in every split
        routes = assign_routes(problems, task_kind=cfg.task.kind, field=cfg.routing.field,
                               routes=cfg.routing.teachers)
    encoded = {split: [toklib.encode_chat_prompt(tok, p.prompt) for p in probs] for split, probs in problems.items()}
    _refuse_unknown_tokens(tok, problems, encoded)
    if run.is_main:
        for split, probs in problems.items():
            atomic_write_jsonl(layout.prompts(split), [
                {"prompt": p.prompt, "label": p.answer, "prompt_ids": ids, **({ROUTE: r} if r is not None else {})}
                for p, ids, r in zip(probs, encoded[split], routes[split])])

    summary: dict[str, Any] = {"teachers": {}}
    for name, t in cfg.teachers.items():
        if t.path is None and not (layout.teacher(name) / "config.json").is_file():
            _train_teacher(run, name, t)
        check_tokenizer(run, layout.teacher(name), f"teacher {name!r}")
        summary["teachers"][name] = {"path": str(layout.teacher(name)), "fingerprint": run.fingerprint(layout.teacher(name))}

    student_dir = layout.student_base
    if cfg.student.path is None and not (student_dir / "config.json").is_file():
        scfg = arch_to_config(cfg.student.init, tok, cfg.precision)
        if cfg.student.init_from_teacher_layers:
            # The copied layers only make sense with the teacher's normalisation and positions.
            tcfg = ModelConfig.from_pretrained(layout.teacher(cfg.student.init_from_teacher_layers))
            scfg = scfg.replace(rms_norm_eps=tcfg.rms_norm_eps, rope_theta=tcfg.rope_theta,
                                rope_type=tcfg.rope_type, rope_scaling=tcfg.rope_scaling)
            params = _student_from_teacher(scfg, run, cfg.student.init_from_teacher_layers)
        else:
            params = init_params(scfg, cfg.seed)
        save_pretrained(from_params(scfg, params, mesh=run.mesh), student_dir, tokenizer_dir=str(layout.tokenizer))
        barrier("student-base")
    check_tokenizer(run, student_dir, "student")
    summary["student_base"] = {"path": str(student_dir), "fingerprint": run.fingerprint(student_dir)}
    summary["tokenizer"] = {"path": str(layout.tokenizer), "fingerprint": toklib.tokenizer_fingerprint(tok)}
    summary["prompts"] = {k: len(v) for k, v in problems.items()}
    if cfg.routing.enabled:
        summary["prompts_per_route"] = {split: {r: rs.count(r) for r in sorted(set(rs))} for split, rs in routes.items()}
    if run.is_main:
        atomic_write_json(layout.stage("prepare") / "summary.json", summary)
    return summary
