"""The run directory's guards: the lock, the refusal naming the changed leaf, the re-verification of a skipped
stage's outputs. (Every class of bad input through the CLI, table-driven: tests/test_bad_inputs.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "jopd.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_run_directory_lock(tmp_path):
    """A run directory in use is refused naming the holder's pid and host; a stale lock (its process is gone)
    is taken over with a warning, and released at the end."""
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": 0}))
    # "report" alone on an empty run directory: refused after the lock (it needs earlier stages), quickly
    proc = _cli("--config", TINY, "--run-dir", str(run_dir), "--stages", "report")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"in use by another jopd invocation (pid {os.getpid()} on {socket.gethostname()}" in proc.stderr
    assert "Traceback" not in proc.stderr and lock.is_file()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": 0}))
    proc = _cli("--config", TINY, "--run-dir", str(run_dir), "--stages", "report")
    assert f"taking over the stale lock {lock} (pid {dead.pid}" in proc.stderr, proc.stderr[-3000:]
    assert "in use by another" not in proc.stderr and not lock.exists()


def test_changed_inputs_name_the_leaf_field(tmp_path):
    """A stage refused for changed inputs names the field that changed (sft.steps: 100 -> 50), not the whole
    config section; the fingerprint itself is unchanged by the detailed record (old run directories stay
    valid)."""
    from jopd.config import load_config
    from jopd.pipeline import Run, Stage, StageError, run_stage

    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}"])
    run = Run.create(cfg, mesh=None)
    first = Stage("sft", lambda r: {"sft": r.cfg.sft, "seed": 0}, lambda r: {"ok": 1})
    assert run_stage(first, run) == {"ok": 1}
    done = json.loads((tmp_path / "run" / "sft" / "DONE.json").read_text())
    assert done["inputs"]["sft"].startswith("SFTSection(")  # what the fingerprint hashes, as before
    changed = Stage("sft", lambda r: {"sft": dataclasses.replace(r.cfg.sft, steps=50), "seed": 0}, first.run)
    with pytest.raises(StageError) as err:
        run_stage(changed, run)
    assert "changed: sft.steps: 100 -> 50" in str(err.value) and "SFTSection(" not in str(err.value)


def test_skipped_stage_reverifies_its_outputs(tmp_path):
    """A completed stage is skipped only while its outputs are what it wrote (every file present, at its
    recorded size): a deleted store chunk or a truncated file is reported, never silently reused."""
    from jopd.config import load_config
    from jopd.pipeline import Run, Stage, StageError, run_stage

    run = Run.create(load_config(TINY, [f"run_dir={tmp_path / 'run'}"]), mesh=None)
    out = run.layout.stage("rollout")

    def write(r):
        (out / "store" / "chunks").mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (out / "store" / "chunks" / f"{i}").write_bytes(b"x" * (10 + i))
        (out / "summary.json").write_text("{}")
        return {}

    stage = Stage("rollout", lambda r: {"seed": 0}, write)
    run_stage(stage, run)
    manifest = json.loads((out / "DONE.json").read_text())["manifest"]
    assert manifest == {"rollout/store/chunks/0": 10, "rollout/store/chunks/1": 11, "rollout/store/chunks/2": 12,
                        "rollout/summary.json": 2}
    run_stage(stage, run)  # untouched: skipped
    (out / "store" / "chunks" / "1").unlink()
    (out / "summary.json").write_text("{ }")
    with pytest.raises(StageError) as err:
        run_stage(stage, run)
    message = str(err.value)
    assert "missing rollout/store/chunks/1" in message and "size changed: rollout/summary.json" in message
    assert f"Delete {out}" in message
