"""End to end through the CLI: configs/tiny.yaml (shrunk by conftest.tiny_shrink: the same stages and code paths,
fewer steps and rows) runs every stage (the demo's structure at tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_shrink

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    env["WANDB_SILENT"] = "true"
    return subprocess.run([sys.executable, "-m", "jopd.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    # W&B in offline mode: it writes its run files under RUN_DIR/wandb and never touches the network
    proc = _cli("--config", "configs/tiny.yaml", "--run-dir", str(run_dir), *tiny_shrink(),
                "logging.wandb.enabled=true", "logging.wandb.mode=offline")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_every_stage_completes(tiny_run: Path):
    from jopd.config import STAGES

    for stage in STAGES:
        done = json.loads((tiny_run / stage / "DONE.json").read_text())
        # Wall and process CPU seconds of every stage (CPU time: user + system over all threads).
        assert done["seconds"] > 0 and done["cpu_seconds"] > 0, stage
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


def _tensorboard_scalars(event_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard event directory, read back from the TFRecord framing (length, crc,
    payload, crc) and the Event protobuf, as TensorBoard itself reads them."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(event_dir.glob("events.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def _wandb_offline_runs(wandb_dir: Path) -> dict[str, dict]:
    """W&B offline run files (``run-ID.wandb``: a LevelDB-style log of protobuf records in 32 KiB blocks after
    a 7-byte header), read back: {run name: {"group", "id", "history": {step: {key: value}}}}."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    runs: dict[str, dict] = {}
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending, records = path.read_bytes(), 7, b"", []
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # block trailer too short for a header
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST fragment
                records.append(Record.FromString(pending))
                pending = b""
        info: dict = {"history": {}}
        for rec in records:
            if rec.WhichOneof("record_type") == "run":
                info.update(name=rec.run.display_name, group=rec.run.run_group, id=rec.run.run_id)
            elif rec.WhichOneof("record_type") == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                info["history"].setdefault(int(row["_step"]), {}).update(row)
        runs[info["name"]] = info
    return runs


def test_metrics_are_readable_in_tensorboard_and_wandb(tiny_run: Path):
    """Every loop's JSONL rows are also in its TensorBoard events and in its W&B run (offline mode), with the
    same values at the same steps; one W&B run per loop, all in the run directory's group."""
    loops = ("teacher_A", "teacher_B", "sft", "arm_lightning_A", "arm_lightning_B", "arm_online_A")
    runs = _wandb_offline_runs(tiny_run / "wandb")
    assert set(runs) == set(loops)
    ids = json.loads((tiny_run / "wandb" / "run_ids.json").read_text())
    for loop in loops:
        rows = [json.loads(x) for x in (tiny_run / "metrics" / f"{loop}.jsonl").read_text().splitlines()]
        scalars = _tensorboard_scalars(tiny_run / "tb" / loop)
        wandb_run = runs[loop]
        assert wandb_run["group"] == tiny_run.name and wandb_run["id"] == ids[loop]
        keys = [k for k in ("loss", "eval/accuracy", "reverse_kl") if any(k in r for r in rows)]
        assert "loss" in keys, loop
        for key in keys:
            expected = {r["step"]: r[key] for r in rows if isinstance(r.get(key), float | int)}
            assert expected and set(scalars[key]) == set(expected), (loop, key)
            for step, value in expected.items():
                assert scalars[key][step] == pytest.approx(value, rel=1e-6), (loop, key, step)  # float32 on disk
                assert wandb_run["history"][step][key] == pytest.approx(value, rel=1e-12), (loop, key, step)


def test_saved_models_have_normal_permissions(tiny_run: Path):
    from jopd.io import current_umask

    mode = 0o777 & ~current_umask()
    for model_dir in (tiny_run / "export", tiny_run / "sft" / "model", tiny_run / "prepare" / "student_base"):
        if model_dir.is_dir():
            assert model_dir.stat().st_mode & 0o777 == mode, model_dir
    assert (tiny_run / "export").is_dir()


def test_export_loads_in_transformers(tiny_run: Path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_run / "export")
    ids = torch.tensor([[1, 3, 40, 41, 2, 4]])
    assert torch.isfinite(model(ids).logits).all()
    check = json.loads((tiny_run / "export" / "export_check.json").read_text())
    assert check["transformers_max_abs_diff"] < 1e-4


def test_rerun_skips_and_changed_inputs_are_refused(tiny_run: Path):
    proc = _cli("--config", "configs/tiny.yaml", "--run-dir", str(tiny_run), *tiny_shrink())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "up to date (skipped)" in proc.stderr
    before = {p: p.read_bytes() for p in tiny_run.rglob("*") if p.is_file() and p.name != "run.log"}
    proc = _cli("--config", "configs/tiny.yaml", "--run-dir", str(tiny_run), *tiny_shrink(), "rollout.temperature=0.5",
                "--stages", "rollout")
    assert proc.returncode == 2  # a user error: the message alone, no traceback
    assert "Traceback" not in proc.stderr
    # the refused run leaves the completed run directory as it was (its resolved config.yaml included, no lock
    # left behind); only run.log records the invocation
    after = {p: p.read_bytes() for p in tiny_run.rglob("*") if p.is_file() and p.name != "run.log"}
    assert after.keys() == before.keys() and all(after[p] == before[p] for p in before)
    assert "different inputs" in proc.stderr and "temperature: 1.0 -> 0.5" in proc.stderr


def test_bad_config_lists_every_problem(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers: {A: {path: /nonexistent}}\nstudent: {pth: x}\nopd: {steps: many}\n")
    proc = _cli("--config", str(bad))
    assert proc.returncode == 2
    assert "student.pth: unknown key" in proc.stderr and "opd.steps: expected an integer" in proc.stderr
