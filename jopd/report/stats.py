"""Standard errors of held-out accuracies and the sentence comparing two of them.

Accuracies are fractions in [0, 1] over ``n`` held-out prompts; per-prompt accuracies (one value per prompt,
the mean over that prompt's samples) make the comparison paired.
"""

from __future__ import annotations

import math

__all__ = ["accuracy_se", "compare_accuracy"]


def accuracy_se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` on ``n`` prompts (never exactly 0, so z stays finite)."""
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def compare_accuracy(new: float | None, old: float | None, n: int | None,
                     new_per_prompt: list[float] | None = None, old_per_prompt: list[float] | None = None) -> str:
    """'improved … / did not improve …' with the difference in standard errors.

    With both models' per-prompt accuracies on the same prompts the standard error is the paired one
    (sd of the per-prompt differences / sqrt(n)), which removes the prompt-difficulty variance both models
    share; otherwise that of a difference of two independent proportions."""
    if new is None or old is None:
        return "could not be compared (missing numbers)"
    delta = new - old
    if delta == 0:
        return f"did not improve held-out accuracy (unchanged at {new:.3f})"
    verb = "improved" if delta > 0 else "did not improve (lowered)"
    text = f"{verb} held-out accuracy from {old:.3f} to {new:.3f} ({delta:+.3f})"
    paired = (new_per_prompt is not None and old_per_prompt is not None
              and len(new_per_prompt) == len(old_per_prompt) > 1)
    if paired:
        diff = [a - b for a, b in zip(new_per_prompt, old_per_prompt)]
        mean = sum(diff) / len(diff)
        sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (len(diff) - 1))
        se, n, kind = sd / math.sqrt(len(diff)), len(diff), "paired standard errors"
    elif n:
        se, kind = math.sqrt(accuracy_se(new, n) ** 2 + accuracy_se(old, n) ** 2), "standard errors"
    if paired or n:
        z = abs(delta) / se if se > 0 else math.inf
        text += f", {z:.1f} {kind} on {n} prompts" + (" (within noise)" if z < 2 else "")
    return text
