"""The run report, jopd.report: standard errors, and the report of a fabricated run directory.

* the accuracy comparison uses paired standard errors when both models' per-prompt results exist;
* the report of a fabricated run directory shows the computed speed-ups and findings and writes valid PNGs,
  and says what is missing instead of failing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import three_arm_config as _config
from conftest import write_jsonl as _jsonl

from jopd.io import atomic_write_json
from jopd.layout import RunLayout
from jopd.report import compare_accuracy, write_report


def test_report_uses_paired_standard_errors_when_per_prompt_results_exist():
    rng = np.random.default_rng(0)
    old = (rng.random(400) < 0.6).astype(float)
    new = old.copy()
    flip = rng.choice(np.flatnonzero(old == 0), 24, replace=False)
    new[flip] = 1.0  # the same prompts plus 24 newly solved ones: a small but consistent gain
    paired = compare_accuracy(new.mean(), old.mean(), 400, new.tolist(), old.tolist())
    unpaired = compare_accuracy(new.mean(), old.mean(), 400)
    diff = new - old
    z = diff.mean() / (diff.std(ddof=1) / np.sqrt(400))
    assert f"{z:.1f} paired standard errors on 400 prompts" in paired and "within noise" not in paired
    assert "within noise" in unpaired  # the unpaired test cannot see it
    assert "improved held-out accuracy" in paired


# ----------------------------------------------------------------------------------------------- run dirs


def _arm_rows(step_s: list[float], accs: list[float], kls: list[float], **phases: float) -> list[dict]:
    rows, t = [{"step": 0, "eval/accuracy": accs[0], "eval/reverse_kl": kls[0], "time_s": 0.0}], 0.0
    for i, s in enumerate(step_s, start=1):
        t += s
        rows.append({"step": i, "loss": 0.1, "tokens": 100.0, "time_s": t, "step_s": s, **phases})
    rows.append({"step": len(step_s), "eval/accuracy": accs[1], "eval/reverse_kl": kls[1], "time_s": t})
    return rows


def _fabricate_run(run_dir: Path, *, with_online: bool = True) -> None:
    """Outputs of every stage before report, with known numbers."""
    layout = RunLayout(run_dir)
    done = {"rollout": {"seconds": 10.0, "outputs": {"response_tokens": 1000}},
            "precompute": {"seconds": 6.0, "outputs": {"teachers": {
                "A": {"seconds": 2.0, "response_tokens": 1000}, "B": {"seconds": 2.0, "response_tokens": 1000}}}},
            "sft": {"seconds": 30.0, "outputs": {"train_seconds": 25.0, "tokens": 5000}},
            "train": {"seconds": 50.0}, "eval": {"seconds": 5.0}}
    if with_online:
        done["online"] = {"seconds": 100.0}
    for stage, rec in done.items():
        atomic_write_json(layout.done(stage), {"fingerprint": f"fp-{stage}", **rec})
    arms = {"lightning_A": ("lightning", "A", True, 20.0), "lightning_B": ("lightning", "B", False, 21.0)}
    if with_online:
        arms["online_A"] = ("online", "A", True, 99.0)
    for name, (mode, teacher, consistent, secs) in arms.items():
        layout.arm_model(name).mkdir(parents=True)
        (layout.arm_model(name) / "config.json").write_text("{}")
        atomic_write_json(layout.arm_meta(name),
                          {"mode": mode, "teacher_name": teacher, "consistent_teacher": consistent,
                           "train_seconds": secs, "tokens": 400.0, "steps": 4})
    _jsonl(layout.metrics("arm_lightning_A"),
           _arm_rows([5.0, 0.1, 0.1, 0.1, 0.1], [0.25, 0.5], [0.9, 0.3], data_s=0.01, update_s=0.09))
    _jsonl(layout.metrics("arm_lightning_B"),
           _arm_rows([5.0, 0.1, 0.1, 0.1, 0.1], [0.25, 0.125], [0.9, 1.4], data_s=0.01, update_s=0.09))
    if with_online:
        _jsonl(layout.metrics("arm_online_A"),
               _arm_rows([8.0, 0.5, 0.5, 0.5, 0.5], [0.25, 0.5], [0.9, 0.35], gen_s=0.3, score_s=0.1, update_s=0.1))
    sample = [{"prompt": "Compute 3+4.", "response": "3+4=7\nanswer: 7", "label": "7", "correct": True}]
    results = {"sft": {"accuracy": 0.25, "reverse_kl": 0.9, "num_prompts": 8, "samples": sample},
               "teacher:A": {"accuracy": 0.875, "reverse_kl": 0.0, "num_prompts": 8},
               "arm:lightning_A": {"accuracy": 0.5, "reverse_kl": 0.3, "num_prompts": 8},
               "arm:lightning_B": {"accuracy": 0.125, "reverse_kl": 1.4, "num_prompts": 8}}
    if with_online:
        results["arm:online_A"] = {"accuracy": 0.5, "reverse_kl": 0.35, "num_prompts": 8}
    atomic_write_json(layout.eval_results, results)


def _is_png(path: Path) -> bool:
    import matplotlib.image

    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    img = matplotlib.image.imread(str(path))
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_report_from_fabricated_run(tmp_path, capsys):
    _fabricate_run(tmp_path)
    cfg = _config(tmp_path)
    layout = RunLayout.for_config(cfg)
    summary = write_report(cfg, layout)
    text = layout.report.read_text()
    assert text in capsys.readouterr().out
    assert summary["report"] == str(layout.report)
    assert json.loads((layout.stage("report") / "summary.json").read_text())["speedups"].keys() == {"A"}
    sp = summary["speedups"]["A"]
    # (a): online 99 s vs rollout 10 + precompute 6 x (2 / 4) + lightning 20 = 33 s.
    assert sp["lightning_total_s"] == pytest.approx(33.0)
    assert sp["total_speedup"] == pytest.approx(3.0)
    # (b): compilation steps (5 s, 8 s) left out: 0.5 / 0.1.
    assert sp["step_speedup"] == pytest.approx(5.0)
    assert sp["online_phases"] == pytest.approx({"generate": 0.3, "score": 0.1, "update": 0.1})
    assert "3.00x" in text and "5.00x" in text
    assert "| arm lightning_B | lightning OPD | B | **no** | 0.125 |" in text
    assert "Lightning OPD arm lightning_A (teacher A) improved held-out accuracy from 0.250 to 0.500" in text
    assert "lightning_B (teacher B, not the SFT-data teacher A) ended worse than" in text
    assert "no (ablation)" in text
    plots = sorted(layout.plots.glob("*.png"))
    assert [p.name for p in plots] == ["accuracy_vs_step.png", "accuracy_vs_time.png",
                                       "reverse_kl_vs_step.png", "reverse_kl_vs_time.png"]
    assert sorted(summary["plots"]) == [str(p) for p in plots]
    assert all(_is_png(p) for p in plots)
    assert all(f"![{p.stem}](plots/{p.name})" in text for p in plots)


def test_report_says_what_is_missing(tmp_path):
    _fabricate_run(tmp_path, with_online=False)
    cfg = _config(tmp_path, arms=[{"name": "lightning_A", "mode": "lightning", "teacher": "A"},
                                  {"name": "lightning_B", "mode": "lightning", "teacher": "B",
                                   "allow_inconsistent_teacher": True}])
    layout = RunLayout.for_config(cfg)
    layout.eval_results.unlink()
    summary = write_report(cfg, layout)
    text = layout.report.read_text()
    assert summary["speedups"] == {}
    assert "No online OPD arm is configured" in text
    assert "`eval/results.json` is missing" in text
    assert "no speed-up to report" in text
    # Without the eval stage the arms' final accuracies come from their last periodic evaluation.
    assert "| arm lightning_A | lightning OPD | A | yes | 0.500 |" in text
    assert len(list(layout.plots.glob("*.png"))) == 4


def test_report_writes_nothing_off_the_main_process(tmp_path):
    _fabricate_run(tmp_path)
    cfg = _config(tmp_path)
    layout = RunLayout.for_config(cfg)
    summary = write_report(cfg, layout, is_main_process=False)
    assert summary["speedups"]["A"]["total_speedup"] == pytest.approx(3.0)
    assert "report" not in summary and not layout.report.exists() and not layout.plots.exists()
