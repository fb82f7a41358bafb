"""Benchmark: seconds per optimizer step, online OPD versus Lightning (offline) OPD, same batch and lengths.

* **online OPD** step = the current student ``generate``s B responses (temperature 1, no EOS, so exactly R
  tokens each) + the live teacher scores them (``token_logprobs``) + the OPD update;
* **Lightning OPD** step = the OPD update only, on a batch held in host memory (``shard_batch`` included);
* **one-off cost** of Lightning OPD = rollout generation + teacher precompute for the whole dataset of N rows
  (measured directly, compiled programs warmed first), amortised over S optimizer steps.

Reported: per-step speed-up ``online / lightning`` and total speed-up ``S * online / (one_off + S * lightning)``
at the configured S (and for 1/2/4/8 epochs over the N rows), next to the paper's 3.6-4.0x (GPU-hours). Both
models are random-init Qwen3-shaped (teacher larger). Everything runs on one device, one phase after the
other, so seconds here are device-seconds; a real online setup also keeps teacher GPUs busy (or idle) beside
the trainer, which this single-device measurement does not count.

Examples::

    python scripts/bench_lightning_vs_online.py --small
    python scripts/bench_lightning_vs_online.py --student 1.7b --teacher 8b --dtype bfloat16 --attention cudnn
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_opd_step import (  # noqa: E402 - shared helpers next to this script
    PRESETS,
    env_info,
    model_config,
    print_table,
    total_params,
    write_json,
)

from jopd import models, sampling, steps  # noqa: E402
from jopd.models.config import SUPPORTED_REMAT  # noqa: E402

PAPER_SPEEDUP = "3.6-4.0x (Lightning OPD paper, GPU-hours)"


def _median_time(fn, n: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true",
                    help="CPU smoke: student small, teacher small_teacher, B=4, P=32, R=128, N=32")
    ap.add_argument("--student", default=None, choices=list(PRESETS), help="default 1.7b (small with --small)")
    ap.add_argument("--teacher", default=None, choices=list(PRESETS), help="default 8b (small_teacher)")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per optimizer step (default 16; 4)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (32)")
    ap.add_argument("--response-len", type=int, default=None, help="default 4096 (128)")
    ap.add_argument("--dataset-rows", type=int, default=None,
                    help="N rows of the offline dataset (default 512; 32)")
    ap.add_argument("--rollout-batch", type=int, default=None,
                    help="rows per generate / teacher call in the one-off precompute (default 64; B with --small)")
    ap.add_argument("--total-steps", type=int, default=None,
                    help="S optimizer steps to amortise over (default: 4 epochs over the N rows)")
    ap.add_argument("--timed-steps", type=int, default=3, help="timed steps per mode after one warm-up")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    ap.add_argument("--teacher-param-dtype", choices=("float32", "bfloat16"), default=None,
                    help="teacher parameter dtype (default: bfloat16 when --dtype bfloat16)")
    ap.add_argument("--attention", choices=("xla", "cudnn"), default="xla")
    ap.add_argument("--remat", choices=SUPPORTED_REMAT, default=None,
                    help="remat policy of the student update (default: full; none with --small)")
    ap.add_argument("--out", default="bench_results/lightning_vs_online.json")
    args = ap.parse_args(argv)

    s = args.small
    student_name = args.student or ("small" if s else "1.7b")
    teacher_name = args.teacher or ("small_teacher" if s else "8b")
    b = args.batch_size or (4 if s else 16)
    p = args.prompt_len or (32 if s else 256)
    r = args.response_len or (128 if s else 4096)
    n_rows = args.dataset_rows or (32 if s else 512)
    rollout_b = args.rollout_batch or (b if s else 64)
    total_steps = args.total_steps or 4 * max(n_rows // b, 1)
    remat = args.remat or ("none" if s else "full")
    t_pdt = args.teacher_param_dtype or ("bfloat16" if args.dtype == "bfloat16" else "float32")

    env = env_info("jax")
    print(f"device: {env['device_kind']} ({env['platform']}), jax {env['jax']}, load avg {env['load_avg_1_5_15']}")
    s_cfg = model_config(student_name, dtype=args.dtype, remat=remat, attention=args.attention)
    t_cfg = model_config(teacher_name, dtype=args.dtype, attention=args.attention, param_dtype=t_pdt)
    print(f"student {student_name} ({total_params(PRESETS[student_name]) / 1e6:.1f}M), teacher {teacher_name} "
          f"({total_params(PRESETS[teacher_name]) / 1e6:.1f}M), B={b}, P={p}, R={r}, N={n_rows}, S={total_steps}")

    student = models.from_params(s_cfg, models.init_params(s_cfg, seed=0))
    teacher = models.from_params(t_cfg, models.init_params(t_cfg, seed=1))
    mesh = student.mesh
    opt = steps.make_optimizer(lr=1e-6, total_steps=10**6)
    state = steps.init_state(student.params, opt)
    step = steps.make_opd_step(s_cfg, opt, steps.OPDLossConfig(), mesh=mesh, state=state, batch_size=b)

    rng = np.random.default_rng(0)
    prompts = rng.integers(1, s_cfg.vocab_size, (n_rows, p)).astype(np.int32)

    def rollout(params, rows: np.ndarray, batch: int, seed: int) -> np.ndarray:
        """Sample R tokens per prompt with the student; returns full ``[rows, P + R]`` token ids."""
        res = sampling.generate(models.Model(s_cfg, params, mesh), rows.tolist(), max_new_tokens=r,
                                temperature=1.0, batch_size=batch, seed=seed)
        return np.concatenate([rows, res.tokens], axis=1)  # no EOS: every row has exactly R new tokens

    def teacher_score(tokens: np.ndarray, batch: int) -> np.ndarray:
        out = []
        for i in range(0, len(tokens), batch):
            chunk = tokens[i:i + batch]
            out.append(np.asarray(models.token_logprobs(teacher, chunk, np.ones_like(chunk))))
        return np.concatenate(out)

    resp_mask = np.zeros((b, p + r), np.int32)
    resp_mask[:, p:] = 1

    def to_batch(tokens: np.ndarray, teacher_lp: np.ndarray) -> dict[str, np.ndarray]:
        mask = resp_mask[: len(tokens)]
        return {"tokens": tokens, "response_mask": mask,
                "teacher_logprobs": (teacher_lp * mask).astype(np.float32)}

    # ---- one-off: rollouts + teacher precompute over the N rows (warm the compiled shapes first) --------------
    t0 = time.perf_counter()
    warm = rollout(state.params, prompts[:rollout_b], rollout_b, seed=99)
    teacher_score(warm, rollout_b)
    one_off_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data_tokens = rollout(state.params, prompts, rollout_b, seed=0)
    one_off_gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data_teacher = teacher_score(data_tokens, rollout_b)
    one_off_teacher_s = time.perf_counter() - t0
    one_off_s = one_off_gen_s + one_off_teacher_s

    # ---- online OPD: generate + teacher + update, per step ---------------------------------------------------
    phases: dict[str, list[float]] = {"generate": [], "teacher": [], "update": []}
    cursor = [0]

    def online_step(record: bool):
        nonlocal state
        rows = prompts[(cursor[0] * b) % n_rows:][:b]
        if len(rows) < b:
            rows = prompts[:b]
        cursor[0] += 1
        t_a = time.perf_counter()
        tokens = rollout(state.params, rows, b, seed=1000 + cursor[0])
        t_b = time.perf_counter()
        teacher_lp = teacher_score(tokens, b)
        t_c = time.perf_counter()
        state, metrics = step(state, steps.shard_batch(to_batch(tokens, teacher_lp), mesh))
        jax.block_until_ready((state, metrics))
        t_d = time.perf_counter()
        if record:
            phases["generate"].append(t_b - t_a)
            phases["teacher"].append(t_c - t_b)
            phases["update"].append(t_d - t_c)

    t0 = time.perf_counter()
    online_step(record=False)  # compiles the B-row generate / teacher / update programs
    online_compile_s = time.perf_counter() - t0
    online_s, online_times = _median_time(lambda: online_step(record=True), args.timed_steps)

    # ---- Lightning OPD: update only, batches from host memory ------------------------------------------------
    def lightning_step():
        nonlocal state
        i = (cursor[0] * b) % max(n_rows - b + 1, 1)
        cursor[0] += 1
        batch = to_batch(data_tokens[i:i + b], data_teacher[i:i + b])
        state, metrics = step(state, steps.shard_batch(batch, mesh))
        jax.block_until_ready((state, metrics))

    lightning_step()
    lightning_s, lightning_times = _median_time(lightning_step, args.timed_steps)

    # ---- summary ---------------------------------------------------------------------------------------------
    def total_speedup(n_steps: int) -> float:
        return n_steps * online_s / (one_off_s + n_steps * lightning_s)

    steps_per_epoch = max(n_rows // b, 1)
    rows_out = [
        dict(mode="online OPD", per_step_s=online_s, generate_s=statistics.median(phases["generate"]),
             teacher_s=statistics.median(phases["teacher"]), update_s=statistics.median(phases["update"])),
        dict(mode="Lightning OPD", per_step_s=lightning_s, generate_s=0.0, teacher_s=0.0, update_s=lightning_s,
             amortised_s=lightning_s + one_off_s / total_steps),
    ]
    rows_out[0]["amortised_s"] = online_s
    print()
    print_table(rows_out, [("mode", "mode"), ("generate_s", "generate s"), ("teacher_s", "teacher s"),
                           ("update_s", "update s"), ("per_step_s", "s/step"),
                           ("amortised_s", f"s/step incl. one-off over S={total_steps}")])
    per_step = online_s / lightning_s
    epochs = [dict(epochs=e, steps=e * steps_per_epoch, total_speedup=total_speedup(e * steps_per_epoch))
              for e in (1, 2, 4, 8)]
    print()
    print(f"one-off (N={n_rows} rows, rollout batch {rollout_b}): generate {one_off_gen_s:.3g} s + teacher "
          f"{one_off_teacher_s:.3g} s = {one_off_s:.3g} s")
    print(f"per-step speed-up (online / Lightning update): {per_step:.2f}x")
    print(f"total speed-up at S={total_steps}: {total_speedup(total_steps):.2f}x   (paper: {PAPER_SPEEDUP})")
    print_table(epochs, [("epochs", "epochs over N"), ("steps", "S"), ("total_speedup", "total speed-up")])
    print("note: single device, phases run back to back (device-seconds); compile time excluded everywhere.")

    payload = {
        "benchmark": "lightning_vs_online", "env": env,
        "config": dict(student=student_name, teacher=teacher_name,
                       student_params=total_params(PRESETS[student_name]),
                       teacher_params=total_params(PRESETS[teacher_name]), batch=b, prompt=p, response=r,
                       dataset_rows=n_rows, rollout_batch=rollout_b, total_steps=total_steps, dtype=args.dtype,
                       teacher_param_dtype=t_pdt, attention=args.attention, remat=remat,
                       timed_steps=args.timed_steps),
        "online": dict(per_step_s=online_s, step_times_s=online_times,
                       phases_s={k: statistics.median(v) for k, v in phases.items()}, phase_times_s=phases,
                       warmup_compile_s=online_compile_s),
        "lightning": dict(per_step_s=lightning_s, step_times_s=lightning_times),
        "one_off": dict(generate_s=one_off_gen_s, teacher_s=one_off_teacher_s, total_s=one_off_s,
                        warmup_compile_s=one_off_compile_s),
        "per_step_speedup": per_step, "total_speedup": total_speedup(total_steps), "by_epochs": epochs,
        "paper": PAPER_SPEEDUP,
        "formula": "per-step = online_s / lightning_s; total(S) = S*online_s / (one_off_s + S*lightning_s)",
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
