"""The one training loop: ``run_loop(step_fn, state, batches, hooks)``.

Teacher pre-training, SFT, Lightning OPD and online OPD all train through :func:`run_loop`; what differs is the
step function, where the batches come from, and the hooks. The loop itself only

1. takes the next host batch (this process's rows) and times it (``data_s``),
2. runs ``step_fn(state, batch) -> (state, metrics)`` and waits for its metrics (``update_s``),
3. refuses a non-finite loss or gradient (:class:`TrainingError` naming the step and the batch's rows; the jitted
   step has already skipped that update),
4. keeps the counters a resumed run continues (steps, seconds, tokens, per-phase seconds),
5. calls every hook: metrics rows, periodic evaluation, checkpoints, a progress bar are hooks (below), and so is
   anything a caller wants to add (a test's simulated crash, a profiler).

It needs no ``Config`` and no run directory, so a notebook can call it with a jitted step and any iterator of
batches (see docs/example_lightning_loop.md). Resuming is :func:`restore` (an Orbax checkpoint written by
:class:`CheckpointHook`) followed by ``run_loop(..., resume=restored)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger("jopd")

StepFn = Callable[[Any, Mapping[str, Any]], tuple[Any, Mapping[str, Any]]]


class TrainingError(RuntimeError):
    """Training cannot go on: a non-finite loss or gradient (the message names the step and the batch)."""


@dataclasses.dataclass
class LoopState:
    """What the loop carries from step to step, and what a checkpoint stores to continue it.

    ``step``: optimizer steps done. ``seconds``: time spent getting batches and stepping (hooks excluded: an
    evaluation is not training time). ``tokens``: response tokens trained on. ``phase_seconds``: cumulative
    seconds per phase (``data_s``, ``update_s``, plus what a batch source reports, e.g. online ``gen_s``).
    ``extra``: JSON-able values hooks keep across a resume (e.g. the last evaluation).
    """

    step: int
    train_state: Any
    seconds: float = 0.0
    tokens: float = 0.0
    phase_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_steps: int = 0
    start_step: int = 0
    name: str = ""

    def counters(self) -> dict[str, Any]:
        """The JSON part of a checkpoint."""
        return {"seconds": self.seconds, "tokens": self.tokens, "phase_seconds": dict(self.phase_seconds),
                "extra": self.extra, "time": time.time()}


class Hook:
    """Called by :func:`run_loop`; override what you need. ``row`` is the step's metrics as floats plus the
    loop's own (``tokens``, ``step_s``, ``data_s``, ``update_s``, ``tokens/s``, ``time_s``)."""

    def on_start(self, loop: LoopState) -> None:
        pass

    def on_step(self, loop: LoopState, row: dict[str, float]) -> None:
        pass

    def on_end(self, loop: LoopState) -> None:
        pass

    def close(self) -> None:
        pass


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def run_loop(step_fn: StepFn, train_state: Any, batches: Iterable[Mapping[str, Any]], *, num_steps: int,
             hooks: Sequence[Hook] = (), resume: LoopState | None = None, name: str = "train",
             place: Callable[[Mapping[str, Any]], Any] | None = None,
             describe_batch: Callable[[int], str] | None = None,
             batch_phases: Callable[[], Mapping[str, float]] | None = None) -> LoopState:
    """Train ``train_state`` for steps ``resume.step + 1 .. num_steps`` (1-based; from step 1 without resume).

    Args:
      step_fn: jitted ``(state, batch) -> (state, metrics)``; metrics hold ``loss``, ``grad_norm``, ``nonfinite``
        and optionally ``num_tokens`` (see jopd.steps).
      train_state: the initial state (ignored when ``resume`` is given: its ``train_state`` is used).
      batches: host batches ``{name: np.ndarray [rows, ...]}`` of this process, one per step, in step order
        (a resumed iterator must already be positioned at the resume step).
      num_steps: total optimizer steps.
      hooks: called in order after every step (and at start / end).
      resume: a restored :class:`LoopState` (see :func:`restore`).
      name: used in messages.
      place: host batch -> device batch (e.g. ``functools.partial(jopd.steps.shard_batch, mesh=mesh)``);
        default: the batch is passed as is.
      describe_batch: ``step (1-based) -> text`` naming the batch's rows in error messages.
      batch_phases: called after each batch is taken; its seconds per phase (e.g. online ``gen_s``/``score_s``)
        go into the step's row and the phase totals.

    Returns:
      The final LoopState. Raises TrainingError on a non-finite loss or gradient.
    """
    loop = resume or LoopState(step=0, train_state=train_state)
    loop.num_steps, loop.start_step, loop.name = num_steps, loop.step, name
    it: Iterator[Mapping[str, Any]] = iter(batches)
    try:
        for hook in hooks:
            hook.on_start(loop)
        while loop.step < num_steps:
            done = loop.step + 1
            t0 = time.perf_counter()
            batch = next(it)
            phases = {"data_s": time.perf_counter() - t0}
            if batch_phases is not None:
                phases.update(batch_phases())
            t1 = time.perf_counter()
            state, metrics = step_fn(loop.train_state, place(batch) if place is not None else batch)
            metrics = jax.device_get(metrics)  # waits for the step: update_s is the real device time
            phases["update_s"] = time.perf_counter() - t1
            if bool(metrics.get("nonfinite", False)):
                where = describe_batch(done) if describe_batch is not None else "?"
                raise TrainingError(f"{name}: non-finite loss/gradient at step {done} (loss="
                                    f"{float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}); the update "
                                    f"was skipped. Batch: {where}")
            step_s = time.perf_counter() - t0
            if "num_tokens" in metrics:
                tokens = float(metrics["num_tokens"])
            else:
                tokens = float(np.sum(batch["response_mask"])) * jax.process_count()
            loop.train_state, loop.step = state, done
            loop.seconds += step_s
            loop.tokens += tokens
            for k, v in phases.items():
                loop.phase_seconds[k] = loop.phase_seconds.get(k, 0.0) + v
            loop.last_metrics = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and k != "nonfinite"}
            row = {**loop.last_metrics, "tokens": tokens, "step_s": step_s, **phases,
                   "tokens/s": tokens / max(step_s, 1e-9), "time_s": loop.seconds}
            for hook in hooks:
                hook.on_step(loop, row)
        for hook in hooks:
            hook.on_end(loop)
    finally:
        for hook in hooks:
            hook.close()
    return loop


# ------------------------------------------------------------------------------------------------- hooks
@dataclasses.dataclass(frozen=True)
class WandbTarget:
    """Where one loop's metrics go in Weights & Biases: one W&B run per loop, ``group`` tying a job's loops
    together. ``id_file`` keeps the run ids, so a resumed loop continues its W&B run and a new run directory
    starts new ones; ``config`` is shown as the run's config."""

    project: str
    name: str
    id_file: Path
    dir: Path
    group: str | None = None
    entity: str | None = None
    mode: str = "online"
    tags: tuple[str, ...] = ()
    config: Mapping[str, Any] | None = None

    def run_id(self) -> str:
        import secrets

        ids = json.loads(self.id_file.read_text()) if self.id_file.is_file() else {}
        if self.name not in ids:
            ids[self.name] = secrets.token_hex(8)
            self.id_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.id_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(ids, indent=1, sort_keys=True))
            tmp.replace(self.id_file)
        return ids[self.name]

    def init(self) -> Any:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        return wandb.init(project=self.project, entity=self.entity, group=self.group, name=self.name,
                          id=self.run_id(), resume="allow", dir=str(self.dir), mode=self.mode,
                          tags=list(self.tags) or None, config=dict(self.config or {}), reinit="create_new")


class MetricsLogger:
    """Metrics rows as JSONL (one object per line, ``{"step": s, ...}``), TensorBoard event files and, given a
    :class:`WandbTarget`, a Weights & Biases run.

    Only process 0 writes. Nothing is touched until :meth:`start` (the hooks call it when the loop starts): a
    fresh loop starts the file anew, a loop resumed after step s keeps the rows up to s and rewrites the rest
    (W&B keeps what it was sent: it ignores rows at steps it has already seen).
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None,
                 wandb: WandbTarget | None = None):
        self.enabled = jax.process_index() == 0
        self.path = Path(path)
        self.tensorboard_dir = tensorboard_dir
        self.wandb = wandb
        self._tb = None
        self._wandb_run = None
        self._started = False

    def start(self, resume_after_step: int | None = None) -> None:
        """Idempotent; ``resume_after_step``: the step a resumed loop continues from (None or 0: fresh)."""
        if self._started or not self.enabled:
            self._started = True
            return
        self._started = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after_step and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", -1) <= resume_after_step]
            self.path.write_text("".join(k + "\n" for k in kept))
        elif self.path.exists():
            self.path.unlink()
        if self.tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.tensorboard_dir))
        if self.wandb is not None:
            self._wandb_run = self.wandb.init()

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.start()
        if not self.enabled:
            return
        row = {"step": int(step), **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


class LogMetrics(Hook):
    """Writes the step rows to a :class:`MetricsLogger` every ``every`` steps (and the last), keeping only
    ``keys`` (None: all) plus the loop's timing; ``extra()`` adds values of the moment (e.g. the lr)."""

    def __init__(self, logger: MetricsLogger, every: int = 1, *, keys: Sequence[str] | None = None,
                 extra: Callable[[LoopState], Mapping[str, float]] | None = None, log_every: int = 0):
        self.logger, self.every, self.keys, self.extra, self.log_every = logger, max(every, 1), keys, extra, log_every
        self._window: list[dict[str, float]] = []

    def on_start(self, loop: LoopState) -> None:
        self.logger.start(loop.step)

    def on_step(self, loop: LoopState, row: dict[str, float]) -> None:
        self._window.append(row)
        if not _due(loop.step, self.every, loop.num_steps):
            return
        timing = ("tokens", "step_s", "tokens/s", "time_s")
        out = {k: v for k, v in row.items() if self.keys is None or k in self.keys or k in timing
               or k.endswith("_s")}
        # tokens/s over the window since the last row (one step's figure is noisy)
        secs = sum(r["step_s"] for r in self._window)
        out["tokens/s"] = sum(r["tokens"] for r in self._window) / max(secs, 1e-9)
        if self.extra is not None:
            out.update(self.extra(loop))
        self.logger.log(loop.step, out)
        self._window = []
        if self.log_every and loop.step % self.log_every == 0:
            shown = {k: round(v, 4) for k, v in out.items() if k in ("loss", "reverse_kl", "grad_norm")}
            log.info("step %d/%d: %s (%.2fs/step)", loop.step, loop.num_steps, shown, row["step_s"])

    def close(self) -> None:
        self.logger.close()


class Evaluate(Hook):
    """Runs ``evaluate(train_state, step) -> metrics`` at step 0 (a fresh start only), every ``every`` steps and
    after the last, logging each result (with the loop's ``time_s``) to ``logger``. Its seconds are kept apart
    (``loop.extra["eval_seconds"]``) and the last result in ``loop.extra["last_eval"]``."""

    def __init__(self, evaluate: Callable[[Any, int], Mapping[str, float]], every: int,
                 logger: MetricsLogger | None = None, *, at_start: bool = True, name: str = "eval"):
        self.evaluate, self.every, self.logger, self.at_start, self.name = evaluate, every, logger, at_start, name

    def _run(self, loop: LoopState) -> None:
        t0 = time.perf_counter()
        result = {k: float(v) for k, v in self.evaluate(loop.train_state, loop.step).items()}
        loop.extra["eval_seconds"] = loop.extra.get("eval_seconds", 0.0) + time.perf_counter() - t0
        loop.extra["last_eval"] = result
        if loop.step == 0:
            loop.extra["initial_eval"] = result
        if self.logger is not None:
            self.logger.log(loop.step, {**result, "time_s": loop.seconds})
        log.info("%s step %d: %s", self.name, loop.step, {k: round(v, 4) for k, v in result.items()})

    def on_start(self, loop: LoopState) -> None:
        if self.logger is not None:
            self.logger.start(loop.step)
        if self.at_start and loop.step == 0:
            self._run(loop)

    def on_step(self, loop: LoopState, row: dict[str, float]) -> None:
        if self.every > 0 and loop.step % self.every == 0 and loop.step != loop.num_steps:
            self._run(loop)

    def on_end(self, loop: LoopState) -> None:
        # A run resumed from its final checkpoint has its last evaluation already (in extra).
        if loop.step > loop.start_step or "last_eval" not in loop.extra:
            self._run(loop)


class Checkpoint(Hook):
    """Saves an Orbax checkpoint (train state, the data iterator's state, the loop counters) every ``every``
    steps and after the last; closes the checkpointer at the end (waiting for async saves)."""

    def __init__(self, checkpointer: Any, every: int, *, data_iterator: Any = None):
        self.checkpointer, self.every, self.data_iterator = checkpointer, every, data_iterator

    def on_step(self, loop: LoopState, row: dict[str, float]) -> None:
        if _due(loop.step, self.every, loop.num_steps):
            t0 = time.perf_counter()
            self.checkpointer.save(loop.step, loop.train_state, data_iterator=self.data_iterator,
                                   extra=loop.counters())
            row["checkpoint_s"] = time.perf_counter() - t0

    def close(self) -> None:
        self.checkpointer.close()


class Progress(Hook):
    """A tqdm bar (process 0 only) showing the loss and ``show`` metrics."""

    def __init__(self, desc: str, show: Sequence[str] = ("loss",)):
        self.desc, self.show, self._bar = desc, show, None

    def on_start(self, loop: LoopState) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=loop.num_steps, initial=loop.step, desc=self.desc, leave=False,
                         disable=jax.process_index() != 0)

    def on_step(self, loop: LoopState, row: dict[str, float]) -> None:
        self._bar.update(1)
        self._bar.set_postfix({k: f"{row[k]:.4f}" for k in self.show if k in row})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def restore(checkpointer: Any, train_state: Any, *, data_iterator: Any = None) -> LoopState | None:
    """The newest checkpoint as a LoopState (train state on ``train_state``'s shardings; ``data_iterator``'s
    position restored in place), or None when there is none."""
    step = checkpointer.latest_step()
    if not step:
        return None
    state, saved = checkpointer.restore(step, train_state, data_iterator=data_iterator)
    return LoopState(step=step, train_state=state, seconds=float(saved.get("seconds", 0.0)),
                     tokens=float(saved.get("tokens", 0.0)), phase_seconds=dict(saved.get("phase_seconds", {})),
                     extra=dict(saved.get("extra", {})))
