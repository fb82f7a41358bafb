"""Every shipped config loads and validates; the memory estimator runs on the paper-scale configs.

- every ``configs/*.yaml`` passes ``load_config(check_files=False)`` (keys, types, cross-field rules);
- configs whose files exist here are also checked with ``check_files=True`` (demo/tiny need none; smollm2 needs
  ``.cache/smollm2-135m-instruct``: skipped when missing, a failure under ``CI=true``);
- ``scripts/memory_estimate.py`` gives plausible per-device numbers for configs/qwen3-{4b,8b}.yaml.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from jopd.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SMOLLM2_DIR = ROOT / ".cache" / "smollm2-135m-instruct"
GIB = 1024 ** 3


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def test_configs_dir_has_the_shipped_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "tiny.yaml", "smollm2.yaml", "qwen3-4b.yaml", "qwen3-8b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_structure_is_valid(path: Path) -> None:
    cfg = load_config(str(path), check_files=False)
    assert cfg.arms and cfg.teachers
    assert cfg.sft_teacher in cfg.teachers


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml", "smollm2.yaml"])
def test_config_files_exist(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "smollm2.yaml" and not (SMOLLM2_DIR / "config.json").is_file():
        if _ci():
            pytest.fail(f"CI=true but {SMOLLM2_DIR} is missing (run `make smollm2`)")
        pytest.skip(f"{SMOLLM2_DIR} is missing (run `make smollm2`)")
    monkeypatch.chdir(ROOT)  # config paths are relative to the working directory
    load_config(str(ROOT / "configs" / name), check_files=True)


def test_paper_configs_follow_the_paper() -> None:
    for name in ("qwen3-4b.yaml", "qwen3-8b.yaml", "qwen3-30b-a3b.yaml"):
        cfg = load_config(str(ROOT / "configs" / name), check_files=False)
        o = cfg.opd
        assert (o.optim.lr, o.optim.schedule, o.optim.b1, o.optim.b2) == (2e-6, "constant", 0.9, 0.98)
        assert (o.optim.weight_decay, o.optim.grad_clip, o.batch_size) == (0.1, 1.0, 256)
        assert (o.eps_low, o.eps_high, o.aggregation, o.tis_cap, o.kl_coef) == (0.2, 0.2, "seq_mean", None, 0.0)
        assert cfg.rollout.max_new_tokens == cfg.teacher_data.max_new_tokens == 4096
        for s in (cfg.rollout, cfg.teacher_data):
            assert (s.temperature, s.top_p) == (0.7, 0.9)
        assert cfg.task.kind == "prompt_file"
        p = cfg.precision
        assert (p.param_dtype, p.compute_dtype, p.remat, p.attention_impl) == ("float32", "bfloat16", "full", "cudnn")
        assert cfg.task.sft_prompt_file != cfg.task.opd_prompt_file and cfg.task.sft_prompt_file
        m = cfg.mesh
        assert m.data * m.fsdp * m.tensor * m.expert == 8  # one 8-GPU node
    # The MoE setting splits the routed experts over an expert axis (student and teacher: Qwen3-30B-A3B).
    moe = load_config(str(ROOT / "configs" / "qwen3-30b-a3b.yaml"), check_files=False)
    assert moe.mesh.expert > 1 and 128 % moe.mesh.expert == 0
    assert "Qwen3-30B-A3B" in moe.student.path and "Qwen3-30B-A3B" in moe.teachers[moe.sft_teacher].path


def _memory_estimate():
    spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "scripts" / "memory_estimate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("memory_estimate", mod)  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name,student,teacher,n_student,n_teacher", [
    ("qwen3-4b.yaml", "qwen3-4b", "qwen3-8b", 4.02e9, 8.19e9),
    ("qwen3-8b.yaml", "qwen3-8b", "qwen3-32b", 8.19e9, 32.8e9),
])
def test_memory_estimate_is_plausible(name: str, student: str, teacher: str, n_student: float, n_teacher: float,
                                      tmp_path: Path) -> None:
    mod = _memory_estimate()
    out = tmp_path / "est.json"
    est = mod.main(["--config", str(ROOT / "configs" / name), "--student-arch", student, "--teacher-arch", teacher,
                    "--hbm", "h100-80gb", "--json", str(out), "--quiet"])
    assert out.is_file()
    assert est["devices"] == 8 and est["mesh"]["fsdp"] == 8
    # Parameter counts of the real Qwen3 models (within 1%).
    assert est["student"]["params"] == pytest.approx(n_student, rel=0.01)
    assert est["teacher"]["params"] == pytest.approx(n_teacher, rel=0.01)
    opd = est["stages"]["opd train step"]
    lines = {ln["name"]: ln["gib"] * GIB for ln in opd["lines"]}
    # fp32 master + 2 fp32 Adam moments, sharded 8 ways: N * 12 / 8 bytes.
    assert lines["params (master)"] + lines["Adam moments"] == pytest.approx(n_student * 12 / 8, rel=0.02)
    # The whole step: more than the optimizer state (N * 16 / 8 with one gradient), less than an 80 GB H100.
    assert n_student * 16 / 8 < opd["total_gib"] * GIB < 79 * GIB
    for stage in est["stages"].values():
        assert stage["total_gib"] > 0
        assert all(ln["gib"] >= 0 for ln in stage["lines"])


def test_memory_estimate_matches_model_param_count() -> None:
    from jopd.models.config import ModelConfig

    mod = _memory_estimate()
    mcfg = ModelConfig(model_type="qwen3", qk_norm=True, **mod.PRESETS["qwen3-8b"])
    got = mod.sharded_param_bytes(mcfg, {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}, 4)
    assert got["count"] == mcfg.num_params()
    # Everything but the (replicated) norms is split 8 ways.
    assert got["per_device"] == pytest.approx(got["total"] / 8, rel=1e-3)


def test_sft_difficulty_applies_to_the_sft_prompts_only():
    from jopd.config import ConfigValidationError
    from jopd.data.splits import load_problems

    arch = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
            "num_kv_heads": 1, "head_dim": 16}
    base = {"teachers": {"A": {"init": arch, "style": "A"}}, "student": {"init": arch}, "sft_teacher": "A",
            "precompute": {"teachers": ["A"]}, "arms": [{"name": "l", "mode": "lightning", "teacher": "A"}]}
    task = {"difficulty": [2], "sft_difficulty": [1], "num_sft_prompts": 60, "num_opd_prompts": 60,
            "num_eval_prompts": 60}
    problems = load_problems(load_config(data={**base, "task": task}))
    assert {p.meta["num_ops"] for p in problems["sft"]} == {1}
    for split in ("opd", "eval"):
        assert max(p.meta["num_ops"] for p in problems[split]) == 2
    with pytest.raises(ConfigValidationError, match=r"task\.sft_difficulty: values must be 1\.\.4, got 5"):
        load_config(data={**base, "task": {**task, "sft_difficulty": [5]}})


def test_separate_sft_and_opd_prompt_files(tmp_path):
    """The paper's SFT prompts (OpenThoughts3) and OPD prompts (DAPO-Math-17k) come from different files; eval is
    held out of the OPD file unless it has its own, and never overlaps SFT or OPD."""
    import json

    from jopd.config import ConfigValidationError
    from jopd.data.prompt_files import PromptFileError
    from jopd.data.splits import load_problems

    def write(name, prompts):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"prompt": q, "answer": "1"}) + "\n" for q in prompts))
        return str(path)

    sft_file = write("sft.jsonl", [f"sft {i}" for i in range(20)] + ["shared 0", "shared 1"])
    with open(sft_file, "a") as f:  # SFT prompts need no answer (the teacher writes it)
        f.write(json.dumps({"conversations": [{"from": "human", "value": "sft 20"}]}) + "\n")
    opd_file = write("opd.jsonl", [f"opd {i}" for i in range(30)] + ["shared 0", "shared 1"])
    base = {"teachers": {"A": {"path": "unused"}}, "student": {"path": "unused"}, "sft_teacher": "A",
            "precompute": {"teachers": ["A"]}, "arms": [{"name": "l", "mode": "lightning", "teacher": "A"}]}
    task = {"kind": "prompt_file", "sft_prompt_file": sft_file, "opd_prompt_file": opd_file,
            "num_sft_prompts": 100, "num_opd_prompts": 100, "num_eval_prompts": 8}
    problems = load_problems(load_config(data={**base, "task": task}, check_files=False))
    sft, opd, evals = ({p.prompt for p in problems[k]} for k in ("sft", "opd", "eval"))
    assert len(evals) == 8 and all(p.startswith(("opd", "shared")) for p in evals)
    assert sft <= {f"sft {i}" for i in range(21)} | {"shared 0", "shared 1"} and len(sft) == 23 - len(evals & {"shared 0", "shared 1"})
    assert not (sft & evals) and not (opd & evals)
    assert len(opd) == 32 - 8 and all(p.startswith(("opd", "shared")) for p in opd)
    # the same sources from one call to the next (seeded), and an own eval file leaves the OPD prompts whole
    again = load_problems(load_config(data={**base, "task": task}, check_files=False))
    assert [p.prompt for p in again["opd"]] == [p.prompt for p in problems["opd"]]
    eval_file = write("eval.jsonl", ["eval 0", "shared 1"])
    problems = load_problems(load_config(data={**base, "task": {**task, "eval_prompt_file": eval_file}},
                                         check_files=False))
    assert len(problems["opd"]) == 31 and len(problems["sft"]) == 22
    assert "shared 1" not in {p.prompt for p in problems["opd"] + problems["sft"]}
    # prompt_file fills whichever split has no file of its own
    mixed = {**task, "prompt_file": sft_file, "sft_prompt_file": None}
    problems = load_problems(load_config(data={**base, "task": mixed}, check_files=False))
    assert all(p.prompt.startswith(("sft", "shared")) for p in problems["sft"])
    with pytest.raises(ConfigValidationError, match=r"task\.prompt_file: required when task\.kind is prompt_file "
                       r"and task\.opd_prompt_file is not set"):
        load_config(data={**base, "task": {**task, "opd_prompt_file": None}}, check_files=False)
    with pytest.raises(PromptFileError, match=r"task\.opd_prompt_file .*opd\.jsonl: no OPD prompts left"):
        load_problems(load_config(data={**base, "task": {**task, "eval_prompt_file": opd_file,
                                                                  "num_eval_prompts": 100}}, check_files=False))


# ---------------------------------------------------------------------------------------------------------
# Validation, section by section
# ---------------------------------------------------------------------------------------------------------
_ARCH = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
         "num_kv_heads": 1, "head_dim": 16}
_BASE = {"teachers": {"A": {"init": _ARCH, "style": "A"}}, "student": {"init": _ARCH}, "sft_teacher": "A",
         "precompute": {"teachers": ["A"]}, "arms": [{"name": "l", "mode": "lightning", "teacher": "A"}]}


def _problems(**sections) -> list[str]:
    from jopd.config import ConfigValidationError

    try:
        load_config(data={**_BASE, **sections}, check_files=False)
    except ConfigValidationError as err:
        return err.problems
    return []


def test_valid_packed_loops_load() -> None:
    assert _problems(opd={"token_budget": 4096, "row_len": 512, "micro_batch_size": 4},
                     sft={"token_budget": 2048}, teachers={"A": {"init": _ARCH, "pretrain": {"token_budget": 64}}}) == []


@pytest.mark.parametrize("loop,problem", [
    ({"token_budget": 0}, "opd.token_budget: must be > 0, got 0"),
    ({"token_budget": 1024, "row_len": -1}, "opd.row_len: must be > 0, got -1"),
    ({"row_len": 256}, "opd.row_len: needs opd.token_budget"),
    ({"token_budget": 1000, "row_len": 256}, "opd.token_budget: must be a multiple of row_len 256, got 1000"),
    ({"token_budget": 1024, "row_len": 256, "micro_batch_size": 3},
     "opd.micro_batch_size: with token_budget it counts packed rows and must divide token_budget // row_len = 4"),
    ({"token_budget": 1024, "micro_batch_size": 0}, "opd.micro_batch_size: must be > 0, got 0"),
    ({"batch_size": 16, "micro_batch_size": 3}, "opd.micro_batch_size: must divide batch_size 16, got 3"),
])
def test_packed_batch_settings_are_checked(loop: dict, problem: str) -> None:
    assert any(p.startswith(problem) for p in _problems(opd=loop)), _problems(opd=loop)


def test_packed_rows_need_not_divide_batch_size() -> None:
    # With token_budget, micro_batch_size counts rows; batch_size is not what it must divide.
    assert _problems(opd={"batch_size": 16, "token_budget": 1536, "row_len": 512, "micro_batch_size": 3}) == []


def test_every_section_reports_its_problems_with_dotted_paths_all_at_once() -> None:
    problems = _problems(
        mesh={"fsdp": -1, "tensor": -1, "data": 0},
        teacher_data={"top_p": 0.0}, rollout={"temperature": -1.0, "samples_per_prompt": 0},
        eval={"top_p": 1.5, "max_new_tokens": 0, "samples_per_prompt": 2, "temperature": 0.0},
        sft={"steps": 0, "optim": {"lr": 0.0}}, opd={"eps_low": -0.1, "tis_cap": 0.0, "optim": {"b2": 1.0}},
        teachers={"A": {"init": _ARCH, "pretrain": {"batch_size": 0}, "pretrain_optim": {"lr": -1.0}}},
        task={"difficulty": [5]})
    expected = [
        "mesh.data: must be positive or -1", "mesh: at most one axis may be -1",
        "teacher_data.top_p: must be in (0, 1], got 0.0", "rollout.temperature: must be >= 0, got -1.0",
        "rollout.samples_per_prompt: must be > 0, got 0", "eval.top_p: must be in (0, 1], got 1.5",
        "eval.max_new_tokens: must be > 0, got 0", "eval.samples_per_prompt: 2 responses per prompt need",
        "sft.steps: must be > 0, got 0", "sft.optim.lr: must be > 0, got 0.0", "opd.eps_low: must be >= 0",
        "opd.tis_cap: must be > 0", "opd.optim.b2: must be in [0, 1), got 1.0",
        "teachers.A.pretrain.batch_size: must be > 0, got 0", "teachers.A.pretrain_optim.lr: must be > 0",
        "task.difficulty: values must be 1..4, got 5",
    ]
    for text in expected:
        assert any(p.startswith(text) for p in problems), (text, problems)
    assert len(problems) == len(expected)


def test_cross_section_problems_are_still_reported() -> None:
    problems = _problems(sft_teacher="Z", arms=[{"name": "l", "mode": "lightning", "teacher": "B"}],
                         eval={"kl_teacher": "C"}, export={"arm": "nope"})
    for text in ("sft_teacher: 'Z' is not one of the teachers", "arms[0].teacher: unknown teacher 'B'",
                 "arms[0] (l): lightning arm's teacher 'B' is not in precompute.teachers",
                 "eval.kl_teacher: unknown teacher 'C'", "export.arm: unknown arm 'nope'"):
        assert any(p.startswith(text) for p in problems), (text, problems)
