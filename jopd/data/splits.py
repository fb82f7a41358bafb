"""The SFT / OPD / eval prompts of a run's task: generated arithmetic problems or rows of prompt files.

One function, :func:`load_problems`, used by the ``prepare`` stage (which writes the splits) and by the checks
that run before any stage (``jopd.preflight``: the files readable, their rows well formed, enough of them for
the configured batches).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jopd.data import arithmetic, prompt_files
from jopd.data.prompt_files import PromptFileError


def load_problems(cfg: Any) -> dict[str, list[arithmetic.Problem]]:
    """SFT / OPD / eval problems for the configured task (eval always disjoint from the others)."""
    t = cfg.task
    if t.kind == "arithmetic":
        out: dict[str, list[arithmetic.Problem]] = {}
        counts = {"sft": t.num_sft_prompts, "opd": t.num_opd_prompts, "eval": t.num_eval_prompts}
        for split, n in counts.items():
            levels = t.sft_difficulty if split == "sft" and t.sft_difficulty else t.difficulty
            # Spread the problems evenly over the configured difficulty levels.
            per = [n // len(levels) + (i < n % len(levels)) for i in range(len(levels))]
            probs: list[arithmetic.Problem] = []
            for level, k in zip(levels, per):
                probs += arithmetic.make_problems(split, k, t.seed * 1000 + level, level)
            rng = np.random.default_rng(t.seed)
            out[split] = [probs[i] for i in rng.permutation(len(probs))]
        return out
    sources = {"sft": t.sft_prompt_file or t.prompt_file, "opd": t.opd_prompt_file or t.prompt_file}
    route_field = cfg.routing.field  # multi-teacher runs: every row names its route (meta["route"])
    rows: dict[str, list[arithmetic.Problem]] = {}
    for path in dict.fromkeys(sources.values()):  # each distinct file once, in a seeded order
        # SFT prompts need no reference answer (the teacher answers them; e.g. OpenThoughts3 has none).
        loaded = prompt_files.load_prompt_file(path, dedupe=True, require_answer=path == sources["opd"],
                                               route_field=route_field)
        rows[path] = [loaded[i] for i in np.random.default_rng(t.seed).permutation(len(loaded))]
    if t.eval_prompt_file:
        evals = prompt_files.load_prompt_file(t.eval_prompt_file, dedupe=True,
                                              route_field=route_field)[: t.num_eval_prompts]
    else:  # held out from the OPD source: eval measures the distribution OPD trains on
        evals, rows[sources["opd"]] = rows[sources["opd"]][: t.num_eval_prompts], rows[sources["opd"]][t.num_eval_prompts:]
    eval_prompts = {p.prompt for p in evals}
    rows = {path: [p for p in probs if p.prompt not in eval_prompts] for path, probs in rows.items()}
    key = {"sft": "sft_prompt_file" if t.sft_prompt_file else "prompt_file",
           "opd": "opd_prompt_file" if t.opd_prompt_file else "prompt_file"}
    for split, path in sources.items():
        if not rows[path]:
            raise PromptFileError(f"task.{key[split]} {path}: no {split.upper()} prompts left after removing the "
                                  f"{len(evals)} eval prompts")
    sft = rows[sources["sft"]][: t.num_sft_prompts]
    if sources["opd"] == sources["sft"]:  # one file: OPD takes the prompts after the SFT ones
        shared = rows[sources["opd"]]
        opd = shared[t.num_sft_prompts: t.num_sft_prompts + t.num_opd_prompts] or shared[: t.num_opd_prompts]
    else:
        opd = rows[sources["opd"]][: t.num_opd_prompts]
    return {"sft": sft, "opd": opd, "eval": evals}


def heldout_count(n: int, fraction: float) -> int:
    """How many of ``n`` examples a held-out ``fraction`` takes: at least one when a fraction > 0 is asked and
    n > 1, never all of them."""
    return min(max(int(round(n * fraction)), 1 if fraction > 0 else 0), n - 1) if n > 1 else 0


def heldout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) row indices, ``heldout_count(n, fraction)`` of them held out."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    k = heldout_count(n, fraction)
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())
