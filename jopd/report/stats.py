"""The report's statistics, as pure functions: standard errors, t intervals, paired differences, pass@k.

Accuracies are fractions in [0, 1] over ``n`` held-out prompts; per-prompt accuracies (one value per prompt,
the mean over that prompt's samples) make a comparison of two models paired. Over several seeds (independent
replicates of a whole run) a quantity gets a Student-t interval: mean +- t_{(1+c)/2, n-1} * sd / sqrt(n).
The t quantile is computed here (regularised incomplete beta + bisection), so the report needs no scipy; the
tests compare it against scipy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = [
    "Interval",
    "accuracy_se",
    "compare_accuracy",
    "mean_interval",
    "paired_interval",
    "pass_at_k",
    "pass_at_k_estimate",
    "t_cdf",
    "t_quantile",
]


def accuracy_se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` on ``n`` prompts (never exactly 0, so z stays finite)."""
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


# ---------------------------------------------------------------------------------------- Student t
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta (modified Lentz; converges for x < (a+1)/(a+b+2))."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on `t_cdf` to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket: the upper tail of df = 1 (Cauchy) at p = 0.9995 is ~637
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------------------------------ intervals
@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with its two-sided ``confidence`` t interval over ``n`` values (``half_width`` None when n < 2)."""

    mean: float
    half_width: float | None
    n: int
    sd: float | None
    confidence: float = 0.95

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def se(self) -> float | None:
        return None if self.sd is None else self.sd / math.sqrt(self.n)

    def contains(self, value: float) -> bool | None:
        """Whether ``value`` lies in the interval (None without one)."""
        if self.half_width is None:
            return None
        return self.low <= value <= self.high

    def format(self, spec: str = ".3f") -> str:
        """``0.512 +- 0.031`` (or the mean alone with one value)."""
        if self.half_width is None:
            return format(self.mean, spec)
        return f"{format(self.mean, spec)} +- {format(self.half_width, spec)}"

    def to_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "half_width": self.half_width, "low": self.low, "high": self.high,
                "n": self.n, "sd": self.sd, "confidence": self.confidence}


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with its Student-t interval: t_{(1+confidence)/2, n-1} * sd(ddof=1) / sqrt(n)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, None, 1, None, confidence)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, half, n, sd, confidence)


def paired_interval(new: Sequence[float], old: Sequence[float], confidence: float = 0.95) -> Interval:
    """The interval of the mean paired difference ``new[i] - old[i]`` (same seeds, or same prompts)."""
    if len(new) != len(old):
        raise ValueError(f"paired values need equal lengths, got {len(new)} and {len(old)}")
    return mean_interval([a - b for a, b in zip(new, old)], confidence)


# ---------------------------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct among ``n`` samples: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), the probability that k of the n samples drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # prod_{i=n-c+1}^{n} (1 - k / i): the numerically stable form of C(n-c, k) / C(n, k).
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_k_estimate(correct_counts: Sequence[int], n: int, k: int, confidence: float = 0.95) -> Interval:
    """pass@k over prompts (each with ``n`` samples, ``correct_counts[i]`` correct) with its t interval over
    prompts (prompts are the independent units; the per-prompt estimates are unbiased)."""
    return mean_interval([pass_at_k(n, int(c), k) for c in correct_counts], confidence)


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
        diff = paired_interval(new_per_prompt, old_per_prompt)
        se, n, kind = diff.se, diff.n, "paired standard errors"
    elif n:
        se, kind = math.sqrt(accuracy_se(new, n) ** 2 + accuracy_se(old, n) ** 2), "standard errors"
    if paired or n:
        z = abs(delta) / se if se > 0 else math.inf
        text += f", {z:.1f} {kind} on {n} prompts" + (" (within noise)" if z < 2 else "")
    return text
