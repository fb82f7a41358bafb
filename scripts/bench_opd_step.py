"""Benchmark: the Lightning OPD train step (jitted, state donated) on Qwen3-shaped random models.

For every (preset, response length, remat policy, attention, output head) configuration this measures

* step time: median of ``--steps`` timed steps after ``--warmup`` untimed ones, each ``block_until_ready``;
* tokens/s: ``batch * (prompt + response)`` tokens per step (every position is forwarded and back-propagated);
* peak memory: ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` where the backend reports it (GPU/TPU),
  else the compiled executable's ``memory_analysis()`` (arguments + outputs - aliased + temporaries); and the
  process's peak RSS (``ru_maxrss``, what bench_torch_reference.py reports on CPU; each configuration runs in
  its own process);
* MFU: model FLOPs per step / step time / peak FLOP/s, with

      FLOPs = 6 * N_nonemb * tokens                                  (dense matmuls, fwd + bwd)
            + 6 * L * B * S^2 * H * hd                               (causal attention: 12 * L * S^2 * H * hd / 2
                                                                      per sequence for QK^T and PV, fwd + bwd)
            + 6 * D * V * tokens                                     (LM head, fwd + bwd)

  Recomputation (``remat``, the chunked log-prob head's backward recompute) is *not* counted: this is MFU,
  not hardware FLOP utilisation.

Presets (all Qwen3-shaped: q/k norm, GQA; parameter counts from ``ModelConfig.num_params()``), each with the
batch, prompt and response lengths it runs at unless ``--batch-size`` / ``--prompt-len`` / ``--response-lens``
say otherwise:

==========  ===========  ======  ======  ======  =========  ==  ======  ===============================
preset      params       vocab   hidden  layers  heads/kv   hd  ffn     default B x (P + R)
==========  ===========  ======  ======  ======  =========  ==  ======  ===============================
``small``   5,245,696    8192    256     4       4 / 2      64  768     2 x (32 + 128), 2 x (32 + 512)
``11m``     11,340,544   32000   256     4       4 / 2      64  768     4 x (64 + 448): the issue's 11.3M
``50m``     48,246,528   32768   512     10      8 / 4      64  1536    1 x (256 + 1024), 1 x (256 + 4096)
``103m``    102,966,784  151936  512     8       8 / 4      64  1536    2 x (128 + 896): the issue's 103M
``0.6b``    Qwen3-0.6B dimensions (596M, tied)                          8 x (256 + 1024), 8 x (256 + 4096)
``1.7b``    Qwen3-1.7B dimensions (1.7B, tied)                          8 x (256 + 1024), 8 x (256 + 4096)
==========  ===========  ======  ======  ======  =========  ==  ======  ===============================

``11m`` and ``103m`` reproduce the two measured shapes of the performance issue (~11.3M params at vocab 32000,
batch 4 x 512 tokens; ~103M params at Qwen's vocab 151936, batch 2 x 1024 tokens); every preset ties its
embeddings. ``--small`` runs the ``small`` preset (3 timed steps) in well under a minute on a laptop CPU.

``--lora`` takes LoRA ranks (0 = full fine-tuning, the default; e.g. ``--lora 0 16`` gives both rows): a rank r > 0
trains adapters on every projection (alpha = 2r) with the base frozen, so the state is the adapters and their Adam
moments only and the base weights get no gradient (jopd/models/lora.py); its FLOPs count no weight gradient of
the base (4 N instead of 6 N per token, and 4 D V for the frozen head) plus 6 per adapter parameter per token.

``--remat`` takes decoder-layer rematerialisation policies (``none``: keep every activation; ``attention``: keep
all but the attention scores/probs, recomputed in the backward; ``dots``: keep the weight-matmul outputs,
recompute the rest; ``full``: recompute each layer), ``--attention`` the attention
kernels (``xla``, ``cudnn``) and ``--head`` the output heads (``fused``: the fused head whose backward never
recomputes the logits; ``chunked``: the chunked, rematerialised head); every combination is one row.

Examples::

    python scripts/bench_opd_step.py --small
    python scripts/bench_opd_step.py --small --lora 0 8               # full fine-tuning vs LoRA rank 8
    python scripts/bench_opd_step.py --preset 11m
    python scripts/bench_opd_step.py --preset 1.7b --dtype bfloat16 --attention xla cudnn --remat dots full \\
        --head fused chunked --response-lens 1024 4096

The helpers at the top (presets, FLOP formula, peak table, environment record, table printing) are imported by
the other ``scripts/bench_*.py`` files.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from jopd.models.config import QWEN3_ARCHS, SUPPORTED_ATTENTION, SUPPORTED_REMAT  # no jax backend started

# ---------------------------------------------------------------------------------------------------------
# shared helpers (no jax backend is initialised by importing this module)
# ---------------------------------------------------------------------------------------------------------
# Qwen3-shaped presets: HF-style dimensions. "small" and "50m" are scaled-down Qwen3 shapes for CPU runs; "11m"
# and "103m" are the two measured shapes of the performance issue (11.3M at vocab 32000, 103M at Qwen's vocab).
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "11m": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "50m": dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_layers=10, num_heads=8,
                num_kv_heads=4, head_dim=64, tie_word_embeddings=True),
    "103m": dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                 num_kv_heads=4, head_dim=64, tie_word_embeddings=True),
    "0.6b": QWEN3_ARCHS["0.6b"],
    "1.7b": QWEN3_ARCHS["1.7b"],
    # Teacher-sized shapes for bench_lightning_vs_online.py.
    "small_teacher": dict(vocab_size=8192, hidden_size=384, intermediate_size=1152, num_layers=6, num_heads=6,
                          num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "8b": QWEN3_ARCHS["8b"],
}


@dataclasses.dataclass(frozen=True)
class RunShape:
    """The batch and lengths a preset runs at by default: ``batch`` sequences of ``prompt + response`` tokens,
    one configuration per response length."""

    batch: int
    prompt: int
    responses: tuple[int, ...]


PRESET_SHAPES: dict[str, RunShape] = {
    "small": RunShape(batch=2, prompt=32, responses=(128, 512)),
    "11m": RunShape(batch=4, prompt=64, responses=(448,)),      # 4 x 512 tokens
    "50m": RunShape(batch=1, prompt=256, responses=(1024, 4096)),
    "103m": RunShape(batch=2, prompt=128, responses=(896,)),   # 2 x 1024 tokens
    "0.6b": RunShape(batch=8, prompt=256, responses=(1024, 4096)),
    "1.7b": RunShape(batch=8, prompt=256, responses=(1024, 4096)),
    "small_teacher": RunShape(batch=2, prompt=32, responses=(128, 512)),
    "8b": RunShape(batch=4, prompt=256, responses=(1024, 4096)),
}

# Dense (non-sparse) bf16 tensor-core peaks, FLOP/s, matched by substring of the lower-cased device kind.
PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = (
    ("h100 pcie", 756e12, "H100 PCIe bf16 dense"),
    ("h100", 989e12, "H100 SXM bf16 dense"),
    ("h200", 989e12, "H200 bf16 dense"),
    ("a100", 312e12, "A100 bf16 dense"),
    ("v5p", 459e12, "TPU v5p bf16"),
)

# HBM bandwidth, bytes/s (datasheet), for the decode roofline: (substrings all in the lower-cased device kind,
# bandwidth, label); the first match wins, so the PCIe entry precedes the generic H100 (SXM) one.
HBM_BANDWIDTH: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("h100", "pcie"), 2.0e12, "H100 PCIe HBM2e"),
    (("h100",), 3.35e12, "H100 SXM HBM3"),
    (("h200",), 4.8e12, "H200 HBM3e"),
    (("a100", "80gb"), 2.0e12, "A100 80GB HBM2e"),
)

MFU_FORMULA = ("FLOPs/step = 6*N_nonemb*tokens + 6*L*B*S^2*H*hd (causal attention, fwd+bwd) "
               "+ 6*D*V*tokens (LM head); tokens = B*S; recompute (remat, chunked-head backward) not counted; "
               "LoRA rows: (4*N_nonemb + 6*N_adapters)*tokens + attention + 4*D*V*tokens (no base weight gradient)")


def peak_flops(device_kind: str, platform_name: str, cpu_peak_gflops: float) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for MFU. CPU: the user-supplied estimate."""
    kind = device_kind.lower()
    if platform_name == "cpu":
        return cpu_peak_gflops * 1e9, f"CPU estimate --cpu-peak-gflops={cpu_peak_gflops:g} (not a measured peak)"
    for key, value, label in PEAK_BF16_FLOPS:
        if key in kind:
            return value, f"{label} ({value / 1e12:g} TFLOP/s, datasheet)"
    return float("nan"), f"unknown peak for device kind {device_kind!r}: MFU not computed"


def hbm_bandwidth(device_kind: str) -> tuple[float, str]:
    """(HBM bytes/s, where it comes from) for the decode bandwidth limit; NaN and "unknown device" otherwise."""
    kind = device_kind.lower()
    for keys, value, label in HBM_BANDWIDTH:
        if all(k in kind for k in keys):
            return value, f"{label} ({value / 1e12:g} TB/s, datasheet)"
    return float("nan"), f"unknown device {device_kind!r}: no HBM bandwidth, decode limit not computed"


def nonembedding_params(dims: dict[str, Any]) -> int:
    """Parameters outside the embedding / LM head (attention, MLP, norms)."""
    d, f, h, k, hd = (dims["hidden_size"], dims["intermediate_size"], dims["num_heads"], dims["num_kv_heads"],
                      dims["head_dim"])
    per_layer = d * hd * (2 * h + 2 * k) + 2 * hd + 3 * d * f + 2 * d
    return dims["num_layers"] * per_layer + d


def total_params(dims: dict[str, Any]) -> int:
    emb = dims["vocab_size"] * dims["hidden_size"] * (1 if dims["tie_word_embeddings"] else 2)
    return nonembedding_params(dims) + emb


def train_flops(dims: dict[str, Any], batch: int, seq: int, lora_params: int = 0) -> dict[str, float]:
    """Model FLOPs of one fwd+bwd step over ``batch`` sequences of length ``seq`` (see MFU_FORMULA);
    ``lora_params`` > 0: a LoRA step (frozen base: no weight gradient but the adapters')."""
    tokens = batch * seq
    weight_mult = 4.0 if lora_params else 6.0
    dense = (weight_mult * nonembedding_params(dims) + 6.0 * lora_params) * tokens
    attention = 6.0 * dims["num_layers"] * batch * seq**2 * dims["num_heads"] * dims["head_dim"]
    head = weight_mult * dims["hidden_size"] * dims["vocab_size"] * tokens
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
def model_config(preset: str, *, dtype: str = "float32", remat: str = "none", attention: str = "xla",
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
    rank = spec.get("lora", 0)
    if rank:  # LoRA: adapters on every projection, the base frozen (passed to the step, never donated)
        model = models.lora.with_adapters(model, models.LoraSpec(rank=rank, alpha=2.0 * rank))
    base, adapters = models.lora.split(model.params)
    trainable, extra = (model.params, ()) if adapters is None else ({models.lora.LORA: adapters}, (base,))
    row["trainable_params"] = models.lora.count(trainable)
    opt = steps.make_optimizer(lr=1e-6, total_steps=1000)
    state = steps.init_state(trainable, opt)
    loss_cfg = steps.OPDLossConfig(aggregation=spec["aggregation"], fused_head=spec["head"] == "fused")
    step = steps.make_opd_step(model.config, opt, loss_cfg, mesh=model.mesh, state=state, batch_size=b,
                               frozen=bool(extra))
    batch = steps.shard_batch(random_batch(np.random.default_rng(0), b, p, r, cfg.vocab_size), model.mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, *extra).compile()
    row["compile_s"] = time.perf_counter() - t0
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, *extra)
        jax.block_until_ready((state, metrics))
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    row.update(memory_numbers(compiled))
    # the whole process's high-water mark: meaningful per configuration under --isolate
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step_s = statistics.median(times)
    flops = train_flops(PRESETS[spec["preset"]], b, seq, row["trainable_params"] if rank else 0)
    row.update(step_s=step_s, step_min_s=min(times), step_times_s=times, tokens_per_s=b * seq / step_s,
               tokens_per_s_best=b * seq / min(times), flops_per_step=flops["total"],
               flops_breakdown=flops, achieved_tflops=flops["total"] / step_s / 1e12, loss=loss, status="ok")
    return row


def _run_isolated(spec: dict[str, Any], child_env: dict[str, str]) -> dict[str, Any]:
    """Run one configuration in a fresh process (so the device's peak-memory counter is per configuration)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)],
                          capture_output=True, text=True, env=child_env)
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


COLUMNS = [("preset", "model"), ("params", "params"), ("lora", "LoRA r"), ("trainable_params", "trained"),
           ("batch", "B"), ("seq", "S=P+R"), ("remat", "remat"),
           ("attention", "attn"), ("head", "head"), ("dtype", "dtype"), ("status", "status"), ("compile_s", "compile s"), ("step_s", "step s"),
           ("tokens_per_s", "tok/s"), ("tokens_per_s_best", "best tok/s"),
           ("achieved_tflops", "TFLOP/s"), ("mfu_pct", "MFU %"),
           ("peak_gib", "peak GiB"), ("peak_source", "mem source"), ("rss_gib", "RSS GiB")]


def add_sweep_args(ap: argparse.ArgumentParser) -> None:
    """The sweep flags this benchmark shares with bench_torch_reference.py, so both measure the same shapes."""
    ap.add_argument("--small", action="store_true", help="CPU smoke: preset small (B=2, P=32, R in 128, 512), "
                    "3 timed steps")
    ap.add_argument("--preset", nargs="+", default=None, choices=[k for k in PRESETS if "teacher" not in k],
                    help="default 50m (small with --small)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default per preset (PRESET_SHAPES)")
    ap.add_argument("--response-lens", type=int, nargs="+", default=None, help="default per preset")
    ap.add_argument("--batch-size", type=int, default=None, help="default per preset")
    ap.add_argument("--remat", nargs="+", choices=SUPPORTED_REMAT, default=["attention", "full"],
                    help="decoder-layer rematerialisation policies, one row each")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    ap.add_argument("--aggregation", choices=("seq_mean", "token_mean"), default="seq_mean")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 3 with --small)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu-peak-gflops", type=float, default=50.0,
                    help="peak FLOP/s assumed on CPU for MFU (an estimate, not measured)")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One (preset, batch, prompt, response) point of a sweep."""

    preset: str
    batch: int
    prompt: int
    response: int


def sweep_settings(args: argparse.Namespace) -> tuple[list[Shape], list[str], int]:
    """(shapes, remat policies, timed steps) from `add_sweep_args` flags; unset lengths come from PRESET_SHAPES."""
    shapes = []
    for preset in args.preset or (["small"] if args.small else ["50m"]):
        default = PRESET_SHAPES[preset]
        for response in args.response_lens or default.responses:
            shapes.append(Shape(preset, args.batch_size or default.batch, args.prompt_len or default.prompt,
                                response))
    return shapes, list(args.remat), args.steps or (3 if args.small else 5)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(ap)
    ap.add_argument("--attention", nargs="+", choices=SUPPORTED_ATTENTION, default=["xla"],
                    help="attention kernels, one row each")
    ap.add_argument("--head", nargs="+", choices=("fused", "chunked"), default=["fused"],
                    help="output heads, one row each (OPDLossConfig.fused_head)")
    ap.add_argument("--lora", nargs="+", type=int, default=[0], metavar="RANK",
                    help="LoRA ranks, one row each (0 = full fine-tuning; e.g. --lora 0 16)")
    ap.add_argument("--isolate", choices=("yes", "no"), default="yes",
                    help="one process per configuration, so peak device memory and peak RSS are per configuration")
    ap.add_argument("--out", default="bench_results/opd_step.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:  # child process of --isolate
        print("RESULT_JSON:" + json.dumps(run_safe(json.loads(args.one)), default=str))
        return {}

    shapes, remats, n_steps = sweep_settings(args)

    # This process only reads the device kind: it must not preallocate the accelerator's memory that the
    # --isolate children need. The children get the caller's environment unchanged.
    child_env = dict(os.environ)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env = env_info("jax")
    peak, peak_source = peak_flops(env["device_kind"], env["platform"], args.cpu_peak_gflops)
    isolate = args.isolate == "yes"
    print(f"device: {env['device_kind']} ({env['platform']}), jax {env['jax']}, peak for MFU: {peak_source}")
    print(f"MFU: {MFU_FORMULA}")

    rows = []
    for shape in shapes:
        for remat in remats:
            for attention in args.attention:
                for head, rank in [(h, k) for h in args.head for k in args.lora]:
                    spec = dict(dataclasses.asdict(shape), remat=remat, attention=attention, head=head,
                                dtype=args.dtype, aggregation=args.aggregation, steps=n_steps, warmup=args.warmup,
                                lora=rank)
                    row = _run_isolated(spec, child_env) if isolate else run_safe(spec)
                    name = (f"{shape.preset} R={shape.response} remat={remat} attn={attention} head={head}"
                            + (f" lora={rank}" if rank else ""))
                    if row["status"] == "ok":
                        row["mfu_pct"] = 100.0 * row["flops_per_step"] / row["step_s"] / peak
                        row["peak_gib"] = (row["peak_bytes"] or float("nan")) / 2**30
                        row["rss_gib"] = row["peak_rss_bytes"] / 2**30
                    else:
                        row.setdefault("seq", shape.prompt + shape.response)
                        print(f"  {name}: {row['status']}: {row.get('error', '')[:300]}")
                    rows.append(row)
                    print(f"  done {name}: {row['status']} {fmt(row.get('step_s', float('nan')))} s/step",
                          flush=True)
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
