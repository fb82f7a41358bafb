"""The report over seeds (``seeds: [...]``): every seed is a whole run of the pipeline in RUN_DIR/seed_S; this
aggregates them into RUN_DIR/report.md and RUN_DIR/report/summary.json.

For every model: held-out accuracy (avg@k), pass@k and reverse KL as mean +- 95% Student-t interval over
seeds; for every arm: its paired difference to the SFT student of the same seed (accuracy and reverse KL), mean
+- interval over seeds; and the paper's claims (jopd.report.claims) checked in every seed, with the
Lightning-vs-online claim also checked over seeds (Lightning's mean inside online's interval). Within one seed
the intervals and paired standard errors are over the held-out prompts (that seed's own report).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jopd.config import Config
from jopd.io import atomic_write_json, atomic_write_text
from jopd.layout import RunLayout
from jopd.report.claims import Claim, run_claims
from jopd.report.costs import stage_costs
from jopd.report.gather import ArmInfo, final_metric, gather_arm, read_optional_json
from jopd.report.stats import Interval, mean_interval

__all__ = ["gather_seed", "render_seeds_report", "write_seeds_report"]


def _fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, int | float) and math.isfinite(x) else "n/a"


def _iv(values: list[float | None], spec: str = ".3f") -> tuple[str, Interval | None]:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return "n/a", None
    iv = mean_interval(vals)
    text = iv.format(spec) + ("" if len(vals) == len(values) else f" ({len(vals)} of {len(values)} seeds)")
    return text, iv


def _model_names(cfg: Config) -> list[tuple[str, str]]:
    """(results key, label) of every model, in report order."""
    return ([("base", "base student"), ("sft", "SFT student")]
            + [(f"teacher:{t}", f"teacher {t}") for t in cfg.teachers]
            + [(f"arm:{a.name}", f"arm {a.name}") for a in cfg.arms])


def gather_seed(cfg: Config, seed: int) -> dict[str, Any]:
    """What one seed's run recorded: eval results, arms, claims, per-stage costs."""
    sub = cfg.for_seed(seed)
    layout = RunLayout.for_config(sub)
    results = read_optional_json(layout.eval_results) or {}
    arms = [gather_arm(layout, a, results) for a in sub.arms]
    return {"seed": seed, "layout": layout, "results": results, "arms": arms,
            "claims": run_claims(arms, results, cfg.sft_teacher), "costs": stage_costs(sub, layout, arms)}


def _arm_delta(arm: ArmInfo, sft: dict[str, Any] | None, key: str) -> float | None:
    v, s = final_metric(arm, key), (sft or {}).get(key)
    return v - s if v is not None and isinstance(s, int | float) else None


def render_seeds_report(cfg: Config, seeds: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The markdown report over seeds and its numbers (JSON-able)."""
    k = cfg.eval.samples_per_prompt
    n_prompts = next((r.get("num_prompts") for s in seeds for r in s["results"].values() if r.get("num_prompts")),
                     None)
    names = [s["seed"] for s in seeds]
    lines = [f"# jopd report over {len(seeds)} seeds: {Path(cfg.run_dir).name}", "",
             f"Run directory `{cfg.run_dir}`; seeds {names}, each a whole run (teachers, SFT, rollouts, arms) in "
             f"`seed_S/` with its own report. Intervals are 95% Student-t intervals over the {len(seeds)} seeds "
             f"(t with {len(seeds) - 1} degrees of freedom); the held-out prompts ({n_prompts or '?'}) are the same "
             "in every seed. Accuracy = avg@" + f"{k} at temperature {cfg.eval.temperature}; pass@{k} = the unbiased "
             f"estimator from the same {k} samples; reverse KL(student || teacher {cfg.eval.kl_teacher or cfg.sft_teacher}) "
             "per response token.", ""]
    # --- per model ---------------------------------------------------------------------------------------
    lines += ["## Results (mean +- 95% interval over seeds)", "",
              f"| model | accuracy (avg@{k}) | pass@{k} | reverse KL | per seed: accuracy |", "|---|---|---|---|---|"]
    models: dict[str, Any] = {}
    for key, label in _model_names(cfg):
        accs = [(s["results"].get(key) or {}).get("accuracy") for s in seeds]
        if all(a is None for a in accs):
            continue
        passk = [((s["results"].get(key) or {}).get("pass_at_k") or {}).get(str(k)) for s in seeds]
        kls = [(s["results"].get(key) or {}).get("reverse_kl") for s in seeds]
        acc_t, acc_iv = _iv(accs)
        pass_t, pass_iv = _iv(passk)
        kl_t, kl_iv = _iv(kls, ".4f")
        lines.append(f"| {label} | {acc_t} | {pass_t} | {kl_t} | {', '.join(_fmt(a) for a in accs)} |")
        models[key] = {"accuracy": accs, "pass_at_k": passk, "reverse_kl": kls,
                       "accuracy_interval": acc_iv.to_dict() if acc_iv else None,
                       "pass_at_k_interval": pass_iv.to_dict() if pass_iv else None,
                       "reverse_kl_interval": kl_iv.to_dict() if kl_iv else None}
    # --- paired differences to SFT ---------------------------------------------------------------------------
    lines += ["", "## Each arm against the SFT student of its seed (paired over seeds)", "",
              "Per seed: the arm's accuracy minus the SFT student's, and the same difference in paired standard "
              "errors over the held-out prompts (z); then mean +- 95% interval of the differences over seeds.", "",
              "| arm | mode | teacher | consistent | accuracy - SFT | reverse KL - SFT | per seed: difference (z) |",
              "|---|---|---|---|---|---|---|"]
    diffs: dict[str, Any] = {}
    for j, arm_cfg in enumerate(cfg.arms):
        per_seed = [s["arms"][j] for s in seeds]
        d_acc = [_arm_delta(a, s["results"].get("sft"), "accuracy") for a, s in zip(per_seed, seeds)]
        d_kl = [_arm_delta(a, s["results"].get("sft"), "reverse_kl") for a, s in zip(per_seed, seeds)]
        zs = []
        for s in seeds:
            c = next((c for c in s["claims"] if c.key == f"{arm_cfg.name}_beats_sft"), None)
            zs.append(c.values.get("z") if c is not None else None)
        acc_t, acc_iv = _iv(d_acc)
        kl_t, kl_iv = _iv(d_kl, ".4f")
        cons = {True: "yes", False: "**no**", None: "?"}[per_seed[0].consistent]
        cells = ", ".join(f"{_fmt(d, '+.3f')}" + (f" ({z:.1f})" if isinstance(z, float) and math.isfinite(z) else "")
                          for d, z in zip(d_acc, zs))
        lines.append(f"| {arm_cfg.name} | {arm_cfg.mode} | {arm_cfg.teacher} | {cons} | {acc_t} | {kl_t} | {cells} |")
        diffs[arm_cfg.name] = {"accuracy_minus_sft": d_acc, "reverse_kl_minus_sft": d_kl, "z_vs_sft": zs,
                               "accuracy_interval": acc_iv.to_dict() if acc_iv else None,
                               "reverse_kl_interval": kl_iv.to_dict() if kl_iv else None}
    # --- claims --------------------------------------------------------------------------------------------
    claim_rows = _claims_over_seeds(cfg, seeds, models)
    lines += ["", "## The paper's claims, checked in every seed", "",
              "| claim | holds in | per seed |", "|---|---|---|"]
    for row in claim_rows:
        lines.append(f"| {row['text']} | {row['holds_in']} of {row['checked']} seeds | {row['per_seed']} |")
    # --- costs -----------------------------------------------------------------------------------------------
    lines += ["", "## Cost per seed (mean +- 95% interval over seeds, wall seconds)", "",
              "| step | wall s | per seed |", "|---|---|---|"]
    items = [c["item"] for c in seeds[0]["costs"]] if seeds else []
    costs: dict[str, Any] = {}
    for i, item in enumerate(items):
        secs = [s["costs"][i]["seconds"] if i < len(s["costs"]) else None for s in seeds]
        text, iv = _iv(secs, ".1f")
        lines.append(f"| {item} | {text} | {', '.join(_fmt(x, '.1f') for x in secs)} |")
        costs[item] = {"seconds": secs, "interval": iv.to_dict() if iv else None}
    lines += ["", "Each seed's own report: " + ", ".join(f"[seed {s['seed']}](seed_{s['seed']}/report.md)"
                                                       for s in seeds), ""]
    summary = {"seeds": names, "num_prompts": n_prompts, "samples_per_prompt": k, "models": models,
               "differences_vs_sft": diffs, "claims": claim_rows, "costs": costs}
    return "\n".join(lines), summary


def _claims_over_seeds(cfg: Config, seeds: list[dict[str, Any]], models: dict[str, Any]) -> list[dict[str, Any]]:
    """Every claim key found in the seeds: in how many seeds it holds; plus Lightning-in-online's-interval."""
    rows: list[dict[str, Any]] = []
    keys = list(dict.fromkeys(c.key for s in seeds for c in s["claims"]))
    for key in keys:
        found: list[Claim | None] = [next((c for c in s["claims"] if c.key == key), None) for s in seeds]
        text = next(c.text for c in found if c is not None)
        checked = [c for c in found if c is not None and c.holds is not None]
        rows.append({"key": key, "text": text, "holds_in": sum(bool(c.holds) for c in checked),
                     "checked": len(checked),
                     "per_seed": "; ".join(f"{s['seed']}: " + ("n/a" if c is None else
                                                               f"{'yes' if c.holds else 'no' if c.holds is False else 'n/a'} ({c.detail})")
                                           for s, c in zip(seeds, found)),
                     "holds": [None if c is None else c.holds for c in found]})
    for light in (a for a in cfg.arms if a.mode == "lightning"):
        online = next((a for a in cfg.arms if a.mode == "online" and a.teacher == light.teacher
                       and a.teacher == cfg.sft_teacher), None)
        if online is None or light.teacher != cfg.sft_teacher:
            continue
        lm, om = models.get(f"arm:{light.name}"), models.get(f"arm:{online.name}")
        liv, oiv = (lm or {}).get("accuracy_interval"), (om or {}).get("accuracy_interval")
        holds = None
        detail = "n/a (needs 2+ seeds)"
        if liv and oiv and oiv.get("half_width") is not None:
            holds = oiv["low"] <= liv["mean"] <= oiv["high"]
            detail = (f"lightning mean {liv['mean']:.3f}; online {oiv['mean']:.3f} +- {oiv['half_width']:.3f} "
                      f"[{oiv['low']:.3f}, {oiv['high']:.3f}]")
        rows.append({"key": f"{light.name}_in_interval_of_{online.name}",
                     "text": f"Lightning OPD ({light.name}) mean accuracy inside the seeds' 95% interval of online "
                             f"OPD ({online.name})", "holds_in": int(bool(holds)), "checked": int(holds is not None),
                     "per_seed": detail, "holds": [holds]})
    return rows


def write_seeds_report(cfg: Config) -> dict[str, Any]:
    """Gather every seed of ``cfg.seeds`` and write RUN_DIR/report.md and RUN_DIR/report/summary.json."""
    seeds = [gather_seed(cfg, s) for s in cfg.seeds]
    text, summary = render_seeds_report(cfg, seeds)
    root = Path(cfg.run_dir)
    atomic_write_text(root / "report.md", text)
    atomic_write_json(root / "report" / "summary.json", summary)
    print(text, flush=True)
    return summary
