"""Pure-functional, jitted train steps: SFT and (Lightning or online) OPD.

A step is ``(state, batch) -> (state, metrics)`` with explicit in/out shardings and the state donated. The OPD
step is ONE fused forward/backward: the "old" log-probs of the PPO ratio are the current ones under
``stop_gradient`` (one optimizer update per batch), so no separate no-grad forward is ever run. With
``micro_batch_size < batch_size`` the gradient is accumulated over micro-batches inside the same jit
(``lax.scan``), using full-batch loss denominators so the result equals the full-batch gradient.

Several PPO updates per batch (``make_opd_step(..., ppo_epochs=E, mini_batches=M)``, ``E * M > 1``): the old
log-probs (and the KL reference's) are computed once with the batch-start params, no gradient, then the step
makes ``E * M`` optimizer updates inside the same jit (a ``lax.scan`` over updates: one compiled update body,
one dispatch per batch, the state donated as for the fused step), each on a mini-batch of ``B / M`` rows
(epoch 1 in order, later epochs a fixed permutation, :func:`mini_batch_order`) with the PPO ratio taken
against the frozen old log-probs, so the clip acts. The fused and top-k heads take the old log-probs too
(the loss stays token-local). The default ``E = M = 1`` is the fused update above, unchanged.

Frozen-base (LoRA) training (``frozen=True``): the state's params are the trainable part only (a LoRA model's
``{"lora": adapters}``, see :mod:`jopd.models.lora`), so gradients and optimizer state exist for them alone; the
step takes the frozen rest of the model's params as an extra argument, never donated, and the model it
differentiates is ``{**frozen, **state.params}``. With a LoRA dropout rate, each update's dropout key is
``fold_in(PRNGKey(dropout_seed), state.step)`` (a resumed run draws the same masks); the frozen-logprob and
reference passes run without dropout.

A non-finite loss or gradient never reaches the parameters: the update is skipped inside the step and
``metrics["nonfinite"]`` is set, which the caller turns into an error naming the batch.

Example (one Lightning OPD step on a tiny model, no CLI)::

    from jopd import models, steps
    model = models.from_params(cfg, models.init_params(cfg))
    opt = steps.make_optimizer(lr=1e-4, total_steps=100)
    state = steps.init_state(model.params, opt)
    step = steps.make_opd_step(cfg, opt, steps.OPDLossConfig(), mesh=model.mesh, state=state)
    state, metrics = step(state, batch)   # batch: tokens, response_mask, teacher_logprobs [B, T]

Packed batches (``packed=True``): each row holds several whole sequences back to back, and the batch also
carries int32 ``segment_ids`` (1, 2, ... per sequence of the row, 0 on padding) and ``positions`` (within each
sequence) ``[B, T]``. Log-probs, loss and gradient then equal those of the same sequences unpacked; a
micro-batch is a set of whole rows, so accumulation stays exact.

Fused output head (``OPDLossConfig.fused_head``, the ``fused_head`` argument of the SFT step / eval loss, on by
default): the fused OPD loss (and SFT's) is a weighted sum of token-local terms, so the output head computes
its own gradient in the forward pass (:func:`jopd.models.fused_head.fused_head_loss`) and the backward pass
never recomputes the ``[B, c, V]`` logits. Metrics still come from :func:`jopd.losses.opd_loss` /
:func:`jopd.losses.sft_loss` on the (stop-gradient) log-probs, so they are those of the unfused path.
Advantage whitening needs batch statistics of all log-probs first, so ``normalize_advantages`` always takes
the unfused path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jopd import losses, sharding
from jopd.models.config import ModelConfig
from jopd.models.decoder import hidden_states, stored_output_kernel
from jopd.models.fused_head import PerTokenLoss, fused_head_loss
from jopd.models.logprobs import logprobs_fn, prediction_mask
from jopd.models.topk_head import topk_student_logprobs

Array = jax.Array
Batch = dict[str, Array]


class TrainState(NamedTuple):
    step: Array  # int32 scalar
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class OPDLossConfig:
    """Static settings of the OPD loss (see :func:`jopd.losses.opd_loss`); ``fused_head=False`` takes the
    rematerialised head (for comparison and benchmarks; same loss, gradient and metrics).

    ``loss_weights`` (:class:`jopd.losses.LossWeights`) mixes the sampled-token surrogate with the direct
    top-k divergences (``jsd_beta``: the JSD's interpolation); any top-k weight > 0 makes the step take the
    batch's ``teacher_topk_ids`` / ``teacher_topk_logprobs`` ``[B, T, k]`` and the top-k head
    (:func:`jopd.models.topk_head.topk_student_logprobs`, autodiff through checkpointed chunks) instead of the
    fused one."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: Literal["token_mean", "seq_mean"] = "seq_mean"
    normalize_advantages: bool = False
    kl_coef: float = 0.0
    tis_cap: float | None = None
    fused_head: bool = True
    loss_weights: losses.LossWeights = losses.LossWeights()
    jsd_beta: float = 0.5

    @property
    def uses_topk(self) -> bool:
        """Whether the step needs the teacher's top-k arrays (a top-k weight > 0)."""
        return bool(self.loss_weights.topk)


def lr_schedule(lr: float, total_steps: int, *, schedule: str = "constant", warmup_steps: int = 0,
                min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Linear warm-up then constant / cosine / linear decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        decay = optax.constant_schedule(lr)
    elif schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    elif schedule == "linear":
        decay = optax.linear_schedule(lr, lr * min_lr_ratio, decay_steps)
    else:
        raise ValueError(f"unknown schedule {schedule!r} (constant, cosine, linear)")
    if warmup_steps <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def _decay_mask(params: Any) -> Any:
    # Weight decay on matrices only: norms and biases (ndim <= 1 per layer) are not decayed.
    def keep(path, x):
        name = str(path[-1].key) if hasattr(path[-1], "key") else ""
        return not (name.endswith("norm") or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(*, lr: float, total_steps: int, schedule: str = "constant", warmup_steps: int = 0,
                   min_lr_ratio: float = 0.1, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.98,
                   eps: float = 1e-8, grad_clip: float = 1.0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a warm-up/decay schedule; its moments take the params' dtype (fp32
    with fp32 master weights, bf16 with ``param_dtype: bfloat16``)."""
    sched = lr_schedule(lr, total_steps, schedule=schedule, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


def optimizer_from_section(optim: Any, total_steps: int) -> optax.GradientTransformation:
    """Build from a config ``OptimSection``."""
    return make_optimizer(lr=optim.lr, total_steps=total_steps, schedule=optim.schedule,
                          warmup_steps=optim.warmup_steps, min_lr_ratio=optim.min_lr_ratio,
                          weight_decay=optim.weight_decay, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                          grad_clip=optim.grad_clip)


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A TrainState whose optimizer state is sharded like the params (Adam moments mirror them)."""
    meshes = [x.sharding.mesh for x in jax.tree.leaves(params) if isinstance(getattr(x, "sharding", None),
                                                                            NamedSharding)]
    if not meshes:
        return TrainState(jnp.zeros((), jnp.int32), params, jax.jit(optimizer.init)(params))
    # The moments are zeros: nothing ties them to the params' layout, and XLA would return them replicated (a
    # full copy of both moments on every device). Their shardings are given explicitly: each moment leaf takes
    # its param's, the rest (step counts) is replicated.
    replicated = NamedSharding(meshes[0], PartitionSpec())
    opt_state = jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, meshes[0]))(params)
    # The step count is placed where the jitted step returns it, so the step compiles once, not again on its
    # second call.
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state)


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Any, mesh) -> Any:
    """Shardings of ``optimizer.init(params)`` (params: arrays or ShapeDtypeStructs with shardings): every
    per-param leaf (Adam's moments) takes its param's sharding, the rest (step counts) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, params),
        state_shardings(params, mesh), transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def state_shardings(state: TrainState, mesh) -> Any:
    """NamedShardings of every state leaf (scalars and unsharded leaves replicated on ``mesh``)."""
    rep = NamedSharding(mesh, PartitionSpec())

    def sh(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else rep

    return jax.tree.map(sh, state)


_PACKING_KEYS = ("segment_ids", "positions")
TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs")  # [B, T, k] batch arrays of the top-k objectives


# ---- losses on a model ---------------------------------------------------------------------------------
def _logprobs(params: Any, config: ModelConfig, batch: Batch, rng: Array | None = None) -> Array:
    """Per-token log-probs [B, T] of ``batch["tokens"]`` on the response mask; packed if the batch is; ``rng``:
    LoRA dropout on (training passes only)."""
    return logprobs_fn(params, config, batch["tokens"], batch["response_mask"],
                       segment_ids=batch.get("segment_ids"), positions=batch.get("positions"), dropout_rng=rng)


def _fused_head_loss(params: Any, config: ModelConfig, batch: Batch, per_token_loss: PerTokenLoss,
                     aux: Any, rng: Array | None = None) -> tuple[Array, Array]:
    """(loss, stop-gradient log-probs [B, T]) of the batch through the fused output head (packed if the batch
    is); ``per_token_loss`` and ``aux`` as in :func:`fused_head_loss`."""
    seg = batch.get("segment_ids")
    h = hidden_states(params, config, batch["tokens"], batch.get("positions"), seg, dropout_rng=rng)
    valid = prediction_mask(batch["response_mask"], seg)
    w_out, vocab_major = stored_output_kernel(params, config)
    return fused_head_loss(h, w_out, batch["tokens"], valid, per_token_loss, aux,
                           chunk=config.logits_chunk_size, vocab_major=vocab_major)


def opd_objective(params: Any, config: ModelConfig, batch: Batch, loss_cfg: OPDLossConfig, num_tokens: Array,
                  num_seqs: Array, ref_params: Any = None, rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """OPD loss of one (micro-)batch: tokens, response_mask, teacher_logprobs [+ behaviour_logprobs]
    [+ segment_ids, positions when packed], all [B, T]; ``rng``: the student pass's LoRA dropout key."""
    mask = batch["response_mask"]
    seg = batch.get("segment_ids")
    old = batch.get("old_logprobs")  # several PPO updates per batch: frozen at the batch's start
    ref = batch.get("ref_logprobs")  # the same, computed once at the batch's start
    if loss_cfg.kl_coef > 0 and ref is None:
        if ref_params is None:
            raise ValueError("kl_coef > 0 needs ref_params (the SFT policy)")
        ref = jax.lax.stop_gradient(_logprobs(ref_params, config, batch))
    behaviour = batch.get("behaviour_logprobs") if (loss_cfg.tis_cap is not None or
                                                    "behaviour_logprobs" in batch) else None
    opd_loss = functools.partial(
        losses.opd_loss, teacher_logprobs=batch["teacher_logprobs"], response_mask=mask, old_logprobs=old,
        behaviour_logprobs=behaviour, ref_logprobs=ref, eps_low=loss_cfg.eps_low, eps_high=loss_cfg.eps_high,
        aggregation=loss_cfg.aggregation, normalize_advantages=loss_cfg.normalize_advantages,
        tis_cap=loss_cfg.tis_cap, kl_coef=loss_cfg.kl_coef, num_tokens=num_tokens, num_seqs=num_seqs,
        segment_ids=seg,
    )
    w_sampled = loss_cfg.loss_weights.sampled
    if loss_cfg.uses_topk:
        return _topk_objective(params, config, batch, loss_cfg, opd_loss, num_tokens, num_seqs, rng)
    if not loss_cfg.fused_head or loss_cfg.normalize_advantages:
        loss, metrics = opd_loss(_logprobs(params, config, batch, rng))
        return (loss if w_sampled == 1.0 else w_sampled * loss), metrics

    def per_token(lp: Array, a: dict[str, Array]) -> Array:
        return a["weight"] * losses.opd_token_loss(
            lp, a["teacher"], a["mask"], old_logprobs=a.get("old"), behaviour_logprobs=a["behaviour"],
            ref_logprobs=a["ref"],
            eps_low=loss_cfg.eps_low, eps_high=loss_cfg.eps_high, tis_cap=loss_cfg.tis_cap,
            kl_coef=loss_cfg.kl_coef)

    weight = losses.token_weights(mask, loss_cfg.aggregation, num_tokens=num_tokens, num_seqs=num_seqs,
                                  segment_ids=seg)
    if w_sampled != 1.0:
        weight = w_sampled * weight
    aux = {"weight": weight, "teacher": batch["teacher_logprobs"], "mask": mask, "behaviour": behaviour,
           "ref": ref}
    if old is not None:
        aux["old"] = old
    loss, student = _fused_head_loss(params, config, batch, per_token, aux, rng)
    _, metrics = opd_loss(student)
    return loss, metrics


def _topk_objective(params: Any, config: ModelConfig, batch: Batch, loss_cfg: OPDLossConfig,
                    opd_loss: Callable[[Array], tuple[Array, dict[str, Array]]], num_tokens: Array,
                    num_seqs: Array, rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """``sampled * opd_loss + sum_kind w_kind * aggregate(topk_divergence(kind))`` through the top-k head; the
    batch also carries ``teacher_topk_ids`` / ``teacher_topk_logprobs`` ``[B, T, k]``. Plain autodiff through
    the head's checkpointed chunks; metrics: the OPD ones plus ``topk_<kind>`` (response-token means)."""
    mask, seg = batch["response_mask"], batch.get("segment_ids")
    h = hidden_states(params, config, batch["tokens"], batch.get("positions"), seg, dropout_rng=rng)
    w_out, vocab_major = stored_output_kernel(params, config)
    lp, student_topk, student_tail = topk_student_logprobs(
        h, w_out, batch["tokens"], mask, batch["teacher_topk_ids"], chunk=config.logits_chunk_size,
        segment_ids=seg, vocab_major=vocab_major)
    sampled_loss, metrics = opd_loss(lp)
    w = loss_cfg.loss_weights
    loss = w.sampled * sampled_loss if w.sampled > 0 else jnp.zeros((), sampled_loss.dtype)
    for kind, weight in w.topk.items():
        per_token = losses.topk_divergence(student_topk, student_tail, batch["teacher_topk_logprobs"], kind,
                                           loss_cfg.jsd_beta, response_mask=mask)
        loss = loss + weight * losses.aggregate(per_token, mask, loss_cfg.aggregation, num_tokens=num_tokens,
                                                num_seqs=num_seqs, segment_ids=seg)
        metrics[f"topk_{kind}"] = losses.topk_metric(per_token, mask)
    return loss, metrics


def sft_objective(params: Any, config: ModelConfig, batch: Batch, aggregation: str, num_tokens: Array,
                  num_seqs: Array, *, fused_head: bool = True, rng: Array | None = None
                  ) -> tuple[Array, dict[str, Array]]:
    """Cross-entropy on response tokens only: tokens, response_mask [+ segment_ids, positions when packed];
    ``rng``: LoRA dropout on."""
    sft_loss = functools.partial(losses.sft_loss, response_mask=batch["response_mask"], aggregation=aggregation,
                                 num_tokens=num_tokens, num_seqs=num_seqs, segment_ids=batch.get("segment_ids"))
    if not fused_head:
        return sft_loss(_logprobs(params, config, batch, rng))
    weight = losses.token_weights(batch["response_mask"], aggregation, num_tokens=num_tokens,
                                  num_seqs=num_seqs, segment_ids=batch.get("segment_ids"))
    loss, lp = _fused_head_loss(params, config, batch, lambda lp, w: -w * lp, weight, rng)
    _, metrics = sft_loss(lp)
    return loss, metrics


# ---- the generic step ----------------------------------------------------------------------------------
# (trainable params, batch, num_tokens, num_seqs[, LoRA dropout key]) -> (loss, metrics); the key is passed only
# when the step has LoRA dropout.
Objective = Callable[..., tuple[Array, dict[str, Array]]]


def _dropout_key(seed: int | None, step: Array) -> Array | None:
    """The LoRA dropout key of the update that makes optimizer step ``step + 1`` (None: no dropout)."""
    return None if seed is None else jax.random.fold_in(jax.random.PRNGKey(seed), step)


def _dropout_seed(config: ModelConfig, seed: int) -> int | None:
    """``seed`` when the model has LoRA dropout, else None (the step then draws no random numbers at all)."""
    return seed if config.lora is not None and config.lora.dropout > 0 else None


def _model_params(frozen: Any) -> Callable[[Any], Any]:
    """The model's params from the trainable ones: ``{**frozen, **trainable}`` (frozen-base training), else
    the trainable ones themselves."""
    return (lambda p: p) if frozen is None else (lambda p: {**frozen, **p})


def _accumulated_grads(objective: Objective, params: Any, batch: Batch, micro_batches: int,
                       rng: Array | None = None) -> tuple[Array, Any, dict[str, Array]]:
    num_tokens, num_seqs = losses.loss_denominators(batch["response_mask"], batch.get("segment_ids"))
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    keyed = () if rng is None else (rng,)
    if micro_batches == 1:
        (loss, metrics), grads = grad_fn(params, batch, num_tokens, num_seqs, *keyed)
        return loss, grads, metrics

    micro = jax.tree.map(lambda x: x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:]), batch)

    def body(carry, xs):
        loss_acc, grad_acc = carry
        mb, index = xs
        mb = jax.tree.map(lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
        key = () if rng is None else (jax.random.fold_in(rng, index),)
        (loss, metrics), grads = grad_fn(params, mb, num_tokens, num_seqs, *key)
        grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
        return (loss_acc + loss, grad_acc), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, grads), metrics = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                          (micro, jnp.arange(micro_batches)))
    # Metrics are per-micro-batch masked means: combine weighted by each micro-batch's token count.
    weights = metrics["num_tokens"] / jnp.maximum(jnp.sum(metrics["num_tokens"]), 1.0)
    combined = {}
    for k, v in metrics.items():
        if k in ("num_tokens", "num_seqs"):
            combined[k] = jnp.sum(v)
        elif k.endswith("_max"):
            combined[k] = jnp.max(v)
        else:
            combined[k] = jnp.sum(v * weights)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, grads, combined


def _tree_norm(tree: Any) -> Array:
    # optax >= 0.2.5 spells it optax.tree.norm; global_norm is deprecated there.
    tree_ns = getattr(optax, "tree", None)
    return tree_ns.norm(tree) if tree_ns is not None and hasattr(tree_ns, "norm") else optax.global_norm(tree)


def _apply(state: TrainState, loss: Array, grads: Any, metrics: dict[str, Array],
           optimizer: optax.GradientTransformation,
           skip: Array | None = None) -> tuple[TrainState, dict[str, Array]]:
    # In fp32 whatever the params' dtype: with bf16 master weights the grads are bf16, and the norm (a logged
    # metric and the finiteness check) would otherwise be a bf16 sum of squares.
    grad_norm = _tree_norm(jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), grads))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    apply = finite if skip is None else finite & ~skip  # skip: an earlier update of the batch was non-finite

    def update(state: TrainState) -> TrainState:
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), new_opt)

    # Skip (keep the old state) when anything is non-finite; the caller raises with the batch identified. A
    # conditional, not a select of old and new: XLA then updates the donated state in place, where the select
    # needs a copy of the largest Adam moments (2 x the embedding's size at the step's end).
    new_state = jax.lax.cond(apply, update, lambda state: state, state)
    out = dict(metrics)
    out.update(loss=loss, grad_norm=grad_norm, nonfinite=~finite)
    return new_state, out


def _train_step(state: TrainState, batch: Batch, *, objective: Objective, optimizer, micro_batches: int,
                mesh, dropout_seed: int | None = None) -> tuple[TrainState, dict[str, Array]]:
    loss, grads, metrics = _accumulated_grads(objective, state.params, batch, micro_batches,
                                              _dropout_key(dropout_seed, state.step))
    return _apply(state, loss, grads, metrics, optimizer)


# ---- several PPO updates per batch ---------------------------------------------------------------------
def mini_batch_order(rows: int, ppo_epochs: int, seed: int = 0) -> np.ndarray:
    """Row order of the PPO updates of one batch, int32 ``[ppo_epochs, rows]``: the first epoch takes the rows
    as they come (the loader has already shuffled them), each later epoch ``e`` a fixed permutation drawn from
    ``(seed, e)``, the same for every batch (so it needs no state: a resumed run continues exactly). Epoch
    ``e``'s mini-batch ``j`` is rows ``order[e, j * rows // M:(j + 1) * rows // M]``."""
    perms = [np.arange(rows)] + [np.random.default_rng([seed, e, 0x99D]).permutation(rows)
                                 for e in range(1, ppo_epochs)]
    return np.stack(perms).astype(np.int32)


def _rows_constrained(tree: Any, lead: int = 0) -> Any:
    """Each leaf's row axis (after ``lead`` leading axes) on the mesh's batch axes."""
    return jax.tree.map(lambda x: sharding.constrain(x, (None,) * lead + ("batch",) + (None,) * (x.ndim - lead - 1)),
                        tree)


def _frozen_logprobs(params: Any, config: ModelConfig, batch: Batch, chunk_rows: int,
                     ref_params: Any) -> dict[str, Array]:
    """``old_logprobs`` (and ``ref_logprobs`` when ``ref_params`` is given) ``[B, T]`` of the batch at its start:
    no gradient, ``chunk_rows`` rows per forward pass (the micro-batch size, so memory is that of one)."""
    keys = ("tokens", "response_mask") + tuple(k for k in _PACKING_KEYS if k in batch)
    inputs = {k: batch[k] for k in keys}

    def forward(b: Batch) -> dict[str, Array]:
        out = {"old_logprobs": _logprobs(params, config, b)}
        if ref_params is not None:
            out["ref_logprobs"] = _logprobs(ref_params, config, b)
        return out

    n = batch["tokens"].shape[0] // chunk_rows
    if n == 1:
        out = forward(inputs)
    else:
        chunks = jax.tree.map(lambda x: x.reshape((n, chunk_rows) + x.shape[1:]), inputs)
        out = jax.lax.map(lambda b: forward(_rows_constrained(b)), chunks)
        out = jax.tree.map(lambda x: x.reshape((n * chunk_rows,) + x.shape[2:]), out)
    return _rows_constrained(jax.tree.map(jax.lax.stop_gradient, out))


def _combine_updates(per: dict[str, Array], epochs: int) -> dict[str, Array]:
    """The metrics of the batch's ``[U]`` updates: ``loss`` / ``grad_norm`` their mean, the other means
    weighted by each update's token count, ``*_max`` the max, ``num_tokens`` / ``num_seqs`` the batch's
    (one epoch's sum), ``nonfinite`` any; plus each ``KEY_per_update`` ``[U]`` as it was."""
    weights = per["num_tokens"] / jnp.maximum(jnp.sum(per["num_tokens"]), 1.0)
    out: dict[str, Array] = {}
    for k, v in per.items():
        if k == "nonfinite":
            out[k] = jnp.any(v)
        elif k in ("num_tokens", "num_seqs"):
            out[k] = jnp.sum(v) / epochs
        elif k.endswith("_max"):
            out[k] = jnp.max(v)
        elif k in ("loss", "grad_norm"):
            out[k] = jnp.mean(v)
        else:
            out[k] = jnp.sum(v * weights)
        out[f"{k}_per_update"] = v
    return out


def _ppo_step(state: TrainState, batch: Batch, *, objective: Objective, optimizer, config: ModelConfig,
              order: np.ndarray, mini_batches: int, micro_batches: int, chunk_rows: int,
              ref_params: Any, model_params: Callable[[Any], Any] = lambda p: p,
              dropout_seed: int | None = None) -> tuple[TrainState, dict[str, Array]]:
    """``E * M`` optimizer updates on one batch (``E, B = order.shape``): the old (and reference) log-probs
    are computed once with the batch-start params, then each epoch's rows (``order[e]``) are split into
    ``M`` mini-batches of ``B / M`` rows, one update each (its own loss denominators, ``micro_batches``-way
    accumulation inside), the PPO ratio taken against the frozen old log-probs. A ``lax.scan`` over the
    updates; after a non-finite update the batch's later ones are skipped too. ``model_params``: the model's
    params from the state's (frozen-base training)."""
    epochs, rows = order.shape
    full = {**batch, **_frozen_logprobs(model_params(state.params), config, batch, chunk_rows, ref_params)}
    per_mb = rows // mini_batches
    if epochs == 1:  # in order: no gather
        stacked = jax.tree.map(lambda x: x.reshape((mini_batches, per_mb) + x.shape[1:]), full)
    else:
        idx = jnp.asarray(order.reshape(-1))
        stacked = jax.tree.map(lambda x: jnp.take(x, idx, axis=0).reshape((epochs * mini_batches, per_mb)
                                                                          + x.shape[1:]), full)
    stacked = _rows_constrained(stacked, lead=1)

    def body(carry, mb):
        st, bad = carry
        loss, grads, metrics = _accumulated_grads(objective, st.params, _rows_constrained(mb), micro_batches,
                                                  _dropout_key(dropout_seed, st.step))
        st, out = _apply(st, loss, grads, metrics, optimizer, skip=bad)
        return (st, bad | out["nonfinite"]), out

    (state, _), per = jax.lax.scan(body, (state, jnp.zeros((), bool)), stacked)
    return state, _combine_updates(per, epochs)


def _jit_step(fn: Callable, state: TrainState, mesh, batch_keys: tuple[str, ...], batch_size: int,
              extra_args: int = 0) -> Callable:
    st_sh = state_shardings(state, mesh)
    b_sh = {k: sharding.batch_sharding(mesh, 3 if k in TOPK_KEYS else 2, batch_size) for k in batch_keys}
    rep = NamedSharding(mesh, PartitionSpec())
    in_sh = (st_sh, b_sh) + (None,) * extra_args
    return sharding.bind_mesh(jax.jit(fn, in_shardings=in_sh, out_shardings=(st_sh, rep), donate_argnums=(0,)), mesh)


def make_opd_step(config: ModelConfig, optimizer, loss_cfg: OPDLossConfig, *, mesh, state: TrainState,
                  batch_size: int, micro_batch_size: int | None = None, with_behaviour: bool = False,
                  with_ref: bool = False, packed: bool = False, ppo_epochs: int = 1, mini_batches: int = 1,
                  shuffle_seed: int = 0, frozen: bool = False, dropout_seed: int = 0) -> Callable:
    """Jitted OPD step ``(state, batch[, frozen_params][, ref_params]) -> (state, metrics)``.

    batch: ``tokens`` int32, ``response_mask`` int32, ``teacher_logprobs`` f32 [+ ``behaviour_logprobs``]
    [+ ``segment_ids``, ``positions`` int32 when ``packed``], all ``[batch_size, T]`` (rows), sharded over
    the mesh's batch axes. ``with_ref`` adds a third argument: the reference (SFT) params for the KL penalty.
    With a top-k weight in ``loss_cfg.loss_weights`` the batch also carries ``teacher_topk_ids`` int32 and
    ``teacher_topk_logprobs`` f32 ``[batch_size, T, k]``.

    ``ppo_epochs = mini_batches = 1`` (the default): one fused update (ratio 1). Otherwise the step makes
    ``ppo_epochs * mini_batches`` optimizer updates on the batch (see :func:`_ppo_step`; rows per epoch in
    :func:`mini_batch_order` ``(batch_size, ppo_epochs, shuffle_seed)``), the PPO ratio against the log-probs
    of the batch's start, so the clip acts; ``micro_batch_size`` then splits each mini-batch and must divide
    ``batch_size / mini_batches``. ``state.step`` counts optimizer updates, so it advances by
    ``ppo_epochs * mini_batches`` per call. Metrics: see :func:`_combine_updates`.

    ``frozen``: frozen-base (LoRA) training, the step takes the model's frozen params after the batch (see the
    module docstring; with ``with_ref`` the KL reference is typically those frozen params: the base without
    adapters is the SFT policy). ``dropout_seed``: the LoRA dropout keys' seed (used when ``config.lora`` has a
    dropout rate).
    """
    micro = batch_size // (micro_batch_size or batch_size)
    if ppo_epochs < 1 or mini_batches < 1:
        raise ValueError(f"ppo_epochs and mini_batches must be >= 1, got {ppo_epochs} and {mini_batches}")
    updates = ppo_epochs * mini_batches
    if updates > 1:
        if batch_size % mini_batches:
            raise ValueError(f"mini_batches {mini_batches} must divide the batch's {batch_size} rows")
        per_mb = batch_size // mini_batches
        if micro_batch_size is not None and per_mb % micro_batch_size:
            raise ValueError(f"micro_batch_size {micro_batch_size} must divide the {per_mb} rows of a mini-batch "
                             f"(batch {batch_size} / mini_batches {mini_batches})")
        micro_per_mb = per_mb // (micro_batch_size or per_mb)
        order = mini_batch_order(batch_size, ppo_epochs, shuffle_seed)
    seed = _dropout_seed(config, dropout_seed)

    def step(state, batch, frozen_params=None, ref_params=None):
        full = _model_params(frozen_params)
        if updates > 1:
            # The reference log-probs are frozen once per batch with the old ones (no ref pass per update).
            def objective(p, b, nt, ns, rng=None):
                return opd_objective(full(p), config, b, loss_cfg, nt, ns, rng=rng)

            return _ppo_step(state, batch, objective=objective, optimizer=optimizer, config=config, order=order,
                             mini_batches=mini_batches, micro_batches=micro_per_mb,
                             chunk_rows=micro_batch_size or per_mb,
                             ref_params=ref_params if loss_cfg.kl_coef > 0 else None, model_params=full,
                             dropout_seed=seed)

        def objective(p, b, nt, ns, rng=None):
            return opd_objective(full(p), config, b, loss_cfg, nt, ns, ref_params, rng=rng)

        return _train_step(state, batch, objective=objective, optimizer=optimizer, micro_batches=micro,
                           mesh=mesh, dropout_seed=seed)

    keys = ("tokens", "response_mask", "teacher_logprobs") + (("behaviour_logprobs",) if with_behaviour else ())
    keys += TOPK_KEYS if loss_cfg.uses_topk else ()
    keys += _PACKING_KEYS if packed else ()
    # The jitted signature: (state, batch[, frozen_params][, ref_params]).
    if frozen and with_ref:
        return _jit_step(step, state, mesh, keys, batch_size, extra_args=2)
    if frozen:
        return _jit_step(lambda s, b, f: step(s, b, f), state, mesh, keys, batch_size, extra_args=1)
    if with_ref:
        return _jit_step(lambda s, b, r: step(s, b, None, r), state, mesh, keys, batch_size, extra_args=1)
    return _jit_step(lambda s, b: step(s, b), state, mesh, keys, batch_size)


def make_sft_step(config: ModelConfig, optimizer, *, mesh, state: TrainState, batch_size: int,
                  micro_batch_size: int | None = None, aggregation: str = "token_mean",
                  packed: bool = False, fused_head: bool = True, frozen: bool = False,
                  dropout_seed: int = 0) -> Callable:
    """Jitted SFT step ``(state, batch[, frozen_params]) -> (state, metrics)``; batch: tokens, response_mask
    [+ segment_ids, positions when ``packed``] ``[B, T]``. ``fused_head=False``: the rematerialised head.
    ``frozen`` / ``dropout_seed``: frozen-base (LoRA) training, as in :func:`make_opd_step`."""
    micro = batch_size // (micro_batch_size or batch_size)
    seed = _dropout_seed(config, dropout_seed)

    def step(state, batch, frozen_params=None):
        full = _model_params(frozen_params)

        def objective(p, b, nt, ns, rng=None):
            return sft_objective(full(p), config, b, aggregation, nt, ns, fused_head=fused_head, rng=rng)

        return _train_step(state, batch, objective=objective, optimizer=optimizer, micro_batches=micro,
                           mesh=mesh, dropout_seed=seed)

    keys = ("tokens", "response_mask") + (_PACKING_KEYS if packed else ())
    if frozen:
        return _jit_step(step, state, mesh, keys, batch_size, extra_args=1)
    return _jit_step(lambda s, b: step(s, b), state, mesh, keys, batch_size)


def make_eval_loss(config: ModelConfig, *, mesh, aggregation: str = "token_mean",
                   fused_head: bool = True) -> Callable:
    """Jitted held-out SFT loss ``(params, batch) -> metrics`` (no gradient); a batch with ``segment_ids``
    and ``positions`` is packed (no flag needed: the batch shardings are not fixed here). Undifferentiated,
    the fused head runs its forward matmul only, like the unfused one."""

    def fn(params, batch):
        nt, ns = losses.loss_denominators(batch["response_mask"], batch.get("segment_ids"))
        loss, metrics = sft_objective(params, config, batch, aggregation, nt, ns, fused_head=fused_head)
        return {**metrics, "loss": loss}

    return sharding.bind_mesh(jax.jit(fn), mesh)


def shard_batch(batch: dict[str, Any], mesh) -> Batch:
    """Place host numpy arrays ``[B, ...]`` on the mesh, split over its batch axes.

    Multi-process: each process passes its own rows (``[B / process_count, ...]``) and the global array is
    assembled with ``jax.make_array_from_process_local_data``.
    """
    out = {}
    for k, v in batch.items():
        sh = sharding.batch_sharding(mesh, v.ndim, v.shape[0] * jax.process_count())
        if jax.process_count() > 1:
            out[k] = jax.make_array_from_process_local_data(sh, v)
        else:
            out[k] = jax.device_put(v, sh)
    return out
