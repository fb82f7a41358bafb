"""How a stage runs: its inputs' fingerprint decides skip / resume / refuse; ``Run`` is what every stage gets.

A stage is two functions, ``inputs(run) -> dict`` (everything its outputs depend on: config values, upstream
fingerprints, model fingerprints) and ``run(run) -> dict`` (the work; it resumes from what an interrupted run
wrote). Before the work :func:`run_stage` records ``<stage>/STARTED.json`` with the inputs' fingerprint, after it
``<stage>/DONE.json``. On the next invocation:

- DONE with the same fingerprint -> skipped;
- STARTED (not DONE) with the same fingerprint -> run again, resuming from its chunk markers / checkpoints;
- either with a different fingerprint -> refused, naming the inputs that changed: outputs of different inputs
  are never mixed.

Every process runs every stage; a barrier separates stages so no process reads an upstream stage's outputs
before they are complete.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jopd.config import Config
from jopd.io import atomic_write_json, atomic_write_text, read_json
from jopd.layout import RunLayout
from jopd.loop import MetricsLogger, WandbTarget

log = logging.getLogger("jopd")


class StageError(RuntimeError):
    """A stage cannot run (inconsistent inputs, missing upstream outputs, refused by a rule)."""


# ------------------------------------------------------------------------------------------- fingerprints
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


def model_fingerprint(model_dir: str | os.PathLike, cache: dict[str, str] | None = None) -> str:
    """Identity of a model: sha256 over its config.json and every safetensors file's content.

    Hashing a large model takes a while, so per-file hashes can be kept in ``cache`` (updated in place), keyed
    by (path, size, mtime).
    """
    model_dir = Path(model_dir)
    files = sorted([model_dir / "config.json"] + list(model_dir.glob("*.safetensors")))
    cache = {} if cache is None else cache
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = _hash_file(f)
        h.update(f.name.encode() + b"\0" + cache[key].encode())
    return h.hexdigest()


def _as_fields(obj: Any) -> Any:
    """JSON fallback for the detailed input record: dataclasses as their fields, anything else as text."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return str(obj)


def changed_inputs(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key.sub: old -> new`` for every leaf that differs between two input records."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += changed_inputs(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


# -------------------------------------------------------------------------------------------------- run
def barrier(name: str) -> None:
    """Every process waits here for the others (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class RunDirLock:
    """``RUN_DIR/.lock``: one invocation per run directory at a time (process 0 of a job holds it).

    The lock file records the holder's pid and host. A second invocation is refused naming them; a lock whose
    process is gone (same host, pid not alive) is stale and taken over with a warning. A lock held on another
    host cannot be checked from here: the message says to delete it if that job is known to be dead.
    """

    def __init__(self, path: Path):
        self.path = path
        self._held = False

    def acquire(self) -> None:
        import socket

        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder, me["host"]):
                    raise StageError(
                        f"{self.path.parent} is in use by another jopd invocation (pid {holder['pid']} on "
                        f"{holder['host']}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['time']))})"
                        f"; wait for it to end, or delete {self.path} if that process is gone") from None
                log.warning("taking over the stale lock %s (pid %s on %s is gone)", self.path,
                            (holder or {}).get("pid"), (holder or {}).get("host"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        raise StageError(f"{self.path}: could not take the run-directory lock (another invocation raced for it)")

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if {"pid", "host", "time"} <= set(holder) else None
        except (OSError, ValueError):
            return None  # unreadable or torn: treated as stale

    @staticmethod
    def _stale(holder: dict[str, Any], host: str) -> bool:
        if holder["host"] != host:
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


@dataclasses.dataclass
class Run:
    """A run: the validated config, where its files are, and the device mesh."""

    cfg: Config
    layout: RunLayout
    mesh: Any
    # Extra jopd.loop.Hook objects every training loop of the run also calls (a profiler, a tracker, a
    # simulated crash); each sees the loop's name in LoopState.name.
    hooks: tuple[Any, ...] = ()
    # The resolved config as YAML: written to RUN_DIR/config.yaml when a stage runs (not when every stage is
    # skipped or one is refused), so the file describes the configuration the outputs were made with.
    config_text: str | None = None

    @classmethod
    def create(cls, cfg: Config, mesh: Any, hooks: tuple[Any, ...] = (), config_text: str | None = None) -> Run:
        return cls(cfg, RunLayout.for_config(cfg), mesh, hooks, config_text)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def metrics_logger(self, name: str) -> MetricsLogger:
        """The metrics sinks of one training loop: RUN_DIR/metrics/NAME.jsonl, RUN_DIR/tb/NAME and, with
        ``logging.wandb.enabled``, a W&B run NAME in the run's group."""
        w = self.cfg.logging.wandb
        target = None
        if w.enabled:
            target = WandbTarget(project=w.project, name=name, id_file=self.layout.wandb / "run_ids.json",
                                 dir=self.layout.wandb, group=w.group or Path(self.cfg.run_dir).resolve().name,
                                 entity=w.entity, mode=w.mode, tags=tuple(w.tags), config=dataclasses.asdict(self.cfg))
        return MetricsLogger(self.layout.metrics(name), self.layout.tensorboard(name), wandb=target)

    def model_options(self, **overrides: Any) -> dict[str, Any]:
        """Runtime settings of every model of the run (precision section), for ``load_pretrained``."""
        p = self.cfg.precision
        return {"compute_dtype": p.compute_dtype, "remat": p.remat, "attention_impl": p.attention_impl,
                "logits_chunk_size": p.logits_chunk_size, **overrides}

    def load_model(self, path: str | os.PathLike, *, param_dtype: str | None = None):
        from jopd.models import load_pretrained

        return load_pretrained(path, param_dtype or self.cfg.precision.param_dtype, mesh=self.mesh,
                               **self.model_options())

    def load_teacher(self, name: str):
        """A teacher, held in ``precision.teacher_dtype`` (teachers are only ever evaluated)."""
        p = self.cfg.precision
        return self.load_model(self.layout.teacher(name), param_dtype=p.teacher_dtype or p.param_dtype)

    @functools.cached_property
    def tokenizer(self) -> Any:
        from jopd.data.tokenizer import load_tokenizer

        return load_tokenizer(str(self.layout.tokenizer))

    def fingerprint(self, model_dir: str | os.PathLike) -> str:
        return model_fingerprint(model_dir, self._fingerprint_cache)

    @functools.cached_property
    def _fingerprint_cache(self) -> dict[str, str]:
        """Per-file model hashes (RUN_DIR/fingerprint_cache.json), read once; written back only when a stage
        runs (:meth:`save_fingerprint_cache`), so a refused or all-skipped invocation changes no file."""
        try:
            cache = read_json(self.layout.fingerprint_cache)
            return cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            return {}

    def save_fingerprint_cache(self) -> None:
        if self.is_main and self._fingerprint_cache:
            try:
                saved = read_json(self.layout.fingerprint_cache)
            except (OSError, ValueError):
                saved = None
            if saved != self._fingerprint_cache:
                atomic_write_json(self.layout.fingerprint_cache, self._fingerprint_cache)

    def done_record(self, stage: str) -> dict[str, Any]:
        path = self.layout.done(stage)
        if not path.is_file():
            raise StageError(f"this stage needs the outputs of stage {stage!r}, which has not completed in "
                             f"{self.layout.root} (add {stage!r} to `stages`, or run it first)")
        return read_json(path)

    def upstream(self, stage: str) -> str:
        """Fingerprint of a completed upstream stage (part of a downstream stage's inputs)."""
        return self.done_record(stage)["fingerprint"]

    def outputs(self, stage: str) -> dict[str, Any]:
        """What a completed upstream stage returned."""
        return self.done_record(stage).get("outputs", {})


@dataclasses.dataclass(frozen=True)
class Stage:
    """A pipeline stage: ``inputs(run)`` (what its outputs depend on) and ``run(run)`` (the work, resumable)."""

    name: str
    inputs: Callable[[Run], dict[str, Any]]
    run: Callable[[Run], dict[str, Any]]
    # Where its outputs live (default: RUN_DIR/<name>): listed in DONE.json and checked when the stage is skipped.
    outputs: Callable[[Run], list[Path]] | None = None

    def output_paths(self, run: Run) -> list[Path]:
        return self.outputs(run) if self.outputs is not None else [run.layout.stage(self.name)]


def output_manifest(stage: Stage, run: Run) -> dict[str, int]:
    """{path relative to RUN_DIR: size in bytes} of every file of the stage's outputs (its markers excluded)."""
    root, markers = run.layout.root, {run.layout.done(stage.name), run.layout.started(stage.name)}
    files: dict[str, int] = {}
    for base in stage.output_paths(run):
        for path in [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()):
            if path not in markers:
                files[str(path.relative_to(root))] = path.stat().st_size
    return files


def _verify_outputs(stage: Stage, run: Run, recorded: dict[str, int]) -> None:
    """A skipped stage's outputs must still be what it wrote: every recorded file present, at its size."""
    now = output_manifest(stage, run)
    missing = sorted(set(recorded) - set(now))
    resized = sorted(k for k in recorded if k in now and now[k] != recorded[k])
    if missing or resized:
        parts = ([f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []) + (
            [f"size changed: {', '.join(resized[:5])}{' ...' if len(resized) > 5 else ''}"] if resized else [])
        raise StageError(
            f"stage {stage.name!r} completed, but its outputs have changed since ({'; '.join(parts)}): refusing "
            f"to reuse them. Delete {run.layout.stage(stage.name)} (and the stages after it) to redo it")


def run_stage(stage: Stage, run: Run) -> dict[str, Any]:
    """Skip, resume or refuse ``stage`` by its inputs' fingerprint (module doc); returns its outputs."""
    layout = run.layout
    raw_inputs = stage.inputs(run)
    inputs = json.loads(json.dumps(raw_inputs, sort_keys=True, default=str))
    fp = fingerprint(inputs)
    # The same inputs with config sections as nested fields (the fingerprint keeps hashing ``inputs``, so run
    # directories written before stay valid): a refusal can then name the leaf that changed (sft.steps: 100 -> 50).
    detail = json.loads(json.dumps(raw_inputs, sort_keys=True, default=_as_fields))
    for marker in (layout.done(stage.name), layout.started(stage.name)):
        if not marker.is_file():
            continue
        try:
            record = read_json(marker)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as err:
            raise StageError(f"{marker}: not a readable stage marker ({err}); delete {marker.parent} (and the "
                             "stages after it) to redo the stage") from None
        if record.get("fingerprint") != fp:
            changes = (changed_inputs(record["inputs_detail"], detail) if "inputs_detail" in record
                       else changed_inputs(record.get("inputs", {}), inputs))
            raise StageError(
                f"stage {stage.name!r}: {marker.parent} holds outputs made from different inputs; refusing to mix "
                f"them.\n  changed: {'; '.join(changes[:10]) or '(fingerprint only)'}\n"
                f"  delete {marker.parent} (and the stages after it) or use another run_dir")
        if marker.name == "DONE.json":
            if "manifest" in record:  # records written before manifests existed are trusted as they are
                _verify_outputs(stage, run, record["manifest"])
            log.info("stage %s: up to date (skipped)", stage.name)
            return record.get("outputs", {})
        log.info("stage %s: resuming an interrupted run", stage.name)
        break
    if run.is_main:
        if run.config_text is not None:
            atomic_write_text(layout.config_yaml, run.config_text)
        run.save_fingerprint_cache()
        atomic_write_json(layout.started(stage.name), {"fingerprint": fp, "inputs": inputs,
                                                        "inputs_detail": detail, "time": time.time()})
    barrier(f"{stage.name}-start")
    t0, cpu0 = time.time(), time.process_time()
    log.info("stage %s: running", stage.name)
    outputs = stage.run(run) or {}  # a TrainingError (non-finite loss) propagates: a failed run, not bad input
    # CPU seconds of this process (user + system, every thread): on a shared machine the wall time depends on
    # the load, the CPU time much less, so an idle machine's wall time can be estimated from it.
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    barrier(f"{stage.name}-end")
    if run.is_main:
        run.save_fingerprint_cache()
        manifest = output_manifest(stage, run)
        atomic_write_json(layout.done(stage.name), {"fingerprint": fp, "inputs": inputs, "inputs_detail": detail,
                                                     "outputs": outputs, "manifest": manifest,
                                                     "seconds": seconds, "cpu_seconds": cpu_seconds,
                                                     "time": time.time()})
    barrier(f"{stage.name}-done")  # nobody reads this stage's DONE marker before it exists
    log.info("stage %s: done in %.1f s (%.1f CPU-s)", stage.name, seconds, cpu_seconds)
    return outputs


# ---------------------------------------------------------------------------- rules every stage applies
def derive_seed(seed: int, index: int) -> int:
    """The sampling seed of resumable unit ``index`` (a part / a store chunk) of a stage seeded with ``seed``.

    `jopd.sampling.generate` keys row ``i`` of a call by ``fold_in(seed, i)``, so calls sharing a seed would repeat
    their random streams row by row; hashing (seed, index) gives every unit an independent stream that depends
    only on its index, which is what makes a resumed run reproduce an uninterrupted one.
    """
    digest = hashlib.sha256(f"jopd:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def numerics_inputs(cfg: Config, *, logits_chunked: bool = False) -> dict[str, Any]:
    """Precision settings that change sampled tokens / computed log-probs (so they belong to stage inputs).

    ``logits_chunked``: the stage computes log-probs with the chunked head, whose chunk size can change the last
    bits; sampling does not use it.
    """
    p = cfg.precision
    out: dict[str, Any] = {"param_dtype": p.param_dtype, "teacher_dtype": p.teacher_dtype,
                           "compute_dtype": p.compute_dtype, "attention_impl": p.attention_impl}
    if logits_chunked:
        out["logits_chunk_size"] = p.logits_chunk_size
    return out


def check_tokenizer(run: Run, model_dir: Path, what: str) -> str:
    """The fingerprint of ``model_dir``'s vocabulary, refused (StageError naming both) if it maps any id
    differently from the run's tokenizer. A directory without tokenizer files uses the run's."""
    from jopd.data import tokenizer as toklib

    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return toklib.tokenizer_fingerprint(run.tokenizer)
    try:
        return toklib.check_same_vocab(run.tokenizer, str(model_dir), name_a=f"run tokenizer ({run.layout.tokenizer})",
                                       name_b=f"{what} ({model_dir})")
    except toklib.VocabMismatchError as e:
        raise StageError(str(e)) from e


def sft_teacher(run: Run) -> tuple[str | None, str]:
    """(name, fingerprint) of the teacher that wrote the SFT data, as recorded by the ``sft`` stage."""
    outputs = run.outputs("sft")
    fp = outputs.get("sft_teacher_fingerprint")
    if not fp:
        raise StageError(f"the sft stage in {run.layout.root} recorded no sft_teacher_fingerprint; re-run it")
    return outputs.get("sft_teacher_name"), fp


def sft_teachers(run: Run) -> dict[str, tuple[str, str]]:
    """Multi-teacher runs: route -> (name, fingerprint) of the teacher that wrote the route's SFT data, as
    recorded by the ``sft`` stage; {} for a one-teacher run."""
    recorded = run.outputs("sft").get("sft_teachers")
    if not recorded:
        if run.cfg.routing.enabled:
            raise StageError(f"the sft stage in {run.layout.root} recorded no per-route SFT teachers: its SFT data "
                             "was written without routing; delete teacher_data and sft (and the stages after them) "
                             "to redo them with routing.field set")
        return {}
    return {route: (v["teacher_name"], v["teacher_fingerprint"]) for route, v in recorded.items()}


def check_teacher_consistency(run: Run, arm: Any, teacher_fp: str, *, route: str | None = None,
                              teacher: str | None = None) -> bool:
    """True if the arm's teacher is the SFT-data teacher; refused (StageError) unless the arm allows the ablation,
    which is then warned about and recorded (False). Multi-teacher runs: the teacher ``teacher`` the arm gives
    ``route`` against the teacher that wrote that route's SFT data."""
    if route is None:
        sft_name, sft_fp = sft_teacher(run)
        what = f"its teacher {arm.teacher!r} (fingerprint {teacher_fp}) is not the teacher that wrote the SFT data"
    else:
        by_route = sft_teachers(run)
        if route not in by_route:
            raise StageError(f"arm {arm.name!r}: route {route!r} has no SFT-data teacher recorded by the sft stage "
                             f"(routes {sorted(by_route)}); the routes changed since: redo teacher_data and sft")
        sft_name, sft_fp = by_route[route]
        what = (f"its teacher {teacher!r} of route {route!r} (fingerprint {teacher_fp}) is not the teacher that "
                f"wrote the route's SFT data")
    if teacher_fp == sft_fp:
        return True
    msg = (f"arm {arm.name!r}: {what}, {sft_name!r} (fingerprint {sft_fp}): the student was not fine-tuned on this "
           "teacher's responses, so OPD would distil from an inconsistent teacher")
    if not arm.allow_inconsistent_teacher:
        raise StageError(msg + f". Set allow_inconsistent_teacher: true on arm {arm.name!r} to run this ablation.")
    log.warning("%s (allowed by allow_inconsistent_teacher; recorded as consistent_teacher: false)", msg)
    return False


def open_or_create_store(run: Run, path: Path, *, attrs: dict[str, Any], num_rows: int, max_len: int,
                         rows_per_chunk: int, topk: int = 0):
    """The RolloutStore at ``path`` opened for writing, created first (by process 0, atomically) if absent;
    refused if it was made for another shape or other attributes."""
    from jopd.data.store import RolloutStore, StoreError, create_atomically

    if run.is_main and not (path / "meta.json").is_file():
        if path.exists() and any(path.iterdir()):
            raise StageError(f"{path} exists but is not a RolloutStore (no meta.json); delete it")
        create_atomically(path, num_rows=num_rows, max_len=max_len, rows_per_chunk=rows_per_chunk, topk=topk,
                          attrs=attrs)
    barrier(f"store-created:{path}")
    try:
        store = RolloutStore.open(path, mode="r+")
    except StoreError as e:
        raise StageError(f"cannot open {path}: {e}\n  delete {path} to start it over") from e
    got = (store.num_rows, store.max_len, store.rows_per_chunk, store.topk)
    if got != (num_rows, max_len, rows_per_chunk, topk) or store.attrs != attrs:
        # The stage fingerprint normally catches this first; this guards against a hand-edited run directory.
        raise StageError(f"{path} was made for other inputs (shape {got} / attrs differ from "
                         f"{(num_rows, max_len, rows_per_chunk, topk)}); refusing to mix. Delete {path}")
    return store


def store_fingerprint(path: str | os.PathLike, group: str = "rollout") -> str:
    """Identity of a store's ``group`` content without re-reading it: sha256 over meta.json and the group's
    completion markers, which carry the SHA-256 of every chunk of every array."""
    path = Path(path)
    h = hashlib.sha256()
    for f in [path / "meta.json", *sorted((path / "progress" / group).glob("*.json"))]:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
