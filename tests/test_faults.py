"""Fault injection: the tiny pipeline killed with SIGKILL at points of every stage kind, each time resumed by
re-running the same command, ends with the artifacts of an uninterrupted run, byte for byte.

The kills are real (``kill -9`` of the CLI process, no cleanup code runs). Training kills come from a loop hook
injected through ``jopd.main.main(hooks=...)``: the hook runs after the loop's own checkpoint hook, so a kill at
a checkpoint step lands while the asynchronous Orbax save is still being written. Generation kills come from
outside: the test watches the run directory and kills the process as soon as the first chunk of a store is
committed, while the next one is being generated.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAULT_RUN_ARGS, cli_env, run_artifacts

ROOT = Path(__file__).resolve().parents[1]

# A CLI process whose training loop ``LOOP`` kills itself (SIGKILL) right after step ``STEP``.
_KILLER = """
import os, signal, sys
from jopd.loop import Hook
from jopd.main import main

class KillAfter(Hook):
    def __init__(self, loop, step):
        self.loop, self.step = loop, step
    def on_step(self, loop, row):
        if loop.name == self.loop and loop.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

loop, step, *argv = sys.argv[1:]
sys.exit(main(argv, hooks=(KillAfter(loop, int(step)),)))
"""

# (what is interrupted, how): a training loop name and step (killed by the hook), or a file whose appearance
# triggers the kill from outside. With FAULT_RUN_ARGS: teachers pre-train 16 steps (one checkpoint, at 16), SFT
# 8 steps (checkpoints at 4 and 8), arms 2 steps (a checkpoint each step), rollout 2 chunks of 8 rows.
KILL_POINTS = [
    ("in-run teacher pre-training, between checkpoints (prepare)", ("teacher_A", 9), "prepare"),
    ("SFT, during the asynchronous checkpoint save of step 4", ("sft", 4), "sft"),
    ("rollout generation, after chunk 0 of 2 was committed", "rollout/store/progress/rollout/000000.json", "rollout"),
    ("Lightning arm, during the checkpoint save of step 1", ("arm 'lightning_A'", 1), "train"),
    ("online arm, after step 1 (generation + live teacher + update)", ("arm 'online_A'", 1), "online"),
]


def _base_args(run_dir: Path) -> list[str]:
    return ["--config", "configs/tiny.yaml", "--run-dir", str(run_dir), *FAULT_RUN_ARGS]


def _kill_when_file_appears(run_dir: Path, marker: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "jopd.main", *_base_args(run_dir)], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if (run_dir / marker).exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigkill_at_every_stage_kind_then_resume_gives_identical_artifacts(completed_tiny_run: Path,
                                                                           tmp_path: Path):
    run_dir = tmp_path / "run"
    for what, how, stage in KILL_POINTS:
        if isinstance(how, tuple):
            loop, step = how
            proc = subprocess.run([sys.executable, "-c", _KILLER, loop, str(step), *_base_args(run_dir)], cwd=ROOT,
                                  env=cli_env(), capture_output=True, text=True, timeout=900)
        else:
            proc = _kill_when_file_appears(run_dir, how)
        assert proc.returncode == -signal.SIGKILL, f"{what}: not killed (exit {proc.returncode})\n{proc.stderr[-3000:]}"
        # killed inside the intended stage: started, not done; every stage before it done
        assert (run_dir / stage / "STARTED.json").is_file() and not (run_dir / stage / "DONE.json").exists(), what
        assert (run_dir / ".lock").is_file()  # left behind by the killed process: a stale lock, taken over next
    proc = subprocess.run([sys.executable, "-m", "jopd.main", *_base_args(run_dir)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "taking over the stale lock" in proc.stderr
    got, want = run_artifacts(run_dir), run_artifacts(completed_tiny_run)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"artifacts differ from the uninterrupted run: {differ}"
    assert any(name.endswith(".safetensors") for name in want) and any("/c/" in name for name in want)


@pytest.mark.parametrize("case", ["absurd learning rate", "inf in the teacher store"])
def test_nonfinite_loss_stops_the_arm_naming_step_and_rows_and_the_last_checkpoint_resumes(
        case: str, completed_tiny_run: Path, tmp_path: Path):
    """A non-finite loss or gradient stops the arm (exit 1) naming the arm, the step and the batch's store rows;
    the checkpoint of the step before stays, and the next invocation resumes from it."""
    import shutil

    import numpy as np

    from jopd.data.store import RolloutStore

    run_dir = tmp_path / "run"
    shutil.copytree(completed_tiny_run, run_dir, symlinks=True)
    for path in ("train", "online", "eval", "export", "report", "arms"):
        shutil.rmtree(run_dir / path, ignore_errors=True)
    args = [*_base_args(run_dir), "--stages", "train", "arms=[{name: lightning_A, mode: lightning, teacher: A}]",
            "opd.steps=3"]
    if case == "absurd learning rate":
        # step 1's update (lr 1e30) leaves parameters of size ~1e30: step 2's loss is not finite
        args += ["opd.optim.lr=1.0e30"]
        failing_step, pattern = 2, "arm 'lightning_A': non-finite loss/gradient at step 2"
    else:
        # one response token of one row made +inf by a scorer gone wrong, with a valid chunk marker (the
        # store's writer refuses non-finite values, so go underneath it)
        store = RolloutStore.open(run_dir / "precompute" / "A" / "store", "r+")
        rows = store.read_rows(range(store.num_rows), ["teacher_logprobs", "prompt_len"])
        lp = rows["teacher_logprobs"]
        bad_row = store.num_rows - 1
        lp[bad_row, rows["prompt_len"][bad_row]] = np.inf
        chunk = bad_row // store.rows_per_chunk
        lo = chunk * store.rows_per_chunk
        store._commit("teacher", chunk, {"teacher_logprobs": lp[lo:lo + store.rows_per_chunk]})
        failing_step, pattern = None, "arm 'lightning_A': non-finite loss/gradient at step"
    proc = subprocess.run([sys.executable, "-m", "jopd.main", *args], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert pattern in proc.stderr and "store rows [" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    step = int(line.split("at step ")[1].split()[0])
    if failing_step is not None:
        assert step == failing_step
    else:  # the failing batch is the one holding the bad row
        assert f"{bad_row}" in line.split("store rows [")[1].split("]")[0].split(", ")
    ckpt_dir = run_dir / "arms" / "lightning_A" / "ckpt"
    ckpts = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []
    assert ckpts[-1] == step - 1 if step > 1 else not ckpts  # the last good step's checkpoint is kept
    again = subprocess.run([sys.executable, "-m", "jopd.main", *args], cwd=ROOT, env=cli_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 1 and f"at step {step}" in again.stderr
    if step > 1:
        assert f"resumed from the checkpoint of step {step - 1}" in again.stderr
