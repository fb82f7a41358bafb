"""configs/science.yaml shortened (tiny models and sizes, 2 seeds) end to end through the CLI, and the report over
seeds checked against scipy: every interval over seeds, every paired difference to SFT, pass@k from the
per-prompt counts, the claims table."""

from __future__ import annotations

import json
import subprocess
import sys
from math import comb
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cli_env

scipy_stats = pytest.importorskip("scipy.stats")

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (3, 5)
TINY_ARCH = ("{model_type: qwen3, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, "
             "num_kv_heads: 1, head_dim: 16, max_position_embeddings: 128}")


def science_shrink() -> list[str]:
    """Overrides that cut configs/science.yaml to tiny sizes (every stage and arm still runs) with 2 seeds."""
    cfg = yaml.safe_load((ROOT / "configs" / "science.yaml").read_text())
    out = [f"seeds=[{', '.join(map(str, SEEDS))}]", "task.num_sft_prompts=32", "task.num_opd_prompts=16",
           "task.num_eval_prompts=12", f"student.init={TINY_ARCH}", "teacher_data.max_new_tokens=24",
           "teacher_data.batch_size=32", "rollout.max_new_tokens=24", "rollout.batch_size=16",
           "rollout.samples_per_prompt=2", "rollout.rows_per_chunk=32", "precompute.batch_size=16",
           "sft.steps=8", "sft.checkpoint_every=8", "sft.eval_every=0", "sft.batch_size=8", "opd.steps=2",
           "opd.batch_size=8", "opd.checkpoint_every=2", "opd.eval_every=2", "opd.log_every=1",
           "eval.max_new_tokens=24", "eval.batch_size=12", "eval.samples_per_prompt=4"]
    for name in cfg["teachers"]:
        out += [f"teachers.{name}.init={TINY_ARCH}", f"teachers.{name}.pretrain_examples=64",
                f"teachers.{name}.pretrain.steps=8", f"teachers.{name}.pretrain.checkpoint_every=8",
                f"teachers.{name}.pretrain.batch_size=16"]
    return out


@pytest.fixture(scope="module")
def science_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("science") / "run"
    proc = subprocess.run([sys.executable, "-m", "jopd.main", "--config", "configs/science.yaml", "--run-dir",
                           str(run_dir), *science_shrink()], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def _t_interval(values: list[float]) -> tuple[float, float, float]:
    v = np.asarray(values, np.float64)
    low, high = scipy_stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=scipy_stats.sem(v))
    return float(v.mean()), float(low), float(high)


@pytest.mark.slow
def test_every_seed_is_a_complete_run(science_run: Path) -> None:
    from jopd.config import STAGES

    for seed in SEEDS:
        sub = science_run / f"seed_{seed}"
        for stage in STAGES:
            assert (sub / stage / "DONE.json").is_file(), (seed, stage)
        cfg = yaml.safe_load((sub / "config.yaml").read_text())
        assert cfg["seed"] == seed and cfg["seeds"] == [] and cfg["run_dir"] == str(sub)
        assert (sub / "report.md").is_file()
    # Different seeds train different teachers (their init and data are drawn from the seed).
    a, b = (json.loads((science_run / f"seed_{s}" / "prepare" / "summary.json").read_text()) for s in SEEDS)
    assert a["teachers"]["A"]["fingerprint"] != b["teachers"]["A"]["fingerprint"]
    # The held-out prompts are the same in every seed (paired comparisons across seeds are meaningful).
    prompts = [(science_run / f"seed_{s}" / "prepare" / "prompts" / "eval.jsonl").read_text() for s in SEEDS]
    assert prompts[0] == prompts[1]


@pytest.mark.slow
def test_intervals_over_seeds_match_scipy(science_run: Path) -> None:
    summary = json.loads((science_run / "report" / "summary.json").read_text())
    assert summary["seeds"] == list(SEEDS)
    results = [json.loads((science_run / f"seed_{s}" / "eval" / "results.json").read_text()) for s in SEEDS]
    k = summary["samples_per_prompt"]
    assert set(summary["models"]) >= {"sft", "teacher:A", "arm:lightning_A", "arm:online_A"}
    for model, entry in summary["models"].items():
        for key, interval in (("accuracy", "accuracy_interval"), ("reverse_kl", "reverse_kl_interval")):
            values = [r[model][key] for r in results]
            assert entry[key] == pytest.approx(values)
            mean, low, high = _t_interval(values)
            iv = entry[interval]
            assert iv["n"] == len(SEEDS) and iv["confidence"] == 0.95
            assert iv["mean"] == pytest.approx(mean, abs=1e-12)
            if np.ptp(values) == 0:  # identical values over seeds: scipy gives nan bounds, the interval is the point
                assert iv["half_width"] == pytest.approx(0.0, abs=1e-12)
            else:
                assert iv["low"] == pytest.approx(low, rel=1e-9) and iv["high"] == pytest.approx(high, rel=1e-9)
        # pass@k of each seed: the unbiased estimator from the per-prompt counts.
        for r in results:
            counts = [round(a * k) for a in r[model]["per_prompt_accuracy"]]
            expect = np.mean([1 - comb(k - c, k) / comb(k, k) for c in counts])
            assert r[model]["pass_at_k"][str(k)] == pytest.approx(expect)
        assert entry["pass_at_k"] == pytest.approx([r[model]["pass_at_k"][str(k)] for r in results])


@pytest.mark.slow
def test_paired_differences_to_sft_match_scipy(science_run: Path) -> None:
    summary = json.loads((science_run / "report" / "summary.json").read_text())
    results = [json.loads((science_run / f"seed_{s}" / "eval" / "results.json").read_text()) for s in SEEDS]
    for arm, entry in summary["differences_vs_sft"].items():
        new = np.array([r[f"arm:{arm}"]["accuracy"] for r in results])
        old = np.array([r["sft"]["accuracy"] for r in results])
        assert entry["accuracy_minus_sft"] == pytest.approx((new - old).tolist(), abs=1e-12)
        iv = entry["accuracy_interval"]
        assert iv["mean"] == pytest.approx((new - old).mean(), abs=1e-12)
        if np.ptp(new - old) > 0:
            ci = scipy_stats.ttest_rel(new, old).confidence_interval(0.95)
            assert iv["low"] == pytest.approx(ci.low, rel=1e-9) and iv["high"] == pytest.approx(ci.high, rel=1e-9)
        # Within a seed: z = mean paired difference over prompts / its standard error.
        for r, z in zip(results, entry["z_vs_sft"]):
            if z is None:
                continue
            d = np.subtract(r[f"arm:{arm}"]["per_prompt_accuracy"], r["sft"]["per_prompt_accuracy"])
            if d.std(ddof=1) > 0:
                assert z == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(len(d))), rel=1e-9)


@pytest.mark.slow
def test_report_over_seeds_has_every_section(science_run: Path) -> None:
    text = (science_run / "report.md").read_text()
    for heading in ("## Results (mean +- 95% interval over seeds)", "## Each arm against the SFT student",
                    "## The paper's claims, checked in every seed", "## Cost per seed"):
        assert heading in text
    summary = json.loads((science_run / "report" / "summary.json").read_text())
    keys = {c["key"] for c in summary["claims"]}
    assert {"lightning_A_beats_sft", "online_A_beats_sft", "lightning_A_in_interval_of_online_A"} <= keys
    for c in summary["claims"]:
        assert 0 <= c["holds_in"] <= c["checked"] <= len(SEEDS)
    costs = summary["costs"]
    assert "rollout" in costs and all(len(v["seconds"]) == len(SEEDS) for v in costs.values())


def test_report_over_seeds_on_synthetic_results() -> None:
    """Non-degenerate numbers (the tiny run's accuracies are all 0): 3 seeds of made-up eval results, every
    interval and paired difference against scipy, and the claims counted per seed."""
    from jopd.config import load_config
    from jopd.report.claims import run_claims
    from jopd.report.gather import ArmInfo
    from jopd.report.seeds import render_seeds_report

    cfg = load_config("configs/science.yaml", ["seeds=[0, 1, 2]"], check_files=False)
    rng = np.random.default_rng(0)
    n, k = 200, 4
    seeds = []
    for seed in range(3):
        sft_counts = rng.binomial(k, 0.5, n)
        counts = {"sft": sft_counts, "teacher:A": rng.binomial(k, 0.8, n),
                  "arm:lightning_A": np.minimum(sft_counts + rng.binomial(1, 0.3, n), k),
                  "arm:online_A": np.minimum(sft_counts + rng.binomial(1, 0.35, n), k),
                  "arm:lightning_B": np.maximum(sft_counts - rng.binomial(1, 0.2, n), 0),
                  "arm:online_B": np.maximum(sft_counts - rng.binomial(1, 0.3, n), 0)}
        results = {}
        for name, c in counts.items():
            per = (c / k).tolist()
            results[name] = {"accuracy": float(np.mean(per)), "per_prompt_accuracy": per, "num_prompts": n,
                             "reverse_kl": float(rng.uniform(0.05, 0.1)),
                             "pass_at_k": {str(k): float(np.mean(c > 0))}}
        arms = [ArmInfo(name=a.name, mode=a.mode, teacher=a.teacher, consistent=a.teacher == cfg.sft_teacher,
                        trained=True, wall_s=10.0 + seed, tokens=1000.0, steps=cfg.opd.steps, step_s=0.1, phases={},
                        eval_rows=[], final=results[f"arm:{a.name}"]) for a in cfg.arms]
        seeds.append({"seed": seed, "results": results, "arms": arms,
                      "claims": run_claims(arms, results, cfg.sft_teacher),
                      "costs": [{"item": "SFT", "seconds": 5.0 + seed}]})
    _, summary = render_seeds_report(cfg, seeds)
    for model, entry in summary["models"].items():
        values = [s["results"][model]["accuracy"] for s in seeds]
        mean, low, high = _t_interval(values)
        assert entry["accuracy_interval"]["mean"] == pytest.approx(mean)
        assert entry["accuracy_interval"]["low"] == pytest.approx(low, rel=1e-9)
        assert entry["accuracy_interval"]["high"] == pytest.approx(high, rel=1e-9)
    for arm, entry in summary["differences_vs_sft"].items():
        new = np.array([s["results"][f"arm:{arm}"]["accuracy"] for s in seeds])
        old = np.array([s["results"]["sft"]["accuracy"] for s in seeds])
        ci = scipy_stats.ttest_rel(new, old).confidence_interval(0.95)
        assert entry["accuracy_interval"]["low"] == pytest.approx(ci.low, rel=1e-9)
        assert entry["accuracy_interval"]["high"] == pytest.approx(ci.high, rel=1e-9)
        for s, z in zip(seeds, entry["z_vs_sft"]):
            if z is not None:
                d = np.subtract(s["results"][f"arm:{arm}"]["per_prompt_accuracy"],
                                s["results"]["sft"]["per_prompt_accuracy"])
                assert z == pytest.approx(d.mean() / scipy_stats.sem(d), rel=1e-9)
    claims = {c["key"]: c for c in summary["claims"]}
    for key in ("lightning_A_beats_sft", "online_A_beats_sft"):
        expect = sum(next(c for c in s["claims"] if c.key == key).holds for s in seeds)
        assert claims[key]["holds_in"] == expect and claims[key]["checked"] == 3
    assert claims["lightning_B_worse_than_consistent"]["checked"] == 3
    light = summary["models"]["arm:lightning_A"]["accuracy_interval"]["mean"]
    online = summary["models"]["arm:online_A"]["accuracy_interval"]
    assert claims["lightning_A_in_interval_of_online_A"]["holds_in"] == int(online["low"] <= light <= online["high"])
    assert summary["costs"]["SFT"]["interval"]["mean"] == pytest.approx(6.0)
