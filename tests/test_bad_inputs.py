"""Every class of bad input, table-driven through the CLI: exit status 2, a message naming the file / field /
value and what was expected, no traceback, and a completed run directory left byte-identical (only run.log may
record the refused invocation).

Most classes are found before any stage runs (``jopd.config`` and ``jopd.preflight``) and run ``jopd.main.main``
in this process against the completed tiny run; the classes a stage finds run the CLI in a subprocess. The
messages observed here are the table in docs/bad-inputs.md: `JOPD_WRITE_DOCS=1 pytest tests/test_bad_inputs.py`
rewrites it, and ``test_the_docs_table_is_the_observed_messages`` fails while it is out of date.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import FAULT_RUN_ARGS, HF_FIXTURES, cli_env

from jopd.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.yaml"
DOC = ROOT / "docs" / "bad-inputs.md"
OBSERVED: dict[str, tuple[str, str]] = {}  # case -> (category, normalised message)


@dataclasses.dataclass(frozen=True)
class Case:
    """One class of bad input. ``setup(tmp, run_dir) -> extra CLI arguments`` writes what the case needs under
    ``tmp``; ``damage(run_dir)`` changes a copy of the completed run first (its cases run on the copy);
    ``fresh``: the case runs on a new run directory (which must then not be created) instead of the completed
    one; ``subprocess``: found by a stage, so the CLI runs in its own process."""

    name: str
    category: str
    setup: Callable[[Path, Path], list[str]]
    expect: tuple[str, ...]
    damage: Callable[[Path], None] | None = None
    fresh: bool = False
    subprocess: bool = False


# ---------------------------------------------------------------------------------------------- builders
def _args(*args: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: list(args)


def _model_dir(tmp: Path, change: Callable[[Path], None]) -> Path:
    """A copy of a valid HF fixture (qwen3 with q/k norms, no tokenizer files), changed by ``change``."""
    path = tmp / "model"
    shutil.copytree(HF_FIXTURES / "qwen3_qknorm", path)
    change(path)
    return path


def _edit_config(**fields) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(fields)
        (path / "config.json").write_text(json.dumps(cfg))
    return change


def _edit_tensors(edit: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors")
    return change


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        target = path / name
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return change


def _truncate(path: Path) -> None:
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _teacher(change: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    """An external teacher A (the model directory changed by ``change``) on the completed tiny run."""
    return lambda tmp, run: [f"teachers.A.path={_model_dir(tmp, change)}", "teachers.A.init=null"]


def _prompt_file_task(tmp: Path, run: Path, prompts: Path, *, student: Path | None = None,
                      tokenizer: bool = True) -> list[str]:
    """A prompt-file task with an external teacher and student (valid fixtures) and the run's tokenizer."""
    fixture = HF_FIXTURES / "qwen3_qknorm"
    tok_dir = run / "prepare" / "tokenizer"
    if tokenizer and not tok_dir.is_dir():  # a new run directory: the arithmetic task's character tokenizer
        from jopd.data.tokenizer import build_char_tokenizer

        tok_dir = build_char_tokenizer(tmp / "tokenizer")
    return ["task.kind=prompt_file", f"task.prompt_file={prompts}",
            *([f"tokenizer.path={tok_dir}"] if tokenizer else []),
            "teachers={A: {path: " + str(fixture) + "}}", "precompute.teachers=[A]", "student.init=null",
            f"student.path={student or fixture}", "arms=[{name: l, mode: lightning, teacher: A}]",
            "opd.batch_size=2"]


def _prompts(name: str, content: str | bytes) -> Callable[[Path, Path], list[str]]:
    def setup(tmp: Path, run: Path) -> list[str]:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return _prompt_file_task(tmp, run, path)
    return setup


def _parquet(tmp: Path, run: Path) -> list[str]:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp / "prompts.parquet"
    pq.write_table(pa.table({"question": ["What is 2+2?", "What is 3+3?"], "answer": ["4", "6"]}), path)
    return _prompt_file_task(tmp, run, path)


def _good_prompts(tmp: Path, n: int = 40) -> Path:
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "answer": str(i + 1)}) + "\n"
                            for i in range(n)))
    return path


def _student_without_tokenizer(tmp: Path, run: Path) -> list[str]:
    return _prompt_file_task(tmp, run, _good_prompts(tmp), tokenizer=False)


def _tokenizer_dir_without_files(tmp: Path, run: Path) -> list[str]:
    (tmp / "tok").mkdir()
    (tmp / "tok" / "README").write_text("no tokenizer here")
    return [f"tokenizer.path={tmp / 'tok'}"]


def _a_file(tmp: Path, run: Path) -> list[str]:
    (tmp / "a_file").write_text("x")
    return ["--run-dir", str(tmp / "a_file")]


def _under_a_file(tmp: Path, run: Path) -> list[str]:
    (tmp / "a_file").write_text("x")
    return ["--run-dir", str(tmp / "a_file" / "run")]


def _live_lock(tmp: Path, run: Path) -> list[str]:
    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": 0}))
    return []


def _unlink(rel: str) -> Callable[[Path], None]:
    return lambda run: (run / rel).unlink()


def _write_in_run(rel: str, content: str) -> Callable[[Path], None]:
    return lambda run: (run / rel).write_text(content)


_MANY_OOV = ('{"prompt": "What is 2+2? \u65e5", "answer": "4"}\n'
             + "".join(f'{{"prompt": "What is {i}+1?", "answer": "{i + 1}"}}\n' for i in range(80)))

CASES = [
    # ------------------------------------------------------------------ config file, values, overrides
    Case("config file missing", "config", lambda tmp, run: ["--config", str(tmp / "missing.yaml")],
         ("missing.yaml", "does not exist"), fresh=True),
    Case("config file not YAML", "config", lambda tmp, run: [
        "--config", str((tmp / "garbled.yaml").write_text("opd: {steps: [1\n") and tmp / "garbled.yaml")],
        ("garbled.yaml", "invalid YAML"), fresh=True),
    Case("override value not YAML", "config", _args("opd.steps=[1"),
         ("override 'opd.steps=[1': the value '[1' is not valid YAML",)),
    Case("override without =", "config", _args("opd.steps"), ("override 'opd.steps': expected key.sub=value",)),
    Case("override list index out of range", "config", _args("arms.7.teacher=A"),
         ("'arms.7.teacher' does not name a config field",)),
    Case("override list index not a number", "config", _args("arms.x.teacher=A"),
         ("'arms.x.teacher' does not name a config field",)),
    Case("unknown key", "config", _args("opd.stepz=3"), ("opd.stepz: unknown key",)),
    Case("wrong type", "config", _args("opd.steps=many"), ("opd.steps: expected an integer",)),
    Case("zero batch", "config", _args("rollout.batch_size=0"), ("rollout.batch_size: must be > 0, got 0",)),
    Case("zero model width", "config", _args("student.init.hidden_size=0"),
         ("student.init.hidden_size: must be > 0, got 0",)),
    Case("heads not a multiple of kv heads", "config", _args("teachers.A.init.num_heads=3"),
         ("teachers.A.init.num_heads: must be a multiple of num_kv_heads 2, got 3",)),
    Case("unknown stage", "config", _args("--stages", "prepare,trian"), ("stages: unknown stage 'trian'",)),
    Case("unknown teacher in an arm", "config", _args("arms.0.teacher=C"), ("arms[0].teacher: unknown teacher 'C'",)),
    Case("mesh larger than the devices", "config", _args("mesh.fsdp=64"), ("mesh", "64")),
    # ------------------------------------------------------------------------------ sizes across sections
    Case("OPD batch larger than the OPD rows", "sizes", _args("opd.batch_size=64"),
         ("opd.batch_size: 64 is larger than the 16 OPD rollout rows",)),
    Case("SFT batch larger than the SFT rows", "sizes", _args("sft.batch_size=64"),
         ("sft.batch_size: 64 is larger than the 30 SFT training rows",)),
    Case("teacher pre-training batch larger than its examples", "sizes", _args("teachers.B.pretrain.batch_size=500"),
         ("teachers.B.pretrain.batch_size: 500 is larger than the 122 training examples",)),
    # --------------------------------------------------------------------------------------- prompt files
    Case("prompt file missing", "prompt file", lambda tmp, run: _prompt_file_task(tmp, run, tmp / "none.jsonl"),
         ("task.prompt_file: file", "none.jsonl' does not exist")),
    Case("JSONL line not JSON", "prompt file",
         _prompts("p.jsonl", '{"prompt": "What is 2+2?", "answer": "4"}\n{"prompt": "x"\n'), ("p.jsonl:2: invalid JSON",)),
    Case("row without a prompt", "prompt file", _prompts("p.jsonl", '{"answer": "4"}\n'),
         ("p.jsonl:1: missing prompt field 'prompt'",)),
    Case("row without an answer", "prompt file", _prompts("p.jsonl", '{"prompt": "What is 2+2?"}\n'),
         ("p.jsonl:1: missing answer field",)),
    Case("row that is not an object", "prompt file", _prompts("p.jsonl", '["What is 2+2?", "4"]\n'),
         ("p.jsonl", "expected a JSON object per row")),
    Case("non-UTF-8 bytes", "prompt file", _prompts("p.jsonl", b'{"prompt": "caf\xe9", "answer": "4"}\n'),
         ("p.jsonl", "UTF-8")),
    Case("empty prompt file", "prompt file", _prompts("p.jsonl", ""), ("p.jsonl: no SFT prompts left",)),
    Case("unknown extension", "prompt file", _prompts("p.csv", "prompt,answer\nWhat is 2+2?,4\n"),
         ("p.csv: unsupported prompt file type '.csv'",)),
    Case("Parquet file with the wrong columns", "prompt file", _parquet,
         ("prompts.parquet row 0 (0-based): missing prompt field 'prompt'",)),
    Case("characters outside the tokenizer's vocabulary", "prompt file", _prompts("p.jsonl", _MANY_OOV),
         ("p.jsonl:1; characters '\u65e5'",), fresh=True, subprocess=True),
    # ----------------------------------------------------------------------------------- model directories
    Case("not a model directory", "model directory", lambda tmp, run: [f"teachers.A.path={tmp}", "teachers.A.init=null"],
         ("teachers.A.path:", "is not a Hugging Face model directory (no config.json)")),
    Case("unsupported model_type", "model directory", _teacher(_edit_config(model_type="gpt2")),
         ("teachers.A.path:", "gpt2")),
    Case("garbled config.json", "model directory", _teacher(_write("config.json", "{model_type: qwen3")),
         ("teachers.A.path:", "config.json: invalid JSON")),
    Case("config.json not an object", "model directory", _teacher(_write("config.json", "[1, 2]")),
         ("teachers.A.path:", "config.json")),
    Case("safetensors file missing", "model directory", _teacher(_unlink("model.safetensors")),
         ("teachers.A.path:", "neither model.safetensors nor model.safetensors.index.json found")),
    Case("truncated safetensors file", "model directory", _teacher(_truncate),
         ("teachers.A.path:", "extends past the end of the file (truncated?)")),
    Case("missing tensor", "model directory",
         _teacher(_edit_tensors(lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))),
         ("teachers.A.path:", "tensor model.layers.0.mlp.up_proj.weight is missing")),
    Case("extra tensor", "model directory",
         _teacher(_edit_tensors(lambda t: t.update({"model.extra.weight": np.ones(3, np.float32)}))),
         ("teachers.A.path:", "does not use: ['model.extra.weight']")),
    Case("config that does not match the weights", "model directory", _teacher(_edit_config(intermediate_size=40)),
         ("teachers.A.path:", "tensor model.layers.0.mlp.gate_proj.weight has shape", "implies (40,")),
    Case("tensor stored transposed (same element count)", "model directory",
         _teacher(_edit_tensors(lambda t: t.update(
             {"model.layers.0.self_attn.q_proj.weight": np.ascontiguousarray(t["model.layers.0.self_attn.q_proj.weight"].T)}))),
         ("teachers.A.path:", "tensor model.layers.0.self_attn.q_proj.weight has shape (64, 128)", "implies (128, 64)")),
    Case("integer tensor", "model directory",
         _teacher(_edit_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)}))),
         ("teachers.A.path:", "tensor model.norm.weight has dtype I32")),
    Case("student directory without a tokenizer", "model directory", _student_without_tokenizer,
         ("student.path:", "has no tokenizer files")),
    Case("tokenizer directory without tokenizer files", "model directory", _tokenizer_dir_without_files,
         ("tokenizer.path:", "has no tokenizer files")),
    # ----------------------------------------------------------------------------------- run directories
    Case("run directory is a file", "run directory", _a_file, ("exists and is not a directory",), fresh=True),
    Case("run directory under a file", "run directory", _under_a_file, ("is a file, not a directory",), fresh=True),
    Case("run directory in use", "run directory", _live_lock, ("is in use by another jopd invocation (pid",),
         subprocess=True),
    Case("garbled stage marker", "run directory", _args(), ("report/DONE.json: not a readable stage marker",),
         damage=_write_in_run("report/DONE.json", "{garbled"), subprocess=True),
    Case("deleted store chunk of a completed stage", "run directory", _args(),
         ("stage 'rollout' completed, but its outputs have changed since", "missing rollout/store/tokens/c/1/0"),
         damage=_unlink("rollout/store/tokens/c/1/0"), subprocess=True),
    Case("deleted in-run teacher weights", "run directory", _args(),
         ("stage 'prepare' completed, but its outputs have changed", "prepare/teachers/A/model.safetensors"),
         damage=_unlink("prepare/teachers/A/model.safetensors"), subprocess=True),
    Case("changed input of a completed stage", "run directory", _args("rollout.temperature=0.5"),
         ("different inputs", "sampling.temperature: 1.0 -> 0.5"), subprocess=True),
]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "run.log"}


def _normalise(text: str, tmp: Path, run_dir: Path) -> str:
    """The message without what changes from one session to the next: paths, the lock holder, key lists."""
    import re

    for path, name in ((run_dir, "RUN_DIR"), (tmp, "TMP"), (ROOT, ".")):
        text = text.replace(str(path), name)
    text = re.sub(r"pid \d+ on \S+, since [^)]*\)", "pid PID on HOST, since TIME)", text)
    return re.sub(r"\(known: [^)]*\)", "(known: ...)", text)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_naming_it_and_changes_nothing(case: Case, completed_tiny_run: Path, tmp_path: Path,
                                                         capsys):
    if case.fresh:
        run_dir = tmp_path / "fresh_run"
    elif case.damage is not None:
        run_dir = tmp_path / "damaged_run"
        shutil.copytree(completed_tiny_run, run_dir, symlinks=True)
        case.damage(run_dir)
    else:
        run_dir = completed_tiny_run
    before = None if case.fresh else _snapshot(run_dir)
    work = tmp_path / "inputs"
    work.mkdir()
    extra = case.setup(work, run_dir)
    args = ["--config", TINY, "--run-dir", str(run_dir), *FAULT_RUN_ARGS, *extra]
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", "jopd.main", *args], cwd=ROOT, env=cli_env(), capture_output=True,
                              text=True, timeout=600)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = main(args), capsys.readouterr().err
    if case.name == "run directory in use":
        (run_dir / ".lock").unlink()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    message = err[err.index("error: "):].strip() if "error: " in err else ""
    for part in case.expect:
        assert part in message, (part, err[-3000:])
    if case.subprocess and case.name != "run directory in use":  # refused by a stage, after run.log was opened
        assert "Traceback" in (run_dir / "run.log").read_text()  # kept there for whoever debugs it
    if case.fresh:
        assert not run_dir.exists() or case.subprocess or run_dir.is_file()
    else:
        after = _snapshot(run_dir)
        assert after.keys() == before.keys(), sorted(set(after) ^ set(before))
        assert [k for k in before if before[k] != after[k]] == []
    OBSERVED[case.name] = (case.category, _normalise(message[len("error: "):], work, run_dir))


def _table() -> str:
    lines = ["# Bad input: what each class gets", "",
             "Generated by `JOPD_WRITE_DOCS=1 pytest tests/test_bad_inputs.py` from the messages the tests observe",
             "(paths shortened: `RUN_DIR` the run directory, `TMP` the test's input files). Every class exits with",
             "status 2 and this message alone (the traceback goes to RUN_DIR/run.log when the run directory exists,",
             "and to the console with `--debug`); a run directory that was complete is left byte-identical (only",
             "run.log records the refused invocation). Most classes are found before any stage runs",
             "(`jopd/config.py`, `jopd/preflight.py`); the characters outside the vocabulary are found by `prepare`",
             "(it needs the tokenizer), the damaged run directories when their stage is skipped.", "",
             "A read-only run directory or parent is refused the same way (`run_dir: ... is not writable`); it is",
             "not in the table because the suite runs as root in CI, for whom nothing is read-only.", "",
             "A non-finite loss or gradient is not bad input: the arm stops with exit status 1 naming the arm, the",
             "step and the batch's store rows, and the next invocation resumes from the last checkpoint",
             "(tests/test_faults.py).", "",
             "| class | found in | message |", "|---|---|---|"]
    for case in CASES:
        category, message = OBSERVED[case.name]
        cell = message.replace("|", "\\|").replace("\n", "<br>")
        lines.append(f"| {case.name} | {category} | {cell} |")
    return "\n".join(lines) + "\n"


def test_the_docs_table_is_the_observed_messages():
    missing = [c.name for c in CASES if c.name not in OBSERVED]
    if missing:
        pytest.skip(f"only with every case run in this session (missing: {missing[:3]} ...)")
    text = _table()
    if os.environ.get("JOPD_WRITE_DOCS") == "1":
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, \
        "docs/bad-inputs.md is out of date: JOPD_WRITE_DOCS=1 pytest tests/test_bad_inputs.py"
