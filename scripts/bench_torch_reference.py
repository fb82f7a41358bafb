"""Benchmark: the OPD step as it is commonly written today in PyTorch / transformers (the baseline for jopd).

Same Qwen3-shaped random models, shapes, dtypes and loss as ``bench_opd_step.py``, written the way slime /
verl-style trainers do it:

1. ``AutoModelForCausalLM.from_config(Qwen3Config(...))`` with ``eager`` or ``sdpa`` attention;
2. a separate ``torch.no_grad()`` forward for the "old" log-probs;
3. a forward with grad: full ``[B, T, V]`` logits -> fp32 ``log_softmax`` -> ``gather``;
4. the clipped PPO surrogate with ``A = teacher_lp - old_lp`` (eps 0.2), seq-mean or token-mean aggregation;
5. ``clip_grad_norm_(1.0)`` and an ``AdamW`` step (betas 0.9/0.98, eps 1e-8, no weight decay, as jopd).

bf16 (``--dtype bfloat16``) is mixed precision like jopd: fp32 parameters and optimizer state, bf16 compute
under ``torch.autocast``. ``--remat full`` uses ``gradient_checkpointing_enable()`` (``none``: off; ``dots``
has no counterpart in this path and its rows are recorded as skipped). Timing: median of ``--steps``
steps after ``--warmup``, synchronised on GPU. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on
CPU the process's peak RSS (``ru_maxrss``, includes the Python runtime; a rough number).

Compare with jopd afterwards: ``python scripts/bench_compare.py`` (reads both JSON files).

Examples::

    python scripts/bench_torch_reference.py --small
    python scripts/bench_torch_reference.py --preset 11m
    python scripts/bench_torch_reference.py --preset 1.7b --dtype bfloat16 --attn sdpa --response-lens 1024 4096
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_opd_step import (  # noqa: E402 - the shared helpers live next to this script
    MFU_FORMULA,
    PRESETS,
    add_sweep_args,
    env_info,
    fmt,
    is_oom,
    peak_flops,
    print_table,
    sweep_settings,
    total_params,
    train_flops,
    write_json,
)

# jopd remat policy -> gradient checkpointing on/off; a policy missing here has no torch counterpart.
TORCH_REMAT = {"none": False, "full": True}


def build_model(preset: str, attn: str, checkpointing: bool, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen3Config

    d = PRESETS[preset]
    cfg = Qwen3Config(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                      intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_layers"],
                      num_attention_heads=d["num_heads"], num_key_value_heads=d["num_kv_heads"],
                      head_dim=d["head_dim"], tie_word_embeddings=d["tie_word_embeddings"],
                      max_position_embeddings=1 << 16, use_cache=False)
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def token_logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` log p(tokens[:, t+1] | tokens[:, :t+1]) through full fp32 logits (the usual way)."""
    logits = model(input_ids=tokens, use_cache=False).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def opd_loss(lp, old_lp, teacher_lp, mask, aggregation: str, eps: float = 0.2) -> torch.Tensor:
    """Clipped PPO surrogate with A = teacher - old; mask 1 on response tokens (all ``[B, T-1]``)."""
    adv = (teacher_lp - old_lp).detach()
    ratio = torch.exp(lp - old_lp)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    if aggregation == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    n_tok = mask.sum(-1)
    seq_mean = (per_token * mask).sum(-1) / n_tok.clamp(min=1)
    return seq_mean.sum() / (n_tok > 0).sum().clamp(min=1)


def make_batch(gen: torch.Generator, batch: int, prompt: int, response: int, vocab: int, device):
    seq = prompt + response
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.long)
    mask = torch.zeros(batch, seq)
    mask[:, prompt:] = 1
    teacher = -4.0 * torch.rand(batch, seq, generator=gen) * mask
    # Shift to the [B, T-1] "predicts token t+1" layout used by the loss.
    return tokens.to(device), mask[:, 1:].to(device), teacher[:, 1:].to(device)


def run_one(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    b, p, r = spec["batch"], spec["prompt"], spec["response"]
    seq = p + r
    row = dict(spec, seq=seq, tokens_per_step=b * seq, params=total_params(PRESETS[spec["preset"]]))
    model = build_model(spec["preset"], spec["attn"], TORCH_REMAT[spec["remat"]], device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    tokens, mask, teacher = make_batch(torch.Generator().manual_seed(0), b, p, r,
                                       PRESETS[spec["preset"]]["vocab_size"], device)
    cuda = device.type == "cuda"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec["dtype"] == "bfloat16"
                else contextlib.nullcontext())

    def step() -> float:
        with autocast:
            if spec["detach_old"]:
                lp = token_logprobs(model, tokens)
                old = lp.detach()
            else:
                with torch.no_grad():
                    old = token_logprobs(model, tokens)
                lp = token_logprobs(model, tokens)
            loss = opd_loss(lp, old, teacher, mask, spec["aggregation"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        loss = step()  # float() synchronises
        if cuda:
            torch.cuda.synchronize()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    if cuda:
        row.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_source="cuda.max_memory_allocated")
    else:
        row.update(peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   peak_source="process ru_maxrss")
    step_s = statistics.median(times)
    flops = train_flops(PRESETS[spec["preset"]], b, seq)
    row.update(step_s=step_s, step_min_s=min(times), step_times_s=times, tokens_per_s=b * seq / step_s,
               tokens_per_s_best=b * seq / min(times), flops_per_step=flops["total"],
               achieved_tflops=flops["total"] / step_s / 1e12, loss=loss, status="ok")
    return row


COLUMNS = [("preset", "model"), ("params", "params"), ("batch", "B"), ("seq", "S=P+R"), ("remat", "remat"),
           ("dtype", "dtype"), ("attn", "attn"), ("old_pass", "old log-probs"), ("status", "status"),
           ("step_s", "step s"), ("tokens_per_s", "tok/s"), ("tokens_per_s_best", "best tok/s"),
           ("achieved_tflops", "TFLOP/s"), ("mfu_pct", "MFU %"),
           ("peak_gib", "peak GiB"), ("peak_source", "mem source")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(ap)
    ap.add_argument("--attn", choices=("eager", "sdpa"), default="sdpa")
    ap.add_argument("--detach-old", action="store_true",
                    help="ablation: old = lp.detach() (one forward) instead of a separate no_grad forward")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own, = cores); 1 is more robust on a shared CPU")
    ap.add_argument("--out", default="bench_results/torch_reference.json")
    args = ap.parse_args(argv)

    shapes, remats, n_steps = sweep_settings(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = env_info("torch")
    peak, peak_source = peak_flops(env["device_kind"], env["platform"], args.cpu_peak_gflops)
    print(f"device: {env['device_kind']} ({env['platform']}), torch {env['torch']}, peak for MFU: {peak_source}")

    rows = []
    for shape in shapes:
        for remat in remats:
            spec = dict(preset=shape.preset, batch=shape.batch, prompt=shape.prompt, response=shape.response,
                        remat=remat, dtype=args.dtype, attn=args.attn, aggregation=args.aggregation,
                        detach_old=args.detach_old, old_pass="detach" if args.detach_old else "no_grad fwd",
                        steps=n_steps, warmup=args.warmup)
            if remat not in TORCH_REMAT:
                row = dict(spec, seq=shape.prompt + shape.response, params=total_params(PRESETS[shape.preset]),
                           status="skipped",
                           note=f"remat {remat!r}: no such policy in the torch path (only none / full)")
            else:
                try:
                    row = run_one(spec, device)  # model and optimizer are freed when it returns
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    row["mfu_pct"] = 100.0 * row["flops_per_step"] / row["step_s"] / peak
                    row["peak_gib"] = row["peak_bytes"] / 2**30
                except Exception as e:  # noqa: BLE001 - an OOM configuration must not stop the sweep
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    row = dict(spec, seq=shape.prompt + shape.response, status="oom" if is_oom(e) else "error",
                               error=f"{type(e).__name__}: {str(e)[:500]}")
            rows.append(row)
            print(f"  done {shape.preset} R={shape.response} remat={remat}: {row['status']} "
                  f"{fmt(row.get('step_s', float('nan')))} s/step {row.get('note', '')}", flush=True)
    print()
    print_table(rows, COLUMNS)
    payload = {"benchmark": "opd_step", "framework": "torch", "env": env, "peak_flops": peak,
               "peak_flops_source": peak_source, "mfu_formula": MFU_FORMULA,
               "tokens_per_s_definition": "batch * (prompt + response) / median step time (best: fastest step)",
               "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
