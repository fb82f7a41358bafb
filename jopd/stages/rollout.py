"""Stage ``rollout``: the SFT student samples responses for the OPD prompts, once, into a RolloutStore.

Writes ``RUN_DIR/rollout/store`` (`jopd.data.store.RolloutStore`): ``rollout.samples_per_prompt`` rows per OPD
prompt, row ``r`` = (prompt ``r // samples_per_prompt``, sample ``r % samples_per_prompt``), each with the exact
sampled ids (prompt then response, the stop id included when emitted), prompt_len / response_len, the sampler's
behaviour log-probs at the response positions, ended_with_eos / truncated and prompt_index / sample_index.
``max_len`` = longest prompt + ``rollout.max_new_tokens``. Attributes: see docs/data-formats.md.

Resuming: the store chunk is the unit of generation. Chunk ``c`` is sampled in one `generate` call seeded with
``derive_seed(rollout.seed, c)``, so its bytes do not depend on which chunks were written before; an interrupted
run regenerates only the chunks without a completion marker and ends byte-identical to an uninterrupted one.

Several processes: `generate` is collective, so every process walks over *all* pending chunks in the same order
(listed after a barrier) and only the chunk's owner (``chunk % process_count``) writes it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jopd.data import tokenizer as toklib
from jopd.data.store import StoreError
from jopd.io import read_jsonl
from jopd.models import ModelConfig
from jopd.pipeline import (
    Run,
    StageError,
    barrier,
    derive_seed,
    numerics_inputs,
    open_or_create_store,
    sft_teacher,
)
from jopd.rollouts import row_length, sample_chunk, sampling_record

log = logging.getLogger("jopd")


def _sampling(run: Run) -> dict[str, Any]:
    return sampling_record(run.cfg.rollout, run.cfg.rollout.samples_per_prompt)


def inputs(run: Run) -> dict[str, Any]:
    r = run.cfg.rollout
    sft = run.upstream("sft")  # first: it names the missing stage if sft has not run
    # batch_size and rows_per_chunk decide how rows are grouped into compiled calls and seeded chunks.
    return {"sampling": _sampling(run), "batch_size": r.batch_size, "rows_per_chunk": r.rows_per_chunk,
            "policy_fingerprint": run.fingerprint(run.layout.sft_model), "numerics": numerics_inputs(run.cfg),
            "sft": sft, "prepare": run.upstream("prepare")}


def execute(run: Run) -> dict[str, Any]:
    r, layout, tok = run.cfg.rollout, run.layout, run.tokenizer
    prompts = read_jsonl(layout.prompts("opd"))
    if not prompts:
        raise StageError(f"{layout.prompts('opd')} has no prompts")
    spp = r.samples_per_prompt
    num_rows = len(prompts) * spp
    max_len = row_length(prompts, r.max_new_tokens)
    # The config alone gives the stop ids; the weights are loaded only if there is something to generate.
    stops = toklib.stop_ids(tok, ModelConfig.from_pretrained(layout.sft_model))
    attrs = {"kind": "rollout", "policy_path": layout.relative(layout.sft_model),
             "policy_fingerprint": run.fingerprint(layout.sft_model), "sft_teacher_fingerprint": sft_teacher(run)[1],
             "tokenizer_fingerprint": toklib.tokenizer_fingerprint(tok), "sampling": _sampling(run),
             "prompt_split": "opd", "num_prompts": len(prompts), "stop_ids": list(stops)}
    store = open_or_create_store(run, layout.rollout_store, attrs=attrs, num_rows=num_rows, max_len=max_len,
                                 rows_per_chunk=r.rows_per_chunk)
    pending = store.pending_chunks("rollout")
    mine = set(store.pending_chunks("rollout", process_index=jax.process_index(), process_count=jax.process_count()))
    barrier("rollout-pending")  # nobody writes before every process has listed what is pending
    log.info("rollout: %d prompts x %d samples = %d rows in %d chunks (%d to generate)", len(prompts), spp, num_rows,
             store.num_chunks, len(pending))
    t0, new_tokens = time.time(), 0
    if pending:
        model = run.load_model(layout.sft_model)
        bar = tqdm(total=sum(hi - lo for lo, hi in map(store.chunk_rows, pending)), desc="rollout", unit="row",
                   disable=not run.is_main)
        for c in pending:
            rows = np.arange(*store.chunk_rows(c))
            p_idx, s_idx = rows // spp, rows % spp
            chunk = sample_chunk(model, [prompts[i]["prompt_ids"] for i in p_idx], sampling=r, stop_ids=stops,
                                 seed=derive_seed(r.seed, c), max_len=max_len, prompt_index=p_idx, sample_index=s_idx)
            if c in mine:
                store.write_rollout_chunk(c, **chunk)
            new_tokens += int(chunk["response_len"].sum())
            bar.update(len(rows))
        bar.close()
        del model
    seconds = time.time() - t0
    barrier("rollout-written")
    try:
        store.verify(["rollout"])
    except StoreError as e:
        raise StageError(f"rollout store failed verification: {e}") from e
    stats = store.read_rows(range(num_rows), ["response_len", "ended_with_eos", "truncated"])
    summary = {
        "store": str(layout.rollout_store), "rows": num_rows, "prompts": len(prompts), "chunks": store.num_chunks,
        "eos_rate": float(stats["ended_with_eos"].mean()), "truncation_rate": float(stats["truncated"].mean()),
        "mean_response_len": float(stats["response_len"].mean()), "response_tokens": int(stats["response_len"].sum()),
        "tokens_generated_this_run": new_tokens,
        "tokens_per_s": float(new_tokens / seconds) if new_tokens and seconds > 0 else None, "seconds": seconds,
        "policy_fingerprint": attrs["policy_fingerprint"], "sft_teacher_fingerprint": attrs["sft_teacher_fingerprint"]}
    log.info("rollout: %d rows, eos rate %.3f, truncated %.3f, mean response %.1f tokens", num_rows,
             summary["eos_rate"], summary["truncation_rate"], summary["mean_response_len"])
    return summary
