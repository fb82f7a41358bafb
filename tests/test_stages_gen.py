"""The generation stages (teacher_data, rollout, precompute) on a tiny fabricated run.

The upstream stages (prepare, sft) are replaced by fakes that write what those stages would: the character
tokenizer, prompt splits, random-init teachers and an "SFT" student (random too), with real DONE.json records made
by `run_stage`. Checked: exact ids from the sampler end up on disk, stored rows / log-probs equal what `generate` /
`token_logprobs` give, interrupted-and-resumed stages leave byte-identical outputs, bad inputs are refused
(tokenizer mismatch, corrupted store, changed settings) and finished stages are skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from jopd.config import load_config
from jopd.data import tokenizer as toklib
from jopd.data.store import RolloutStore, StoreCorruptError
from jopd.io import atomic_write_json, read_json, read_jsonl
from jopd.layout import RunLayout
from jopd.models import from_params, hidden_states, init_params, save_pretrained, token_logprobs
from jopd.pipeline import Run, Stage, StageError, derive_seed, run_stage, store_fingerprint
from jopd.sampling import generate
from jopd.sharding import MeshConfig, make_mesh
from jopd.stages import stage as stage_named
from jopd.stages import teacher_data
from jopd.stages.prepare import arch_to_config

ARCH = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
        "num_kv_heads": 1, "head_dim": 16, "max_position_embeddings": 128, "tie_word_embeddings": False}
PROMPTS = {"sft": ["1+2", "3*4", "5-1", "7+8", "2*2+1", "9-3"],
           "opd": ["4+4", "6*2", "8-5", "1+1+1", "3*3", "7-2"],
           "eval": ["2+5"]}
BASE_DATA: dict[str, Any] = {
    "teachers": {"A": {"init": ARCH}, "B": {"init": ARCH}},
    "student": {"init": ARCH},
    # Sizes keep every generate call at 3-4 rows (one compiled row bucket per stage).
    "teacher_data": {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 10, "batch_size": 3, "seed": 3},
    # 6 prompts x 2 samples = 12 rows in chunks of 4; precompute batches of 3 leave a padded partial batch.
    "rollout": {"temperature": 1.0, "max_new_tokens": 10, "batch_size": 4, "samples_per_prompt": 2,
                "rows_per_chunk": 4, "seed": 5},
    "precompute": {"teachers": ["A", "B"], "batch_size": 3},
    "arms": [{"name": "lightning", "teacher": "A"}],
}
# One mesh object for every context: compiled programs are cached per mesh, so tests share compilations.
MESH = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, expert=1), devices=jax.devices()[:1])
GEN_STAGES = tuple(stage_named(n) for n in ("teacher_data", "rollout", "precompute"))


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_ctx(run_dir: Path, **over: Any) -> Run:
    cfg = load_config(data=_merge({**BASE_DATA, "run_dir": str(run_dir)}, over))
    return Run(cfg, RunLayout.for_config(cfg), MESH)


def read_prompts(ctx: Run, split: str) -> list[dict[str, Any]]:
    return read_jsonl(ctx.layout.prompts(split))


def teacher_fp(ctx: Run, name: str) -> str:
    return ctx.fingerprint(ctx.layout.teacher(name))


_BASE_PARAMS: dict[Any, Any] = {}


@functools.partial(jax.jit, static_argnums=1)
def _hidden(params, config, tokens):
    return hidden_states(params, config, tokens)


def _save_random_model(ctx: Run, out_dir: Path, seed: int) -> None:
    """A random model whose stop id comes up now and then (so both EOS and truncated rows occur)."""
    mcfg = arch_to_config(ctx.cfg.student.init, ctx.tokenizer, ctx.cfg.precision)
    if mcfg not in _BASE_PARAMS:  # one init compile; models differ by the noise added below
        _BASE_PARAMS[mcfg] = jax.device_get(init_params(mcfg, 0))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: x + np.float32(0.02) * rng.standard_normal(x.shape, np.float32),
                          _BASE_PARAMS[mcfg])
    # Spread the logits so that sampling is far from uniform, then give the stop id the output column of the
    # token this model favours most on average (minus a little), so stopping is likely but not certain.
    head = params["lm_head"] * 10.0
    eos = toklib.end_of_turn_id(ctx.tokenizer)
    tokens = np.array([toklib.encode_chat_prompt(ctx.tokenizer, "12+34*5")], np.int32)
    mean_logits = np.asarray(_hidden({**params, "lm_head": head}, mcfg, tokens))[0].mean(0) @ head
    mean_logits[eos] = -np.inf
    head[:, eos] = head[:, int(np.argmax(mean_logits))] * 0.9
    params = {**params, "lm_head": head}
    save_pretrained(from_params(mcfg, params, mesh=ctx.mesh), out_dir, tokenizer_dir=str(ctx.layout.tokenizer))


def _fake_prepare(ctx: Run) -> dict[str, Any]:
    """Writes what `prepare` would: tokenizer, prompt splits, two random-init teachers."""
    toklib.build_char_tokenizer(ctx.layout.built_tokenizer)
    tok = ctx.tokenizer
    for split, texts in PROMPTS.items():
        rows = [{"prompt": t, "label": str(eval(t)), "prompt_ids": toklib.encode_chat_prompt(tok, t)} for t in texts]
        ctx.layout.prompts(split).parent.mkdir(parents=True, exist_ok=True)
        ctx.layout.prompts(split).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i, name in enumerate(ctx.cfg.teachers):
        _save_random_model(ctx, ctx.layout.teacher(name), seed=10 + i)
    return {}


def _fake_sft(ctx: Run) -> dict[str, Any]:
    """Writes what `sft` would: sft/model (here a random init) and the SFT teacher's fingerprint."""
    _save_random_model(ctx, ctx.layout.sft_model, seed=20)
    fp = teacher_fp(ctx, ctx.cfg.sft_teacher)
    atomic_write_json(ctx.layout.sft_meta, {"sft_teacher_name": ctx.cfg.sft_teacher, "sft_teacher_fingerprint": fp})
    return {"sft_teacher_fingerprint": fp}


FAKE_PREPARE = Stage("prepare", lambda ctx: {"prompts": PROMPTS, "arch": ARCH}, _fake_prepare)
FAKE_SFT = Stage("sft", lambda ctx: {"prepare": ctx.upstream("prepare")}, _fake_sft)


def _stage_files(stage_dir: Path) -> dict[str, bytes]:
    """Every file of a stage directory but the run records (they hold timestamps and timings)."""
    return {str(p.relative_to(stage_dir)): p.read_bytes() for p in sorted(stage_dir.rglob("*"))
            if p.is_file() and p.name not in ("STARTED.json", "DONE.json")}


def _copy_run(src: Run, dst: Path, stages: tuple[str, ...]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for s in stages:
        shutil.copytree(src.layout.stage(s), dst / s)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Run:
    """A run with fake prepare/sft and the three generation stages run uninterrupted."""
    ctx = make_ctx(tmp_path_factory.mktemp("run"))
    run_stage(FAKE_PREPARE, ctx)
    run_stage(FAKE_SFT, ctx)
    for stage in GEN_STAGES:
        run_stage(stage, ctx)
    return ctx


# ---------------------------------------------------------------------------------------------- teacher_data
def test_teacher_data_writes_the_samplers_exact_ids(base):
    ctx = base
    s = ctx.cfg.teacher_data
    sdir = ctx.layout.stage("teacher_data")
    rows = [json.loads(line) for line in (sdir / "sft.jsonl").read_text().splitlines()]
    prompts = read_prompts(ctx, "sft")
    assert [r["prompt_ids"] for r in rows] == [p["prompt_ids"] for p in prompts]
    assert set(rows[0]) == {"prompt", "label", "prompt_ids", "response_ids", "response_text", "ended_with_eos"}

    teacher = ctx.load_model(ctx.layout.teacher("A"))
    eos = toklib.stop_ids(ctx.tokenizer, teacher.config)
    assert toklib.end_of_turn_id(ctx.tokenizer) in eos
    for part, lo in enumerate(range(0, len(prompts), s.batch_size)):
        chunk = prompts[lo:lo + s.batch_size]
        res = generate(teacher, [p["prompt_ids"] for p in chunk], max_new_tokens=s.max_new_tokens,
                       temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_token_id=eos,
                       seed=derive_seed(s.seed, part), batch_size=s.batch_size)
        for j, (r, e) in enumerate(zip(rows[lo:lo + s.batch_size], res.ended_with_eos)):
            ids = res.response(j)
            assert r["response_ids"] == ids and r["ended_with_eos"] == e
            assert r["response_text"] == ctx.tokenizer.decode(ids, skip_special_tokens=True)
            assert (ids[-1] in eos) == e and (e or len(ids) == s.max_new_tokens)
    # Distinct parts get distinct random streams (no repeated samples across parts).
    assert len({tuple(r["response_ids"]) for r in rows}) == len(rows)

    meta = read_json(sdir / "meta.json")
    assert meta["teacher_name"] == "A" and meta["teacher_fingerprint"] == teacher_fp(ctx, "A")
    assert meta["tokenizer_fingerprint"] == toklib.tokenizer_fingerprint(ctx.tokenizer)
    out = read_json(sdir / "DONE.json")["outputs"]
    assert out["num_rows"] == len(prompts) and out["teacher_fingerprint"] == meta["teacher_fingerprint"]
    assert out["tokens"] == sum(len(r["response_ids"]) for r in rows)


# ---------------------------------------------------------------------------------------------------- rollout
def test_rollout_store_holds_the_generated_rows(base):
    ctx = base
    r = ctx.cfg.rollout
    store = RolloutStore.open(ctx.layout.stage("rollout") / "store")
    prompts = read_prompts(ctx, "opd")
    spp = r.samples_per_prompt
    assert store.num_rows == len(prompts) * spp
    assert store.max_len == max(len(p["prompt_ids"]) for p in prompts) + r.max_new_tokens
    attrs = store.attrs
    assert attrs["kind"] == "rollout" and attrs["prompt_split"] == "opd"
    assert attrs["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 10, "seed": 5,
                                 "samples_per_prompt": 2}
    assert attrs["policy_fingerprint"] == ctx.fingerprint(ctx.layout.sft_model)
    assert attrs["sft_teacher_fingerprint"] == teacher_fp(ctx, "A")
    assert attrs["tokenizer_fingerprint"] == toklib.tokenizer_fingerprint(ctx.tokenizer)

    policy = ctx.load_model(ctx.layout.sft_model)
    eos = tuple(attrs["stop_ids"])
    all_eos = []
    for c in range(store.num_chunks):
        lo, hi = store.chunk_rows(c)
        rows = store.read_rows(range(lo, hi), store.group_fields("rollout"))
        p_idx = np.arange(lo, hi) // spp
        np.testing.assert_array_equal(rows["prompt_index"], p_idx)
        np.testing.assert_array_equal(rows["sample_index"], np.arange(lo, hi) % spp)
        res = generate(policy, [prompts[i]["prompt_ids"] for i in p_idx], max_new_tokens=r.max_new_tokens,
                       temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, eos_token_id=eos,
                       seed=derive_seed(r.seed, c), batch_size=r.batch_size)
        for i, e in enumerate(res.ended_with_eos):
            ids, lps = res.response(i), res.logprobs[i, :res.lengths[i]]
            plen, rlen = int(rows["prompt_len"][i]), int(rows["response_len"][i])
            assert plen == len(prompts[p_idx[i]]["prompt_ids"]) and rlen == len(ids)
            assert rows["tokens"][i, :plen].tolist() == prompts[p_idx[i]]["prompt_ids"]
            assert rows["tokens"][i, plen:plen + rlen].tolist() == ids  # the stop id is part of the response
            assert not rows["tokens"][i, plen + rlen:].any()
            np.testing.assert_array_equal(rows["behaviour_logprobs"][i, plen:plen + rlen], np.float32(lps))
            assert not rows["behaviour_logprobs"][i, :plen].any()
            assert bool(rows["ended_with_eos"][i]) == e and bool(rows["truncated"][i]) == (not e)
            all_eos.append(e)
    assert any(all_eos) and not all(all_eos)  # both kinds of rows are exercised
    out = read_json(ctx.layout.stage("rollout") / "DONE.json")["outputs"]
    assert out["rows"] == store.num_rows and out["eos_rate"] == pytest.approx(np.mean(all_eos))
    assert out["truncation_rate"] == pytest.approx(1 - np.mean(all_eos))


# ------------------------------------------------------------------------------------------------- precompute
def test_precompute_stores_teacher_logprobs_of_the_rollouts(base):
    ctx = base
    src = RolloutStore.open(ctx.layout.stage("rollout") / "store")
    src_rows = src.read_rows(range(src.num_rows), src.group_fields("rollout"))
    for name in ("A", "B"):
        store = RolloutStore.open(ctx.layout.stage("precompute") / name / "store")
        assert store.verify() == {"rollout": store.num_chunks, "teacher": store.num_chunks}
        attrs = store.attrs
        assert attrs["teacher_name"] == name and attrs["teacher_fingerprint"] == teacher_fp(ctx, name)
        assert attrs["source_store"] == "rollout/store" and attrs["logprob_temperature"] == 1.0
        assert attrs["source_store_fingerprint"] == store_fingerprint(src.path)
        assert attrs["teacher_tokenizer_fingerprint"] == src.attrs["tokenizer_fingerprint"]
        assert attrs["topk"] == 0 and attrs["sampling"] == src.attrs["sampling"]
        rows = store.read_rows(range(store.num_rows))
        for field, value in src_rows.items():
            np.testing.assert_array_equal(rows[field], value)
        teacher = ctx.load_model(ctx.layout.teacher(name))
        real = (np.arange(store.max_len)[None] < (rows["prompt_len"] + rows["response_len"])[:, None])
        expected = np.asarray(token_logprobs(teacher, rows["tokens"], real.astype(np.int32)))
        expected = np.where(rows["response_mask"].astype(bool), expected, 0)
        np.testing.assert_allclose(rows["teacher_logprobs"], expected, rtol=1e-5, atol=1e-5)
        out = read_json(ctx.layout.stage("precompute") / "DONE.json")["outputs"]["teachers"][name]
        assert out["response_tokens"] == int(rows["response_mask"].sum())
        assert out["mean_teacher_logprob"] == pytest.approx(float(expected[rows["response_mask"] == 1].mean()),
                                                            rel=1e-5)
    a = RolloutStore.open(ctx.layout.stage("precompute") / "A" / "store").read_rows(range(12), ["teacher_logprobs"])
    b = RolloutStore.open(ctx.layout.stage("precompute") / "B" / "store").read_rows(range(12), ["teacher_logprobs"])
    assert not np.allclose(a["teacher_logprobs"], b["teacher_logprobs"])  # each teacher really scored


def test_precompute_topk(base, tmp_path):
    ctx = make_ctx(tmp_path, precompute={"teachers": ["A"], "topk": 3}, arms=[{"name": "l", "teacher": "A"}])
    _copy_run(base, tmp_path, ("prepare", "sft", "teacher_data", "rollout"))
    run_stage(stage_named("precompute"), ctx)
    store = RolloutStore.open(tmp_path / "precompute" / "A" / "store")
    ref_store = RolloutStore.open(base.layout.stage("precompute") / "A" / "store")
    ref = ref_store.read_rows(range(12), ["teacher_logprobs"])
    rows = store.read_rows(range(store.num_rows))
    assert store.topk == 3 and store.attrs["topk"] == 3
    np.testing.assert_allclose(rows["teacher_logprobs"], ref["teacher_logprobs"], rtol=1e-5, atol=1e-5)
    resp = rows["response_mask"].astype(bool)
    vals, ids = rows["teacher_topk_logprobs"], rows["teacher_topk_ids"]
    assert not vals[~resp].any() and not ids[~resp].any()
    assert (np.diff(vals[resp], axis=-1) <= 0).all()  # sorted, best first
    # The sampled token's log-prob is either in the top-k or below its smallest entry.
    lp = rows["teacher_logprobs"][resp]
    in_top = (ids[resp] == rows["tokens"][resp][:, None]).any(-1)
    assert (lp[~in_top] <= vals[resp][~in_top, -1] + 1e-6).all()
    hit = ids[resp] == rows["tokens"][resp][:, None]
    np.testing.assert_allclose(vals[resp][hit], np.repeat(lp, hit.sum(-1)), atol=1e-5)


# --------------------------------------------------------------------------------------------------- resuming
class _Crash(RuntimeError):
    pass


def _crash_after(monkeypatch, owner: Any, method: str, n: int | None) -> dict[str, int]:
    """Counts calls of ``owner.method``; with ``n`` set, the (n+1)-th call raises instead (after n good ones)."""
    real = getattr(owner, method)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        if n is not None and calls["n"] >= n:
            raise _Crash(f"simulated crash in {method} after {n} calls")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, method, wrapped)
    return calls


def _progress(stage_dir: Path) -> int:
    """Finished units of work in a stage directory: teacher_data parts, store chunk markers."""
    return len(list(stage_dir.glob("parts/*.jsonl"))) + len(list(stage_dir.rglob("progress/*/*.json")))


def test_interrupted_stages_resume_byte_identical(base, tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path)
    _copy_run(base, tmp_path, ("prepare", "sft"))
    # (what crashes, after how many calls, finished units on disk then); units: parts, or chunk markers of every
    # group of every store of the stage. 2 teacher_data parts; 3 rollout chunks; 2 stores x 2 groups x 3 chunks.
    crashes = {
        "teacher_data": [(teacher_data, "atomic_write_jsonl", 1, 1)],
        "rollout": [(RolloutStore, "write_rollout_chunk", 1, 1)],
        # A crash while copying teacher A's rollout group, then one while scoring teacher B (A is then done).
        "precompute": [(RolloutStore, "write_rollout_chunk", 2, 2),
                       (RolloutStore, "write_teacher_chunk", 4, 3 + 3 + 3 + 1)],
    }
    total = {"teacher_data": 2, "rollout": 3, "precompute": 12}
    resume_method = {"teacher_data": (teacher_data, "atomic_write_jsonl"),
                     "rollout": (RolloutStore, "write_rollout_chunk"),
                     "precompute": (RolloutStore, "write_teacher_chunk")}
    for stage in GEN_STAGES:
        sdir = ctx.layout.stage(stage.name)
        for owner, method, n, units in crashes[stage.name]:
            with monkeypatch.context() as m:
                _crash_after(m, owner, method, n)
                with pytest.raises(_Crash):
                    run_stage(stage, ctx)
            assert (sdir / "STARTED.json").is_file() and not (sdir / "DONE.json").is_file()
            assert _progress(sdir) == units
        done_before = _progress(sdir)
        with monkeypatch.context() as m:
            calls = _crash_after(m, *resume_method[stage.name], None)
            run_stage(stage, ctx)
        assert _progress(sdir) == total[stage.name]
        if stage.name != "precompute":  # only the missing units are redone (+ the final sft.jsonl)
            assert calls["n"] == total[stage.name] - done_before + (stage.name == "teacher_data")
        else:
            assert calls["n"] == 2  # B's two unscored chunks
        got, want = _stage_files(sdir), _stage_files(base.layout.stage(stage.name))
        assert sorted(got) == sorted(want)
        for rel in want:
            assert got[rel] == want[rel], f"{stage.name}/{rel} differs after resuming"
        assert read_json(sdir / "DONE.json")["fingerprint"] == read_json(base.layout.stage(stage.name) / "DONE.json")[
            "fingerprint"]


# ------------------------------------------------------------------------------------------------- refusals
def test_teacher_with_another_tokenizer_is_refused(base, tmp_path):
    ctx = make_ctx(tmp_path)
    _copy_run(base, tmp_path, ("prepare", "sft", "teacher_data", "rollout"))
    teacher_b = ctx.layout.teacher("B")
    toklib.build_char_tokenizer(teacher_b, extra_chars="§")  # id 100 exists in B's vocabulary only
    with pytest.raises(StageError) as e:
        run_stage(stage_named("precompute"), ctx)
    msg = str(e.value)
    assert "teacher 'B'" in msg and str(teacher_b) in msg and str(ctx.layout.tokenizer) in msg
    assert not (tmp_path / "precompute" / "B" / "store").exists()


def test_corrupted_chunks_are_detected(base, tmp_path):
    # A damaged teacher chunk in a finished store: verify names it.
    store_dir = tmp_path / "store"
    shutil.copytree(base.layout.stage("precompute") / "A" / "store", store_dir)
    chunk = store_dir / "teacher_logprobs" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[-5] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="chunk 1"):
        RolloutStore.open(store_dir).verify()

    # A damaged rollout store: precompute refuses to copy (and so launder) it.
    ctx = make_ctx(tmp_path / "run")
    _copy_run(base, tmp_path / "run", ("prepare", "sft", "teacher_data", "rollout"))
    tokens_chunk = tmp_path / "run" / "rollout" / "store" / "tokens" / "c" / "2" / "0"
    tokens_chunk.unlink()
    with pytest.raises(StageError, match="unusable"):
        run_stage(stage_named("precompute"), ctx)


def test_finished_stages_are_skipped(base):
    for real in GEN_STAGES:
        stage = dataclasses.replace(real, run=lambda ctx: pytest.fail("a finished stage ran again"))
        before = _stage_files(base.layout.stage(stage.name))
        out = run_stage(stage, base)
        assert out == read_json(base.layout.stage(stage.name) / "DONE.json")["outputs"]
        assert _stage_files(base.layout.stage(stage.name)) == before


def test_changed_sampling_settings_are_refused(base):
    ctx = make_ctx(base.layout.root, rollout={"temperature": 0.5})
    done = (base.layout.stage("rollout") / "DONE.json").read_bytes()
    with pytest.raises(StageError, match="temperature") as e:
        run_stage(stage_named("rollout"), ctx)
    assert "refusing to mix" in str(e.value)
    assert (base.layout.stage("rollout") / "DONE.json").read_bytes() == done
