"""End to end through the CLI: configs/tiny.yaml runs every stage (the demo's structure at tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    return subprocess.run([sys.executable, "-m", "jopd.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = _cli("--config", "configs/tiny.yaml", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_every_stage_completes(tiny_run: Path):
    from jopd.config import STAGES

    for stage in STAGES:
        assert (tiny_run / stage / "DONE.json").is_file(), stage
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert set(summary) == set(STAGES)
    assert (tiny_run / "config.yaml").is_file() and (tiny_run / "run.log").is_file()


def test_outputs_are_consistent(tiny_run: Path):
    from jopd.data.store import RolloutStore

    rollout = RolloutStore.open(tiny_run / "rollout" / "store")
    for teacher in ("A", "B"):
        store = RolloutStore.open(tiny_run / "precompute" / teacher / "store")
        store.verify()
        assert store.attrs["teacher_name"] == teacher
        assert store.num_rows == rollout.num_rows
    meta_a = json.loads((tiny_run / "arms" / "lightning_A" / "meta.json").read_text())
    meta_b = json.loads((tiny_run / "arms" / "lightning_B" / "meta.json").read_text())
    assert meta_a["consistent_teacher"] is True and meta_b["consistent_teacher"] is False
    results = json.loads((tiny_run / "eval" / "results.json").read_text())
    for name in ("base", "sft", "teacher:A", "teacher:B", "arm:lightning_A", "arm:lightning_B", "arm:online_A"):
        assert 0.0 <= results[name]["accuracy"] <= 1.0, name
        assert "reverse_kl" in results[name]
    # The teacher scored against itself has zero reverse KL.
    assert abs(results["teacher:A"]["reverse_kl"]) < 1e-4
    report = (tiny_run / "report.md").read_text()
    assert "Lightning OPD vs online OPD" in report and "lightning_B" in report
    for png in ("accuracy_vs_step", "reverse_kl_vs_time"):
        assert (tiny_run / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Metrics JSONL and TensorBoard event files exist for every arm.
    for arm in ("lightning_A", "lightning_B", "online_A"):
        rows = [json.loads(x) for x in (tiny_run / "metrics" / f"arm_{arm}.jsonl").read_text().splitlines()]
        assert any("eval/accuracy" in r for r in rows) and any("loss" in r for r in rows)
        assert list((tiny_run / "tb" / f"arm_{arm}").glob("events.*"))


def test_export_loads_in_transformers(tiny_run: Path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_run / "export")
    ids = torch.tensor([[1, 3, 40, 41, 2, 4]])
    assert torch.isfinite(model(ids).logits).all()
    check = json.loads((tiny_run / "export" / "export_check.json").read_text())
    assert check["transformers_max_abs_diff"] < 1e-4


def test_rerun_skips_and_changed_inputs_are_refused(tiny_run: Path):
    proc = _cli("--config", "configs/tiny.yaml", "--run-dir", str(tiny_run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "up to date (skipped)" in proc.stderr
    proc = _cli("--config", "configs/tiny.yaml", "--run-dir", str(tiny_run), "rollout.temperature=0.5",
                "--stages", "rollout")
    assert proc.returncode == 1
    assert "different inputs" in proc.stderr and "temperature: 1.0 -> 0.5" in proc.stderr


def test_bad_config_lists_every_problem(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers: {A: {path: /nonexistent}}\nstudent: {pth: x}\nopd: {steps: many}\n")
    proc = _cli("--config", str(bad))
    assert proc.returncode == 2
    assert "student.pth: unknown key" in proc.stderr and "opd.steps: expected an integer" in proc.stderr
