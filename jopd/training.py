"""The kinds of training a run does, each a short composition of library pieces around :func:`jopd.loop.run_loop`.

- :func:`store_batches`: the one data path: a store of (prompt, response) rows -> Grain -> host batches, either
  ``batch_size`` padded sequences or packed token-budget batches (``token_budget``), checkpointable.
- :func:`supervised`: cross-entropy on response tokens (SFT, and the in-run teachers' pre-training).
- :func:`opd`: the OPD step on any batch source: the fixed rollouts + stored teacher log-probs (Lightning) or
  :class:`OnlineBatches` (standard OPD: fresh student samples scored by a live teacher).

None of them needs a ``Config`` object or a run directory: they take config *sections* (plain dataclasses) and
paths. A LoRA model (:mod:`jopd.models.lora`) is trained with its base frozen: the train state holds its adapters
only (:func:`trainable_split`), and :func:`current_model` is the model a loop's state stands for.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jopd import loop as looplib
from jopd import losses
from jopd.checkpointing import Checkpointer
from jopd.data import loader
from jopd.data.routing import stratified_order
from jopd.models import Model, lora, token_logprobs
from jopd.sampling import bucket, generate, sequences
from jopd.sharding import round_up, to_host
from jopd.steps import (
    OPDLossConfig,
    init_state,
    lr_schedule,
    make_eval_loss,
    make_opd_step,
    make_sft_step,
    optimizer_from_section,
    shard_batch,
)

log = logging.getLogger("jopd")

SFT_FIELDS = ("tokens", "response_mask")
OPD_FIELDS = ("tokens", "response_mask", "teacher_logprobs", "behaviour_logprobs")
# Step metrics an OPD arm's metrics rows keep (when the step returns them).
OPD_METRICS = ("loss", "advantage_mean", "reverse_kl", "clip_frac", "grad_norm", "entropy_est", "ratio_mean",
               "behaviour_ratio_mean", "behaviour_ratio_max", "behaviour_ess", "tis_clip_frac", "kl_ref",
               *(f"topk_{kind}" for kind in losses.TOPK_KINDS))


# ------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass
class StoreBatches:
    """Host batches of a store for steps 1..num_steps (an iterator), plus what the loop needs to know.

    ``rows``: rows per global batch (sequences, or packed rows of ``row_len``); ``packed``: batches carry
    ``segment_ids`` / ``positions``; ``data_iterator``: the Grain iterator whose state checkpoints hold.
    """

    data_iterator: Any
    rows: int
    packed: bool
    row_len: int
    plan_describe: Callable[[int], str] | None  # packed: the plan names a batch's rows from its step alone
    _last_rows: list[int] = dataclasses.field(default_factory=list)
    slices: loader.StoreSlices | None = None  # rows of several stores (multi-teacher): names rows by store

    def describe(self, step: int) -> str:
        """The store rows of step ``step`` (1-based; padded: the last batch taken, this process's rows)."""
        if self.plan_describe is not None:
            return self.plan_describe(step)
        if self.slices is not None:
            return f"{self.slices.describe(self._last_rows)} (this process's)"
        return f"store rows {self._last_rows} (this process's)"

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.data_iterator))
        if loader.ROW_INDEX in batch:
            self._last_rows = batch.pop(loader.ROW_INDEX).tolist()
        return batch


def store_batches(store_path: str | Path | loader.StoreSlices, *, batch_size: int, token_budget: int | None,
                  row_len: int | None, seed: int, num_steps: int, fields: Sequence[str],
                  shuffle: bool = True) -> StoreBatches:
    """The batches of one training loop from a store, or from rows of several (`loader.StoreSlices`: batches
    stratified by part, see jopd.data.loader for both layouts)."""
    slices = store_path if isinstance(store_path, loader.StoreSlices) else None
    if token_budget:
        ds, plan = loader.make_packed_dataset(store_path, token_budget=token_budget, row_len=row_len, seed=seed,
                                              num_steps=num_steps, shuffle=shuffle, fields=fields)
        describe = (lambda step: plan.describe(step - 1)) if slices is None else (
            lambda step: slices.describe(sorted(i for row in plan.batch(step - 1) for i in row)))
        return StoreBatches(iter(ds), plan.rows, True, plan.row_len, describe, slices=slices)
    it = loader.make_loader(store_path, global_batch_size=batch_size, seed=seed, shuffle=shuffle, seq_len="auto",
                            fields=tuple(fields) + (loader.ROW_INDEX,))
    return StoreBatches(it, batch_size, False, 0, None, slices=slices)


def fixed_batches(store_path: str | Path, *, batch_size: int, fields: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Every row of a store once, in order, as padded batches of ``batch_size`` (held-out evaluation)."""
    it = loader.make_loader(store_path, global_batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                            drop_remainder=False, seq_len="auto", fields=fields)
    return [dict(b) for b in it]


def process_rows(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous slice of a global host batch (what ``shard_batch`` takes), for batch sources
    that produce the whole global batch on every process (online OPD's samples)."""
    n, count, index = len(next(iter(batch.values()))), jax.process_count(), jax.process_index()
    per = n // count
    return {k: v[index * per:(index + 1) * per] for k, v in batch.items()}


def _place(mesh: Any) -> Callable[[Mapping[str, np.ndarray]], Any]:
    return functools.partial(shard_batch, mesh=mesh)


# ------------------------------------------------------------------------------------- trainable params
def trainable_split(model: Model) -> tuple[Any, Any | None]:
    """``(trainable params, frozen params or None)``: a LoRA model trains ``{"lora": adapters}`` with its base
    frozen (no gradient, no optimizer state, not in checkpoints); a plain model trains all of its params."""
    base, adapters = lora.split(model.params)
    if adapters is None:
        return model.params, None
    return {lora.LORA: adapters}, base


def current_model(model: Model, train_state: Any) -> Model:
    """The model a training loop's state stands for: ``model`` with its params updated by the state's (all of
    them, or a LoRA model's adapters)."""
    return dataclasses.replace(model, params={**model.params, **train_state.params})


def _step_caller(jitted: Callable, *extra: Any) -> Callable:
    """``(state, batch) -> jitted(state, batch, *extra)`` for the extra arguments that are not None (the frozen
    params, the KL reference), in that order."""
    args = tuple(x for x in extra if x is not None)
    return jitted if not args else (lambda st, b: jitted(st, b, *args))


# ------------------------------------------------------------------------------------------- supervised
def heldout_loss(eval_fn: Callable, params: Any, batches: Sequence[Mapping[str, np.ndarray]], mesh: Any) -> float:
    """Token-weighted mean NLL over held-out batches."""
    total, tokens = 0.0, 0.0
    for b in batches:
        m = jax.device_get(eval_fn(params, shard_batch(b, mesh)))
        total += float(m["nll"]) * float(m["num_tokens"])
        tokens += float(m["num_tokens"])
    return total / max(tokens, 1.0)


def supervised(model: Model, *, train_store: str | Path, loop: Any, optim: Any, seed: int, ckpt_dir: str | Path,
               heldout_store: str | Path | None = None, logger: looplib.MetricsLogger | None = None,
               name: str = "sft", hooks: Sequence[looplib.Hook] = ()) -> tuple[Model, dict[str, Any]]:
    """Fine-tune ``model`` on a store's response tokens (token-mean cross-entropy); resumable from ``ckpt_dir``.

    ``loop``: a TrainLoop section (steps, batch_size or token_budget/row_len, micro_batch_size, cadences);
    ``optim``: an OptimSection. The held-out loss (over ``heldout_store``) is evaluated at step 0, every
    ``loop.eval_every`` steps and at the end. ``hooks`` run after the built-in ones (e.g. a test's crash). A LoRA
    ``model`` trains its adapters only (LoRA dropout keys from ``seed``). Returns the trained model (same config)
    and a summary.
    """
    mesh = model.mesh
    data = store_batches(train_store, batch_size=loop.batch_size, token_budget=loop.token_budget,
                         row_len=loop.row_len, seed=seed, num_steps=loop.steps, fields=SFT_FIELDS)
    optimizer = optimizer_from_section(optim, loop.steps)
    schedule = lr_schedule(optim.lr, loop.steps, schedule=optim.schedule, warmup_steps=optim.warmup_steps,
                           min_lr_ratio=optim.min_lr_ratio)
    trainable, frozen = trainable_split(model)
    state = init_state(trainable, optimizer)
    step_fn = _step_caller(make_sft_step(model.config, optimizer, mesh=mesh, state=state, batch_size=data.rows,
                                         micro_batch_size=loop.micro_batch_size, packed=data.packed,
                                         frozen=frozen is not None, dropout_seed=seed), frozen)
    ckpt = Checkpointer(ckpt_dir, keep=loop.keep_checkpoints, async_save=loop.async_checkpointing)
    resume = looplib.restore(ckpt, state, data_iterator=data.data_iterator)
    if resume is not None:
        log.info("%s: resumed from the checkpoint of step %d", name, resume.step)

    all_hooks: list[looplib.Hook] = []
    if logger is not None:
        all_hooks.append(looplib.LogMetrics(logger, loop.log_every, keys=("loss", "grad_norm"),
                                            extra=lambda st: {"lr": float(schedule(st.step - 1))}))
    held = fixed_batches(heldout_store, batch_size=loop.micro_batch_size or loop.batch_size, fields=SFT_FIELDS) \
        if heldout_store is not None else []
    if held:
        eval_loss = make_eval_loss(model.config, mesh=mesh)
        all_hooks.append(looplib.Evaluate(
            lambda st, step: {"heldout_loss": heldout_loss(eval_loss, current_model(model, st).params, held, mesh)},
            loop.eval_every,
            logger, name=name))
    all_hooks += [looplib.Checkpoint(ckpt, loop.checkpoint_every, data_iterator=data.data_iterator),
                  looplib.Progress(name), *hooks]
    final = looplib.run_loop(step_fn, state, data, num_steps=loop.steps, hooks=all_hooks, resume=resume, name=name,
                             place=_place(mesh), describe_batch=data.describe)
    extra = final.extra
    summary = {"steps": loop.steps, "final_loss": final.last_metrics.get("loss"),
               "final_grad_norm": final.last_metrics.get("grad_norm"),
               "heldout_loss_initial": extra.get("initial_eval", {}).get("heldout_loss"),
               "heldout_loss_final": extra.get("last_eval", {}).get("heldout_loss"),
               "tokens": final.tokens, "train_seconds": final.seconds, "packed": data.packed,
               "resumed_from_step": final.start_step}
    log.info("%s: done (%d steps, loss %s, held-out %s)", name, loop.steps, summary["final_loss"],
             summary["heldout_loss_final"])
    return current_model(model, final.train_state), summary


# ------------------------------------------------------------------------------------------------- OPD
def opd_loss_config(opd: Any, arm: Any = None) -> OPDLossConfig:
    """The static loss settings of an OPDSection, with ``arm``'s own objective (ArmSection.objective) if given."""
    weights, beta = arm.objective(opd) if arm is not None else (opd.loss_weights, opd.jsd_beta)
    return OPDLossConfig(eps_low=opd.eps_low, eps_high=opd.eps_high, aggregation=opd.aggregation,
                         normalize_advantages=opd.normalize_advantages, kl_coef=opd.kl_coef, tis_cap=opd.tis_cap,
                         loss_weights=losses.LossWeights(**dataclasses.asdict(weights)), jsd_beta=beta)


def opd(student: Model, batches: Any, *, opd: Any, rows: int, ckpt_dir: str | Path, packed: bool = False,
        data_iterator: Any = None, describe_batch: Callable[[int], str] | None = None,
        batch_phases: Callable[[], Mapping[str, float]] | None = None,
        evaluate: Callable[[Model], Mapping[str, float]] | None = None,
        logger: looplib.MetricsLogger | None = None, name: str = "opd",
        hooks: Sequence[looplib.Hook] = (), arm: Any = None, seed: int = 0) -> tuple[Model, looplib.LoopState]:
    """Train ``student`` with the OPD step for ``opd.steps`` steps on ``batches`` (``rows`` rows each).

    A step is one batch: ``opd.ppo_epochs * opd.mini_batches`` optimizer updates (1 by default: the fused
    update), so the lr schedule spans ``opd.steps`` times that many updates; ``seed`` draws the mini-batches'
    row order of the later PPO epochs (:func:`jopd.steps.mini_batch_order`).

    ``opd``: an OPDSection (loss, optimizer, cadences); ``arm``: an ArmSection whose own objective
    (``loss_weights`` / ``jsd_beta``) replaces opd's (with a top-k weight the batches must carry
    ``teacher_topk_ids`` / ``teacher_topk_logprobs``, see ``OPD_FIELDS + loader.TOPK_FIELDS``). ``evaluate(model)``: periodic held-out evaluation (step 0,
    every ``opd.eval_every``, the end) when ``opd.eval_every > 0``. Resumes from the newest checkpoint in
    ``ckpt_dir`` (train state, ``data_iterator``'s position, counters). A LoRA ``student`` trains its adapters
    only, and its KL reference (``opd.kl_coef > 0``) is its frozen base: the SFT policy, with no copy. Returns the
    final model and LoopState.
    """
    mesh = student.mesh
    trainable, frozen = trainable_split(student)
    # The KL reference must be a separate copy: the state's params are donated to (consumed by) each step.
    ref_params = None
    if opd.kl_coef > 0:
        ref_params = frozen if frozen is not None else jax.tree.map(jnp.copy, student.params)
    optimizer = optimizer_from_section(opd.optim, opd.steps * opd.ppo_updates())
    state = init_state(trainable, optimizer)
    jitted = make_opd_step(student.config, optimizer, opd_loss_config(opd, arm), mesh=mesh, state=state,
                           batch_size=rows, micro_batch_size=opd.micro_batch_size, with_behaviour=True,
                           with_ref=ref_params is not None, packed=packed, ppo_epochs=opd.ppo_epochs,
                           mini_batches=opd.mini_batches, shuffle_seed=seed, frozen=frozen is not None,
                           dropout_seed=seed)
    step_fn = _step_caller(jitted, frozen, ref_params)
    ckpt = Checkpointer(ckpt_dir, keep=opd.keep_checkpoints, async_save=opd.async_checkpointing)
    resume = looplib.restore(ckpt, state, data_iterator=data_iterator)
    if resume is not None:
        log.info("%s: resumed from the checkpoint of step %d", name, resume.step)
    all_hooks: list[looplib.Hook] = []
    if logger is not None:
        all_hooks.append(looplib.LogMetrics(logger, 1, keys=OPD_METRICS, log_every=opd.log_every))
    if evaluate is not None and opd.eval_every > 0:
        all_hooks.append(looplib.Evaluate(
            lambda st, step: {f"eval/{k}": v for k, v in evaluate(current_model(student, st)).items()},
            opd.eval_every, logger, name=name))
    all_hooks += [looplib.Checkpoint(ckpt, opd.checkpoint_every, data_iterator=data_iterator),
                  looplib.Progress(name, show=("loss", "reverse_kl")), *hooks]
    final = looplib.run_loop(step_fn, state, batches, num_steps=opd.steps, hooks=all_hooks, resume=resume,
                             name=name, place=_place(mesh), describe_batch=describe_batch, batch_phases=batch_phases)
    return current_model(student, final.train_state), final


def prompt_stream(num_prompts: int, seed: int, start: int, count: int,
                  groups: Sequence[int] | None = None) -> list[int]:
    """Prompt indices at positions ``start .. start + count`` of the OPD prompt stream: the prompts in a fresh
    seeded permutation per pass, passes one after another. Online step s takes positions ``(s - 1) B .. s B``;
    refresh generation g takes those of the online steps it serves, ``g N B .. (g + 1) N B``. With ``groups``
    (each prompt's route, multi-teacher runs) a pass is a `stratified_order` of the prompts instead, so every
    batch holds the routes in proportion to their prompts."""
    positions = np.arange(start, start + count)
    epochs, within = np.divmod(positions, num_prompts)

    def order(e: int) -> np.ndarray:
        rng = np.random.default_rng([seed, e, 0x0B5])
        return rng.permutation(num_prompts) if groups is None else stratified_order(groups, rng)

    # One permutation per pass the range touches (usually one), not one per prompt.
    perms = {int(e): order(int(e)) for e in np.unique(epochs)}
    return [int(perms[int(e)][j]) for e, j in zip(epochs, within)]


def sample_seed(seed: int, step: int) -> int:
    """The sampling seed of online step ``step``: a hash of (seed, step), so steps draw independent samples."""
    return int(np.random.SeedSequence([seed, step, 0x0B5]).generate_state(1)[0] % (2**31 - 1))


class OnlineBatches(looplib.Hook):
    """Standard OPD's batches: the next ``batch_size`` prompts, answered by the CURRENT student and scored by a
    live teacher. Pass it to :func:`opd` as the batches and as a hook (it reads the loop's current params).

    The prompt stream cycles over ``prompts`` with a fresh seeded permutation per pass and sampling seeds derive
    from (seed, step), so batch s is a function of s: a resumed run needs only the step to continue.
    ``last_phases``: seconds spent generating (``gen_s``) and scoring (``score_s``) the last batch.

    Multi-teacher: ``teacher`` a sequence of models, one per route, and ``routes`` the route (index into it) of
    every prompt: the stream is stratified by route (:func:`prompt_stream`) and each row is scored by its route's
    teacher, every teacher scoring only its rows (padded to a power of two, at most ``batch_size``).
    """

    def __init__(self, prompts: Sequence[Mapping[str, Any]], student: Model, teacher: Model | Sequence[Model], *,
                 batch_size: int, seed: int, sampling: Any, stop_ids: Sequence[int],
                 seq_bucket: int = loader.SEQ_LEN_BUCKET, routes: Sequence[int] | None = None):
        if not prompts:
            raise ValueError("online OPD: no prompts")
        if (routes is None) != isinstance(teacher, Model):
            raise ValueError("online OPD: give one teacher, or one teacher per route and the prompts' routes")
        if routes is not None and (len(routes) != len(prompts) or not 0 <= min(routes) <= max(routes) < len(teacher)):
            raise ValueError(f"online OPD: routes must give each of the {len(prompts)} prompts one of the "
                             f"{len(teacher)} teachers")
        self.prompts, self.student, self.teacher = prompts, student, teacher
        self.routes = None if routes is None else np.asarray(routes, np.int64)
        self.batch_size, self.seed, self.sampling, self.stop_ids = batch_size, seed, sampling, tuple(stop_ids)
        longest_prompt = max(len(p["prompt_ids"]) for p in prompts)
        # One static length for every batch: the longest prompt plus a full-length response, rounded up.
        self.seq_len = round_up(longest_prompt + sampling.max_new_tokens, seq_bucket)
        self.last_phases: dict[str, float] = {}
        self._loop: looplib.LoopState | None = None

    def on_start(self, loop: looplib.LoopState) -> None:
        self._loop = loop

    def prompt_indices(self, step: int) -> list[int]:
        """Indices of the prompts of step ``step`` (1-based)."""
        return prompt_stream(len(self.prompts), self.seed, (step - 1) * self.batch_size, self.batch_size,
                             groups=self.routes)

    def _teacher_logprobs(self, indices: Sequence[int], tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[B, T] teacher log-probs of the batch: one teacher, or each row's route's teacher on its rows."""
        if self.routes is None:
            return to_host(token_logprobs(self.teacher, tokens, mask)).astype(np.float32)
        out = np.zeros(tokens.shape, np.float32)
        row_route = self.routes[np.asarray(indices)]
        for r in np.unique(row_route):
            rows = np.flatnonzero(row_route == r)
            n = min(bucket(len(rows)), len(indices))  # few compiled shapes
            sub_tokens, sub_mask = np.zeros((n, tokens.shape[1]), np.int32), np.zeros((n, tokens.shape[1]), np.int32)
            sub_tokens[:len(rows)], sub_mask[:len(rows)] = tokens[rows], mask[rows]
            sub_mask[len(rows):, 0] = 1  # padding rows: a one-token sequence, so every row is valid
            out[rows] = to_host(token_logprobs(self.teacher[r], sub_tokens, sub_mask))[:len(rows)]
        return out

    def describe(self, step: int) -> str:
        return f"opd prompt indices {self.prompt_indices(step)}"

    def __iter__(self) -> OnlineBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        step = self._loop.step + 1
        indices = self.prompt_indices(step)
        prompt_ids = [self.prompts[i]["prompt_ids"] for i in indices]
        sp = self.sampling
        t0 = time.perf_counter()
        res = generate(current_model(self.student, self._loop.train_state), prompt_ids,
                       max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                       eos_token_id=self.stop_ids, seed=sample_seed(self.seed, step - 1), batch_size=self.batch_size)
        t1 = time.perf_counter()
        seqs = sequences(prompt_ids, res, self.seq_len)
        teacher_lp = self._teacher_logprobs(indices, seqs["tokens"], seqs["mask"])
        self.last_phases = {"gen_s": t1 - t0, "score_s": time.perf_counter() - t1}
        response = seqs["response_mask"]
        return process_rows({"tokens": seqs["tokens"], "response_mask": response,
                             "teacher_logprobs": np.where(response > 0, teacher_lp, np.float32(0)),
                             "behaviour_logprobs": seqs["behaviour_logprobs"]})


class RefreshBatches(looplib.Hook):
    """The batches of a Lightning arm with a refresh schedule every ``every`` (N) steps. Pass it to :func:`opd`
    as the batches and as a hook (it reads the loop's current step and params).

    Steps 1 .. N come from ``first`` (generation 0: the precomputed store). Generation g >= 1 serves steps
    g N + 1 .. (g + 1) N: before step g N + 1, ``make_generation(g, loop)`` samples it with the student of
    step g N (``loop.train_state.params``) and scores it, returning ``(store path, {phase: seconds})``, and
    ``open_batches(path, g)`` gives its :class:`StoreBatches` (N steps). A run resumed inside generation g
    reopens the generation (complete: it is only verified) and skips the batches already trained on, so batch
    s depends only on s. ``last_phases``: the seconds of the refresh made before the last batch (``refresh_gen_s``,
    ``refresh_score_s``), empty on the other steps.
    """

    def __init__(self, first: StoreBatches, *, every: int,
                 make_generation: Callable[[int, looplib.LoopState], tuple[Path, Mapping[str, float]]],
                 open_batches: Callable[[Path, int], StoreBatches]):
        if every < 1:
            raise ValueError(f"RefreshBatches: every must be >= 1, got {every}")
        self.first, self.every = first, every
        self.make_generation, self.open_batches = make_generation, open_batches
        self.data_iterator = first.data_iterator  # generation 0's position is what checkpoints keep
        self.last_phases: dict[str, float] = {}
        self._loop: looplib.LoopState | None = None
        self._generation, self._batches, self._path = 0, first, None

    def on_start(self, loop: looplib.LoopState) -> None:
        self._loop = loop

    def generation_of(self, step: int) -> int:
        """The generation whose rows step ``step`` (1-based) trains on."""
        return (step - 1) // self.every

    def describe(self, step: int) -> str:
        g = self.generation_of(step)
        if g == 0:
            return f"generation 0: {self.first.describe(step)}"
        if g != self._generation:  # only the generation being trained on is open
            return f"generation {g}, batch {step - g * self.every} of {self.every}"
        return f"generation {g} ({self._path}): {self._batches.describe(step - g * self.every)}"

    def __iter__(self) -> RefreshBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        step = self._loop.step + 1
        g = self.generation_of(step)
        self.last_phases = {}
        if g != self._generation:
            path, phases = self.make_generation(g, self._loop)
            self.last_phases = {f"refresh_{k}": float(v) for k, v in phases.items()}
            self._generation, self._path = g, path
            self._batches = self.open_batches(path, g)
            for _ in range(step - 1 - g * self.every):  # resumed inside the generation
                next(self._batches)
        return next(self._batches)
