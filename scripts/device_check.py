"""Device check: every device benchmark of jopd in one command, for a lent H100 / H200 (``device_check.sh``).

    python scripts/device_check.py OUT_DIR            # on the GPU: ~6 minutes, at most 8 (sum of part limits)
    python scripts/device_check.py OUT_DIR --small    # the same parts at tiny shapes on CPU, ~2-3 minutes

Parts, each run as subprocesses under its own time limit (a part that fails, runs out of memory or out of
time is recorded with that status and the check goes on):

* ``env``: device kind, jax / jaxlib / torch versions, the peak FLOP/s and HBM bandwidth used below, the
  ``nvidia-smi`` line where there is one;
* ``opd_step`` (a): ``bench_opd_step.py``, bf16 compute with fp32 master weights, at the Qwen3-0.6B and 1.7B
  shapes, response 1024 and 4096, attention xla and cudnn, remat ``full`` (the policy the torch path also
  has), plus 1.7B / 4096 / cudnn with remat ``dots`` for the MFU target: tokens/s, MFU, peak memory. One
  process per configuration, the most important first, so a part that runs out of time keeps what it did;
* ``torch_reference`` (b): ``bench_torch_reference.py`` (sdpa, bf16 autocast) at the same shapes when torch is
  importable ("skipped: torch not installed" otherwise);
* ``compare`` (b): ``bench_compare.py``: jopd / torch tokens/s per matching configuration;
* ``decode`` (c): ``bench_core.py``'s generate part at batch 1 / 16 / 64 (bf16 parameters and cache) and its
  fraction of the HBM-bandwidth limit (``bench_core.decode_bytes_per_step``);
* ``tiny_pipeline`` (d): ``python -m jopd.main --config configs/tiny.yaml`` end to end on the device: wall time
  and exit status.

Targets printed next to the figures: jopd >= 1.5x the torch path; >= 50% MFU at 1.7B / 4k in bf16; decode at
batch 64 within 1.5x of the bandwidth limit. ``--small`` forces the CPU (``JAX_PLATFORMS=cpu``, no CUDA for
torch), uses the ``small`` preset at short lengths with one timed step, and shortens tiny.yaml with overrides;
it checks that every part works, its figures mean nothing.

Writes ``OUT_DIR/device_check.json`` (every part: status, wall time, limit, commands, rows) and
``OUT_DIR/device_check.md`` (one table, a row per part and per measured configuration); each part's own JSON
and logs are kept under ``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_opd_step import fmt, is_oom, write_json  # noqa: E402 - shared helpers next to this script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PY = sys.executable

TARGETS = {
    "compare": "jopd >= 1.5x the torch path (tokens/s, same shape)",
    "opd_step": ">= 50% MFU at 1.7B / 4k in bf16",
    "decode": "decode at batch 64 within 1.5x of the HBM-bandwidth limit",
}
TARGET_RATIO, TARGET_MFU_PCT, TARGET_DECODE_SLACK = 1.5, 50.0, 1.5
TORCH_POLICIES = ("none", "full")  # the remat policies bench_torch_reference.py has (its TORCH_REMAT)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """One configuration of the OPD-step sweeps (batch, prompt and dtype come from the plan)."""

    preset: str
    response: int
    attention: str
    remat: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one device check runs, and each part's time limit in seconds."""

    steps: tuple[StepConfig, ...]  # jopd configurations, most important first
    batch: int
    prompt: int
    dtype: str
    timed_steps: int
    warmup: int
    mfu_target: tuple[str, int]  # (preset, response) whose rows are held to the MFU target
    decode: tuple[str, ...]  # bench_core.py arguments
    tiny_overrides: tuple[str, ...]
    limits: dict[str, int]
    child_env: dict[str, str]  # added to every subprocess's environment
    smoke: bool  # CPU smoke run: the figures and target verdicts are no measurement


def _full_steps() -> tuple[StepConfig, ...]:
    first = StepConfig("1.7b", 4096, "cudnn", "dots")
    rest = [StepConfig(p, r, a, "full") for p in ("1.7b", "0.6b") for r in (4096, 1024) for a in ("cudnn", "xla")]
    return (first, *rest)


# Budget on one H100: opd_step ~9 x 20 s, torch ~4 x 15 s, decode ~40 s, tiny.yaml ~100 s; the limits sum to
# 470 s so the whole check ends within 8 minutes even when every part runs to its limit.
FULL = Plan(
    steps=_full_steps(), batch=4, prompt=256, dtype="bfloat16", timed_steps=2, warmup=1,
    mfu_target=("1.7b", 4096),
    decode=("--preset", "1.7b", "--dtype", "bfloat16", "--param-dtype", "bfloat16", "--prompt-len", "256",
            "--new-tokens", "128", "--gen-batches", "1", "16", "64", "--repeats", "1"),
    tiny_overrides=(),
    limits={"env": 20, "opd_step": 180, "torch_reference": 75, "compare": 15, "decode": 60, "tiny_pipeline": 120},
    child_env={},
    smoke=False,
)
SMALL = Plan(
    steps=(StepConfig("small", 32, "xla", "dots"), StepConfig("small", 32, "xla", "full")),
    batch=2, prompt=16, dtype="bfloat16", timed_steps=1, warmup=1,
    mfu_target=("1.7b", 4096),
    decode=("--preset", "small", "--dtype", "bfloat16", "--param-dtype", "bfloat16", "--prompt-len", "16",
            "--new-tokens", "8", "--gen-batches", "1", "16", "64", "--repeats", "1"),
    tiny_overrides=("opd.steps=2", "opd.checkpoint_every=2", "opd.eval_every=2", "sft.steps=10",
                    "teachers.A.pretrain.steps=10", "teachers.B.pretrain.steps=10", "task.num_eval_prompts=4",
                    "eval.max_new_tokens=8"),
    limits={"env": 60, "opd_step": 120, "torch_reference": 60, "compare": 30, "decode": 90, "tiny_pipeline": 180},
    child_env={"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""},
    smoke=True,
)
TITLES = {"env": "e. environment", "opd_step": "a. jopd OPD step", "torch_reference": "b. torch reference",
          "compare": "b. jopd / torch", "decode": "c. decode vs HBM limit", "tiny_pipeline": "d. tiny.yaml end to end"}


@dataclasses.dataclass
class Run:
    """One subprocess of a part."""

    command: list[str]
    log: str
    status: str = "not run"
    rc: int | None = None
    wall_s: float = 0.0


@dataclasses.dataclass
class Part:
    name: str
    limit_s: int
    status: str = "not run"
    wall_s: float = 0.0
    runs: list[Run] = dataclasses.field(default_factory=list)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one per measured configuration
    summary: str = ""  # the part's figures in one line
    target: str = ""  # "met" / "missed" / why not evaluated, for parts with a target
    started: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    def remaining(self) -> float:
        return self.limit_s - (time.perf_counter() - self.started)

    def record(self) -> dict[str, Any]:
        return dict(title=TITLES[self.name], status=self.status, wall_s=self.wall_s, limit_s=self.limit_s,
                    summary=self.summary, target=self.target, runs=[dataclasses.asdict(r) for r in self.runs],
                    rows=self.rows)


def run_command(command: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> Run:
    """Run ``command`` in ROOT with output to ``log``; kill its whole process group after ``timeout_s``."""
    run = Run(command=command, log=str(log))
    if timeout_s < 1:
        run.status = "not run: part time limit reached"
        return run
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            run.rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    run.wall_s = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if run.rc is None:
        run.status = f"timeout ({timeout_s:.0f} s)"
    elif run.rc == 0:
        run.status = "ok"
    else:
        run.status = "oom" if is_oom(RuntimeError(text[-20000:])) else f"error (exit {run.rc})"
    print(f"  [{run.status}] {run.wall_s:6.1f} s  {' '.join(command[1:])[:150]}", flush=True)
    return run


def _load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _tally(rows: list[dict[str, Any]]) -> str:
    """Part status from its rows: "ok", or e.g. "partial: 7 ok, 1 oom", or "failed: 2 timeout"."""
    counts: dict[str, int] = {}
    for row in rows:
        status = row["status"].split(" (")[0].split(":")[0]  # "timeout (40 s)" -> "timeout"
        counts[status] = counts.get(status, 0) + 1
    if counts.keys() == {"ok"}:
        return "ok"
    text = ", ".join(f"{n} {s}" for s, n in counts.items())
    return f"partial: {text}" if "ok" in counts else f"failed: {text}"


# ---------------------------------------------------------------------------------------------------------
# the parts
# ---------------------------------------------------------------------------------------------------------
def environment_json() -> dict[str, Any]:
    """(child process) The environment record; initialises the jax backend, so never in the parent."""
    from bench_opd_step import _version, env_info, hbm_bandwidth, peak_flops

    env = env_info("jax")
    env["jaxlib"] = _version("jaxlib")
    env["peak_flops"], env["peak_flops_source"] = peak_flops(env["device_kind"], env["platform"], 50.0)
    env["hbm_bandwidth"], env["hbm_bandwidth_source"] = hbm_bandwidth(env["device_kind"])
    return env


def nvidia_smi() -> str:
    """The GPU's name, driver, memory and power limit from nvidia-smi, or why there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi not found"
    try:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "nvidia-smi timed out"
    return q.stdout.strip() or q.stderr.strip()


def part_env(part: Part, out: Path, env: dict[str, str]) -> None:
    path = out / "env.json"
    run = run_command([PY, str(Path(__file__).resolve()), "--env-json", str(path)], out / "logs" / "env.log",
                      part.remaining(), env)
    part.runs.append(run)
    part.status = run.status
    if run.status != "ok":
        return
    info = _load(path)
    info["nvidia_smi"] = nvidia_smi()
    part.rows.append(info)
    part.summary = (f"{info['device_kind']} ({info['platform']} x{info['device_count']}); jax {info['jax']}, "
                    f"jaxlib {info['jaxlib']}, torch {info['torch']}; peak: {info['peak_flops_source']}; "
                    f"HBM: {info['hbm_bandwidth_source']}; nvidia-smi: {info['nvidia_smi']}")


def _merge(part: Part, out: Path, name: str, specs: list[dict[str, Any]], runs: list[Run],
           files: list[Path]) -> Path:
    """Join the per-configuration JSON files of a sweep into ``out/name.json`` (rows of runs that died carry
    the run's status) and fill ``part.rows``."""
    payload: dict[str, Any] = {}
    for spec, run, path in zip(specs, runs, files):
        if run.status == "ok":
            result = _load(path)
            payload = payload or {k: v for k, v in result.items() if k != "rows"}
            part.rows += result["rows"]
        else:
            part.rows.append(dict(spec, seq=spec["prompt"] + spec["response"], status=run.status, log=run.log))
    merged = out / f"{name}.json"
    payload["rows"] = part.rows
    with open(merged, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    return merged


def part_opd_step(part: Part, out: Path, env: dict[str, str], plan: Plan) -> None:
    (out / "opd_step").mkdir(exist_ok=True)
    specs, files = [], []
    for i, c in enumerate(plan.steps):
        spec = dict(preset=c.preset, batch=plan.batch, prompt=plan.prompt, response=c.response,
                    attention=c.attention, remat=c.remat, head="fused", dtype=plan.dtype)
        path = out / "opd_step" / f"{i:02d}.json"
        cmd = [PY, str(SCRIPTS / "bench_opd_step.py"), "--preset", c.preset, "--batch-size", str(plan.batch),
               "--prompt-len", str(plan.prompt), "--response-lens", str(c.response), "--attention", c.attention,
               "--remat", c.remat, "--head", "fused", "--dtype", plan.dtype, "--steps", str(plan.timed_steps),
               "--warmup", str(plan.warmup), "--out", str(path)]
        part.runs.append(run_command(cmd, out / "logs" / f"opd_step_{i:02d}.log", part.remaining(), env))
        specs.append(spec)
        files.append(path)
    _merge(part, out, "opd_step", specs, part.runs, files)
    part.status = _tally(part.rows)
    preset, response = plan.mfu_target
    best = [r["mfu_pct"] for r in part.rows
            if r["status"] == "ok" and (r["preset"], r["response"]) == (preset, response)]
    part.target = (f"best {max(best):.1f}% MFU at {preset} / R={response}: "
                   f"{'met' if max(best) >= TARGET_MFU_PCT else 'missed'}" if best
                   else f"not measured (no {preset} / R={response} row ran)")
    ok = [r for r in part.rows if r["status"] == "ok"]
    part.summary = f"{len(ok)} of {len(part.rows)} configurations ran"


def part_torch(part: Part, out: Path, env: dict[str, str], plan: Plan) -> Path | None:
    shapes = list(dict.fromkeys((c.preset, c.response, c.remat) for c in plan.steps if c.remat in TORCH_POLICIES))
    specs = [dict(preset=p, batch=plan.batch, prompt=plan.prompt, response=r, remat=m, dtype=plan.dtype,
                  attn="sdpa") for p, r, m in shapes]
    if importlib.util.find_spec("torch") is None:
        part.status = "skipped: torch not installed"
    elif not plan.smoke:  # a CPU-only torch next to CUDA jax would time out at these shapes
        probe = run_command([PY, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"],
                            out / "logs" / "torch_cuda_probe.log", part.remaining(), env)
        part.runs.append(probe)
        if probe.status != "ok":
            part.status = "skipped: torch has no CUDA device" if probe.rc == 3 else f"torch probe: {probe.status}"
    if part.status.startswith(("skipped", "torch probe")):
        part.rows = [dict(s, seq=s["prompt"] + s["response"], status=part.status) for s in specs]
        return None
    (out / "torch_reference").mkdir(exist_ok=True)
    files = []
    for i, s in enumerate(specs):
        path = out / "torch_reference" / f"{i:02d}.json"
        cmd = [PY, str(SCRIPTS / "bench_torch_reference.py"), "--preset", s["preset"], "--batch-size",
               str(plan.batch), "--prompt-len", str(plan.prompt), "--response-lens", str(s["response"]),
               "--remat", s["remat"], "--attn", "sdpa", "--dtype", plan.dtype, "--steps", str(plan.timed_steps),
               "--warmup", str(plan.warmup), "--out", str(path)]
        part.runs.append(run_command(cmd, out / "logs" / f"torch_reference_{i:02d}.log", part.remaining(), env))
        files.append(path)
    merged = _merge(part, out, "torch_reference", specs, part.runs, files)
    part.status = _tally(part.rows)
    ok = [r for r in part.rows if r["status"] == "ok"]
    part.summary = f"{len(ok)} of {len(part.rows)} configurations ran"
    return merged if ok else None


def part_compare(part: Part, out: Path, env: dict[str, str], jopd: Path, torch_file: Path | None,
                 torch_status: str) -> None:
    if torch_file is None:
        part.status = (torch_status if torch_status.startswith("skipped")
                       else f"skipped: no torch rows ({torch_status})")
        part.target = "not measured"
        return
    path = out / "compare.json"
    cmd = [PY, str(SCRIPTS / "bench_compare.py"), "--jopd", str(jopd), "--torch", str(torch_file), "--out", str(path)]
    run = run_command(cmd, out / "logs" / "compare.log", part.remaining(), env)
    part.runs.append(run)
    part.status = run.status
    if run.status != "ok":
        return
    part.rows = [dict(r, status="ok") for r in _load(path)["rows"]]
    if not part.rows:
        part.status, part.target = "failed: no matching configurations", "not measured"
        return
    worst = min(r["ratio"] for r in part.rows)
    part.summary = f"{len(part.rows)} matching configurations, jopd / torch {worst:.2f}x to " \
                   f"{max(r['ratio'] for r in part.rows):.2f}x"
    part.target = f"lowest {worst:.2f}x: {'met' if worst >= TARGET_RATIO else 'missed'}"


def part_decode(part: Part, out: Path, env: dict[str, str], plan: Plan) -> None:
    path = out / "core.json"
    cmd = [PY, str(SCRIPTS / "bench_core.py"), *plan.decode, "--skip", "logprobs", "memory", "--out", str(path)]
    run = run_command(cmd, out / "logs" / "decode.log", part.remaining(), env)
    part.runs.append(run)
    part.status = run.status
    if run.status != "ok":
        part.target = "not measured"
        return
    result = _load(path)
    part.rows = [dict(r, preset=result["preset"], status="ok") for r in result["rows"] if r["section"] == "generate"]
    part.summary = f"{result['preset']}, params {result['param_dtype']}; HBM: {result['hbm_bandwidth_source']}"
    b64 = [r for r in part.rows if r["batch"] == 64]
    if not b64:
        part.target = "not measured (no batch 64 row)"
    elif b64[0]["fraction_of_hbm_limit"] != b64[0]["fraction_of_hbm_limit"]:  # NaN: unknown bandwidth
        part.target = "unknown device: no bandwidth limit"
    else:
        slack = 1.0 / b64[0]["fraction_of_hbm_limit"]
        part.target = f"batch 64 at {slack:.2f}x below the limit: {'met' if slack <= TARGET_DECODE_SLACK else 'missed'}"


def part_tiny(part: Part, out: Path, env: dict[str, str], plan: Plan) -> None:
    cmd = [PY, "-m", "jopd.main", "--config", "configs/tiny.yaml", "--run-dir", str(out / "tiny_run"),
           *plan.tiny_overrides]
    run = run_command(cmd, out / "logs" / "tiny_pipeline.log", part.remaining(), env)
    part.runs.append(run)
    part.status = run.status
    part.rows = [dict(config="configs/tiny.yaml" + (" " + " ".join(plan.tiny_overrides) if plan.tiny_overrides
                                                    else ""), status=run.status, exit_status=run.rc,
                      wall_s=run.wall_s)]
    part.summary = f"exit status {run.rc}, {run.wall_s:.1f} s"


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def _step_config(r: dict[str, Any]) -> str:
    extra = f" {r['attention']} head={r.get('head')}" if "attention" in r else f" {r.get('attn', '')}"
    return f"{r['preset']} B={r['batch']} S={r['prompt']}+{r['response']} remat={r['remat']}{extra} {r['dtype']}"


def _step_result(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return ""
    return (f"{fmt(r['tokens_per_s'])} tok/s, {fmt(r['step_s'])} s/step, MFU {fmt(r['mfu_pct'])}%, "
            f"peak {fmt(r['peak_gib'])} GiB ({r['peak_source']})")


def detail_lines(part: Part, plan: Plan) -> list[tuple[str, str, str, str]]:
    """(status, configuration, result, target) per measured configuration of a part."""
    lines = []
    for r in part.rows:
        if part.name in ("opd_step", "torch_reference"):
            target = ""
            if part.name == "opd_step" and (r["preset"], r["response"]) == plan.mfu_target and r["status"] == "ok":
                target = f">= {TARGET_MFU_PCT:g}% MFU: {'met' if r['mfu_pct'] >= TARGET_MFU_PCT else 'missed'}"
            lines.append((r["status"], _step_config(r), _step_result(r) or r.get("note", ""), target))
        elif part.name == "compare":
            lines.append(("ok", _step_config(dict(r, prompt=r["seq"] - r["response"])),
                          f"jopd {fmt(r['jopd_tok_s'])} / torch {fmt(r['torch_tok_s'])} tok/s = {r['ratio']:.2f}x",
                          f">= {TARGET_RATIO:g}x: {'met' if r['ratio'] >= TARGET_RATIO else 'missed'}"))
        elif part.name == "decode":
            frac = r["fraction_of_hbm_limit"]
            target = ""
            if r["batch"] == 64 and frac == frac:
                target = f"within {TARGET_DECODE_SLACK:g}x: {'met' if 1 / frac <= TARGET_DECODE_SLACK else 'missed'}"
            lines.append(("ok", f"{r['preset']} B={r['batch']} P={r['prompt_len']} new={r['new_tokens']}",
                          f"decode {fmt(r['decode_tokens_per_s'])} tok/s, limit {fmt(r['hbm_limit_tokens_per_s'])} "
                          f"tok/s ({fmt(100 * frac)}% of it)", target))
    return lines


def markdown(parts: list[Part], plan: Plan, mode: str, env_row: dict[str, Any] | None, wall_s: float) -> str:
    device = f"{env_row['device_kind']} ({env_row['platform']})" if env_row else "unknown (env part failed)"
    smoke = (" **--small: a CPU smoke run at tiny shapes; its figures and target verdicts are no measurement.**"
             if plan.smoke else "")
    out = [f"# Device check ({mode})", "",
           f"Device: {device}; {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; "
           f"total {wall_s:.0f} s. Targets: {'; '.join(TARGETS.values())}.{smoke}", "",
           "| part | status | configuration | result | target | wall s |", "| --- | --- | --- | --- | --- | --- |"]

    def cell(text: str) -> str:
        return text.replace("|", "/").replace("\n", " ")

    for p in parts:
        out.append(f"| **{TITLES[p.name]}** | {cell(p.status)} | (part, limit {p.limit_s} s) | {cell(p.summary)} | "
                   f"{cell(p.target)} | {p.wall_s:.1f} |")
        for status, config, result, target in detail_lines(p, plan):
            out.append(f"| {TITLES[p.name]} | {cell(status)} | {cell(config)} | {cell(result)} | {cell(target)} | |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", help="directory for device_check.json / .md, logs and part outputs")
    ap.add_argument("--small", action="store_true", help="the same parts at tiny shapes on CPU (~2-3 minutes)")
    ap.add_argument("--env-json", help=argparse.SUPPRESS)  # child mode of the env part
    args = ap.parse_args(argv)
    if args.env_json:
        write_json(args.env_json, environment_json())
        return 0
    if not args.out_dir:
        ap.error("OUT_DIR is required")

    plan, mode = (SMALL, "small, CPU") if args.small else (FULL, "full")
    out = Path(args.out_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **plan.child_env, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t_start = time.perf_counter()
    print(f"device check ({mode}) -> {out}; part limits {plan.limits} (sum {sum(plan.limits.values())} s)")

    parts: list[Part] = []

    def start(name: str) -> Part:
        print(f"{TITLES[name]} (limit {plan.limits[name]} s)", flush=True)
        part = Part(name=name, limit_s=plan.limits[name])
        parts.append(part)
        return part

    def finish(part: Part) -> None:
        part.wall_s = time.perf_counter() - part.started
        print(f"  -> {part.status}  {part.summary}  {part.target}".rstrip(), flush=True)

    p = start("env")
    part_env(p, out, env)
    finish(p)
    env_row = p.rows[0] if p.rows else None
    p = start("opd_step")
    part_opd_step(p, out, env, plan)
    finish(p)
    p = start("torch_reference")
    torch_file = part_torch(p, out, env, plan)
    finish(p)
    torch_status = p.status
    p = start("compare")
    part_compare(p, out, env, out / "opd_step.json", torch_file, torch_status)
    finish(p)
    p = start("decode")
    part_decode(p, out, env, plan)
    finish(p)
    p = start("tiny_pipeline")
    part_tiny(p, out, env, plan)
    finish(p)

    wall_s = time.perf_counter() - t_start
    payload = {"benchmark": "device_check", "mode": mode, "out_dir": str(out), "wall_s": wall_s,
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "env": env_row, "targets": TARGETS, "plan": dataclasses.asdict(plan),
               "parts": {p.name: p.record() for p in parts}}
    write_json(str(out / "device_check.json"), payload)
    text = markdown(parts, plan, mode, env_row, wall_s)
    (out / "device_check.md").write_text(text)
    print(f"wrote {out / 'device_check.md'}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
