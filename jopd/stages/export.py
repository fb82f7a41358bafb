"""Stage ``export``: an OPD arm's final student as a standalone Hugging Face directory, ``RUN_DIR/export``.

The arm is ``export.arm`` (default: the first arm); its model is written with the run's tokenizer files and
``export.dtype`` weights, then checked: jopd loads it back and its log-probs on a couple of held-out prompts equal
the source model's (exactly for a same-dtype export; a bfloat16 one is recorded, not enforced); when torch is
importable, transformers loads it and its log-probs match jopd's to 1e-4 (float32 both). Without torch that check
is skipped with a note. A LoRA arm's export is its merged model; the stage also checks it against the adapter model
(the SFT model with ``arms/NAME/adapter`` loaded back) to 1e-4, and ``export.adapter`` copies that adapter (PEFT
format) to ``export/adapter``.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jopd.io import atomic_write_json, read_jsonl
from jopd.models import load_adapter, load_pretrained, save_pretrained, token_logprobs
from jopd.pipeline import Run, StageError, barrier
from jopd.sharding import to_host

log = logging.getLogger("jopd")

# Held-out prompts the round-trip check scores, and the tolerance against transformers (float32 both sides).
CHECK_ROWS = 2
TOLERANCE = 1e-4


def export_arm(run: Run) -> str:
    return run.cfg.export.arm or run.cfg.arms[0].name


def transformers_logprobs(path: str | Path, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-token log-probs ``[B, T]`` (jopd's alignment: 0 at t = 0 and at padding) from transformers, fp32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                              attn_implementation="eager")
    model.eval()
    ids = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0].numpy()
    out = np.zeros(tokens.shape, np.float32)
    out[:, 1:] = lp
    return out * mask


def _source(run: Run) -> Path:
    src = run.layout.arm_model(export_arm(run))
    if not (src / "config.json").is_file():
        raise StageError(f"export: arm {export_arm(run)!r} has no final model at {src} (run the train/online stage "
                         "first)")
    return src


def _adapter(run: Run) -> Path | None:
    """The exported arm's adapter (a LoRA arm), else None."""
    path = run.layout.arm_adapter(export_arm(run))
    return path if run.cfg.arm(export_arm(run)).lora_section(run.cfg.opd).enabled and path.is_dir() else None


def inputs(run: Run) -> dict[str, Any]:
    # export.adapter is out of the section's repr: recorded only when on (existing run dirs keep fingerprints).
    return {"export": run.cfg.export, "arm": export_arm(run), "model": run.fingerprint(_source(run)),
            "prepare": run.upstream("prepare"), **({"adapter": True} if run.cfg.export.adapter else {})}


def execute(run: Run) -> dict[str, Any]:
    cfg, layout = run.cfg, run.layout
    src, out_dir = _source(run), layout.export
    dtype = cfg.export.dtype or cfg.precision.param_dtype
    model = run.load_model(src)
    log.info("export: arm %s (%s) -> %s as %s", export_arm(run), src, out_dir, dtype)
    # save_pretrained replaces out_dir atomically, moving the stage's STARTED marker aside with the old
    # directory, so it is rewritten afterwards.
    started = layout.started("export")
    started_text = started.read_text() if started.is_file() else None
    save_pretrained(model, out_dir, tokenizer_dir=str(layout.tokenizer), dtype=dtype)
    if started_text is not None and run.is_main:
        started.write_text(started_text)
    adapter = _adapter(run)
    if cfg.export.adapter:
        if adapter is None:
            raise StageError(f"export.adapter: arm {export_arm(run)!r} has no adapter at "
                             f"{layout.arm_adapter(export_arm(run))} (was it trained with LoRA?)")
        if run.is_main:
            shutil.copytree(adapter, layout.export_adapter)
    barrier("export-written")

    rows = [list(map(int, r["prompt_ids"])) for r in read_jsonl(layout.prompts("eval"))[:CHECK_ROWS]]
    summary: dict[str, Any] = {"arm": export_arm(run), "source": str(src), "path": str(out_dir), "dtype": dtype,
                               "check_rows": len(rows)}
    if not rows:
        summary["note"] = "no held-out prompts: log-prob checks skipped"
        return summary
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    mask = np.zeros_like(tokens)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, 1
    # Both sides in float32 compute so the comparison measures the export, not the precision settings.
    fp32 = run.model_options(compute_dtype="float32")
    src_lp = to_host(token_logprobs(load_pretrained(src, "float32", mesh=run.mesh, **fp32), tokens, mask))
    exp_lp = to_host(token_logprobs(load_pretrained(out_dir, "float32", mesh=run.mesh, **fp32), tokens, mask))
    summary["jopd_vs_source_max_abs_diff"] = float(np.max(np.abs(exp_lp - src_lp)))
    if dtype == model.config.param_dtype and summary["jopd_vs_source_max_abs_diff"] > TOLERANCE:
        raise StageError(f"export: the exported model's log-probs differ from the source's by "
                         f"{summary['jopd_vs_source_max_abs_diff']:.2e} (> {TOLERANCE})")
    if adapter is not None:
        # The merged export against the adapter it merged: the SFT model with the saved adapter loaded back.
        base = load_pretrained(layout.sft_model, "float32", mesh=run.mesh, **fp32)
        adapter_model = load_adapter(adapter, base)
        adapter_lp = to_host(token_logprobs(adapter_model, tokens, mask))
        summary["lora"] = {"adapter": str(adapter), "rank": adapter_model.config.lora.rank,
                           "adapter_vs_export_max_abs_diff": float(np.max(np.abs(exp_lp - adapter_lp))),
                           **({"adapter_copy": str(layout.export_adapter)} if cfg.export.adapter else {})}
        if dtype == model.config.param_dtype and summary["lora"]["adapter_vs_export_max_abs_diff"] > TOLERANCE:
            raise StageError(f"export: the merged model's log-probs differ from its adapter model's (SFT model + "
                             f"{adapter}) by {summary['lora']['adapter_vs_export_max_abs_diff']:.2e} (> {TOLERANCE})")
    if not run.is_main:
        return summary  # transformers runs on one host
    if importlib.util.find_spec("torch") is None:
        summary["transformers_check"] = "skipped: torch is not installed"
        log.warning("export: torch is not installed; transformers load check skipped")
    else:
        diff = float(np.max(np.abs(transformers_logprobs(out_dir, tokens, mask) - exp_lp)))
        summary["transformers_max_abs_diff"] = diff
        if diff > TOLERANCE:
            raise StageError(f"export: transformers' log-probs on {out_dir} differ from jopd's by {diff:.2e} "
                             f"(> {TOLERANCE}); the export is not faithful")
        summary["transformers_check"] = "passed"
        log.info("export: transformers loads the export; max |logprob diff| %.2e", diff)
    atomic_write_json(layout.export_check, summary)
    return summary
