"""Stage ``sft``: supervised fine-tuning of the base student on the SFT-data teacher's responses.

:func:`train_supervised` is the generic resumable SFT loop (also used by ``prepare`` to train in-run teachers):

- loss: cross-entropy on the response tokens only (``jopd.steps.make_sft_step``, token-mean), AdamW with a
  warm-up/decay schedule and gradient clipping, gradient accumulation when ``loop.micro_batch_size`` is set;
- **length bucketing** (not packing): every batch is right-padded to one of a few static lengths (multiples of
  a bucket width chosen so that at most ~8 lengths exist), so only a handful of shapes are ever compiled.
  Each epoch, the training examples are shuffled with a seed derived from ``(seed, epoch)`` and then stably
  sorted by bucket, so batches hold examples of similar length in a random order; the order of the batches
  is shuffled too. The last partial batch of an epoch is filled with padding rows (response mask 0), which
  the loss ignores. Packing was not chosen because the step's attention has no document masking;
- the data order is pure index arithmetic of ``(seed, step)``, so a resumed run needs only the step count
  from its checkpoint to continue exactly where it stopped;
- held-out loss (a seeded ``holdout_fraction`` of the examples) at step 0, every ``loop.eval_every`` steps
  and at the end;
- Orbax checkpoints every ``loop.checkpoint_every`` steps and at the end in ``work_dir/ckpt``; re-running after
  an interruption restores the newest one, and the final parameters equal those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jopd.checkpointing import Checkpointer
from jopd.config import OptimSection, TrainLoop
from jopd.models import Model, save_pretrained
from jopd.stages.base import RunContext, Stage, StageError, atomic_write_json, read_json
from jopd.steps import (
    TrainState,
    init_state,
    lr_schedule,
    make_eval_loss,
    make_sft_step,
    optimizer_from_section,
    shard_batch,
    state_shardings,
)

log = logging.getLogger("jopd")

Example = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, response_ids)
MAX_SHAPES = 8  # at most this many distinct padded lengths per run


def after_step(name: str, step: int) -> None:
    """Called after every completed (and, when due, checkpointed) step. A seam for tests, which replace it
    to simulate an interruption; it does nothing in a normal run."""


# ---------------------------------------------------------------------------------------------- batching
def bucket_width(max_len: int, max_shapes: int = MAX_SHAPES) -> int:
    """Multiple of 32 wide enough that lengths up to ``max_len`` fall into at most ``max_shapes`` buckets."""
    return max(32, math.ceil(max_len / max_shapes / 32) * 32)


class BucketedBatches:
    """Deterministic, length-bucketed batches of SFT examples; batch ``s`` is a function of ``(seed, s)``.

    Rows are ``tokens = prompt + response`` right-padded with 0 and ``response_mask`` = 1 on the response.
    """

    def __init__(self, examples: Sequence[Example], indices: Sequence[int], batch_size: int, seed: int,
                 width: int):
        if not len(indices):
            raise ValueError("no examples to batch")
        self.examples, self.indices = examples, np.asarray(indices, np.int64)
        self.batch_size, self.seed, self.width = batch_size, seed, width
        lengths = np.asarray([len(examples[i][0]) + len(examples[i][1]) for i in self.indices])
        self.bucket = -(-lengths // width) * width  # padded length of each example
        self.steps_per_epoch = -(-len(self.indices) // batch_size)

    @property
    def shapes(self) -> list[int]:
        return sorted(set(self.bucket.tolist()))

    def _epoch_order(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.indices))
        perm = perm[np.argsort(self.bucket[perm], kind="stable")]  # random order within each bucket
        batches = [perm[i:i + self.batch_size] for i in range(0, len(perm), self.batch_size)]
        return [batches[j] for j in rng.permutation(len(batches))]

    def batch_positions(self, step: int) -> np.ndarray:
        """Positions (into ``indices``) of the rows of global batch ``step`` (0-based); may be short."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch, self._cached_order = epoch, self._epoch_order(epoch)
        return self._cached_order[j]

    def example_ids(self, step: int) -> list[int]:
        """Indices into the caller's example list of the rows of batch ``step``."""
        return self.indices[self.batch_positions(step)].tolist()

    def make(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Host arrays ``[batch_size, T]`` for the given rows (short batches padded with empty rows)."""
        length = int(self.bucket[positions].max())
        tokens = np.zeros((self.batch_size, length), np.int32)
        mask = np.zeros((self.batch_size, length), np.int32)
        for r, p in enumerate(positions):
            prompt, response = self.examples[self.indices[p]]
            n_p, n_r = len(prompt), len(response)
            tokens[r, :n_p] = prompt
            tokens[r, n_p:n_p + n_r] = response
            mask[r, n_p:n_p + n_r] = 1
        return {"tokens": tokens, "response_mask": mask}

    def get(self, step: int) -> dict[str, np.ndarray]:
        return self.make(self.batch_positions(step))

    def fixed_batches(self) -> list[dict[str, np.ndarray]]:
        """Every row exactly once, bucketed, in a fixed order (held-out evaluation)."""
        order = np.argsort(self.bucket, kind="stable")
        return [self.make(order[i:i + self.batch_size]) for i in range(0, len(order), self.batch_size)]


def placed_state(params: Any, optimizer: Any, mesh) -> TrainState:
    """``init_state`` with every leaf committed to its final sharding on ``mesh``.

    ``jax.jit(optimizer.init)`` returns uncommitted single-device scalars (step counts); the step's outputs
    are committed NamedSharding arrays, so without this the first and second steps see different argument
    shardings and the step is compiled twice.
    """
    state = init_state(params, optimizer)
    return jax.device_put(state, state_shardings(state, mesh))


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous slice of a global host batch (what ``shard_batch`` expects)."""
    n, pc, pi = next(iter(batch.values())).shape[0], jax.process_count(), jax.process_index()
    if pc == 1:
        return batch
    per = n // pc
    return {k: v[pi * per:(pi + 1) * per] for k, v in batch.items()}


def heldout_loss(eval_fn: Callable, params: Any, batches: list[dict[str, np.ndarray]], mesh) -> float:
    """Token-weighted mean NLL over held-out batches."""
    total, tokens = 0.0, 0.0
    for b in batches:
        m = jax.device_get(eval_fn(params, shard_batch(local_rows(b), mesh)))
        total += float(m["nll"]) * float(m["num_tokens"])
        tokens += float(m["num_tokens"])
    return total / max(tokens, 1.0)


def _split(n: int, holdout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train / held-out index split (at least one of each when a fraction > 0 is asked and n > 1)."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    k = min(max(int(round(n * holdout_fraction)), 1 if holdout_fraction > 0 else 0), n - 1) if n > 1 else 0
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


# -------------------------------------------------------------------------------------------------- loop
def train_supervised(ctx: RunContext, *, name: str, model: Model, examples: Sequence[Example], loop: TrainLoop,
                     optim: OptimSection, work_dir: str | Path, holdout_fraction: float = 0.0, seed: int = 0,
                     eval_fn: Callable[[Model, int], dict[str, float]] | None = None) -> tuple[Model, dict]:
    """Fine-tune ``model`` on ``examples`` (response tokens only); resumable from ``work_dir/ckpt``.

    Args:
      ctx: run context (mesh, metrics).
      name: metrics name (``RUN_DIR/metrics/NAME.jsonl``) and log prefix.
      model: the initial model; its params are consumed (donated to the first step).
      examples: (prompt_ids, response_ids) pairs; response ids already end with the end-of-turn id.
      loop / optim: steps, batch sizes, cadences / optimizer settings.
      work_dir: checkpoints go to ``work_dir/ckpt``.
      holdout_fraction: fraction of examples held out for the held-out loss.
      seed: data split and order.
      eval_fn: optional extra evaluation ``(model, step) -> metrics`` logged with the held-out loss.

    Returns:
      (the trained Model with the same config, summary dict).

    Raises:
      StageError naming the step and example indices when a loss or gradient is not finite.
    """
    if not examples:
        raise StageError(f"{name}: no training examples")
    mesh = model.mesh
    cfg = model.config
    train_idx, held_idx = _split(len(examples), holdout_fraction, seed)
    longest = max(len(p) + len(r) for p, r in examples)
    if longest > cfg.max_position_embeddings:
        log.warning("%s: longest example has %d tokens > max_position_embeddings %d", name, longest,
                    cfg.max_position_embeddings)
    width = bucket_width(longest)
    data = BucketedBatches(examples, train_idx, loop.batch_size, seed, width)
    held_batches = (BucketedBatches(examples, held_idx, loop.micro_batch_size or loop.batch_size, seed,
                                    width).fixed_batches() if held_idx else [])

    optimizer = optimizer_from_section(optim, loop.steps)
    schedule = lr_schedule(optim.lr, loop.steps, schedule=optim.schedule, warmup_steps=optim.warmup_steps,
                           min_lr_ratio=optim.min_lr_ratio)
    state = placed_state(model.params, optimizer, mesh)
    step_fn = make_sft_step(cfg, optimizer, mesh=mesh, state=state, batch_size=loop.batch_size,
                            micro_batch_size=loop.micro_batch_size)
    eval_loss = make_eval_loss(cfg, mesh=mesh) if held_batches else None

    ckpt = Checkpointer(Path(work_dir) / "ckpt", keep=loop.keep_checkpoints, async_save=loop.async_checkpointing)
    start = ckpt.latest_step() or 0
    extra: dict[str, Any] = {}
    if start:
        state, extra = ckpt.restore(start, state)
        log.info("%s: resumed from the checkpoint of step %d", name, start)
    metrics_log = ctx.metrics(name, resume_after_step=start if start else None)

    def evaluate(step: int, params: Any, log_row: bool = True) -> dict[str, float]:
        out: dict[str, float] = {}
        if eval_loss is not None:
            out["heldout_loss"] = heldout_loss(eval_loss, params, held_batches, mesh)
        if eval_fn is not None:
            out.update(eval_fn(dataclasses.replace(model, params=params), step))
        if out and log_row:
            metrics_log.log(step, out)
        return out

    initial_eval = evaluate(0, state.params) if start == 0 else dict(extra.get("initial_eval", {}))
    seconds = float(extra.get("seconds", 0.0))
    tokens_seen = int(extra.get("tokens", 0))
    last: dict[str, float] = {}
    window_t, window_tokens = time.perf_counter(), 0
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=loop.steps, initial=start, desc=name, disable=not ctx.is_main_process, leave=False)
    except ImportError:  # tqdm is a dependency; the loop does not need it
        bar = None
    try:
        for s in range(start, loop.steps):
            t0 = time.perf_counter()
            host = data.get(s)
            state, metrics = step_fn(state, shard_batch(local_rows(host), mesh))
            metrics = jax.device_get(metrics)
            if bool(metrics["nonfinite"]):
                raise StageError(
                    f"{name}: non-finite loss/gradient at step {s + 1} (loss={float(metrics['loss'])}, "
                    f"grad_norm={float(metrics['grad_norm'])}); batch = example indices {data.example_ids(s)}")
            step_tokens = int(host["response_mask"].sum())
            tokens_seen += step_tokens
            window_tokens += step_tokens
            seconds += time.perf_counter() - t0
            done = s + 1
            last = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}
            if done % max(loop.log_every, 1) == 0 or done == loop.steps:
                now = time.perf_counter()
                metrics_log.log(done, {**last, "lr": float(schedule(s)),
                                       "tokens/s": window_tokens / max(now - window_t, 1e-9),
                                       "seq_len": host["tokens"].shape[1], "time_s": seconds})
                window_t, window_tokens = now, 0
            if loop.eval_every and done % loop.eval_every == 0 and done != loop.steps:
                evaluate(done, state.params)
            if done % max(loop.checkpoint_every, 1) == 0 or done == loop.steps:
                ckpt.save(done, state, extra={"seconds": seconds, "tokens": tokens_seen, "epoch":
                                              done // data.steps_per_epoch, "batch_in_epoch":
                                              done % data.steps_per_epoch, "initial_eval": initial_eval,
                                              "time": time.time()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            after_step(name, done)
        # A run resumed after its last checkpoint already logged the final row: recompute, do not repeat it.
        final_eval = evaluate(loop.steps, state.params, log_row=start < loop.steps)
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        metrics_log.close()

    trained = dataclasses.replace(model, params=state.params)
    summary = {"steps": loop.steps, "final_loss": last.get("loss"), "final_grad_norm": last.get("grad_norm"),
               "heldout_loss_initial": initial_eval.get("heldout_loss"),
               "heldout_loss_final": final_eval.get("heldout_loss"), "train_examples": len(train_idx),
               "heldout_examples": len(held_idx), "tokens": tokens_seen, "train_seconds": seconds,
               "seq_len_buckets": data.shapes, "resumed_from_step": start,
               **{f"final_{k}": v for k, v in final_eval.items() if k != "heldout_loss"}}
    log.info("%s: done (%d steps, loss %.4f, held-out %s)", name, loop.steps, last.get("loss", float("nan")),
             final_eval.get("heldout_loss"))
    return trained, summary


# ------------------------------------------------------------------------------------------------- stage
class SFTStage(Stage):
    name = "sft"

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {"sft": ctx.cfg.sft, "seed": ctx.cfg.seed, "precision": ctx.cfg.precision,
                "teacher_data": ctx.upstream("teacher_data"), "prepare": ctx.upstream("prepare")}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg = ctx.cfg
        sdir = ctx.stage_dir(self.name)
        td_dir = ctx.stage_dir("teacher_data")
        try:
            td_meta = read_json(td_dir / "meta.json")
            with open(td_dir / "sft.jsonl") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            raise StageError(f"sft: cannot read the teacher data in {td_dir}: {e}") from e
        examples = [(r["prompt_ids"], r["response_ids"]) for r in rows if r.get("response_ids")]
        if not examples:
            raise StageError(f"sft: {td_dir / 'sft.jsonl'} holds no examples with a response")
        model = ctx.load_model(ctx.student_base_dir())
        log.info("sft: %d examples from teacher %s", len(examples), td_meta.get("teacher_name"))
        model, summary = train_supervised(ctx, name="sft", model=model, examples=examples, loop=cfg.sft,
                                          optim=cfg.sft.optim, work_dir=sdir, holdout_fraction=cfg.sft.holdout_fraction,
                                          seed=cfg.seed)
        out_dir = ctx.sft_model_dir()
        save_pretrained(model, out_dir, tokenizer_dir=str(ctx.tokenizer_dir()))
        ctx.sync("sft-export")
        meta = {"sft_teacher_name": td_meta.get("teacher_name"),
                "sft_teacher_fingerprint": td_meta.get("teacher_fingerprint"),
                "model_fingerprint": ctx.model_fingerprint(out_dir), "model_path": str(out_dir),
                "examples": len(examples), **summary}
        if ctx.is_main_process:
            atomic_write_json(sdir / "meta.json", meta)
        return meta


STAGE = SFTStage()
