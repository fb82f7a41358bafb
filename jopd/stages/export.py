"""Stage ``export``: an OPD arm's final student as a standalone Hugging Face directory, ``RUN_DIR/export``.

The arm is ``export.arm`` (default: the first arm); its ``arms/NAME/model`` is written with the run's tokenizer
files and ``export.dtype`` weights. The export is then checked:

- jopd loads it back and its log-probs on a couple of held-out prompts equal the source model's (exactly for
  a same-dtype export; within bf16 rounding for a bfloat16 one, recorded but not enforced);
- when torch is importable, ``transformers.AutoModelForCausalLM`` loads it and its log-probs match jopd's on
  the export to 1e-4 (both in float32). Without torch this check is skipped with a note in the summary.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from jopd.evaluation import host_array
from jopd.models import load_pretrained, save_pretrained, token_logprobs
from jopd.stages.base import RunContext, Stage, StageError, atomic_write_json
from jopd.stages.prepare import read_prompts

log = logging.getLogger("jopd")

# Held-out prompts the round-trip check scores, and the tolerance against transformers (float32 both sides).
CHECK_ROWS = 2
TOLERANCE = 1e-4


def export_arm(ctx: RunContext) -> str:
    return ctx.cfg.export.arm or ctx.cfg.arms[0].name


def _padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 tokens and mask ``[B, T]``."""
    length = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return tokens, mask


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


class ExportStage(Stage):
    name = "export"

    def _source(self, ctx: RunContext) -> Path:
        arm = export_arm(ctx)
        src = ctx.arm_dir(arm) / "model"
        if not (src / "config.json").is_file():
            raise StageError(f"export: arm {arm!r} has no final model at {src} (run the train/online stage first)")
        return src

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {"export": ctx.cfg.export, "arm": export_arm(ctx),
                "model": ctx.model_fingerprint(self._source(ctx)), "prepare": ctx.upstream("prepare")}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg = ctx.cfg
        src = self._source(ctx)
        out_dir = ctx.stage_dir(self.name)
        dtype = cfg.export.dtype or cfg.precision.param_dtype
        model = ctx.load_model(src)
        log.info("export: arm %s (%s) -> %s as %s", export_arm(ctx), src, out_dir, dtype)
        # save_pretrained replaces out_dir atomically; the stage markers written by run_stage are moved aside
        # with the old directory, so they are rewritten afterwards.
        started = out_dir / "STARTED.json"
        started_text = started.read_text() if started.is_file() else None
        save_pretrained(model, out_dir, tokenizer_dir=str(ctx.tokenizer_dir()), dtype=dtype)
        if started_text is not None and ctx.is_main_process:
            started.write_text(started_text)
        ctx.sync("export-written")

        rows = [list(map(int, r["prompt_ids"])) for r in read_prompts(ctx, "eval")[:CHECK_ROWS]]
        summary: dict[str, Any] = {"arm": export_arm(ctx), "source": str(src), "path": str(out_dir),
                                   "dtype": dtype, "check_rows": len(rows)}
        if not rows:
            summary["note"] = "no held-out prompts: log-prob checks skipped"
            return summary
        tokens, mask = _padded(rows)
        # Both sides in float32 compute so the comparison measures the export, not the precision settings.
        fp32 = {**ctx.runtime(), "compute_dtype": "float32"}
        src_lp = host_array(token_logprobs(load_pretrained(src, "float32", mesh=ctx.mesh, **fp32), tokens, mask))
        exported = load_pretrained(out_dir, "float32", mesh=ctx.mesh, **fp32)
        exp_lp = host_array(token_logprobs(exported, tokens, mask))
        summary["jopd_vs_source_max_abs_diff"] = float(np.max(np.abs(exp_lp - src_lp)))
        if dtype == model.config.param_dtype and summary["jopd_vs_source_max_abs_diff"] > TOLERANCE:
            raise StageError(f"export: the exported model's log-probs differ from the source's by "
                             f"{summary['jopd_vs_source_max_abs_diff']:.2e} (> {TOLERANCE})")

        if not ctx.is_main_process:
            return summary  # transformers runs on one host
        if importlib.util.find_spec("torch") is None:
            summary["transformers_check"] = "skipped: torch is not installed"
            log.warning("export: torch is not installed; transformers load check skipped")
        else:
            hf_lp = transformers_logprobs(out_dir, tokens, mask)
            diff = float(np.max(np.abs(hf_lp - exp_lp)))
            summary["transformers_max_abs_diff"] = diff
            if diff > TOLERANCE:
                raise StageError(f"export: transformers' log-probs on {out_dir} differ from jopd's by {diff:.2e} "
                                 f"(> {TOLERANCE}); the export is not faithful")
            summary["transformers_check"] = "passed"
            log.info("export: transformers loads the export; max |logprob diff| %.2e", diff)
        atomic_write_json(out_dir / "export_check.json", summary)
        return summary


STAGE = ExportStage()
