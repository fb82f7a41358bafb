"""The paper's claims, checked on one run's numbers: OPD beats SFT, Lightning matches online, an inconsistent
teacher hurts.

Each check compares two models evaluated on the same held-out prompts, paired over prompts: the difference of
their per-prompt accuracies (avg@k) and its standard error sd / sqrt(n). A claim "holds" by the rule stated in
its text; None = it could not be checked (a model or a number is missing). The seeds report (jopd.report.seeds)
checks the same claims in every seed and adds intervals over seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jopd.report.gather import ArmInfo, final_metric
from jopd.report.stats import paired_interval

__all__ = ["Claim", "PairedDiff", "paired_diff", "run_claims"]

# A difference "beats" when it is at least this many paired standard errors above zero.
MIN_Z = 2.0


@dataclasses.dataclass(frozen=True)
class PairedDiff:
    """Accuracy of ``new`` minus ``old`` on the same prompts: the mean difference and its paired standard error."""

    delta: float
    se: float
    n: int

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.delta / self.se
        return 0.0 if self.delta == 0 else float("inf") * (1 if self.delta > 0 else -1)


def paired_diff(new: dict[str, Any] | None, old: dict[str, Any] | None) -> PairedDiff | None:
    """The paired accuracy difference of two eval results (eval/results.json entries), or None."""
    a = (new or {}).get("per_prompt_accuracy")
    b = (old or {}).get("per_prompt_accuracy")
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b) or len(a) < 2:
        return None
    iv = paired_interval(a, b)
    return PairedDiff(iv.mean, iv.se or 0.0, iv.n)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One checked statement: ``key`` (stable id), ``text`` (the rule, human-readable), ``holds``, ``detail``
    (the numbers) and ``values`` (the same numbers, JSON-able)."""

    key: str
    text: str
    holds: bool | None
    detail: str
    values: dict[str, Any] = dataclasses.field(default_factory=dict)


def _arm_result(arm: ArmInfo) -> dict[str, Any] | None:
    return arm.final if arm.final is not None and "per_prompt_accuracy" in arm.final else None


def run_claims(arms: list[ArmInfo], results: dict[str, Any], sft_teacher: str) -> list[Claim]:
    """The claims of one run: each consistent arm vs SFT (accuracy by >= 2 paired SEs, reverse KL lower), each
    consistent lightning arm vs the online arm of the same teacher (within 2 paired SEs), each inconsistent arm
    vs the consistent arm of its mode (lower accuracy). Arms with a refresh schedule are not Lightning OPD here."""
    sft = results.get("sft")
    out: list[Claim] = []
    consistent = [a for a in arms if a.consistent is True and not a.refresh]
    for arm in consistent:
        kind = "Lightning" if arm.mode == "lightning" else "online"
        res = _arm_result(arm)
        d = paired_diff(res, sft)
        if d is None:
            out.append(Claim(f"{arm.name}_beats_sft", f"{kind} OPD ({arm.name}) beats SFT on held-out accuracy by "
                             f">= {MIN_Z:g} paired standard errors", None, "no paired evaluation of both"))
        else:
            out.append(Claim(
                f"{arm.name}_beats_sft",
                f"{kind} OPD ({arm.name}) beats SFT on held-out accuracy by >= {MIN_Z:g} paired standard errors",
                d.delta > 0 and d.z >= MIN_Z,
                f"{res['accuracy']:.3f} vs {sft['accuracy']:.3f}: {d.delta:+.3f}, {d.z:.1f} paired SEs on {d.n} "
                "prompts", {"delta": d.delta, "se": d.se, "z": d.z, "n": d.n}))
        kl, sft_kl = final_metric(arm, "reverse_kl"), (sft or {}).get("reverse_kl")
        out.append(Claim(
            f"{arm.name}_lowers_reverse_kl", f"{kind} OPD ({arm.name}) lowers the reverse KL to teacher {sft_teacher}",
            None if kl is None or sft_kl is None else kl < sft_kl,
            "n/a" if kl is None or sft_kl is None else f"{kl:.4f} vs SFT {sft_kl:.4f} per token",
            {"reverse_kl": kl, "sft_reverse_kl": sft_kl}))
    for light in (a for a in consistent if a.mode == "lightning"):
        online = next((a for a in consistent if a.mode == "online" and a.teacher == light.teacher), None)
        if online is None:
            continue
        d = paired_diff(_arm_result(light), _arm_result(online))
        text = (f"Lightning OPD ({light.name}) matches online OPD ({online.name}): accuracy within {MIN_Z:g} paired "
                "standard errors")
        if d is None:
            out.append(Claim(f"{light.name}_matches_{online.name}", text, None, "no paired evaluation of both"))
            continue
        out.append(Claim(f"{light.name}_matches_{online.name}", text, abs(d.z) < MIN_Z,
                         f"{d.delta:+.3f} (lightning - online), {d.z:.1f} paired SEs",
                         {"delta": d.delta, "se": d.se, "z": d.z, "n": d.n}))
    for arm in (a for a in arms if a.consistent is False and not a.refresh):
        peer = next((a for a in consistent if a.mode == arm.mode), None)
        kind = "Lightning" if arm.mode == "lightning" else "online"
        text = (f"the inconsistent teacher hurts {kind} OPD: {arm.name} (teacher {arm.teacher}) ends below "
                + (peer.name if peer else f"the consistent {arm.mode} arm"))
        d = paired_diff(_arm_result(arm), _arm_result(peer)) if peer else None
        if d is None:
            out.append(Claim(f"{arm.name}_worse_than_consistent", text, None, "no paired evaluation of both"))
            continue
        out.append(Claim(f"{arm.name}_worse_than_consistent", text, d.delta < 0,
                         f"{arm.final['accuracy']:.3f} vs {peer.final['accuracy']:.3f}: {d.delta:+.3f}, "
                         f"{d.z:.1f} paired SEs", {"delta": d.delta, "se": d.se, "z": d.z, "n": d.n}))
    return out


def claims_section(claims: list[Claim]) -> list[str]:
    """Markdown lines: one row per claim with its verdict and numbers."""
    if not claims:
        return []
    lines = ["", "## The paper's claims, checked", "",
             "Differences are paired over the held-out prompts (per-prompt avg@k of both models).", "",
             "| claim | holds | numbers |", "|---|---|---|"]
    for c in claims:
        verdict = {True: "yes", False: "**no**", None: "n/a"}[c.holds]
        lines.append(f"| {c.text} | {verdict} | {c.detail} |")
    return lines
