"""Writing OPD stores: the student's samples, then the teacher's scores, chunk by chunk.

Every store an OPD arm trains on is written by these functions, whatever made it: generation 0 is the Lightning
store (the ``rollout`` stage samples it with the SFT student, the ``precompute`` stage copies it and adds each
teacher's scores); with a refresh schedule (``opd.refresh_every`` N > 0) generation g >= 1 is sampled by the
arm's student at step g N and scored by its teacher (:func:`write_generation`) into
``arms/NAME/generations/GGGG/store``, with the same chunking, seeds per chunk, completion markers and SHA-256
verification, so a crash inside a refresh resumes it chunk by chunk like the first one.

- :func:`sample_chunk`: one chunk's rows sampled by a policy, as ``RolloutStore.write_rollout_chunk`` takes them;
- :func:`scoring_shape` / :func:`score_chunk`: a teacher's log-probs (and top-k) of one chunk in fixed
  ``[batch, length]`` shapes (so resumed and uninterrupted runs compute the same bits), response positions only.

Several processes: sampling and scoring are collective, so every process walks over every pending chunk in the
same order and only the chunk's owner (``chunk % process_count``) writes it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jopd import sharding
from jopd.data import tokenizer as toklib
from jopd.data.loader import SEQ_LEN_BUCKET, StoreSlices
from jopd.data.routing import route_groups
from jopd.data.store import RolloutStore, StoreError
from jopd.io import atomic_write_json, read_json, read_jsonl
from jopd.models import Model, ModelConfig, logprobs_and_topk_fn, token_logprobs
from jopd.multi_teacher import describe_routes, prompt_routes, route_names
from jopd.pipeline import (
    Run,
    StageError,
    barrier,
    check_teacher_consistency,
    check_tokenizer,
    derive_seed,
    fingerprint,
    open_or_create_store,
    sft_teacher,
)
from jopd.sampling import generate, sequences
from jopd.training import RefreshBatches, StoreBatches, current_model, prompt_stream, store_batches

log = logging.getLogger("jopd")


# ------------------------------------------------------------------------------------------------ sampling
def sampling_record(rollout: Any, samples_per_prompt: int) -> dict[str, Any]:
    """The sampling settings a store's attrs (and the rollout stage's inputs) record."""
    return {"temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k,
            "max_new_tokens": rollout.max_new_tokens, "seed": rollout.seed, "samples_per_prompt": samples_per_prompt}


def row_length(prompts: Sequence[dict[str, Any]], max_new_tokens: int) -> int:
    """A store's row length ``max_len``: the longest prompt plus a full-length response."""
    return max(len(p["prompt_ids"]) for p in prompts) + max_new_tokens


def sample_chunk(model: Model, prompt_ids: Sequence[Sequence[int]], *, sampling: Any, stop_ids: Sequence[int],
                 seed: int, max_len: int, prompt_index: np.ndarray, sample_index: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of one store chunk sampled by ``model``: ``write_rollout_chunk``'s keyword arguments.

    ``sampling``: a SamplingSection (temperature, top_p, top_k, max_new_tokens, batch_size); rows stop at a stop
    id or at max_new_tokens (then ``truncated``). ``max_len``: the store's row length.
    """
    res = generate(model, prompt_ids, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                   top_p=sampling.top_p, top_k=sampling.top_k, eos_token_id=tuple(stop_ids), seed=seed,
                   batch_size=sampling.batch_size)
    seqs = sequences(prompt_ids, res, max_len)
    return {"tokens": seqs["tokens"], "prompt_len": seqs["prompt_len"], "response_len": seqs["response_len"],
            "behaviour_logprobs": seqs["behaviour_logprobs"], "ended_with_eos": res.ended_with_eos,
            "truncated": ~res.ended_with_eos, "prompt_index": np.asarray(prompt_index, np.int32),
            "sample_index": np.asarray(sample_index, np.int32)}


# ------------------------------------------------------------------------------------------------- scoring
@functools.lru_cache(maxsize=8)
def _topk_scorer(config: Any, mesh: Any, topk: int):
    return sharding.bind_mesh(jax.jit(lambda p, t, m: logprobs_and_topk_fn(p, config, t, m, topk)), mesh)


def teacher_scores(model: Model, tokens: np.ndarray, mask: np.ndarray, topk: int):
    """Host arrays (log-probs [B, T], top-k ids [B, T, k] | None, top-k log-probs | None) of ``model``."""
    if topk == 0:
        return sharding.to_host(token_logprobs(model, tokens, mask)), None, None
    fn = _topk_scorer(model.config, model.mesh, topk)
    if model.mesh is not None:
        sh = sharding.batch_sharding(model.mesh, 2, tokens.shape[0])
        tokens, mask = jax.device_put(tokens, sh), jax.device_put(mask, sh)
    return sharding.to_host(fn(model.params, tokens, mask))


@dataclasses.dataclass(frozen=True)
class ScoringShape:
    """The static shape every chunk of a store is scored in: ``[batch, length]`` calls reading the first
    ``read_len`` positions of each row (``length`` = longest row rounded up to the bucket)."""

    batch: int
    length: int
    read_len: int


def scoring_shape(store: RolloutStore, batch_size: int, mesh: Any) -> ScoringShape:
    """Fixed across chunks and resumes: it depends only on the store's rows (all sampled) and the settings."""
    length = sharding.round_up(max(store.max_row_len(), 2), SEQ_LEN_BUCKET)
    batch = sharding.round_up(batch_size, 1 if mesh is None else sharding.batch_parallelism(mesh))
    return ScoringShape(batch, length, min(length, store.max_len))


def score_chunk(model: Model, store: RolloutStore, chunk: int, shape: ScoringShape, topk: int, *,
                what: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """``model``'s log-probs of chunk ``chunk``'s tokens ([n, max_len], 0 outside the response) and, with
    ``topk`` k > 0, its top-k ids / log-probs ([n, max_len, k]); plus the number of response tokens.

    Raises ValueError naming ``what`` (the teacher) when a row holds an id outside its vocabulary."""
    lo, hi = store.chunk_rows(chunk)
    data = store.read_rows(range(lo, hi), ["tokens", "prompt_len", "response_len", "response_mask"],
                           seq_len=shape.read_len)
    if int(data["tokens"].max()) >= model.config.vocab_size:
        raise ValueError(f"rows {lo}:{hi} of {store.path} hold token id {int(data['tokens'].max())} >= {what} "
                         f"vocab_size {model.config.vocab_size}")
    n, k, read_len, batch = hi - lo, topk, shape.read_len, shape.batch
    lp = np.zeros((n, store.max_len), np.float32)
    ids = np.zeros((n, store.max_len, k), np.int32) if k else None
    vals = np.zeros((n, store.max_len, k), np.float32) if k else None
    real = np.arange(read_len)[None, :] < (data["prompt_len"] + data["response_len"])[:, None]
    for b0 in range(0, n, batch):
        m = min(batch, n - b0)
        tokens = np.zeros((batch, shape.length), np.int32)
        mask = np.zeros((batch, shape.length), np.int32)
        tokens[:m, :read_len] = data["tokens"][b0:b0 + m]
        mask[:m, :read_len] = real[b0:b0 + m]
        out_lp, out_ids, out_vals = teacher_scores(model, tokens, mask, k)
        lp[b0:b0 + m, :read_len] = out_lp[:m, :read_len]
        if k:
            ids[b0:b0 + m, :read_len] = out_ids[:m, :read_len]
            vals[b0:b0 + m, :read_len] = out_vals[:m, :read_len]
    # Only response positions are stored (the prompt's log-probs are not needed and 0 is canonical).
    resp = np.zeros((n, store.max_len), bool)
    resp[:, :read_len] = data["response_mask"].astype(bool)
    lp = np.where(resp, lp, np.float32(0))
    if k:
        ids, vals = np.where(resp[..., None], ids, 0), np.where(resp[..., None], vals, np.float32(0))
    return lp, ids, vals, int(resp.sum())


# ----------------------------------------------------------------------------------------- refresh schedule
@dataclasses.dataclass
class GenerationCost:
    """Seconds and tokens of one refresh generation, as spent by this process's run (a resumed generation
    counts only what it redid)."""

    gen_s: float = 0.0
    score_s: float = 0.0
    tokens_generated: int = 0
    tokens_scored: int = 0


def write_generation(run: Run, path: Path, *, student: Model, teacher: Model, teacher_name: str,
                     prompts: Sequence[dict[str, Any]], prompt_indices: Sequence[int], attrs: dict[str, Any],
                     max_len: int, seed: int, topk: int) -> GenerationCost:
    """Sample ``student`` on ``prompts[prompt_indices]`` (one row each, the ``rollout`` sampling settings) and
    score the rows with ``teacher`` (``precompute.batch_size`` rows per call, ``topk``) into the store at
    ``path``, resuming whatever chunks a crash left written; the store is verified at the end. Chunk c is
    sampled with ``derive_seed(seed, c)``. A store at ``path`` made from other ``attrs`` is refused. Returns the
    seconds and tokens this call spent.
    """
    r = run.cfg.rollout
    num_rows = len(prompt_indices)
    store = open_or_create_store(run, path, attrs=attrs, num_rows=num_rows, max_len=max_len,
                                 rows_per_chunk=r.rows_per_chunk, topk=topk)
    pid, nproc = jax.process_index(), jax.process_count()
    cost = GenerationCost()
    pending = store.pending_chunks("rollout")
    mine = set(store.pending_chunks("rollout", process_index=pid, process_count=nproc))
    barrier(f"{path}-rollout-pending")  # nobody writes before every process has listed what is pending
    t0 = time.perf_counter()
    indices = np.asarray(prompt_indices, np.int64)
    for c in pending:
        p_idx = indices[np.arange(*store.chunk_rows(c))]
        chunk = sample_chunk(student, [prompts[i]["prompt_ids"] for i in p_idx], sampling=r,
                             stop_ids=attrs["stop_ids"], seed=derive_seed(seed, c), max_len=max_len,
                             prompt_index=p_idx, sample_index=np.zeros_like(p_idx))
        if c in mine:
            store.write_rollout_chunk(c, **chunk)
        cost.tokens_generated += int(chunk["response_len"].sum())
    cost.gen_s = time.perf_counter() - t0
    barrier(f"{path}-rollout-written")

    pending = store.pending_chunks("teacher")
    mine = set(store.pending_chunks("teacher", process_index=pid, process_count=nproc))
    barrier(f"{path}-teacher-pending")
    t0 = time.perf_counter()
    if pending:
        shape = scoring_shape(store, run.cfg.precompute.batch_size, teacher.mesh)
        for c in pending:
            try:
                lp, ids, vals, n = score_chunk(teacher, store, c, shape, topk, what=f"teacher {teacher_name!r}")
            except ValueError as e:
                raise StageError(f"refresh: {e}") from e
            if c in mine:
                store.write_teacher_chunk(c, lp, ids, vals)
            cost.tokens_scored += n
    cost.score_s = time.perf_counter() - t0
    barrier(f"{path}-scored")
    try:
        store.verify()
    except StoreError as e:
        raise StageError(f"refresh: the generation store {path} failed verification: {e}; delete it to redo "
                         "the generation") from e
    return cost


def refresh_summary(run: Run, arm: Any) -> dict[str, Any]:
    """What an arm's refresh generations recorded (their meta.json, in order): the arm meta.json's ``refresh``."""
    every = arm.refresh(run.cfg.opd)
    gens = [read_json(p) for p in sorted(run.layout.arm(arm.name).glob("generations/*/meta.json"))]
    total = lambda key: float(sum(g["cost"][key] for g in gens))  # noqa: E731
    return {"every": every, "generations": len(gens), "gen_s": total("gen_s"), "score_s": total("score_s"),
            "tokens_generated": int(total("tokens_generated")), "tokens_scored": int(total("tokens_scored")),
            "consistent_teacher": all(g["consistent_teacher"] for g in gens),
            "per_generation": [{k: g[k] for k in ("generation", "policy_step", "teacher_fingerprint",
                                                  "consistent_teacher", "cost")} for g in gens]}


def refreshing_batches(run: Run, arm: Any, first: StoreBatches, *, student: Model, teacher: Callable[[str], Model],
                       fields: Sequence[str]) -> RefreshBatches:
    """The arm's batches under its refresh schedule N (``arm.refresh(opd)`` > 0): generation 0 is ``first``
    (the precomputed store), generation g >= 1 is sampled by the student of step g N and scored by its teacher
    (``teacher(name)``, loaded when first needed) into ``layout.arm_generation(arm, g)``, then trained on for N
    steps.

    Teacher consistency is checked again for every generation (the teacher directory is fingerprinted when the
    generation is made). A generation found incomplete once the student has moved past its step is refused:
    its remaining rows could no longer be sampled by the student it belongs to.

    Multi-teacher arms (``routing.field``): the generation's prompts (the online steps' stream, stratified by
    route) are split by the teacher the arm gives their routes; each teacher's rows, route after route, go to
    ``layout.arm_generation(arm, g, teacher)`` (attrs ``routes`` like a precompute store), and the generation
    trains on them as `StoreSlices` (batches stratified by route).
    """
    cfg, layout = run.cfg, run.layout
    every, batch, topk = arm.refresh(cfg.opd), cfg.opd.batch_size, cfg.precompute.topk if any(
        f.startswith("teacher_topk") for f in fields) else 0
    prompts = read_jsonl(layout.prompts("opd"))
    r = cfg.rollout
    max_len, sampling = row_length(prompts, r.max_new_tokens), sampling_record(r, samples_per_prompt=1)
    stops = list(toklib.stop_ids(run.tokenizer, ModelConfig.from_pretrained(layout.sft_model)))
    routed = cfg.routing.enabled
    names = route_names(cfg) if routed else []
    try:
        prompt_route = prompt_routes(prompts, cfg, str(layout.prompts("opd"))) if routed else []
    except ValueError as e:
        raise StageError(f"arm {arm.name!r}: {e}") from e
    groups = route_groups(prompt_route, names) if routed else None

    def base_attrs(g: int, teacher_name: str, teacher_dir: Path, teacher_fp: str) -> dict[str, Any]:
        return {"kind": "refresh", "arm": arm.name, "generation": g, "policy_step": g * every,
                "refresh_every": every, "teacher_name": teacher_name, "teacher_fingerprint": teacher_fp,
                "teacher_tokenizer_fingerprint": check_tokenizer(run, teacher_dir, f"teacher {teacher_name!r}"),
                "tokenizer_fingerprint": toklib.tokenizer_fingerprint(run.tokenizer),
                "sft_teacher_fingerprint": sft_teacher(run)[1], "sampling": sampling, "stop_ids": stops,
                "prompt_split": "opd", "num_prompts": len(prompts), "topk": topk, "logprob_temperature": 1.0}

    def parts(g: int) -> list[tuple[str, Path, list[int], dict[str, list[int]]]]:
        """(teacher, store path, prompt indices, {route: [first, end row]} or {}) of every store of generation g."""
        indices = prompt_stream(len(prompts), cfg.seed, g * every * batch, every * batch, groups=groups)
        if not routed:
            return [(arm.teacher, layout.arm_generation(arm.name, g), indices, {})]
        out = []
        arm_routes = arm.routes(cfg.routing)
        for name in sorted(set(arm_routes.values())):
            rows, spans = [], {}
            for route in (x for x in names if arm_routes[x] == name):
                mine = [i for i in indices if prompt_route[i] == route]
                if mine:  # a generation may draw no prompt of a small route
                    spans[route] = [len(rows), len(rows) + len(mine)]
                    rows += mine
            if rows:
                out.append((name, layout.arm_generation(arm.name, g, name), rows, spans))
        return out

    def make_generation(g: int, loop: Any) -> tuple[Path, dict[str, float]]:
        stores = parts(g)
        gen_dir = layout.arm_generation(arm.name, g).parent
        meta_path = gen_dir / "meta.json"
        complete = all((path / "meta.json").is_file() and all(
            RolloutStore.open(path).is_complete(group) for group in ("rollout", "teacher")) for _, path, _, _ in stores)
        if not complete and loop.step != g * every:
            raise StageError(f"arm {arm.name!r}: refresh generation {g} ({gen_dir}) is incomplete, but the arm's "
                             f"checkpoint is at step {loop.step}, past the step {g * every} whose student samples "
                             f"it; delete {layout.arm(arm.name)} to re-train the arm")
        log.info("arm %s: refresh generation %d (student of step %d, %d rows)%s", arm.name, g, g * every,
                 every * batch, " already written: verifying" if complete else "")
        policy = current_model(student, loop.train_state)
        cost, per_route, fps, consistent = GenerationCost(), {}, {}, True
        gen_seed = derive_seed(r.seed, 1_000_000 + g)
        for k, (name, path, rows, spans) in enumerate(stores):
            teacher_dir = layout.teacher(name)
            fp = fps[name] = run.fingerprint(teacher_dir)
            attrs = base_attrs(g, name, teacher_dir, fp)
            if routed:
                for route, (lo, hi) in spans.items():
                    ok = check_teacher_consistency(run, arm, fp, route=route, teacher=name)
                    per_route[route] = {"teacher_name": name, "teacher_fingerprint": fp, "consistent_teacher": ok,
                                        "rows": hi - lo}
                    consistent &= ok
                attrs.update(routing_field=cfg.routing.field, routes=spans)
            else:
                consistent = check_teacher_consistency(run, arm, fp)
            part = write_generation(run, path, student=policy, teacher=teacher(name), teacher_name=name,
                                    prompts=prompts, prompt_indices=rows, attrs=attrs, max_len=max_len,
                                    seed=gen_seed if not routed else derive_seed(gen_seed, k), topk=topk)
            for key, value in dataclasses.asdict(part).items():
                setattr(cost, key, getattr(cost, key) + value)
        if run.is_main and not (complete and meta_path.is_file()):
            who = ({"teacher_name": arm.teacher, "teacher_fingerprint": fps[arm.teacher]} if not routed else
                   {"teacher_name": f"routes ({describe_routes({x: v['teacher_name'] for x, v in per_route.items()})})",
                    "teacher_fingerprint": fingerprint({x: v["teacher_fingerprint"] for x, v in per_route.items()}),
                    "routes": per_route})
            atomic_write_json(meta_path, {"generation": g, "policy_step": g * every, "rows": every * batch, **who,
                                          "consistent_teacher": consistent, "cost": dataclasses.asdict(cost),
                                          "store": layout.relative(stores[0][1] if not routed else gen_dir)})
        barrier(f"arm-{arm.name}-generation-{g}")
        return (gen_dir if routed else stores[0][1]), {"gen_s": cost.gen_s, "score_s": cost.score_s}

    def open_batches(path: Path, g: int) -> StoreBatches:
        source: Any = path
        if routed:
            slices = []
            for _, path, _, spans in parts(g):
                slices += [(route, (str(path), lo, hi)) for route, (lo, hi) in spans.items()]
            source = StoreSlices(tuple(part for _, part in sorted(slices)))
        return store_batches(source, batch_size=batch, token_budget=cfg.opd.token_budget, row_len=cfg.opd.row_len,
                             seed=derive_seed(cfg.seed, g), num_steps=every, fields=fields, shuffle=cfg.opd.shuffle)

    return RefreshBatches(first, every=every, make_generation=make_generation, open_batches=open_batches)
