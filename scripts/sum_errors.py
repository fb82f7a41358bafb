"""What kind of solution each model of a run writes on the sum-chain task (task level 4): correct in one order,
correct with the orders mixed, a term skipped or repeated, a wrong sum.

Usage::

    .venv/bin/python scripts/sum_errors.py RUN_DIR [--models sft arm:lightning_A ...] [--json out.json]

Each model answers the run's held-out prompts exactly as the eval stage samples them (``eval`` settings of
RUN_DIR/config.yaml, its seed: the same responses the accuracy was computed from), and every response is
classified by ``jopd.data.arithmetic.sum_solution_kind``. Prints a markdown table of the fractions (rows: models;
columns: kinds) with the accuracy, for docs/results.md. Prompts that are not sums of terms are skipped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jopd.data import tokenizer as toklib  # noqa: E402
from jopd.data.arithmetic import SUM_SOLUTION_KINDS, sum_solution_kind, sum_terms  # noqa: E402
from jopd.data.grading import check_answer  # noqa: E402
from jopd.io import read_jsonl  # noqa: E402
from jopd.layout import RunLayout  # noqa: E402
from jopd.models import load_pretrained  # noqa: E402
from jopd.sampling import generate  # noqa: E402

_EXPR = re.compile(r"(\d+(?:\+\d+)+)")


def model_dir(layout: RunLayout, name: str) -> Path:
    if name == "sft":
        return layout.sft_model
    if name == "base":
        return layout.student_base
    kind, _, rest = name.partition(":")
    return {"teacher": layout.teacher, "arm": layout.arm_model}[kind](rest)


def classify_model(path: Path, rows: list[dict], tok, ev: dict, seed: int) -> dict[str, float]:
    model = load_pretrained(path)
    k = int(ev.get("samples_per_prompt", 1))
    gen = generate(model, [r["prompt_ids"] for r in rows for _ in range(k)], max_new_tokens=int(ev["max_new_tokens"]),
                   temperature=float(ev["temperature"]), top_p=float(ev.get("top_p", 1.0)),
                   eos_token_id=toklib.stop_ids(tok, model.config), seed=seed, batch_size=int(ev["batch_size"]))
    counts = dict.fromkeys(SUM_SOLUTION_KINDS, 0)
    for j in range(len(gen.lengths)):
        row = rows[j // k]
        text = tok.decode(gen.response(j), skip_special_tokens=True)
        counts[sum_solution_kind(row["terms"], text, check_answer(text, row["label"]))] += 1
    n = len(gen.lengths)
    out = {kind: c / n for kind, c in counts.items()}
    out["accuracy"] = sum(v for kind, v in out.items() if kind.startswith("correct"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--models", nargs="*", default=None, help="default: the run's eval.models, else sft, teachers, arms")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cfg = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    layout = RunLayout(args.run_dir)
    tok = toklib.load_tokenizer(str(layout.tokenizer))
    rows = []
    for r in read_jsonl(layout.prompts("eval")):
        m = _EXPR.search(r["prompt"])
        terms = sum_terms(m.group(1)) if m else None
        if terms:
            rows.append({**r, "terms": terms})
    models = args.models or cfg["eval"].get("models") or (
        ["sft"] + [f"teacher:{t}" for t in cfg["teachers"]] + [f"arm:{a['name']}" for a in cfg["arms"]])
    results = {name: classify_model(model_dir(layout, name), rows, tok, cfg["eval"], cfg["seed"]) for name in models}
    print(f"{len(rows)} held-out sums x {cfg['eval'].get('samples_per_prompt', 1)} samples at temperature "
          f"{cfg['eval']['temperature']}\n")
    print("| model | accuracy | " + " | ".join(SUM_SOLUTION_KINDS) + " |")
    print("|---|---|" + "---|" * len(SUM_SOLUTION_KINDS))
    for name, res in results.items():
        print(f"| {name} | {res['accuracy']:.3f} | " + " | ".join(f"{res[k]:.3f}" for k in SUM_SOLUTION_KINDS) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
