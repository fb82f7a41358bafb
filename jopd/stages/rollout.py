"""Stage ``rollout``: the SFT student samples responses for the OPD prompts, once, into a RolloutStore.

Writes ``RUN_DIR/rollout/store`` (`jopd.data.store.RolloutStore`): ``rollout.samples_per_prompt`` rows per OPD
prompt, row ``r`` = (prompt ``r // samples_per_prompt``, sample ``r % samples_per_prompt``). Each row holds the
exact sampled ids (prompt then response, the stop id included in the response when emitted), prompt_len /
response_len, the sampler's behaviour log-probs at the response positions, ended_with_eos / truncated, and
prompt_index / sample_index. ``max_len`` = longest prompt + ``rollout.max_new_tokens``. Attributes follow
docs/CONTRACTS.md (``kind``, ``policy_path``, ``policy_fingerprint``, ``sft_teacher_fingerprint``,
``tokenizer_fingerprint``, ``sampling``, ``prompt_split``; plus ``num_prompts`` and ``stop_ids``).

Resuming: the store chunk is the unit of generation. Chunk ``c`` is sampled in one `generate` call seeded with
``derive_seed(rollout.seed, c)``, so a chunk's bytes do not depend on which chunks were written before; an
interrupted run regenerates only the chunks without a completion marker and ends byte-identical to an
uninterrupted one.

Several JAX processes: `generate` runs jitted programs on the global mesh, which every process must enter
together. So every process walks over *all* pending chunks in the same order (the pending list is read after a
barrier, from the shared run directory), and only the chunk's owner -- ``chunk % process_count``, as in
`RolloutStore.pending_chunks` -- writes it. This keeps the collectives in lockstep at the price of no
inter-process parallelism beyond what the mesh itself gives (each generate call is already data-parallel).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jopd.data import tokenizer as toklib
from jopd.data.store import RolloutStore, StoreError
from jopd.models import ModelConfig
from jopd.stages.base import RunContext, Stage, StageError, read_json
from jopd.stages.prepare import read_prompts
from jopd.stages.teacher_data import derive_seed, numerics_inputs, run_relative, stop_ids

log = logging.getLogger("jopd")


def sft_teacher_fingerprint(ctx: RunContext) -> str:
    """Fingerprint of the teacher whose data the SFT student was trained on (recorded by the sft stage)."""
    fp = ctx.done_record("sft").get("outputs", {}).get("sft_teacher_fingerprint")
    meta_path = ctx.stage_dir("sft") / "meta.json"
    if not fp and meta_path.is_file():
        fp = read_json(meta_path).get("sft_teacher_fingerprint")
    if not fp:
        raise StageError(f"stage 'sft' recorded no sft_teacher_fingerprint (neither in {ctx.stage_dir('sft')}/"
                         "DONE.json outputs nor in meta.json); re-run the sft stage")
    return str(fp)


def create_store_atomically(path: Path, **create_kwargs: Any) -> None:
    """Creates a RolloutStore at ``path`` via a temporary sibling renamed into place.

    `RolloutStore.create` writes meta.json and then one zarr.json per array; a crash in between would leave a
    directory that looks like a store but cannot be opened. Building it aside and renaming makes the store
    appear complete or not at all. Call from one process only.
    """
    for stale in path.parent.glob(f"{path.name}.tmp-*"):  # leftovers of a crash during an earlier create
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    RolloutStore.create(tmp, **create_kwargs)
    os.replace(tmp, path)


def open_or_create_store(ctx: RunContext, path: Path, *, attrs: dict[str, Any], num_rows: int, max_len: int,
                         rows_per_chunk: int, topk: int = 0) -> RolloutStore:
    """Opens the store at ``path`` for writing, creating it first if absent; refuses one of another shape/attrs."""
    if ctx.is_main_process and not (path / "meta.json").is_file():
        if path.exists() and any(path.iterdir()):
            raise StageError(f"{path} exists but is not a RolloutStore (no meta.json); delete it")
        if path.exists():
            path.rmdir()
        create_store_atomically(path, num_rows=num_rows, max_len=max_len, rows_per_chunk=rows_per_chunk,
                                topk=topk, attrs=attrs)
    ctx.sync(f"store-created:{path}")
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


class RolloutStage(Stage):
    name = "rollout"

    def _sampling(self, ctx: RunContext) -> dict[str, Any]:
        r = ctx.cfg.rollout
        return {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
                "max_new_tokens": r.max_new_tokens, "seed": r.seed, "samples_per_prompt": r.samples_per_prompt}

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        r = ctx.cfg.rollout
        sft = ctx.upstream("sft")  # first: it names the missing stage if sft has not run
        # batch_size and rows_per_chunk decide how rows are grouped into compiled calls and seeded chunks.
        return {"sampling": self._sampling(ctx), "batch_size": r.batch_size, "rows_per_chunk": r.rows_per_chunk,
                "policy_fingerprint": ctx.model_fingerprint(ctx.sft_model_dir()), "numerics": numerics_inputs(ctx),
                "sft": sft, "prepare": ctx.upstream("prepare")}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from jopd.sampling import generate

        r = ctx.cfg.rollout
        tok = ctx.tokenizer
        prompts = read_prompts(ctx, "opd")
        if not prompts:
            raise StageError(f"{ctx.stage_dir('prepare')}/prompts/opd.jsonl has no prompts")
        if r.samples_per_prompt < 1 or r.rows_per_chunk < 1:
            raise StageError("rollout.samples_per_prompt and rollout.rows_per_chunk must be >= 1")
        policy_dir = ctx.sft_model_dir()
        spp = r.samples_per_prompt
        num_rows = len(prompts) * spp
        max_len = max(len(p["prompt_ids"]) for p in prompts) + r.max_new_tokens

        # The config alone gives the stop ids; the weights are loaded only if there is something to generate.
        eos = stop_ids(tok, ModelConfig.from_pretrained(policy_dir))
        attrs = {"kind": "rollout", "policy_path": run_relative(ctx, policy_dir),
                 "policy_fingerprint": ctx.model_fingerprint(policy_dir),
                 "sft_teacher_fingerprint": sft_teacher_fingerprint(ctx),
                 "tokenizer_fingerprint": toklib.tokenizer_fingerprint(tok), "sampling": self._sampling(ctx),
                 "prompt_split": "opd", "num_prompts": len(prompts), "stop_ids": list(eos)}
        path = ctx.stage_dir(self.name) / "store"
        store = open_or_create_store(ctx, path, attrs=attrs, num_rows=num_rows, max_len=max_len,
                                     rows_per_chunk=r.rows_per_chunk)

        pending = store.pending_chunks("rollout")
        mine = set(store.pending_chunks("rollout", process_index=jax.process_index(),
                                        process_count=jax.process_count()))
        ctx.sync("rollout-pending")  # nobody writes before every process has listed what is pending
        log.info("rollout: %d prompts x %d samples = %d rows in %d chunks (%d to generate)", len(prompts), spp,
                 num_rows, store.num_chunks, len(pending))
        model = ctx.load_model(policy_dir) if pending else None
        t0 = time.time()
        new_tokens = 0
        bar = tqdm(total=sum(hi - lo for lo, hi in map(store.chunk_rows, pending)), desc="rollout", unit="row",
                   disable=not ctx.is_main_process)
        for c in pending:
            start, stop = store.chunk_rows(c)
            rows = np.arange(start, stop)
            p_idx, s_idx = rows // spp, rows % spp
            prompt_ids = [prompts[i]["prompt_ids"] for i in p_idx]
            res = generate(model, prompt_ids, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                           top_p=r.top_p, top_k=r.top_k, eos_token_id=eos, seed=derive_seed(r.seed, c),
                           batch_size=r.batch_size)
            n = stop - start
            tokens = np.zeros((n, max_len), np.int32)
            behaviour = np.zeros((n, max_len), np.float32)
            plen = np.array([len(p) for p in prompt_ids], np.int32)
            rlen = np.array([len(t) for t in res.tokens], np.int32)
            for i, (p, t, lp) in enumerate(zip(prompt_ids, res.tokens, res.logprobs)):
                tokens[i, :plen[i]] = p
                tokens[i, plen[i]:plen[i] + rlen[i]] = t
                behaviour[i, plen[i]:plen[i] + rlen[i]] = lp  # aligned: lp of the token at that position
            eos_flags = np.array(res.ended_with_eos, bool)
            if c in mine:
                # generate stops only at a stop id or at max_new_tokens: a row without EOS was truncated.
                store.write_rollout_chunk(c, tokens=tokens, prompt_len=plen, response_len=rlen,
                                          behaviour_logprobs=behaviour, ended_with_eos=eos_flags,
                                          truncated=~eos_flags, prompt_index=p_idx.astype(np.int32),
                                          sample_index=s_idx.astype(np.int32))
            new_tokens += int(rlen.sum())
            bar.update(n)
        bar.close()
        seconds = time.time() - t0
        del model
        ctx.sync("rollout-written")

        try:
            store.verify(["rollout"])
        except StoreError as e:
            raise StageError(f"rollout store failed verification: {e}") from e
        stats = store.read_rows(range(num_rows), ["response_len", "ended_with_eos", "truncated"])
        summary = {
            "store": str(path), "rows": num_rows, "prompts": len(prompts), "chunks": store.num_chunks,
            "eos_rate": float(stats["ended_with_eos"].mean()), "truncation_rate": float(stats["truncated"].mean()),
            "mean_response_len": float(stats["response_len"].mean()),
            "response_tokens": int(stats["response_len"].sum()), "tokens_generated_this_run": new_tokens,
            "tokens_per_s": float(new_tokens / seconds) if new_tokens and seconds > 0 else None,
            "seconds": seconds, "policy_fingerprint": attrs["policy_fingerprint"],
            "sft_teacher_fingerprint": attrs["sft_teacher_fingerprint"],
        }
        log.info("rollout: %d rows, eos rate %.3f, truncated %.3f, mean response %.1f tokens", num_rows,
                 summary["eos_rate"], summary["truncation_rate"], summary["mean_response_len"])
        return summary


STAGE = RolloutStage()
