"""Shared test setup.

Every test process gets 8 simulated CPU devices (set before jax is imported anywhere) so sharded code paths
run on a laptop; single-device tests build their meshes from ``jax.devices()[:1]``.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# One persistent XLA compilation cache for the whole session, this process and every CLI / multi-process
# subprocess it starts (they inherit the environment): the tiny pipelines of several test modules compile the
# same programs, and a cached program loads in milliseconds (a shrunk tiny run: 49 s cold, 19 s warm).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _CACHE = tempfile.mkdtemp(prefix="jopd-test-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

TESTS_DIR = pathlib.Path(__file__).resolve().parent
FIXTURES = TESTS_DIR / "fixtures"
HF_FIXTURES = FIXTURES / "hf"
REF_FIXTURES = FIXTURES / "ref"
TINY_CASES = ("llama_tied", "llama_untied_rope3", "qwen2_bias", "qwen3_qknorm", "qwen3_moe", "qwen3_moe_nonorm")


def hf_dir(case: str) -> pathlib.Path:
    path = HF_FIXTURES / case
    if not (path / "config.json").is_file():
        pytest.fail(f"missing test fixture {path}: run `python scripts/make_reference_fixtures.py`")
    return path


def ref_path(case: str) -> pathlib.Path:
    path = REF_FIXTURES / f"{case}.npz"
    if not path.is_file():
        pytest.fail(f"missing test fixture {path}: run `python scripts/make_reference_fixtures.py`")
    return path


def load_ref(case: str) -> dict:
    import numpy as np

    with np.load(ref_path(case)) as f:
        return {k: f[k] for k in f.files}


def gen_prompts(ref: dict) -> list[list[int]]:
    """The reference's greedy-generation prompts as lists of token ids (padding removed)."""
    return [ref["gen_prompts"][i, :n].tolist() for i, n in enumerate(ref["gen_prompt_lens"])]


def compare_len(margins, tie: float = 1e-4) -> int:
    """Number of leading generated tokens that must agree: stop at the first near-tie step (a tie may go
    either way, and everything after it can then differ)."""
    import numpy as np

    ties = np.flatnonzero(np.asarray(margins) < tie)
    return int(ties[0]) if ties.size else len(margins)


def eight_devices() -> list:
    """8 devices for sharded tests: the default backend's if it has 8, else the simulated CPU ones."""
    devs = jax.devices()
    if len(devs) >= 8:
        return devs[:8]
    cpus = jax.devices("cpu")
    if len(cpus) >= 8:
        return cpus[:8]
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 was set too late?)")


def one_device() -> list:
    return jax.devices()[:1]


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """The converted SmolLM2-135M-Instruct directory from ``$JOPD_SMOLLM2_DIR``.

    Skipped when unavailable locally; under CI (``CI=true``) a missing model is a failure, so the real-model
    tests can never silently disappear.
    """
    env = os.environ.get("JOPD_SMOLLM2_DIR")
    if not env:
        problem = "JOPD_SMOLLM2_DIR is not set (run `make smollm2` and export it, or use `make test`)"
    elif not (pathlib.Path(env) / "config.json").is_file():
        problem = f"JOPD_SMOLLM2_DIR={env} has no config.json (run `make smollm2`)"
    else:
        return pathlib.Path(env)
    if _ci():
        pytest.fail(f"CI=true but the SmolLM2 model is unavailable: {problem}")
    pytest.skip(problem)


def three_arm_config(run_dir: pathlib.Path, **extra):
    """A run config with teachers A and B and arms lightning_A, lightning_B (inconsistent), online_A."""
    from jopd.config import load_config

    arch = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
            "num_kv_heads": 1, "head_dim": 16}
    data = {"run_dir": str(run_dir), "stages": ["eval", "export", "report"],
            "teachers": {"A": {"init": arch, "style": "A"}, "B": {"init": arch, "style": "B"}},
            "student": {"init": arch}, "sft_teacher": "A", "precompute": {"teachers": ["A", "B"]},
            "arms": [{"name": "lightning_A", "mode": "lightning", "teacher": "A"},
                     {"name": "lightning_B", "mode": "lightning", "teacher": "B", "allow_inconsistent_teacher": True},
                     {"name": "online_A", "mode": "online", "teacher": "A"}]}
    data.update(extra)
    return load_config(data=data)


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tiny_shrink(teachers: str = "AB", eval_every: int = 2) -> list[str]:
    """Dotted overrides that cut configs/tiny.yaml to its smallest (every stage still runs; compilation
    dominates): the CLI tests' common run. ``teachers``: the in-run teachers the config has."""
    return [
        "task.num_sft_prompts=32", "task.num_opd_prompts=16", "task.num_eval_prompts=8",
        *(f"teachers.{t}.{k}" for t in teachers for k in ("pretrain_examples=128", "pretrain.steps=16",
                                                          "pretrain.checkpoint_every=16")),
        "teacher_data.max_new_tokens=16", "rollout.max_new_tokens=16", "eval.max_new_tokens=16",
        "teacher_data.batch_size=32", "rollout.batch_size=16", "rollout.rows_per_chunk=16",
        "precompute.batch_size=16", "eval.batch_size=8",
        "sft.steps=8", "sft.checkpoint_every=8", "sft.batch_size=8",
        "opd.steps=2", "opd.checkpoint_every=2", f"opd.eval_every={eval_every}", "opd.log_every=1",
    ]


# The shrunk tiny pipeline with several units per resumable step (2 rollout chunks, 2 SFT checkpoints, an arm
# checkpoint per step): the uninterrupted reference of the fault-injection tests, and the completed run directory
# the bad-input tests must leave byte-identical.
FAULT_RUN_ARGS = (*tiny_shrink(), "rollout.batch_size=8", "rollout.rows_per_chunk=8", "sft.checkpoint_every=4",
                  "opd.checkpoint_every=1")


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: one CPU device, as a user runs it (the session's XLA compilation
    cache is inherited)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["WANDB_SILENT"] = "true"
    return env


@pytest.fixture(scope="session")
def completed_tiny_run(tmp_path_factory) -> pathlib.Path:
    """A completed run directory of configs/tiny.yaml with ``FAULT_RUN_ARGS`` (every stage). Tests must not
    change it (copy it first)."""
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("completed_tiny") / "run"
    proc = subprocess.run([sys.executable, "-m", "jopd.main", "--config", "configs/tiny.yaml", "--run-dir",
                           str(run_dir), *FAULT_RUN_ARGS], cwd=TESTS_DIR.parent, env=cli_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def run_artifacts(run_dir: pathlib.Path) -> dict[str, bytes]:
    """The deterministic artifacts of a run directory, {relative path: bytes}: every model's weights, every
    store array chunk, the prompts and the teacher data, and the eval results without their timings (what a
    resumed run must reproduce exactly; markers, logs and metrics carry times)."""
    import json

    out: dict[str, bytes] = {}
    for path in sorted(run_dir.rglob("*")):
        rel = str(path.relative_to(run_dir))
        if not path.is_file():
            continue
        if (path.suffix == ".safetensors" or "/c/" in rel and "store" in rel
                or rel.startswith(("prepare/prompts/", "teacher_data/sft.jsonl"))):
            out[rel] = path.read_bytes()
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    for model, metrics in results.items():
        kept = {k: v for k, v in metrics.items() if k != "path" and "second" not in k and not k.endswith("_s")} \
            if isinstance(metrics, dict) else metrics
        out[f"eval/results.json:{model}"] = json.dumps(kept, sort_keys=True).encode()
    return out
