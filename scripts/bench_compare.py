"""Compare jopd's OPD step with the PyTorch reference: tokens/s ratio for matching configurations.

Reads ``bench_results/opd_step.json`` (``bench_opd_step.py``) and ``bench_results/torch_reference.json``
(``bench_torch_reference.py``); configurations match on (preset, batch, prompt, response, remat policy, dtype),
so every jopd row (each attention kernel and output head) is compared with the torch row of its shape. jopd's
``attention`` policy (keep everything but the attention probabilities) is compared with torch's ``none``: torch's
SDPA kernels keep no attention probabilities for the backward pass either; torch has no ``dots`` policy, so those
rows have no match. A ratio > 1 means jopd is faster. Only meaningful when both files come from the same machine under similar load
(the load average of each run is printed).

Example::

    python scripts/bench_compare.py --jopd bench_results/opd_step.json --torch bench_results/torch_reference.json
"""

from __future__ import annotations

import argparse
import json
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_opd_step import print_table, write_json  # noqa: E402 - shared helpers next to this script

KEY = ("preset", "batch", "prompt", "response", "remat", "dtype")
TORCH_POLICY = {"none": "none", "attention": "none", "full": "full"}  # jopd remat -> the torch row it matches


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jopd", default="bench_results/opd_step.json")
    ap.add_argument("--torch", default="bench_results/torch_reference.json")
    ap.add_argument("--out", default="bench_results/compare.json")
    args = ap.parse_args(argv)
    with open(args.jopd) as f:
        jopd = json.load(f)
    with open(args.torch) as f:
        ref = json.load(f)
    for name, res in (("jopd", jopd), ("torch", ref)):
        env = res["env"]
        print(f"{name}: {env.get('device_kind')} date {env.get('date')} load avg {env.get('load_avg_1_5_15')}")
    if jopd["env"].get("device_kind") != ref["env"].get("device_kind"):
        print("WARNING: the two files come from different devices; ratios are not meaningful")

    torch_rows = {tuple(r.get(k) for k in KEY): r for r in ref["rows"] if r.get("status") == "ok"}
    rows = []
    for r in jopd["rows"]:
        key = dict(r, remat=TORCH_POLICY.get(r.get("remat"), r.get("remat")))
        t = torch_rows.get(tuple(key.get(k) for k in KEY))
        if r.get("status") != "ok" or t is None:
            continue
        rows.append(dict(zip(KEY, (r[k] for k in KEY)), seq=r["seq"], attention=r.get("attention"),
                         head=r.get("head"), jopd_tok_s=r["tokens_per_s"],
                         torch_tok_s=t["tokens_per_s"], torch_attn=t.get("attn"),
                         torch_old=t.get("old_pass"), ratio=r["tokens_per_s"] / t["tokens_per_s"],
                         ratio_best=(r.get("tokens_per_s_best") or float("nan"))
                         / (t.get("tokens_per_s_best") or float("nan")),
                         jopd_peak_gib=r.get("peak_gib"), jopd_rss_gib=r.get("rss_gib"),
                         torch_peak_gib=t.get("peak_gib"), torch_remat=t.get("remat")))
    if not rows:
        print("no matching configurations")
    else:
        print_table(rows, [("preset", "model"), ("batch", "B"), ("seq", "S"), ("remat", "remat"),
                           ("dtype", "dtype"), ("attention", "jopd attn"), ("head", "jopd head"),
                           ("jopd_tok_s", "jopd tok/s"), ("torch_tok_s", "torch tok/s"),
                           ("torch_attn", "torch attn"), ("torch_old", "torch old lp"),
                           ("ratio", "jopd/torch (median)"), ("ratio_best", "(best step)"),
                           ("jopd_peak_gib", "jopd GiB"), ("jopd_rss_gib", "jopd RSS GiB"),
                           ("torch_remat", "torch remat"), ("torch_peak_gib", "torch GiB")])
    payload = {"benchmark": "compare", "jopd_file": args.jopd, "torch_file": args.torch,
               "jopd_env": jopd["env"], "torch_env": ref["env"], "rows": rows,
               "note": "ratio = jopd tokens/s / torch tokens/s (> 1: jopd faster), from median step times; "
                       "ratio_best from each side's fastest step (less sensitive to other load); memory sources "
                       "differ (see each file's peak_source)"}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
