"""Tests for the SFT loop and the OPD stages (train = Lightning OPD, online = standard OPD).

Upstream outputs are fabricated (tiny random models, fake DONE.json records, a RolloutStore of random rows),
so these tests do not depend on the teacher_data / rollout / precompute stages.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from jopd import sharding, training
from jopd.config import (
    ArchSection,
    ConfigValidationError,
    OptimSection,
    PrecisionSection,
    TrainLoop,
    load_config,
)
from jopd.data import tokenizer as toklib
from jopd.data.store import RolloutStore, write_sequences
from jopd.io import atomic_write_json, read_json
from jopd.layout import RunLayout
from jopd.loop import Hook, MetricsLogger, TrainingError
from jopd.models import from_params, init_params, load_pretrained, save_pretrained
from jopd.pipeline import Run, StageError, run_stage
from jopd.stages import online as online_mod
from jopd.stages import stage
from jopd.stages import train as train_mod
from jopd.stages.prepare import arch_to_config

ARCH = ArchSection(model_type="qwen3", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                   num_kv_heads=1, head_dim=16, max_position_embeddings=256)
N_ROWS, MAX_LEN, RPC = 16, 64, 8


class Interrupt(RuntimeError):
    pass


class InterruptAt(Hook):
    """Simulates a crash right after step ``step`` (and its checkpoint, when one is due) of any loop."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, loop, row) -> None:
        if loop.step == self.step:
            raise Interrupt


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory):
    """A persistent XLA compilation cache for this module only.

    Each run of a stage builds fresh jitted steps for the same tiny model; on 2 CPU cores compiling them
    dominates the runtime, and the cache turns every recompilation of an identical program into a load.
    """
    from jax._src import compilation_cache as cc

    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    cc.reset_cache()  # the cache is set up once per process: re-read the settings above
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()


@pytest.fixture(scope="module")
def mesh():
    return sharding.single_device_mesh()


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, mesh) -> Path:
    """Tokenizer + tiny models (teachers A and B, the SFT student), built once and copied into each run."""
    root = tmp_path_factory.mktemp("assets")
    tok_dir = toklib.build_char_tokenizer(root / "tokenizer")
    tok = toklib.load_tokenizer(str(tok_dir))
    mcfg = arch_to_config(ARCH, tok, PrecisionSection())
    # One init (each init_params call compiles); the other models are independent random perturbations of it.
    base = jax.device_get(init_params(mcfg, 1))
    for name, seed in (("A", 0), ("B", 2), ("student", 3)):
        rng = np.random.default_rng(seed)
        params = jax.tree.map(lambda x: x + (0.02 * rng.standard_normal(x.shape)).astype(x.dtype) if seed else x,
                              base)
        save_pretrained(from_params(mcfg, params, mesh=mesh), root / name, tokenizer_dir=str(tok_dir))
    return root


def _config(run_dir: Path, arms: list[dict[str, Any]], **opd: Any) -> Any:
    arch = {k: getattr(ARCH, k) for k in ("model_type", "hidden_size", "intermediate_size", "num_layers",
                                          "num_heads", "num_kv_heads", "head_dim")}
    data = {
        "run_dir": str(run_dir), "seed": 3,
        "teachers": {"A": {"init": arch}, "B": {"init": arch, "style": "B"}},
        "student": {"init": arch}, "sft_teacher": "A",
        "precompute": {"teachers": ["A", "B"]},
        "rollout": {"temperature": 1.0, "max_new_tokens": 8},
        "opd": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1,
                "eval_every": 0, "async_checkpointing": True, "optim": {"lr": 3e-3, "schedule": "constant"},
                **opd},
        "eval": {"max_new_tokens": 8, "batch_size": 8},
        "arms": arms,
    }
    return load_config(data=data)


def _write_store(path: Path, vocab: int, attrs: dict[str, Any], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    store = RolloutStore.create(path, num_rows=N_ROWS, max_len=MAX_LEN, rows_per_chunk=RPC, attrs=attrs)
    for c in range(store.num_chunks):
        n = RPC
        plen = rng.integers(5, 12, n)
        rlen = rng.integers(3, 20, n)
        tokens = rng.integers(6, vocab, (n, MAX_LEN))
        tokens[np.arange(MAX_LEN)[None, :] >= (plen + rlen)[:, None]] = 0
        store.write_rollout_chunk(c, tokens=tokens, prompt_len=plen, response_len=rlen,
                                  behaviour_logprobs=-rng.random((n, MAX_LEN)) * 3 - 0.1,
                                  ended_with_eos=np.ones(n, bool), truncated=np.zeros(n, bool),
                                  prompt_index=np.arange(c * RPC, c * RPC + n), sample_index=np.zeros(n, np.int32))
        store.write_teacher_chunk(c, -rng.random((n, MAX_LEN)) * 3 - 0.1)


def make_run(root: Path, assets: Path, mesh, arms: list[dict[str, Any]], **opd: Any) -> Run:
    """A run directory with prepare / teacher_data / sft / precompute outputs fabricated."""
    run_dir = root / "run"
    prep = run_dir / "prepare"
    shutil.copytree(assets / "tokenizer", prep / "tokenizer")
    for name in ("A", "B"):
        shutil.copytree(assets / name, prep / "teachers" / name)
    shutil.copytree(assets / "student", prep / "student_base")
    shutil.copytree(assets / "student", run_dir / "sft" / "model")
    cfg = _config(run_dir, arms, **opd)
    ctx = Run(cfg, RunLayout.for_config(cfg), mesh)
    tok = ctx.tokenizer
    for split, n in (("opd", 12), ("eval", 4)):
        rows = [{"prompt": f"{i}+{i + 1}", "label": str(2 * i + 1),
                 "prompt_ids": toklib.encode_chat_prompt(tok, f"{i}+{i + 1}")} for i in range(n)]
        (prep / "prompts").mkdir(parents=True, exist_ok=True)
        (prep / "prompts" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fp_a = ctx.fingerprint(ctx.layout.teacher("A"))
    tok_fp = toklib.tokenizer_fingerprint(tok)
    sft_out = {"sft_teacher_name": "A", "sft_teacher_fingerprint": fp_a,
               "model_fingerprint": ctx.fingerprint(ctx.layout.sft_model)}
    atomic_write_json(run_dir / "sft" / "meta.json", sft_out)
    for name, outputs in (("prepare", {}), ("teacher_data", {"teacher_name": "A", "teacher_fingerprint": fp_a}),
                           ("sft", sft_out), ("precompute", {})):
        atomic_write_json(run_dir / name / "DONE.json", {"fingerprint": f"fp-{name}", "inputs": {},
                                                          "outputs": outputs})
    vocab = len(tok)
    for i, name in enumerate(("A", "B")):
        _write_store(run_dir / "precompute" / name / "store", vocab,
                     {"kind": "rollout", "teacher_name": name,
                      "teacher_fingerprint": ctx.fingerprint(ctx.layout.teacher(name)),
                      "tokenizer_fingerprint": tok_fp, "sft_teacher_fingerprint": fp_a,
                      "logprob_temperature": 1.0, "topk": 0}, seed=i)
    return ctx


def arm_params(ctx: Run, arm: str) -> dict:
    return jax.device_get(load_pretrained(ctx.layout.arm_model(arm), mesh=ctx.mesh).params)


def metric_rows(ctx: Run, name: str) -> list[dict[str, Any]]:
    path = ctx.layout.metrics(name)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LIGHT = [{"name": "light", "mode": "lightning", "teacher": "A"}]


# ---------------------------------------------------------------------------------------------- SFT loop
def _toy_examples(tok: Any, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        digits = "".join(rng.choice(list("0123456789"), rng.integers(2, 6)))
        out.append((toklib.encode_chat_prompt(tok, digits), toklib.encode_response(tok, digits + "=" + digits)))
    return out


def _supervised_data(tmp_path: Path, tok: Any) -> tuple[Path, Path]:
    examples = _toy_examples(tok, 96, 0)
    train, held = examples[:86], examples[86:]
    write_sequences(tmp_path / "train_store", [p for p, _ in train], [r for _, r in train], rows_per_chunk=32)
    write_sequences(tmp_path / "held_store", [p for p, _ in held], [r for _, r in held])
    return tmp_path / "train_store", tmp_path / "held_store"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_supervised_learns_and_resumes_identically(tmp_path: Path, assets: Path, mesh, packed: bool) -> None:
    tok = toklib.load_tokenizer(str(assets / "tokenizer"))
    train_store, held_store = _supervised_data(tmp_path, tok)
    # Packed: 4 rows of 64 token slots per step (several sequences each) instead of 8 padded sequences.
    loop = TrainLoop(steps=40, batch_size=8, micro_batch_size=2 if packed else 4, checkpoint_every=10,
                     keep_checkpoints=2, eval_every=20, log_every=5, token_budget=256 if packed else None,
                     row_len=64 if packed else None)

    def run(work: str, hooks=()) -> tuple[dict, dict]:
        model = load_pretrained(assets / "student", mesh=mesh)
        out, summary = training.supervised(model, train_store=train_store, heldout_store=held_store, loop=loop,
                                           optim=OptimSection(lr=1e-2, warmup_steps=4), seed=0,
                                           ckpt_dir=tmp_path / work / "ckpt",
                                           logger=MetricsLogger(tmp_path / "metrics" / f"{work}.jsonl"), name=work,
                                           hooks=hooks)
        return jax.device_get(out.params), summary

    ref, summary = run("a")
    assert summary["heldout_loss_final"] < summary["heldout_loss_initial"] - 0.5, summary
    assert summary["packed"] is packed
    rows = [json.loads(x) for x in (tmp_path / "metrics" / "a.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "heldout_loss" in r] == [0, 20, 40]
    assert {"loss", "grad_norm", "lr", "tokens/s"} <= set(next(r for r in rows if "loss" in r))
    assert sorted(int(p.name) for p in (tmp_path / "a" / "ckpt").iterdir() if p.name.isdigit()) == [30, 40]

    with pytest.raises(Interrupt):
        run("b", hooks=[InterruptAt(25)])
    resumed, summary_b = run("b")  # restores step 20 with the loader's position, continues the data order
    assert summary_b["resumed_from_step"] == 20
    assert summary_b["heldout_loss_initial"] == summary["heldout_loss_initial"]
    jax.tree.map(np.testing.assert_array_equal, ref, resumed)
    rows_b = [json.loads(x) for x in (tmp_path / "metrics" / "b.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b if "loss" in r] == [r["step"] for r in rows if "loss" in r]


# ---------------------------------------------------------------------------------------- Lightning OPD
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_lightning_resume_gives_identical_params(tmp_path: Path, assets: Path, mesh, packed: bool) -> None:
    budget = {"token_budget": 128, "row_len": 64} if packed else {}
    ref_ctx = make_run(tmp_path / "ref", assets, mesh, LIGHT, eval_every=2, **budget)
    ref_out = run_stage(stage("train"), ref_ctx)
    ref = arm_params(ref_ctx, "light")

    ctx = make_run(tmp_path / "int", assets, mesh, LIGHT, eval_every=2, **budget)
    crashing = Run(ctx.cfg, ctx.layout, ctx.mesh, hooks=(InterruptAt(3),))
    with pytest.raises(Interrupt):
        run_stage(stage("train"), crashing)
    assert not ctx.layout.done("train").exists()
    out = run_stage(stage("train"), ctx)  # STARTED with the same fingerprint -> resumes from step 2
    assert out["arms"]["light"]["resumed_from_step"] == 2
    jax.tree.map(np.testing.assert_array_equal, ref, arm_params(ctx, "light"))

    rows = metric_rows(ctx, "arm_light")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_rows] == [0, 2, 4]
    assert all(r["time_s"] >= 0 and "eval/reverse_kl" in r for r in eval_rows)
    want = {"loss", "advantage_mean", "reverse_kl", "clip_frac", "grad_norm", "entropy_est", "behaviour_ratio_mean",
            "behaviour_ratio_max", "behaviour_ess", "tokens/s", "time_s", "step_s", "update_s", "data_s"}
    assert want <= set(train_rows[0])
    assert np.isclose(train_rows[0]["reverse_kl"], -train_rows[0]["advantage_mean"], atol=1e-5)
    assert [r["time_s"] for r in train_rows] == sorted(r["time_s"] for r in train_rows)
    meta = read_json(ctx.layout.arm_meta("light"))
    assert meta["consistent_teacher"] is True and meta["mode"] == "lightning"
    assert ref_out["arms"]["light"]["final_metrics"]["loss"] == pytest.approx(meta["final_metrics"]["loss"])
    assert (ctx.layout.arm_model("light") / "config.json").is_file()


def test_inconsistent_teacher_refused_then_allowed(tmp_path: Path, assets: Path, mesh) -> None:
    ctx = make_run(tmp_path / "r", assets, mesh, [{"name": "abl", "mode": "lightning", "teacher": "B"}])
    fp_a, fp_b = ctx.fingerprint(ctx.layout.teacher("A")), ctx.fingerprint(ctx.layout.teacher("B"))
    with pytest.raises(StageError) as e:
        train_mod.execute(ctx)
    msg = str(e.value)
    assert fp_a in msg and fp_b in msg and "'A'" in msg and "'B'" in msg and "allow_inconsistent_teacher" in msg

    ctx.cfg.arms[0].allow_inconsistent_teacher = True
    ctx.cfg.opd.steps = 2
    out = train_mod.execute(ctx)
    assert out["arms"]["abl"]["consistent_teacher"] is False
    assert read_json(ctx.layout.arm_meta("abl"))["consistent_teacher"] is False


def test_tokenizer_mismatch_refused(tmp_path: Path, assets: Path, mesh) -> None:
    ctx = make_run(tmp_path / "r", assets, mesh, LIGHT)
    store = RolloutStore.open(ctx.layout.teacher_store("A"), "r+")
    store.update_attrs({"tokenizer_fingerprint": "0" * 64})
    with pytest.raises(StageError, match="tokenizer fingerprint"):
        train_mod.execute(ctx)


def test_corrupt_store_refused(tmp_path: Path, assets: Path, mesh) -> None:
    ctx = make_run(tmp_path / "r", assets, mesh, LIGHT)
    chunk = ctx.layout.teacher_store("A") / "teacher_logprobs" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])  # truncated
    with pytest.raises(StageError, match="corrupt") as e:
        run_stage(stage("train"), ctx)
    assert "teacher_logprobs" in str(e.value)


def test_nan_teacher_logprob_names_the_step(tmp_path: Path, assets: Path, mesh) -> None:
    ctx = make_run(tmp_path / "r", assets, mesh, LIGHT)
    store = RolloutStore.open(ctx.layout.teacher_store("A"), "r+")
    rows = store.read_rows(range(N_ROWS), ["teacher_logprobs", "prompt_len"])
    lp = rows["teacher_logprobs"]
    lp[np.arange(N_ROWS), rows["prompt_len"]] = np.nan  # first response token of every row
    for c in range(store.num_chunks):
        # write_teacher_chunk rightly refuses NaN; go underneath it to simulate a bad scorer with a valid marker.
        store._commit("teacher", c, {"teacher_logprobs": lp[c * RPC:(c + 1) * RPC]})
    with pytest.raises(TrainingError, match=r"arm 'light'.*step 1.*store rows \["):
        run_stage(stage("train"), ctx)


# ------------------------------------------------------------------------------------------- online OPD
def test_online_arm_runs_and_times_phases(tmp_path: Path, assets: Path, mesh) -> None:
    ctx = make_run(tmp_path / "r", assets, mesh, [{"name": "onl", "mode": "online", "teacher": "A"}], steps=2)
    assert train_mod.execute(ctx) == {"arms": {}}  # no lightning arm
    out = online_mod.execute(ctx)["arms"]["onl"]
    phases = out["seconds_per_step_by_phase"]
    assert {"gen_s", "score_s", "update_s"} <= set(phases) and all(v > 0 for v in phases.values())
    rows = metric_rows(ctx, "arm_onl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["gen_s"] > 0 and r["score_s"] > 0 and r["update_s"] > 0 for r in rows)
    assert out["consistent_teacher"] is True and out["tokens"] > 0
    assert (ctx.layout.arm_ckpt("onl") / "2").is_dir()


def test_periodic_evaluation_on_the_first_eval_prompts(tmp_path: Path, assets: Path, mesh) -> None:
    """opd.eval_prompts: the arms' periodic evaluation takes the first N of the 4 eval prompts; the stage inputs
    record it only when set (run directories made before it keep their fingerprints)."""
    onl = [{"name": "onl", "mode": "online", "teacher": "A"}]
    ctx = make_run(tmp_path / "r", assets, mesh, onl, steps=2, eval_every=2, eval_prompts=3)
    assert online_mod.inputs(ctx)["periodic_eval_prompts"] == 3
    assert train_mod.inputs(make_run(tmp_path / "l", assets, mesh, LIGHT, eval_prompts=3))["periodic_eval_prompts"] == 3
    online_mod.execute(ctx)
    evals = [r for r in metric_rows(ctx, "arm_onl") if "eval/num_prompts" in r]
    assert [r["step"] for r in evals] == [0, 2] and all(r["eval/num_prompts"] == 3 for r in evals)
    plain = make_run(tmp_path / "p", assets, mesh, onl, steps=2)
    assert "periodic_eval_prompts" not in online_mod.inputs(plain)
    with pytest.raises(ConfigValidationError, match="opd.eval_prompts: must be > 0, got 0"):
        _config(tmp_path / "x", onl, eval_prompts=0)


def test_online_batches_are_a_function_of_the_step(tmp_path: Path, assets: Path, mesh) -> None:
    """Batch s depends only on (seed, s): prompts cycle in fresh per-pass permutations, seeds derive from s."""
    ctx = make_run(tmp_path / "r", assets, mesh, [{"name": "onl", "mode": "online", "teacher": "A"}])
    prompts = [{"prompt_ids": [1, 2, 3 + i]} for i in range(6)]
    student = load_pretrained(ctx.layout.sft_model, mesh=mesh)
    batches = training.OnlineBatches(prompts, student, student, batch_size=4, seed=3, sampling=ctx.cfg.rollout,
                                     stop_ids=(2,))
    first_pass = batches.prompt_indices(1) + batches.prompt_indices(2)[:2]
    assert sorted(first_pass) == list(range(6))  # one pass covers every prompt once
    assert batches.prompt_indices(2) == training.OnlineBatches(
        prompts, student, student, batch_size=4, seed=3, sampling=ctx.cfg.rollout, stop_ids=(2,)).prompt_indices(2)


# -------------------------------------------------------------------------------------------- sft stage
def test_sft_stage_exports_model_and_meta(tmp_path: Path, assets: Path, mesh) -> None:
    ctx = make_run(tmp_path / "r", assets, mesh, LIGHT)
    shutil.rmtree(ctx.layout.sft_model)
    ctx.layout.done("sft").unlink()
    ctx.cfg.sft.steps, ctx.cfg.sft.batch_size, ctx.cfg.sft.checkpoint_every = 3, 4, 2
    fp_a = ctx.fingerprint(ctx.layout.teacher("A"))
    atomic_write_json(ctx.layout.teacher_data_meta, {"teacher_name": "A", "teacher_fingerprint": fp_a})
    rows = [{"prompt": p, "label": "", "prompt_ids": ids, "response_ids": resp, "response_text": "",
             "ended_with_eos": True} for p, (ids, resp) in
            zip("abcdefghijkl", _toy_examples(ctx.tokenizer, 12, 3), strict=True)]
    ctx.layout.sft_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_stage(stage("sft"), ctx)
    assert out["sft_teacher_name"] == "A" and out["sft_teacher_fingerprint"] == fp_a
    assert out["model_fingerprint"] == ctx.fingerprint(ctx.layout.sft_model)
    assert read_json(ctx.layout.sft_meta)["steps"] == 3
    assert (ctx.layout.sft_model / "tokenizer.json").is_file()
    assert RolloutStore.open(ctx.layout.sft_store).num_rows == 11  # one of the 12 rows is held out
