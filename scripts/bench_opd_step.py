"""Benchmark: the Lightning OPD train step (jitted, state donated) on Qwen3-shaped random models.

For every (preset, response length, remat) configuration this measures

* step time: median of ``--steps`` timed steps after ``--warmup`` untimed ones, each ``block_until_ready``;
* tokens/s: ``batch * (prompt + response)`` tokens per step (every position is forwarded and back-propagated);
* peak memory: ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` where the backend reports it (GPU/TPU),
  else the compiled executable's ``memory_analysis()`` (arguments + outputs - aliased + temporaries);
* MFU: model FLOPs per step / step time / peak FLOP/s, with

      FLOPs = 6 * N_nonemb * tokens                                  (dense matmuls, fwd + bwd)
            + 6 * L * B * S^2 * H * hd                               (causal attention: 12 * L * S^2 * H * hd / 2
                                                                      per sequence for QK^T and PV, fwd + bwd)
            + 6 * D * V * tokens                                     (LM head, fwd + bwd)

  Recomputation (``remat``, the chunked log-prob head's backward recompute) is *not* counted: this is MFU,
  not hardware FLOP utilisation.

Presets: ``small`` (~5M, CPU smoke), ``50m`` (CPU), ``0.6b`` and ``1.7b`` (Qwen3-0.6B / Qwen3-1.7B dimensions).
``--small`` runs the ``small`` preset at short lengths in well under a minute on a laptop CPU.

Examples::

    python scripts/bench_opd_step.py --small
    python scripts/bench_opd_step.py --preset 1.7b --dtype bfloat16 --attention cudnn --response-lens 1024 4096

The helpers at the top (presets, FLOP formula, peak table, environment record, table printing) are imported by
the other ``scripts/bench_*.py`` files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from jopd.models.config import QWEN3_ARCHS  # importing jax does not start a backend

# ---------------------------------------------------------------------------------------------------------
# shared helpers (no jax backend is initialised by importing this module)
# ---------------------------------------------------------------------------------------------------------
# Qwen3-shaped presets: HF-style dimensions. "small" and "50m" are scaled-down Qwen3 shapes for CPU runs.
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "50m": dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_layers=10, num_heads=8,
                num_kv_heads=4, head_dim=64, tie_word_embeddings=True),
    "0.6b": QWEN3_ARCHS["0.6b"],
    "1.7b": QWEN3_ARCHS["1.7b"],
    # Teacher-sized shapes for bench_lightning_vs_online.py.
    "small_teacher": dict(vocab_size=8192, hidden_size=384, intermediate_size=1152, num_layers=6, num_heads=6,
                          num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "8b": QWEN3_ARCHS["8b"],
}
DEFAULT_BATCH = {"small": 2, "50m": 1, "0.6b": 8, "1.7b": 8, "small_teacher": 2, "8b": 4}

# Dense (non-sparse) bf16 tensor-core peaks, FLOP/s, matched by substring of the lower-cased device kind.
PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = (
    ("h100 pcie", 756e12, "H100 PCIe bf16 dense"),
    ("h100", 989e12, "H100 SXM bf16 dense"),
    ("h200", 989e12, "H200 bf16 dense"),
    ("a100", 312e12, "A100 bf16 dense"),
    ("v5p", 459e12, "TPU v5p bf16"),
)

MFU_FORMULA = ("FLOPs/step = 6*N_nonemb*tokens + 6*L*B*S^2*H*hd (causal attention, fwd+bwd) "
               "+ 6*D*V*tokens (LM head); tokens = B*S; recompute (remat, chunked-head backward) not counted")


def peak_flops(device_kind: str, platform_name: str, cpu_peak_gflops: float) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for MFU. CPU: the user-supplied estimate."""
    kind = device_kind.lower()
    if platform_name == "cpu":
        return cpu_peak_gflops * 1e9, f"CPU estimate --cpu-peak-gflops={cpu_peak_gflops:g} (not a measured peak)"
    for key, value, label in PEAK_BF16_FLOPS:
        if key in kind:
            return value, f"{label} ({value / 1e12:g} TFLOP/s, datasheet)"
    return float("nan"), f"unknown peak for device kind {device_kind!r}: MFU not computed"


def nonembedding_params(dims: dict[str, Any]) -> int:
    """Parameters outside the embedding / LM head (attention, MLP, norms)."""
    d, f, h, k, hd = (dims["hidden_size"], dims["intermediate_size"], dims["num_heads"], dims["num_kv_heads"],
                      dims["head_dim"])
    per_layer = d * hd * (2 * h + 2 * k) + 2 * hd + 3 * d * f + 2 * d
    return dims["num_layers"] * per_layer + d


def total_params(dims: dict[str, Any]) -> int:
    emb = dims["vocab_size"] * dims["hidden_size"] * (1 if dims["tie_word_embeddings"] else 2)
    return nonembedding_params(dims) + emb


def train_flops(dims: dict[str, Any], batch: int, seq: int) -> dict[str, float]:
    """Model FLOPs of one fwd+bwd step over ``batch`` sequences of length ``seq`` (see MFU_FORMULA)."""
    tokens = batch * seq
    dense = 6.0 * nonembedding_params(dims) * tokens
    attention = 6.0 * dims["num_layers"] * batch * seq**2 * dims["num_heads"] * dims["head_dim"]
    head = 6.0 * dims["hidden_size"] * dims["vocab_size"] * tokens
    return {"dense": dense, "attention": attention, "lm_head": head, "total": dense + attention + head}


def env_info(framework: str = "jax") -> dict[str, Any]:
    """Machine, library versions and date. ``framework='torch'`` describes the torch device instead."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        # Other processes share the machine: a high load average means noisy, pessimistic timings.
        "load_avg_1_5_15": os.getloadavg(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    if framework == "jax":
        import jax

        dev = jax.devices()[0]
        info.update(jax=jax.__version__, platform=dev.platform, device_kind=dev.device_kind,
                    device_count=jax.device_count())
    else:
        import torch

        info["jax"] = _version("jax")
        if torch.cuda.is_available():
            info.update(platform="gpu", device_kind=torch.cuda.get_device_name(0),
                        device_count=torch.cuda.device_count())
        else:
            info.update(platform="cpu", device_kind="cpu", device_count=1, torch_threads=torch.get_num_threads())
    return info


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(x: Any) -> str:
    if isinstance(x, float):
        if x != x:  # NaN
            return "-"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.3g}"
    return str(x)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """Print ``rows`` as a fixed-width table; ``columns`` are (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[fmt(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")


def is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ---------------------------------------------------------------------------------------------------------
# the jax benchmark
# ---------------------------------------------------------------------------------------------------------
def model_config(preset: str, *, dtype: str = "float32", remat: bool = False, attention: str = "xla",
                 param_dtype: str = "float32"):
    from jopd.models import ModelConfig

    return ModelConfig(model_type="qwen3", qk_norm=True, compute_dtype=dtype, param_dtype=param_dtype,
                       remat=remat, attention_impl=attention, max_position_embeddings=1 << 16,
                       **PRESETS[preset])


def random_batch(rng, batch: int, prompt: int, response: int, vocab: int) -> dict[str, Any]:
    """Host numpy OPD batch: random tokens, response mask over the last ``response`` positions,
    random teacher log-probs in (-4, 0]."""
    import numpy as np

    seq = prompt + response
    mask = np.zeros((batch, seq), np.int32)
    mask[:, prompt:] = 1
    return {
        "tokens": rng.integers(0, vocab, (batch, seq)).astype(np.int32),
        "response_mask": mask,
        "teacher_logprobs": (-4.0 * rng.random((batch, seq)) * mask).astype(np.float32),
    }


def memory_numbers(compiled) -> dict[str, Any]:
    """Compiled estimate (always) and device peak (where the backend reports it)."""
    import jax

    out: dict[str, Any] = {}
    try:
        ma = compiled.memory_analysis()
        out["compiled_bytes"] = int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                                    - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
        out["compiled_temp_bytes"] = int(ma.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements memory_analysis
        out["compiled_bytes"] = None
    stats = jax.devices()[0].memory_stats() or {}
    out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    if out["device_peak_bytes"] is not None:
        out["peak_bytes"], out["peak_source"] = out["device_peak_bytes"], "memory_stats"
    else:
        out["peak_bytes"], out["peak_source"] = out["compiled_bytes"], "memory_analysis"
    return out


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, compile and time one configuration; returns a result row."""
    import jax
    import numpy as np

    from jopd import models, steps

    cfg = model_config(spec["preset"], dtype=spec["dtype"], remat=spec["remat"], attention=spec["attention"])
    b, p, r = spec["batch"], spec["prompt"], spec["response"]
    seq = p + r
    row = dict(spec, seq=seq, tokens_per_step=b * seq, params=total_params(PRESETS[spec["preset"]]))
    model = models.from_params(cfg, models.init_params(cfg, seed=0))
    opt = steps.make_optimizer(lr=1e-6, total_steps=1000)
    state = steps.init_state(model.params, opt)
    step = steps.make_opd_step(cfg, opt, steps.OPDLossConfig(aggregation=spec["aggregation"]), mesh=model.mesh,
                               state=state, batch_size=b)
    batch = steps.shard_batch(random_batch(np.random.default_rng(0), b, p, r, cfg.vocab_size), model.mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    row["compile_s"] = time.perf_counter() - t0
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    row.update(memory_numbers(compiled))
    step_s = statistics.median(times)
    flops = train_flops(PRESETS[spec["preset"]], b, seq)
    row.update(step_s=step_s, step_min_s=min(times), step_times_s=times, tokens_per_s=b * seq / step_s,
               tokens_per_s_best=b * seq / min(times), flops_per_step=flops["total"],
               flops_breakdown=flops, achieved_tflops=flops["total"] / step_s / 1e12, loss=loss, status="ok")
    return row


def _run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh process (so the device's peak-memory counter is per configuration)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON:"):
            return json.loads(line[len("RESULT_JSON:"):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    status = "oom" if ("RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()) else "error"
    return dict(spec, status=status, error=tail)


def run_safe(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return run_one(spec)
    except Exception as e:  # noqa: BLE001 - one failing configuration (e.g. OOM) must not stop the sweep
        return dict(spec, status="oom" if is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:500]}")


COLUMNS = [("preset", "model"), ("params", "params"), ("batch", "B"), ("seq", "S=P+R"), ("remat", "remat"),
           ("dtype", "dtype"), ("status", "status"), ("compile_s", "compile s"), ("step_s", "step s"),
           ("tokens_per_s", "tok/s"), ("tokens_per_s_best", "best tok/s"),
           ("achieved_tflops", "TFLOP/s"), ("mfu_pct", "MFU %"),
           ("peak_gib", "peak GiB"), ("peak_source", "mem source")]


def add_sweep_args(ap: argparse.ArgumentParser) -> None:
    """The sweep flags this benchmark shares with bench_torch_reference.py, so both measure the same shapes."""
    ap.add_argument("--small", action="store_true", help="CPU smoke: preset small, P=32, R in (128, 512)")
    ap.add_argument("--preset", nargs="+", default=None, choices=[k for k in PRESETS if "teacher" not in k])
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (32 with --small)")
    ap.add_argument("--response-lens", type=int, nargs="+", default=None,
                    help="default 1024 4096 (128 512 with --small)")
    ap.add_argument("--batch-size", type=int, default=None, help="default per preset")
    ap.add_argument("--remat", choices=("both", "on", "off"), default="both")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    ap.add_argument("--aggregation", choices=("seq_mean", "token_mean"), default="seq_mean")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 3 with --small)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu-peak-gflops", type=float, default=50.0,
                    help="peak FLOP/s assumed on CPU for MFU (an estimate, not measured)")


def sweep_settings(args: argparse.Namespace) -> tuple[list[str], int, list[int], list[bool], int]:
    """(presets, prompt length, response lengths, remat settings, timed steps) from `add_sweep_args` flags."""
    presets = args.preset or (["small"] if args.small else ["50m"])
    prompt = args.prompt_len or (32 if args.small else 256)
    responses = args.response_lens or ([128, 512] if args.small else [1024, 4096])
    remats = {"both": [False, True], "on": [True], "off": [False]}[args.remat]
    return presets, prompt, responses, remats, args.steps or (3 if args.small else 5)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(ap)
    ap.add_argument("--attention", choices=("xla", "cudnn"), default="xla")
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                    help="one process per configuration (auto: yes on GPU/TPU, for per-config peak memory)")
    ap.add_argument("--out", default="bench_results/opd_step.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:  # child process of --isolate
        print("RESULT_JSON:" + json.dumps(run_safe(json.loads(args.one)), default=str))
        return {}

    presets, prompt, responses, remats, n_steps = sweep_settings(args)

    env = env_info("jax")
    peak, peak_source = peak_flops(env["device_kind"], env["platform"], args.cpu_peak_gflops)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and env["platform"] != "cpu")
    print(f"device: {env['device_kind']} ({env['platform']}), jax {env['jax']}, peak for MFU: {peak_source}")
    print(f"MFU: {MFU_FORMULA}")

    rows = []
    for preset in presets:
        for response in responses:
            for remat in remats:
                spec = dict(preset=preset, batch=args.batch_size or DEFAULT_BATCH[preset], prompt=prompt,
                            response=response, remat=remat, dtype=args.dtype, attention=args.attention,
                            aggregation=args.aggregation, steps=n_steps, warmup=args.warmup)
                row = _run_isolated(spec) if isolate else run_safe(spec)
                if row["status"] == "ok":
                    row["mfu_pct"] = 100.0 * row["flops_per_step"] / row["step_s"] / peak
                    row["peak_gib"] = (row["peak_bytes"] or float("nan")) / 2**30
                else:
                    row.setdefault("seq", prompt + response)
                    print(f"  {preset} R={response} remat={remat}: {row['status']}: "
                          f"{row.get('error', '')[:300]}")
                rows.append(row)
                print(f"  done {preset} R={response} remat={remat}: {row['status']} "
                      f"{fmt(row.get('step_s', float('nan')))} s/step", flush=True)
    print()
    print_table(rows, COLUMNS)
    payload = {"benchmark": "opd_step", "framework": "jopd", "env": env, "peak_flops": peak,
               "peak_flops_source": peak_source, "mfu_formula": MFU_FORMULA,
               "tokens_per_s_definition": "batch * (prompt + response) / median step time (best: fastest step)",
               "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
