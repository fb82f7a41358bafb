"""Evaluation and export: jopd.evaluation, jopd.stages.{evaluate,export} (the report: tests/test_report.py).

* reverse KL of a model against itself is 0 (up to fp error), against a different model positive;
* accuracy counts correct responses (generation replaced by known token ids);
* the teacher scoring pass is aligned with the response positions;
* export round trip: HF directory, transformers loads it, log-probs match jopd's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import three_arm_config as _config
from conftest import write_jsonl as _jsonl

from jopd import evaluation
from jopd.config import ArchSection, PrecisionSection
from jopd.data import arithmetic
from jopd.data import tokenizer as toklib
from jopd.io import atomic_write_json
from jopd.layout import RunLayout
from jopd.models import from_params, init_params, save_pretrained, token_logprobs
from jopd.pipeline import Run, StageError, run_stage
from jopd.sampling import GenerationResult
from jopd.sharding import single_device_mesh
from jopd.stages import stage
from jopd.stages.prepare import arch_to_config


def _generation(responses: list[list[int]], ended: list[bool],
                logprobs: list[list[float]] | None = None) -> GenerationResult:
    """The GenerationResult of known responses (log-probs 0 unless given)."""
    tokens = np.zeros((len(responses), max(map(len, responses))), np.int32)
    lps = np.zeros(tokens.shape, np.float32)
    for i, r in enumerate(responses):
        tokens[i, :len(r)] = r
        lps[i, :len(r)] = logprobs[i] if logprobs is not None else 0.0
    return GenerationResult(tokens, lps, np.array([len(r) for r in responses], np.int32), np.array(ended, bool))


TINY_ARCH = ArchSection(model_type="qwen3", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=16, max_position_embeddings=128)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return toklib.build_char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return toklib.load_tokenizer(str(tok_dir))


@pytest.fixture(scope="module")
def mesh():
    return single_device_mesh()


@pytest.fixture(scope="module")
def student(tok, mesh):
    cfg = arch_to_config(TINY_ARCH, tok, PrecisionSection())
    return from_params(cfg, init_params(cfg, 0), mesh=mesh)


@pytest.fixture(scope="module")
def other(tok, mesh):
    """A different model with a peaked output distribution (embedding scaled up), far from ``student``."""
    cfg = arch_to_config(TINY_ARCH, tok, PrecisionSection())
    params = init_params(cfg, 1)
    params["embedding"] = params["embedding"] * 30.0
    return from_params(cfg, params, mesh=mesh)


@pytest.fixture(scope="module")
def prompts(tok) -> list[dict]:
    return [{"prompt": p.prompt, "label": p.answer, "prompt_ids": toklib.encode_chat_prompt(tok, p.prompt)}
            for p in arithmetic.make_problems("eval", 6, 0, 1)]


# ----------------------------------------------------------------------------------------------- evaluation
def test_reverse_kl_of_a_model_against_itself_is_zero(student, prompts, tok):
    res = evaluation.evaluate_policy(student, prompts, tok, max_new_tokens=12, kl_teacher=student, kl_samples=2)
    assert res["kl_num_sequences"] == 2 * len(prompts)
    assert res["kl_response_tokens"] > 0
    assert abs(res["reverse_kl"]) < 1e-5
    assert abs(res["reverse_kl_seq"]) < 1e-4
    assert 0.0 <= res["accuracy"] <= 1.0 and res["num_prompts"] == len(prompts)


def test_reverse_kl_against_another_model_is_positive(student, other, prompts, tok):
    res = evaluation.evaluate_policy(student, prompts, tok, max_new_tokens=12, kl_teacher=other, kl_samples=2)
    assert res["reverse_kl"] > 0.1
    # Per-sequence value = per-token value x tokens per sequence (same samples).
    np.testing.assert_allclose(res["reverse_kl_seq"],
                               res["reverse_kl"] * res["kl_response_tokens"] / res["kl_num_sequences"], rtol=1e-6)


def test_teacher_scoring_is_aligned_with_response_positions(other, prompts):
    """Feeding the teacher's own log-probs as the 'student' ones gives exactly zero log-ratio."""
    rng = np.random.default_rng(0)
    ps = [r["prompt_ids"] for r in prompts]
    responses = [rng.integers(6, 90, size=n).tolist() for n in (1, 5, 9, 3, 7, 2)]
    lps = []
    for p, y in zip(ps, responses):
        seq = np.asarray([p + y], np.int32)
        lp = np.asarray(token_logprobs(other, seq, np.ones_like(seq)))[0]
        lps.append(lp[len(p):].tolist())
    sums, lengths = evaluation.reverse_kl_estimate(other, ps, _generation(responses, [True] * 6, lps), batch_size=4)
    assert lengths.tolist() == [1, 5, 9, 3, 7, 2]
    np.testing.assert_allclose(sums, 0.0, atol=1e-4)
    shifted = [[v + 0.5 for v in lp] for lp in lps]  # student log-probs 0.5 higher at every token
    sums2, _ = evaluation.reverse_kl_estimate(other, ps, _generation(responses, [True] * 6, shifted), batch_size=4)
    np.testing.assert_allclose(sums2, 0.5 * lengths, atol=1e-4)


def test_accuracy_counts_correct_responses(student, tok):
    eos = toklib.end_of_turn_id(tok)
    rows = [{"prompt": "Compute 3+4.", "label": "7"}, {"prompt": "Compute 2+2.", "label": "4"},
            {"prompt": "What is 9-1?", "label": "8"}, {"prompt": "Compute 5+5.", "label": "10"}]
    for r in rows:
        r["prompt_ids"] = toklib.encode_chat_prompt(tok, r["prompt"])
    texts = ["3+4=7\nanswer: 7", "2+2=5\nanswer: 5", "9-1=8\nanswer: 8", "5+5=10\nansw"]
    ended = [True, True, True, False]
    responses = [toklib.encode_response(tok, t, add_eos=e) for t, e in zip(texts, ended)]
    calls = []

    def fake_generate(model, prompt_ids, **kw):
        calls.append(kw)
        assert [list(p) for p in prompt_ids] == [r["prompt_ids"] for r in rows]
        return _generation(responses, ended)

    res = evaluation.evaluate_policy(student, rows, tok, max_new_tokens=16, generate_fn=fake_generate)
    assert res["accuracy"] == 0.5 and res["num_correct"] == 2
    assert res["eos_rate"] == 0.75
    assert res["mean_response_len"] == pytest.approx(np.mean([len(t) for t in responses]))
    assert [s["correct"] for s in res["samples"]] == [True, False, True, False]
    assert res["samples"][0] == {"prompt": "Compute 3+4.", "response": "3+4=7\nanswer: 7", "label": "7",
                                 "correct": True}
    assert "reverse_kl" not in res
    assert calls[0]["temperature"] == 0.0 and eos in calls[0]["eos_token_id"]


def test_avg_at_k_accuracy_and_its_standard_error(student, tok):
    rows = [{"prompt": "Compute 3+4.", "label": "7"}, {"prompt": "Compute 2+2.", "label": "4"},
            {"prompt": "What is 9-1?", "label": "8"}]
    for r in rows:
        r["prompt_ids"] = toklib.encode_chat_prompt(tok, r["prompt"])
    # k = 4 responses per prompt, in prompt-major order: 3/4, 0/4 and 4/4 correct.
    answers = {"7": ["7", "7", "1", "7"], "4": ["5", "3", "5", "5"], "8": ["8", "8", "8", "8"]}
    texts = [f"x\nanswer: {a}" for r in rows for a in answers[r["label"]]]
    responses = [toklib.encode_response(tok, t) for t in texts]
    seen = {}

    def fake_generate(model, prompt_ids, **kw):
        seen.update(kw, prompt_ids=[list(p) for p in prompt_ids])
        return _generation(responses, [True] * len(responses))

    res = evaluation.evaluate_policy(student, rows, tok, max_new_tokens=16, temperature=1.0, samples_per_prompt=4,
                                     top_p=0.9, generate_fn=fake_generate)
    assert seen["prompt_ids"] == [r["prompt_ids"] for r in rows for _ in range(4)]
    assert seen["temperature"] == 1.0 and seen["top_p"] == 0.9
    assert res["per_prompt_accuracy"] == [0.75, 0.0, 1.0]
    assert res["accuracy"] == pytest.approx(7 / 12) and res["num_correct"] == 7 and res["num_responses"] == 12
    assert res["accuracy_se"] == pytest.approx(np.std([0.75, 0.0, 1.0], ddof=1) / np.sqrt(3))
    # 95% t interval over the 3 prompts (t_{0.975, 2} = 4.302653): half-width t * se.
    assert res["accuracy_ci95"] == pytest.approx(4.302652729911275 * res["accuracy_se"], rel=1e-9)
    # pass@j = mean over prompts of 1 - C(4-c, j) / C(4, j) with c = 3, 0, 4 correct.
    from math import comb
    for j in (1, 2, 4):
        expect = np.mean([1 - comb(4 - c, j) / comb(4, j) for c in (3, 0, 4)])
        assert res["pass_at_k"][str(j)] == pytest.approx(expect)
    assert res["pass_at_k"]["1"] == pytest.approx(res["accuracy"]) and res["pass_at_k"]["4"] == pytest.approx(2 / 3)
    assert set(res["pass_at_k_ci95"]) == {"1", "2", "4"} and res["samples_per_prompt"] == 4
    # One example per prompt, not k copies of the first one.
    assert [s["prompt"] for s in res["samples"]] == [r["prompt"] for r in rows]
    with pytest.raises(ValueError, match="greedy"):
        evaluation.evaluate_policy(student, rows, tok, max_new_tokens=16, samples_per_prompt=2)


# ----------------------------------------------------------------------------------------------- run dirs


def _run(cfg, mesh) -> Run:
    return Run(cfg, RunLayout.for_config(cfg), mesh)


def test_eval_stage_refuses_missing_requested_models(tmp_path, mesh):
    from jopd.stages.evaluate import inputs, models_to_evaluate

    ctx = _run(_config(tmp_path, eval={"models": ["sft", "arm:online_A"]}), mesh)
    with pytest.raises(StageError, match=r"sft .*arm:online_A"):
        inputs(ctx)
    (tmp_path / "sft" / "model").mkdir(parents=True)
    (tmp_path / "sft" / "model" / "config.json").write_text("{}")
    all_present = _run(_config(tmp_path), mesh)
    assert list(models_to_evaluate(all_present)) == ["sft"]


# ----------------------------------------------------------------------------------------------- export
def test_export_round_trip(tmp_path, tok, student, prompts, mesh):
    tok_dir = toklib.build_char_tokenizer(tmp_path / "prepare" / "tokenizer")
    save_pretrained(student, tmp_path / "arms" / "lightning_A" / "model", tokenizer_dir=str(tok_dir))
    _jsonl(tmp_path / "prepare" / "prompts" / "eval.jsonl", prompts)
    atomic_write_json(tmp_path / "prepare" / "DONE.json", {"fingerprint": "fp-prepare"})
    ctx = _run(_config(tmp_path), mesh)
    summary = run_stage(stage("export"), ctx)
    out = tmp_path / "export"
    assert summary["arm"] == "lightning_A" and summary["check_rows"] == 2
    assert summary["jopd_vs_source_max_abs_diff"] == 0.0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "DONE.json",
                 "STARTED.json"):
        assert (out / name).is_file(), name
    try:
        import torch  # noqa: F401
    except ImportError:
        assert summary["transformers_check"].startswith("skipped")
    else:
        assert summary["transformers_check"] == "passed"
        assert summary["transformers_max_abs_diff"] < 1e-4
    # Up to date: a second run is skipped, not repeated.
    assert run_stage(stage("export"), ctx) == json.loads((out / "DONE.json").read_text())["outputs"]
