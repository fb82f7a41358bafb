"""Bad input through the CLI: a one-paragraph message naming the file / field / value, exit status 2, no
traceback (it goes to RUN_DIR/run.log; ``--debug`` shows it on the console).

Config-time classes run ``jopd.main.main`` in this process (they end before JAX starts); classes found by a
stage run the CLI in a subprocess on a run directory that only holds what the case needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jopd.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")

# (class, extra CLI arguments, what the message must say)
CONFIG_CASES = [
    ("override value not YAML", ["opd.steps=[1"],
     "override 'opd.steps=[1': the value '[1' is not valid YAML"),
    ("override without =", ["opd.steps"], "override 'opd.steps': expected key.sub=value"),
    ("override list index out of range", ["arms.7.teacher=A"], "'arms.7.teacher' does not name a config field"),
    ("override list index not a number", ["arms.x.teacher=A"], "'arms.x.teacher' does not name a config field"),
    ("unknown key", ["opd.stepz=3"], "opd.stepz: unknown key"),
    ("wrong type", ["opd.steps=many"], "opd.steps: expected an integer"),
    ("zero batch", ["rollout.batch_size=0"], "rollout.batch_size: must be > 0, got 0"),
    ("zero model width", ["student.init.hidden_size=0"], "student.init.hidden_size: must be > 0, got 0"),
    ("heads not a multiple of kv heads", ["teachers.A.init.num_heads=3"],
     "teachers.A.init.num_heads: must be a multiple of num_kv_heads 2, got 3"),
    ("unknown stage", ["--stages", "prepare,trian"], "stages"),
    ("missing prompt file", ["task.kind=prompt_file", "task.prompt_file=/nonexistent/p.jsonl"],
     "task.prompt_file: file '/nonexistent/p.jsonl' does not exist"),
]


@pytest.mark.parametrize(("case", "args", "message"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors_exit_2_with_the_field_named(case, args, message, tmp_path, capsys):
    code = main(["--config", TINY, "--run-dir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_unreadable_config_files(tmp_path, capsys):
    garbled = tmp_path / "garbled.yaml"
    garbled.write_text("opd: {steps: [1\n")
    for path, message in ((tmp_path / "missing.yaml", "missing.yaml"), (garbled, "garbled.yaml")):
        code = main(["--config", str(path)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "jopd.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def prompt_file_setup(tmp_path_factory) -> dict[str, str]:
    """A teacher / student HF directory (a test fixture) and the built-in character tokenizer, so that
    ``prepare`` reaches the prompt files."""
    from jopd.data.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("prompt_files")
    tok = build_char_tokenizer(root / "tokenizer")
    return {"root": str(root), "tokenizer": str(tok)}


STAGE_CASES = [
    ("JSONL line not JSON", b'{"prompt": "What is 2+2?", "answer": "4"}\n{"prompt": "x"\n', ":2: invalid JSON"),
    ("row without a prompt", b'{"answer": "4"}\n', ":1: missing prompt field 'prompt'"),
    ("row that is not an object", b'["What is 2+2?", "4"]\n', "expected a JSON object per row"),
    ("characters outside the vocabulary", ('{"prompt": "What is 2+2? \u65e5", "answer": "4"}\n' + "".join(
        f'{{"prompt": "What is {i}+1?", "answer": "{i + 1}"}}\n' for i in range(40))).encode(),
     ":1; characters '\u65e5'"),
    ("non-UTF-8 bytes", b'{"prompt": "caf\xe9", "answer": "4"}\n', "UTF-8"),
]


@pytest.mark.parametrize(("case", "content", "message"), STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_bad_prompt_files_exit_2_naming_file_and_line(case, content, message, prompt_file_setup, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(content)
    run_dir = tmp_path / "run"
    fixture = str(ROOT / "tests" / "fixtures" / "hf" / "qwen3_qknorm")
    proc = _cli("--config", TINY, "--run-dir", str(run_dir), "--stages", "prepare", "task.kind=prompt_file",
                f"task.prompt_file={prompts}", f"tokenizer.path={prompt_file_setup['tokenizer']}",
                "teachers={A: {path: " + fixture + "}}", "precompute.teachers=[A]", "student.init=null",
                f"student.path={fixture}", "arms=[{name: l, mode: lightning, teacher: A}]")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(prompts) in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # the traceback is kept for whoever debugs it: in run.log, not on the console
    assert "Traceback" in (run_dir / "run.log").read_text()


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


def test_run_directory_errors(tmp_path, capsys):
    """A run directory that is a file, lies under a file, or holds a garbled stage marker: exit 2 naming it."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for run_dir, message in ((a_file, "exists and is not a directory"),
                             (a_file / "run", "cannot be created: '" + str(a_file) + "' is a file")):
        code = main(["--config", TINY, "--run-dir", str(run_dir)])
        err = capsys.readouterr().err
        assert code == 2 and f"run_dir: '{run_dir}'" in err and message in err and "Traceback" not in err, err
    garbled = tmp_path / "run" / "report" / "DONE.json"
    garbled.parent.mkdir(parents=True)
    garbled.write_text("{garbled")
    proc = _cli("--config", TINY, "--run-dir", str(tmp_path / "run"), "--stages", "report")
    assert proc.returncode == 2 and f"{garbled}: not a readable stage marker" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
