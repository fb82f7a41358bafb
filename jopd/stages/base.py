"""What every stage shares: the run context, input fingerprints, skip/resume/refuse, metrics logging.

A stage's directory is ``RUN_DIR/<stage>/``. Before doing any work a stage records ``STARTED.json`` with the
fingerprint of its inputs (the config values it reads + the fingerprints of the upstream outputs it
consumes); when it finishes it writes ``DONE.json``. On the next run:

- DONE with the same fingerprint → the stage is skipped;
- STARTED (not DONE) with the same fingerprint → the stage runs again and resumes from what it wrote
  (chunk markers, checkpoints);
- either with a different fingerprint → refused with an error naming the inputs that changed: outputs of
  different inputs are never mixed. Delete the stage directory (and those after it) or use a new run_dir.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax

from jopd.config import Config

log = logging.getLogger("jopd")


class StageError(RuntimeError):
    """A stage cannot run (inconsistent inputs, missing upstream outputs, refused by a rule)."""


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (dataclasses included)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _hash_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model_dir: str | os.PathLike, cache_path: str | os.PathLike | None = None) -> str:
    """Identity of a model: sha256 over its config.json and every safetensors file's content.

    Hashing a large model takes a while, so results are cached in ``cache_path`` keyed by
    (path, size, mtime) of each file.
    """
    model_dir = Path(model_dir)
    files = sorted([model_dir / "config.json"] + list(model_dir.glob("*.safetensors")))
    cache: dict[str, Any] = {}
    if cache_path and Path(cache_path).is_file():
        try:
            cache = read_json(cache_path)
        except (OSError, ValueError):
            cache = {}
    h = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = _hash_file(f)
            changed = True
        h.update(f.name.encode() + b"\0" + cache[key].encode())
    if cache_path and changed and jax.process_index() == 0:
        atomic_write_json(cache_path, cache)
    return h.hexdigest()


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


class MetricsLogger:
    """Metrics as JSONL (``RUN_DIR/metrics/NAME.jsonl``) and TensorBoard event files (``RUN_DIR/tb/NAME``)."""

    def __init__(self, run_dir: Path, name: str, *, resume_after_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = run_dir / "metrics" / f"{name}.jsonl"
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after_step is not None and self.path.exists():
            # A resumed run rewrites the steps after its checkpoint: keep only the lines up to it.
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", -1) <= resume_after_step]
            self.path.write_text("".join(k + "\n" for k in kept))
        elif self.path.exists():
            self.path.unlink()
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb" / name))
        except ImportError:  # tensorboardX is a dependency; stay usable without it all the same
            self._tb = None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


@dataclasses.dataclass
class RunContext:
    """Everything a stage needs: the validated config, the run directory and the device mesh."""

    cfg: Config
    run_dir: Path
    mesh: Any

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    @property
    def is_main_process(self) -> bool:
        return jax.process_index() == 0

    def sync(self, name: str) -> None:
        """Barrier across processes (no-op on one process)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    # --- models -------------------------------------------------------------------------------------
    def runtime(self) -> dict[str, Any]:
        p = self.cfg.precision
        return {"compute_dtype": p.compute_dtype, "remat": p.remat, "attention_impl": p.attention_impl,
                "logits_chunk_size": p.logits_chunk_size}

    def load_model(self, path: str | os.PathLike, *, param_dtype: str | None = None):
        from jopd.models import load_pretrained

        return load_pretrained(path, param_dtype or self.cfg.precision.param_dtype, mesh=self.mesh,
                               **self.runtime())

    def load_teacher(self, name: str):
        """A teacher, held in ``precision.teacher_dtype`` (teachers are only ever evaluated)."""
        return self.load_model(self.teacher_dir(name),
                               param_dtype=self.cfg.precision.teacher_dtype or self.cfg.precision.param_dtype)

    def teacher_dir(self, name: str) -> Path:
        t = self.cfg.teachers[name]
        return Path(t.path) if t.path else self.stage_dir("prepare") / "teachers" / name

    def student_base_dir(self) -> Path:
        return Path(self.cfg.student.path) if self.cfg.student.path else self.stage_dir("prepare") / "student_base"

    def sft_model_dir(self) -> Path:
        return self.stage_dir("sft") / "model"

    def arm_dir(self, arm: str) -> Path:
        return self.run_dir / "arms" / arm

    def model_fingerprint(self, path: str | os.PathLike) -> str:
        return model_fingerprint(path, self.run_dir / "fingerprint_cache.json")

    def teacher_fingerprint(self, name: str) -> str:
        return self.model_fingerprint(self.teacher_dir(name))

    # --- tokenizer ----------------------------------------------------------------------------------
    def tokenizer_dir(self) -> Path:
        if self.cfg.tokenizer.path:
            return Path(self.cfg.tokenizer.path)
        if self.cfg.student.path:
            return Path(self.cfg.student.path)
        return self.stage_dir("prepare") / "tokenizer"

    @property
    def tokenizer(self):
        if not hasattr(self, "_tokenizer"):
            from jopd.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(str(self.tokenizer_dir()))
        return self._tokenizer

    # --- upstream outputs ---------------------------------------------------------------------------
    def done_record(self, stage: str) -> dict[str, Any]:
        path = self.stage_dir(stage) / "DONE.json"
        if not path.is_file():
            raise StageError(f"this stage needs the outputs of stage {stage!r}, which has not completed in "
                             f"{self.run_dir} (add {stage!r} to `stages`, or run it first)")
        return read_json(path)

    def upstream(self, stage: str) -> str:
        """Fingerprint of a completed upstream stage (part of a downstream stage's inputs)."""
        return self.done_record(stage)["fingerprint"]

    def metrics(self, name: str, *, resume_after_step: int | None = None) -> MetricsLogger:
        return MetricsLogger(self.run_dir, name, resume_after_step=resume_after_step)


class Stage(abc.ABC):
    """Base class: subclasses set ``name`` and implement ``inputs`` and ``run``."""

    name: str = ""

    @abc.abstractmethod
    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        """JSON-able description of everything the outputs depend on."""

    @abc.abstractmethod
    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Do the work (resuming from partial outputs in ``ctx.stage_dir(self.name)``); return a summary."""


def run_stage(stage: Stage, ctx: RunContext) -> dict[str, Any]:
    sdir = ctx.stage_dir(stage.name)
    inputs = json.loads(json.dumps(stage.inputs(ctx), sort_keys=True, default=str))
    fp = fingerprint(inputs)
    for marker in ("DONE.json", "STARTED.json"):
        path = sdir / marker
        if not path.is_file():
            continue
        rec = read_json(path)
        if rec.get("fingerprint") != fp:
            changes = _diff(rec.get("inputs", {}), inputs)
            raise StageError(
                f"stage {stage.name!r}: {sdir} holds outputs made from different inputs; refusing to mix them.\n"
                f"  changed: {'; '.join(changes[:10]) or '(fingerprint only)'}\n"
                f"  delete {sdir} (and the stages after it) or use another run_dir"
            )
        if marker == "DONE.json":
            log.info("stage %s: up to date (skipped)", stage.name)
            return rec.get("outputs", {})
        log.info("stage %s: resuming an interrupted run", stage.name)
        break
    if ctx.is_main_process:
        atomic_write_json(sdir / "STARTED.json", {"fingerprint": fp, "inputs": inputs, "time": time.time()})
    ctx.sync(f"{stage.name}-start")
    t0 = time.time()
    log.info("stage %s: running", stage.name)
    outputs = stage.run(ctx) or {}
    seconds = time.time() - t0
    ctx.sync(f"{stage.name}-end")
    if ctx.is_main_process:
        atomic_write_json(sdir / "DONE.json", {"fingerprint": fp, "inputs": inputs, "outputs": outputs,
                                               "seconds": seconds, "time": time.time()})
    log.info("stage %s: done in %.1f s", stage.name, seconds)
    return outputs


def iter_batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(s + size, n)
