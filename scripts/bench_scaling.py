"""Benchmark: the sharded OPD step on 1, 2, 4, 8 simulated CPU devices (sharding plan + correctness).

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before jax is imported, so the host CPU shows
up as 8 devices. For each device count n and mesh variant (``fsdp``: fsdp=n; ``fsdp x tensor``: tensor=2,
fsdp=n/2) this compiles the jopd OPD step on a mesh over the first n devices and reports

* the step time (median of ``--steps`` after one warm-up). The simulated devices share the machine's few
  cores, so time does NOT scale with n here -- the point is the sharding plan and correctness;
* collective counts in the compiled HLO (``jit(...).lower(...).compile().as_text()``): all-gather,
  reduce-scatter, all-reduce, collective-permute, all-to-all (async ``-start`` forms counted once; a static
  count, so ops inside the scanned layer stack count once, not once per layer);
* the loss, grad norm and updated parameters after one step compared with the 1-device result (fp32, so only
  reduction-order round-off is expected). The step uses jopd's AdamW with ``eps=1``: Adam's first update is
  ``lr * g / (|g| + eps)``, and with the default tiny eps it is ``lr * sign(g)``, which turns round-off in
  near-zero gradient entries into ``O(lr)`` parameter differences; with ``eps=1`` the update is smooth in g,
  so the parameter difference measures the gradient difference. Pass: ``|dloss| <= atol`` and
  ``max|dparam| <= rtol * max|update|`` (update = the 1-device run's parameter change).

Examples::

    python scripts/bench_scaling.py --small
    python scripts/bench_scaling.py --preset 50m --devices 1 2 4 8
"""

from __future__ import annotations

import os

# Must happen before jax is imported (also by the helpers imported below).
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_opd_step import (  # noqa: E402 - shared helpers next to this script
    PRESETS,
    env_info,
    model_config,
    print_table,
    random_batch,
    total_params,
    write_json,
)

from jopd import models, sharding, steps  # noqa: E402

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
# An HLO instruction's opcode follows its result shape: "... = f32[8,16]{1,0} all-gather(...)". Async pairs
# appear as "all-gather-start(" / "all-gather-done(": the -start is counted, the -done is not.
_OP_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
    counts = dict.fromkeys(COLLECTIVES, 0)
    for m in _OP_RE.finditer(hlo_text):
        counts[m.group(1)] += 1
    return counts


def mesh_variants(n: int) -> list[tuple[str, sharding.MeshConfig]]:
    out = [("fsdp", sharding.MeshConfig(data=1, fsdp=n, tensor=1, expert=1))]
    if n >= 2 and n % 2 == 0:
        out.append(("fsdp x tensor", sharding.MeshConfig(data=1, fsdp=n // 2, tensor=2, expert=1)))
    return out


def run_one(cfg, host_params, host_batch, mesh_cfg: sharding.MeshConfig, n: int, n_steps: int) -> dict[str, Any]:
    mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:n])
    # Fresh device buffers from host copies: the step donates its state.
    model = models.from_params(cfg, jax.tree.map(np.array, host_params), mesh=mesh)
    opt = steps.make_optimizer(lr=0.1, total_steps=1000, eps=1.0)
    state = steps.init_state(model.params, opt)
    b = host_batch["tokens"].shape[0]
    step = steps.make_opd_step(cfg, opt, steps.OPDLossConfig(), mesh=mesh, state=state, batch_size=b)
    batch = steps.shard_batch(host_batch, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    counts = count_collectives(compiled.as_text())

    state, metrics = compiled(state, batch)  # the checked step (also the warm-up)
    first = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
             "params": jax.device_get(state.params)}
    first["update"] = max(float(np.max(np.abs(np.asarray(new, np.float32) - np.asarray(old, np.float32))))
                          for new, old in zip(jax.tree.leaves(first["params"]), jax.tree.leaves(host_params)))
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    spec = {"/".join(str(getattr(k, "key", k)) for k in path): str(x.sharding.spec)
            for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    return dict(compile_s=compile_s, step_s=statistics.median(times), step_times_s=times, collectives=counts,
                first=first, param_specs=spec, mesh={k: int(v) for k, v in mesh.shape.items()})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="preset small, B=8, P=32, R=96")
    ap.add_argument("--preset", default=None, choices=[k for k in PRESETS if "teacher" not in k])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (divisible by every device count)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--response-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps after the checked one (default 2; 1)")
    ap.add_argument("--atol", type=float, default=1e-5, help="loss tolerance of the check vs 1 device")
    ap.add_argument("--rtol", type=float, default=1e-3,
                    help="parameter tolerance vs 1 device, relative to the largest parameter update")
    ap.add_argument("--out", default="bench_results/scaling.json")
    args = ap.parse_args(argv)

    preset = args.preset or ("small" if args.small else "50m")
    b = args.batch_size or 8
    p = args.prompt_len or (32 if args.small else 128)
    r = args.response_len or (96 if args.small else 384)
    if jax.device_count() < max(args.devices):
        raise SystemExit(f"only {jax.device_count()} devices visible; XLA_FLAGS={os.environ.get('XLA_FLAGS')}")

    env = env_info("jax")
    cfg = model_config(preset)
    print(f"{env['device_count']} simulated {env['platform']} devices on {env['cpu_count']} cores "
          f"(load avg {env['load_avg_1_5_15']}); model {preset} ({total_params(PRESETS[preset]) / 1e6:.1f}M), "
          f"B={b}, S={p + r}")
    print("NOTE: simulated devices share the same cores, so step time does not scale with n; this checks the "
          "sharding plan (collectives) and that results equal the 1-device run.")
    host_params = jax.device_get(models.init_params(cfg, seed=0))
    host_batch = random_batch(np.random.default_rng(0), b, p, r, cfg.vocab_size)

    rows, reference = [], None
    for n in args.devices:
        for name, mesh_cfg in mesh_variants(n):
            res = run_one(cfg, host_params, host_batch, mesh_cfg, n, args.steps or (1 if args.small else 2))
            first = res.pop("first")
            if reference is None:
                reference = first
            diffs = jax.tree.map(lambda a, c: float(np.max(np.abs(np.asarray(a, np.float32) - c))),
                                 first["params"], reference["params"])
            max_param_diff = max(jax.tree.leaves(diffs))
            rel_param_diff = max_param_diff / reference["update"]
            loss_diff = abs(first["loss"] - reference["loss"])
            mesh_shape = res.pop("mesh")
            row = dict(devices=n, variant=name, mesh_shape=mesh_shape,
                       mesh="x".join(f"{k}{v}" for k, v in mesh_shape.items() if v > 1) or "1", **res,
                       loss=first["loss"], grad_norm=first["grad_norm"], loss_abs_diff=loss_diff,
                       grad_norm_rel_diff=abs(first["grad_norm"] / reference["grad_norm"] - 1),
                       max_param_abs_diff=max_param_diff, max_update=reference["update"],
                       param_diff_rel_to_update=rel_param_diff,
                       matches_1_device=bool(loss_diff <= args.atol and rel_param_diff <= args.rtol))
            row.update({c: res["collectives"][c] for c in COLLECTIVES})
            rows.append(row)
            print(f"  n={n} {name}: {row['step_s']:.3g} s/step, match={row['matches_1_device']}", flush=True)
    print()
    print_table(rows, [("devices", "n"), ("variant", "variant"), ("mesh", "mesh"), ("compile_s", "compile s"),
                       ("step_s", "step s"), *[(c, c) for c in COLLECTIVES], ("loss_abs_diff", "|dloss|"),
                       ("grad_norm_rel_diff", "dgnorm rel"), ("max_param_abs_diff", "max|dparam|"),
                       ("param_diff_rel_to_update", "/max|update|"), ("matches_1_device", "== 1 dev")])
    ok = all(r["matches_1_device"] for r in rows)
    print(f"\nall results equal the 1-device result (|dloss| <= {args.atol:g}, max|dparam| <= {args.rtol:g} * "
          f"max|update|): {ok}")
    payload = {"benchmark": "scaling", "env": env,
               "config": dict(preset=preset, batch=b, prompt=p, response=r, atol=args.atol, rtol=args.rtol,
                             optimizer="jopd make_optimizer(lr=0.1, eps=1.0)"),
               "note": "simulated CPU devices share the host cores: step time does not scale with device count; "
                       "collective counts are static counts in the compiled HLO (ops inside the layer scan "
                       "count once)", "all_match": ok, "rows": rows}
    write_json(args.out, payload)
    if not ok:
        raise SystemExit("sharded result differs from the 1-device result")
    return payload


if __name__ == "__main__":
    main()
