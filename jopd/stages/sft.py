"""Stage ``sft``: supervised fine-tuning of the base student on the SFT-data teacher's responses.

The teacher data (``teacher_data/sft.jsonl``) becomes two stores in ``RUN_DIR/sft`` -- ``store`` (training rows)
and ``heldout_store`` (a seeded ``sft.holdout_fraction`` of them) -- read through the same Grain path as the OPD
rollouts (padded or packed batches, ``sft.token_budget``), and ``jopd.training.supervised`` trains on them:
response-token cross-entropy, AdamW with warm-up/decay and clipping, Orbax checkpoints that hold the loader's
position, the held-out loss at step 0, every ``sft.eval_every`` steps and at the end. Writes ``sft/model`` (HF)
and ``sft/meta.json`` with the SFT-data teacher's name and fingerprint (the teacher-consistency record; multi-teacher
runs: ``sft_teachers``, every route's teacher and fingerprint). LoRA SFT (``sft.lora.rank`` > 0): only adapters on
the base student's projections are trained; ``sft/model`` is the merged model and ``sft/adapter`` the adapter alone.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jopd.data.splits import heldout_split
from jopd.data.store import write_sequences
from jopd.io import atomic_write_json, read_json, read_jsonl
from jopd.models import lora, save_adapter, save_pretrained
from jopd.multi_teacher import sft_teachers_record
from jopd.pipeline import Run, StageError, barrier
from jopd.training import supervised

log = logging.getLogger("jopd")


def inputs(run: Run) -> dict[str, Any]:
    # sft.lora is out of the section's repr: recorded only when on, so existing run directories keep their
    # fingerprints.
    lora_on = {"lora": dataclasses.asdict(run.cfg.sft.lora)} if run.cfg.sft.lora.enabled else {}
    return {"sft": run.cfg.sft, "seed": run.cfg.seed, "precision": run.cfg.precision,
            "teacher_data": run.upstream("teacher_data"), "prepare": run.upstream("prepare"), **lora_on}


def execute(run: Run) -> dict[str, Any]:
    cfg, layout = run.cfg, run.layout
    try:
        td_meta = read_json(layout.teacher_data_meta)
        rows = [r for r in read_jsonl(layout.sft_jsonl) if r.get("response_ids")]
    except (OSError, ValueError) as e:
        raise StageError(f"sft: cannot read the teacher data in {layout.stage('teacher_data')}: {e}") from e
    if not rows:
        raise StageError(f"sft: {layout.sft_jsonl} holds no examples with a response")
    train, held = heldout_split(len(rows), cfg.sft.holdout_fraction, cfg.seed)
    heldout_store = layout.stage("sft") / "heldout_store"
    if run.is_main:
        write_sequences(layout.sft_store, [rows[i]["prompt_ids"] for i in train],
                        [rows[i]["response_ids"] for i in train])
        if held:
            write_sequences(heldout_store, [rows[i]["prompt_ids"] for i in held], [rows[i]["response_ids"] for i in held])
    barrier("sft-stores")
    who = {"sft_teacher_name": td_meta.get("teacher_name"), "sft_teacher_fingerprint": td_meta.get("teacher_fingerprint")}
    if "teachers" in td_meta:  # multi-teacher: each route's SFT data has its own teacher
        who = sft_teachers_record(td_meta["teachers"])
    model = run.load_model(layout.student_base)
    if (spec := cfg.sft.lora.spec()) is not None:
        model = lora.with_adapters(model, spec, seed=cfg.seed)
    log.info("sft: %d examples from teacher %s", len(rows), who["sft_teacher_name"])
    model, summary = supervised(model, train_store=layout.sft_store, heldout_store=heldout_store if held else None,
                                loop=cfg.sft, optim=cfg.sft.optim, seed=cfg.seed, ckpt_dir=layout.sft_ckpt,
                                logger=run.metrics_logger("sft"), name="sft",
                                hooks=run.hooks)
    save_pretrained(model, layout.sft_model, tokenizer_dir=str(layout.tokenizer))  # a LoRA model: merged
    if spec is not None:
        save_adapter(model, layout.sft_adapter, base_model=str(layout.student_base))
        summary["lora"] = {**lora.describe(model), "adapter_path": str(layout.sft_adapter)}
    barrier("sft-export")
    meta = {**who, "model_fingerprint": run.fingerprint(layout.sft_model), "model_path": str(layout.sft_model),
            "examples": len(rows), "train_examples": len(train), "heldout_examples": len(held), **summary}
    if run.is_main:
        atomic_write_json(layout.sft_meta, meta)
    return meta
