"""The report's prose and markdown: results table, speed-ups, teacher consistency, "what this shows", examples.

Every statement in "what this shows" is computed from the gathered numbers (see `jopd.report.gather`); what
is missing is said so in the text rather than failing. Seconds are wall seconds; device-seconds multiply them
by the number of devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jopd.config import Config
from jopd.layout import RunLayout
from jopd.report.claims import claims_section, run_claims
from jopd.report.costs import cost_section
from jopd.report.gather import (
    COMPILE_OUTLIER_FACTOR,
    PHASES,
    ArmInfo,
    compute_speedups,
    device_info,
    final_metric,
    first_number,
    gather_arm,
    read_optional_json,
    stage_done,
    store_tokens,
)
from jopd.report.routes import routes_section, sft_teacher_label
from jopd.report.stats import compare_accuracy

__all__ = ["findings", "render_report"]


def _fmt(x: Any, spec: str = ".3f", none: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _times(ratio: float, better: str, worse: str) -> str:
    """'2.50x less' for a ratio >= 1, '1.25x more' (the inverse) below 1."""
    return f"{ratio:.2f}x {better}" if ratio >= 1 else f"{1 / ratio:.2f}x {worse}"


def findings(cfg: Config, arms: list[ArmInfo], results: dict[str, Any],
             speedups: dict[str, dict[str, Any]]) -> list[str]:
    """The "what this shows" statements, each computed from the numbers."""
    out: list[str] = []
    sft = results.get("sft") or {}
    sft_acc, sft_kl = sft.get("accuracy"), sft.get("reverse_kl")
    n = sft.get("num_prompts")
    base = results.get("base") or {}
    if base.get("accuracy") is not None and sft_acc is not None:
        cmp = compare_accuracy(sft_acc, base["accuracy"], n, sft.get("per_prompt_accuracy"),
                               base.get("per_prompt_accuracy"))
        out.append(f"SFT on teacher {sft_teacher_label(cfg)}'s responses {cmp} "
                   "over the base student.")
    for arm in arms:
        label = f"{'Lightning' if arm.mode == 'lightning' else 'Online'} OPD arm {arm.name} (teacher {arm.teacher})"
        if not arm.trained and not arm.eval_rows:
            out.append(f"{label} has no trained model or evaluations yet.")
            continue
        acc, kl = final_metric(arm, "accuracy"), final_metric(arm, "reverse_kl")
        final = results.get(f"arm:{arm.name}") or {}
        # Paired only when the final accuracy is this evaluation's (not a periodic one).
        per_prompt = final.get("per_prompt_accuracy") if final.get("accuracy") == acc else None
        s = (f"{label} {compare_accuracy(acc, sft_acc, n, per_prompt, sft.get('per_prompt_accuracy'))} "
             "over the SFT student")
        if kl is not None and sft_kl is not None:
            direction = "lowered" if kl < sft_kl else "raised"
            s += (f"; it {direction} the reverse KL to teacher {sft_teacher_label(cfg)} from {sft_kl:.4f} to "
                  f"{kl:.4f} per token")
        out.append(s + ".")
    for teacher, sp in speedups.items():
        a, b = sp.get("total_speedup"), sp.get("step_speedup")
        if a is None and b is None:
            continue
        parts = []
        if a is not None:
            parts.append(f"{_times(a, 'less', 'more')} total wall time ({sp['lightning_total_s']:.1f} s incl. "
                         f"one-off rollout + precompute vs {sp['online_total_s']:.1f} s)")
        if b is not None:
            parts.append(f"was {_times(b, 'faster', 'slower')} per training step")
        la, oa = sp.get("lightning_accuracy"), sp.get("online_accuracy")
        acc_txt = (f"; final accuracy {la:.3f} (lightning) vs {oa:.3f} (online)"
                   if la is not None and oa is not None else "")
        out.append(f"With teacher {teacher}, Lightning OPD ({sp['lightning_arm']}) took " + " and ".join(parts)
                   + f" than online OPD ({sp['online_arm']}){acc_txt}.")
    inconsistent = [a for a in arms if a.consistent is False]
    for arm in inconsistent:
        peers = [a for a in arms if a.consistent is True and a.mode == arm.mode]
        acc = final_metric(arm, "accuracy")
        peer_accs = [(p.name, final_metric(p, "accuracy")) for p in peers]
        peer_accs = [(nm, v) for nm, v in peer_accs if v is not None]
        if acc is None or not peer_accs:
            out.append(f"Inconsistent-teacher arm {arm.name} (teacher {arm.teacher}) cannot be compared: "
                       "no final accuracy for it or for a consistent arm of the same mode.")
            continue
        worse = [nm for nm, v in peer_accs if acc < v]
        peers_txt = ", ".join(f"{nm} {v:.3f}" for nm, v in peer_accs)
        verdict = "ended worse than" if len(worse) == len(peer_accs) else (
            "ended worse than some of" if worse else "did not end worse than")
        out.append(f"Inconsistent-teacher arm {arm.name} (teacher {arm.teacher}, not the SFT-data teacher "
                   f"{sft_teacher_label(cfg)}) {verdict} the consistent {arm.mode} arm(s): accuracy {acc:.3f} vs "
                   f"{peers_txt}. (Its reverse KL is measured to teacher {sft_teacher_label(cfg)}, not to the teacher "
                   "it was distilled toward.)")
    if not inconsistent:
        out.append("No arm used an inconsistent teacher, so teacher consistency was not tested in this run.")
    if n is not None and n < 100:
        out.append(f"Held-out sets of {n} prompts give coarse accuracies (one prompt = {1 / n:.3f}); treat "
                   "differences under about two standard errors as noise.")
    return out


def render_report(cfg: Config, layout: RunLayout) -> tuple[str, dict[str, Any]]:
    """The markdown report (up to its "## Plots" heading) and a summary of its numbers.

    The summary holds ``speedups``, ``findings``, ``devices`` and ``arms`` (JSON-able) plus ``arms_info``
    (the `ArmInfo` list) and ``results`` (eval/results.json) for the plots.
    """
    results = read_optional_json(layout.eval_results) or {}
    arms = [gather_arm(layout, a, results) for a in cfg.arms]
    n_dev, dev_kind = device_info(cfg, layout)
    speedups = compute_speedups(layout, arms)
    kl_teacher = next((r.get("kl_teacher") for r in results.values() if r.get("kl_teacher")),
                      cfg.eval.kl_teacher or sft_teacher_label(cfg))
    lines = [f"# jopd report: {layout.root.name}", "",
             f"Run directory `{layout.root}`. SFT-data teacher: **{sft_teacher_label(cfg)}**. Devices: {n_dev} x "
             f"{dev_kind}; device-seconds = wall seconds x {n_dev}.", ""]
    if not results:
        lines += ["_No evaluation results (`eval/results.json` is missing): run the eval stage._", ""]

    # --- results table ---------------------------------------------------------------------------------
    n_prompts = next((r.get("num_prompts") for r in results.values() if r.get("num_prompts")), None)
    k = cfg.eval.samples_per_prompt
    lines += ["## Results", "",
              f"Held-out accuracy on {n_prompts if n_prompts else '?'} prompts "
              + (f"(avg@{cfg.eval.samples_per_prompt}: the mean over {cfg.eval.samples_per_prompt} samples per "
                 f"prompt at temperature {cfg.eval.temperature}"
                 + (f", top-p {cfg.eval.top_p}" if cfg.eval.top_p < 1 else "") + ")"
                 if cfg.eval.samples_per_prompt > 1 else f"(temperature {cfg.eval.temperature})")
              + f"; reverse KL(student || teacher {kl_teacher}) per response "
              f"token on {cfg.eval.kl_samples} temperature-1 sample(s) per prompt. +- = 95% t interval over prompts"
              + (f"; pass@{k} = the unbiased estimator from the same {k} samples per prompt." if k > 1 else "."), "",
              f"| model | kind | teacher | consistent | accuracy | pass@{k} | reverse KL | wall s | device s | tokens |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    sft_done = stage_done(layout, "sft")
    sft_out = (sft_done or {}).get("outputs") or {}

    def row(name: str, kind: str, teacher: str, consistent: str, res: dict[str, Any] | None,
            wall: float | None, tokens: float | None, missing: str = "not evaluated") -> str:
        acc = _fmt(res.get("accuracy")) if res else missing
        if res and isinstance(res.get("accuracy_ci95"), int | float):
            acc += f" +- {res['accuracy_ci95']:.3f}"
        passk = ((res or {}).get("pass_at_k") or {}).get(str(k))
        pass_ci = ((res or {}).get("pass_at_k_ci95") or {}).get(str(k))
        passk_txt = _fmt(passk) + (f" +- {pass_ci:.3f}" if isinstance(pass_ci, int | float) else "")
        kl = _fmt(res.get("reverse_kl"), ".4f") if res else missing
        dev_s = wall * n_dev if wall is not None else None
        return (f"| {name} | {kind} | {teacher} | {consistent} | {acc} | {passk_txt} | {kl} | {_fmt(wall, '.1f')} | "
                f"{_fmt(dev_s, '.1f')} | {_fmt(tokens, ',.0f')} |")

    if "base" in results:
        lines.append(row("base", "initial student", "-", "-", results["base"], None, None))
    lines.append(row("sft", "SFT student", sft_teacher_label(cfg), "-", results.get("sft"),
                     first_number(sft_out, ("train_seconds",)) or first_number(sft_done, ("seconds",)),
                     first_number(sft_out, ("tokens",)), missing="not evaluated" if sft_done else "not trained"))
    for t in cfg.teachers:
        if f"teacher:{t}" in results:
            lines.append(row(f"teacher {t}", "teacher", t, "-", results[f"teacher:{t}"], None, None))
    for stage in ("rollout", "precompute"):
        done = stage_done(layout, stage)
        if done is not None:
            secs = first_number(done, ("seconds",))
            lines.append(f"| ({stage}) | one-off cost | - | - | - | - | - | {_fmt(secs, '.1f')} | "
                         f"{_fmt(secs * n_dev if secs is not None else None, '.1f')} | "
                         f"{_fmt(store_tokens(done), ',.0f')} |")
    for a in arms:
        cons = {True: "yes", False: "**no**", None: "?"}[a.consistent]
        res = a.final
        if res is None and a.eval_rows:
            res = {"accuracy": final_metric(a, "accuracy"), "reverse_kl": final_metric(a, "reverse_kl")}
        kind = f"lightning OPD, refresh every {a.refresh['every']}" if a.refresh else f"{a.mode} OPD"
        if a.lora:
            kind += f", LoRA r={a.lora.get('rank')} ({'/'.join(a.lora.get('targets', []))})"
        lines.append(row(f"arm {a.name}", kind, a.teacher, cons, res, a.wall_s, a.tokens,
                         missing="not evaluated" if a.trained else "not trained"))
    if not any(a.mode == "online" for a in cfg.arms):
        lines += ["", "_No online OPD arm is configured: there is no online baseline to compare against._"]
    if not any(a.mode == "lightning" for a in cfg.arms):
        lines += ["", "_No Lightning OPD arm is configured._"]

    refreshed = [a for a in arms if a.refresh]
    if refreshed:
        lines += ["", "## Refresh schedule: one-off and per-refresh costs", "",
                  "Generation 0 is the one-off rollout + precompute (rows above); every refresh re-samples "
                  "N x batch_size rollouts with the arm's current student and re-scores them with its teacher. "
                  "The arm's wall s includes its refreshes.", "",
                  "| arm | every N steps | refreshes | generate s | score s | per refresh s | tokens generated | "
                  "teacher consistent (all generations) |", "|---|---|---|---|---|---|---|---|"]
        for a in refreshed:
            r = a.refresh
            n = r.get("generations") or 0
            per = (r["gen_s"] + r["score_s"]) / n if n else None
            lines.append(f"| {a.name} | {r['every']} | {n} | {_fmt(r.get('gen_s'), '.1f')} | "
                         f"{_fmt(r.get('score_s'), '.1f')} | {_fmt(per, '.2f')} | "
                         f"{_fmt(r.get('tokens_generated'), ',.0f')} | "
                         f"{'yes' if r.get('consistent_teacher') else '**no**'} |")

    # --- speed-ups -----------------------------------------------------------------------------------
    lines += ["", "## Lightning OPD vs online OPD (same teacher)", ""]
    if not speedups:
        lines.append("_No teacher has both a trained lightning arm and a trained online arm: no speed-up to "
                     "report._")
    else:
        lines += ["| teacher | lightning arm | rollout s | precompute s | lightning train s | lightning total s "
                  "| online arm | online total s | (a) total speed-up | lightning s/step | online s/step "
                  "| (b) per-step speed-up | online gen / score / update s/step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t, sp in speedups.items():
            ph = sp["online_phases"]
            split = " / ".join(_fmt(ph.get(p), ".4f") for p in PHASES)
            lines.append(f"| {t} | {sp['lightning_arm']} | {_fmt(sp['rollout_s'], '.1f')} | "
                         f"{_fmt(sp['precompute_s'], '.1f')} | {_fmt(sp['lightning_train_s'], '.1f')} | "
                         f"{_fmt(sp['lightning_total_s'], '.1f')} | {sp['online_arm']} | "
                         f"{_fmt(sp['online_total_s'], '.1f')} | {_fmt(sp['total_speedup'], '.2f')}x | "
                         f"{_fmt(sp['lightning_step_s'], '.4f')} | {_fmt(sp['online_step_s'], '.4f')} | "
                         f"{_fmt(sp['step_speedup'], '.2f')}x | {split} |")
        notes = sorted({sp["one_off_note"] for sp in speedups.values() if sp["one_off_note"]})
        lines += [""] + [f"_Note: {n}._" for n in notes]
        lines.append("(a) = online total / (rollout + precompute + lightning training); "
                     f"(b) = online mean step time / lightning mean step time, over steady-state steps (steps slower "
                     f"than {COMPILE_OUTLIER_FACTOR:g}x the median are taken to include compilation and left out). "
                     "Arm wall times are the training loops' own (periodic evaluation excluded, compilation "
                     "included).")

    cost_lines, costs = cost_section(cfg, layout, arms, n_dev)
    lines += cost_lines

    # --- consistency ------------------------------------------------------------------------------------
    lines += ["", "## Teacher consistency", "",
              "| arm | mode | teacher | SFT-data teacher | consistent |", "|---|---|---|---|---|"]
    for a in arms:
        cons = {True: "yes", False: "no (ablation)", None: "unknown (no arms/NAME/meta.json)"}[a.consistent]
        lines.append(f"| {a.name} | {a.mode} | {a.teacher} | {sft_teacher_label(cfg)} | {cons} |")

    lines += routes_section(cfg, layout, results, arms)  # multi-teacher runs: every route against its teacher

    claims = [] if cfg.routing.enabled else run_claims(arms, results, cfg.sft_teacher)
    lines += claims_section(claims)

    # --- findings ------------------------------------------------------------------------------------------
    found = findings(cfg, arms, results, speedups)
    lines += ["", "## What this shows", ""] + [f"- {f}" for f in found]

    # --- examples -----------------------------------------------------------------------------------------
    order = {name: i for i, name in enumerate(["base", "sft"] + [f"teacher:{t}" for t in cfg.teachers]
                                                + [f"arm:{a.name}" for a in cfg.arms])}
    examples = [(name, s) for name, r in sorted(results.items(), key=lambda kv: order.get(kv[0], len(order)))
                for s in (r.get("samples") or [])[:1]]
    if examples:
        lines += ["", "## Example responses (first held-out prompt)", ""]
        for name, s in examples:
            resp = str(s.get("response", "")).replace("\n", " \\n ").replace("|", "\\|")
            lines.append(f"- **{name}** ({'correct' if s.get('correct') else 'wrong'}): "
                         f"`{s.get('prompt', '')}` -> `{resp[:160]}`")
    lines += ["", "## Plots", ""]
    summary = {"speedups": speedups, "findings": found, "devices": {"count": n_dev, "kind": dev_kind},
               "costs": costs, "claims": [dataclasses.asdict(c) for c in claims],
               "arms": {a.name: {"mode": a.mode, "teacher": a.teacher, "consistent_teacher": a.consistent,
                                 "wall_s": a.wall_s, "tokens": a.tokens, "mean_step_s": a.step_s,
                                 "accuracy": final_metric(a, "accuracy"),
                                 "reverse_kl": final_metric(a, "reverse_kl")} for a in arms}}
    return "\n".join(lines) + "\n", {"arms_info": arms, "results": results, **summary}
