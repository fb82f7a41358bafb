#!/usr/bin/env python
"""Write reference outputs computed with transformers (torch, float32, eager attention) to tests/fixtures/.

    python scripts/make_reference_fixtures.py [--out tests/fixtures] [--smollm2 .cache/smollm2-135m-instruct]
    python scripts/make_reference_fixtures.py --verify-only [--smollm2 DIR]   # recompute + compare, write nothing

For every tiny case it writes an HF directory ``hf/<case>/`` (config.json, generation_config.json,
model.safetensors; no tokenizer) and ``ref/<case>.npz``; with ``--smollm2 DIR`` also ``ref/smollm2.npz``.
After writing, everything is reloaded from disk and recomputed; logprobs and greedy tokens must match
the npz bit-for-bit. Output is deterministic: same script + same library versions -> same bytes
(torch runs single-threaded with deterministic algorithms; npz files are written with fixed zip
timestamps).

npz keys (all arrays, no pickles; load with ``np.load(path)``):
    tokens            int32   [4, T]    right-padded with 0 (tiny cases: T=24, row lengths 24, 17, 9, 2)
    mask              int32   [4, T]    1 = real token
    logprobs          float32 [4, T]    logprobs[:, t] = log_softmax(logits[:, t-1])[tokens[:, t]];
                                        0 at t = 0 and where mask == 0 (forward run with attention_mask=mask)
    gen_prompts       int32   [3, P]    greedy-generation prompts, right-padded with 0 (P = longest prompt)
    gen_prompt_lens   int32   [3]       real length of each prompt (gen_prompts[i, :gen_prompt_lens[i]])
    gen_tokens        int32   [3, 32]   greedy new tokens, each prompt run alone (batch 1, no padding), eos disabled
    gen_logits_margin float32 [3, 32]   top1 - top2 logit at each generated step (skip/stop comparing at ties)
    gen_logprobs      float32 [3, 32]   log_softmax(logits)[gen_token] at each generated step
    seed              int64   []        tiny cases only: seed actually used (first seed >= base whose greedy
                                        margins and MoE router top-k gaps are all >= 2e-3, so all 32 tokens
                                        can be compared; the smollm2 margins are whatever they are)
    smollm2.npz only:
    texts             <U str  [4]       the 3 user messages + the plain text that make up the rows of `tokens`
                                        (rows 0-2 = chat template with add_generation_prompt=True; row 3 = plain)
    (the 3 gen prompts of smollm2 are the 3 chat rows of `tokens`)

config.json fields written by transformers 5.24 (``to_json_string`` of the configs built below):
  common to all: architectures, dtype ("float32"), model_type, vocab_size, hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_act ("silu"), rms_norm_eps,
    max_position_embeddings, initializer_range, attention_dropout, tie_word_embeddings (always written,
    true/false; the config-class default when absent is false for all four types), use_cache,
    bos/eos/pad_token_id (null here), transformers_version.
  RoPE: there is NO top-level "rope_theta" and NO "rope_scaling" any more; both live in
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0} or, for llama3 scaling,
    {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}. (Hub checkpoints written by
    transformers 4.x use top-level "rope_theta" + "rope_scaling" {"rope_type"|"type", ...}: readers should
    accept both spellings; transformers 4.x itself silently ignores "rope_parameters".)
  llama:     + head_dim (always written, = hidden/heads unless given), attention_bias, mlp_bias,
               pretraining_tp. No layer_types / sliding_window.
  qwen2:     NO head_dim (derive hidden/heads), NO attention_bias (q/k/v always have bias, o_proj none);
               + layer_types (["full_attention", ...]), sliding_window (null), use_sliding_window (false),
               max_window_layers (28).
  qwen3:     + head_dim (explicit, may differ from hidden/heads; if absent the Qwen3Config default is 128,
               NOT hidden/heads), attention_bias (false), layer_types, sliding_window (null),
               use_sliding_window (false), max_window_layers. q_norm/k_norm are implied by model_type
               (RMSNorm over head_dim, weights [head_dim], applied per head before RoPE).
  qwen3_moe: + head_dim (only written when passed; we pass 16 = hidden/heads), attention_bias,
               decoder_sparse_step, mlp_only_layers ([]), moe_intermediate_size, norm_topk_prob,
               num_experts_per_tok, "num_local_experts" (!! the expert count is written under this name,
               hub checkpoints use "num_experts"), output_router_logits, router_aux_loss_coef,
               sliding_window (null), use_sliding_window (false); NO layer_types, NO max_window_layers.
               intermediate_size is still written (dense MLP size for mlp_only_layers).
  Safetensors keys: tied models have no lm_head.weight; MoE experts are saved in the per-expert hub layout
  model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight + model.layers.{i}.mlp.gate.weight [E, H]
  (transformers 5 fuses them to 3-D tensors in memory but reverts on save).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
import zipfile

import numpy as np

SEED = 1234
B, T = 4, 24
ROW_LENS = (24, 17, 9, 2)
GEN_PROMPT_LENS = (3, 7, 12)
MAX_NEW = 32
MIN_MARGIN = 2e-3  # min top1-top2 logit gap (and MoE router top-k gap) required of tiny cases
MAX_SEED_TRIES = 50
SMOL_USER_MESSAGES = (
    "What is 12 * 7?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
)
SMOL_PLAIN_TEXT = "The quick brown fox jumps over the lazy dog. 2 + 2 = 4."

COMMON = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
    "hidden_act": "silu",
}


def case_configs():
    """case name -> (config class name, kwargs)."""
    moe = dict(
        COMMON,
        vocab_size=320,
        num_hidden_layers=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=False,
        tie_word_embeddings=False,
    )
    return {
        "llama_tied": (
            "LlamaConfig",
            dict(COMMON, vocab_size=384, num_hidden_layers=3, tie_word_embeddings=True),
        ),
        "llama_untied_rope3": (
            "LlamaConfig",
            dict(
                COMMON,
                vocab_size=320,
                num_hidden_layers=2,
                tie_word_embeddings=False,
                rope_theta=500000.0,
                # original_max_position_embeddings=64 with head_dim 16 / theta 5e5 puts one frequency in each
                # llama3 regime: unchanged (wavelen 6.3 < 16), smoothed (32.3 in [16, 64]), divided by 8 (rest).
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
        ),
        "qwen2_bias": (
            "Qwen2Config",
            dict(COMMON, vocab_size=352, num_hidden_layers=2, tie_word_embeddings=False),
        ),
        "qwen3_qknorm": (
            "Qwen3Config",
            dict(COMMON, vocab_size=352, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False),
        ),
        "qwen3_moe": ("Qwen3MoeConfig", dict(moe, norm_topk_prob=True)),
        "qwen3_moe_nonorm": ("Qwen3MoeConfig", dict(moe, norm_topk_prob=False)),
    }


# ----------------------------------------------------------------------------------------------------------
# deterministic npz writing


def save_npz_deterministic(path: str, arrays: dict) -> None:
    """Like np.savez but with fixed zip timestamps/order, so identical arrays give identical bytes."""
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            arr = np.asarray(arrays[name])
            if arr.dtype == object:
                raise TypeError(f"{name}: object arrays are not allowed (need pickle to load)")
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# torch helpers (imported lazily so `--help` works without torch)


def _torch():
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return torch


def build_tiny_model(case: str, cls_name: str, kwargs: dict, seed: int):
    torch = _torch()
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = getattr(transformers, cls_name)(**kwargs)
    cfg.bos_token_id = None
    cfg.eos_token_id = None
    cfg.pad_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.eval()

    # Overwrite EVERY parameter with non-trivial random values (norms != 1, biases != 0, ...).
    gen = torch.Generator().manual_seed(seed + 1)
    seen = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
            if id(p) in seen:  # tied lm_head
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):  # input/post_attention/final norms, q_norm, k_norm
                val = 1.0 + 0.1 * noise
            elif name.endswith(".bias"):
                val = 0.1 * noise
            elif "embed_tokens" in name or "lm_head" in name:
                val = 0.3 * noise  # larger so that logits are peaked enough for robust greedy decoding
            elif name.endswith("mlp.gate.weight"):  # MoE router [E, H]
                val = 0.15 * noise
            else:
                val = 0.08 * noise
            p.copy_(val)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tie broken"
    # sanity: nothing left at a trivial value
    for name, p in model.named_parameters():
        v = p.detach()
        assert not torch.all(v == 1.0) and not torch.all(v == 0.0), f"{case}: {name} still trivial"
    return model


def check_llama3_rope(model) -> str:
    """Assert that llama3 scaling changes some (not all) frequencies and hits all three regimes."""
    torch = _torch()
    cfg = model.config
    rp = cfg.rope_parameters
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = rp["rope_theta"]
    inv_default = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv_scaled = model.model.rotary_emb.inv_freq.detach().float()
    ratio = (inv_default / inv_scaled).tolist()
    n_same = sum(abs(r - 1.0) < 1e-6 for r in ratio)
    n_full = sum(abs(r - rp["factor"]) < 1e-4 for r in ratio)
    n_smooth = len(ratio) - n_same - n_full
    assert not torch.allclose(inv_default, inv_scaled), "llama3 rope scaling had no effect"
    assert n_same >= 1 and n_full >= 1 and n_smooth >= 1, f"llama3 regimes not all exercised: {ratio}"
    return f"llama3 inv_freq ratios default/scaled: {[round(r, 3) for r in ratio]}"


def make_batch(vocab: int, rng: np.random.Generator):
    tokens = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.int32)
    for i, n in enumerate(ROW_LENS):
        tokens[i, :n] = rng.integers(1, vocab, size=n)
        mask[i, :n] = 1
    return tokens, mask


def pad_rows(rows, pad=0):
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, np.array([len(r) for r in rows], np.int32)


def compute_logprobs(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    torch = _torch()
    tok = torch.from_numpy(tokens.astype(np.int64))
    msk = torch.from_numpy(mask.astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=tok, attention_mask=msk).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tok[:, 1:, None])[..., 0]
    out = torch.zeros(tokens.shape, dtype=torch.float32)
    out[:, 1:] = lp * msk[:, 1:].float()
    out = out.numpy()
    out[mask == 0] = 0.0
    return out.astype(np.float32)


def greedy_generate(model, prompt: list[int]):
    """transformers greedy generate, batch 1, no padding, eos disabled. Returns (tokens, margins, logprobs)."""
    torch = _torch()
    from transformers import GenerationConfig

    model.generation_config.eos_token_id = None
    gcfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=MAX_NEW,
        min_new_tokens=MAX_NEW,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gcfg)
    new = out.sequences[0, len(prompt) :]
    assert new.shape[0] == MAX_NEW, f"generate produced {new.shape[0]} tokens, expected {MAX_NEW}"
    logits = torch.stack([x[0].float() for x in out.logits])  # [MAX_NEW, V] raw logits
    assert torch.equal(logits.argmax(-1), new), "generate output is not the argmax of its logits"
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).numpy().astype(np.float32)
    lps = torch.log_softmax(logits, -1).gather(-1, new[:, None])[:, 0].numpy().astype(np.float32)

    # cross-check against a cache-free full forward over prompt + generated tokens
    full = torch.cat([ids[0], new])[None]
    with torch.no_grad():
        flog = model(input_ids=full).logits[0, len(prompt) - 1 : -1].float()
    agree = flog.argmax(-1) == new
    assert bool(agree[torch.from_numpy(margins) > 1e-3].all()), "cached vs full-forward greedy disagree"
    return new.numpy().astype(np.int32), margins, lps


def generation_fields(model, prompts):
    gp, gl = pad_rows(prompts)
    toks, margins, lps = zip(*(greedy_generate(model, p) for p in prompts))
    return {
        "gen_prompts": gp,
        "gen_prompt_lens": gl,
        "gen_tokens": np.stack(toks).astype(np.int32),
        "gen_logits_margin": np.stack(margins).astype(np.float32),
        "gen_logprobs": np.stack(lps).astype(np.float32),
    }


def router_min_gap(model, tokens, mask):
    """Smallest gap between the k-th and (k+1)-th router logit over real tokens (MoE robustness)."""
    torch = _torch()
    gaps = []
    k = model.config.num_experts_per_tok
    bsz, seqlen = tokens.shape

    def hook(_mod, _inp, out):
        logits = out[0].float()
        s = logits.sort(dim=-1, descending=True).values
        gaps.append((s[:, k - 1] - s[:, k]).reshape(bsz, seqlen))

    hs = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(
                input_ids=torch.from_numpy(tokens.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
            )
    finally:
        for h in hs:
            h.remove()
    m = torch.from_numpy(mask).bool()
    return min(g[m].min().item() for g in gaps)


def robustness(model, ref) -> tuple[float, float]:
    """(min greedy logit margin, min MoE router top-k gap over the batch and all generated sequences)."""
    margin = float(ref["gen_logits_margin"].min())
    if not getattr(model.config, "num_experts", None):
        return margin, float("inf")
    gap = router_min_gap(model, ref["tokens"], ref["mask"])
    for i, n in enumerate(ref["gen_prompt_lens"]):
        seq = np.concatenate([ref["gen_prompts"][i, :n], ref["gen_tokens"][i]])[None]
        gap = min(gap, router_min_gap(model, seq, np.ones_like(seq)))
    return margin, gap


# ----------------------------------------------------------------------------------------------------------


def make_tiny_case(case, cls_name, kwargs, out_root, seed, verify_only):
    torch = _torch()
    from transformers import AutoModelForCausalLM

    hf_dir = os.path.join(out_root, "hf", case)
    npz_path = os.path.join(out_root, "ref", f"{case}.npz")
    notes = []
    if verify_only:
        model = None
        ref = dict(np.load(npz_path))
    else:
        # Deterministic search for a seed whose greedy decoding / MoE routing has no near-ties, so that a
        # float32 reimplementation (errors ~1e-5) can be compared on all 32 generated tokens.
        for attempt in range(MAX_SEED_TRIES):
            used_seed = seed + attempt
            model = build_tiny_model(case, cls_name, kwargs, used_seed)
            rng = np.random.default_rng(used_seed)
            tokens, mask = make_batch(model.config.vocab_size, rng)
            prompts = [rng.integers(1, model.config.vocab_size, size=n).tolist() for n in GEN_PROMPT_LENS]
            ref = {"tokens": tokens, "mask": mask, "logprobs": compute_logprobs(model, tokens, mask)}
            ref.update(generation_fields(model, prompts))
            margin, gap = robustness(model, ref)
            if margin >= MIN_MARGIN and gap >= MIN_MARGIN:
                break
        else:
            raise RuntimeError(f"{case}: no seed in {MAX_SEED_TRIES} tries without near-ties")
        ref["seed"] = np.array(used_seed, np.int64)
        if kwargs.get("rope_scaling"):
            notes.append(check_llama3_rope(model))
        notes.append(f"seed {used_seed} (attempt {attempt + 1}); min router top-k gap {gap:.2e}")
        if os.path.isdir(hf_dir):
            shutil.rmtree(hf_dir)
        model.save_pretrained(hf_dir, safe_serialization=True)
        save_npz_deterministic(npz_path, ref)

    # reload from disk and recompute: must be bit-identical
    re_model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    re_model.eval()
    lp = compute_logprobs(re_model, ref["tokens"], ref["mask"])
    assert np.array_equal(lp, ref["logprobs"]), (
        f"{case}: reloaded logprobs differ (max {np.abs(lp - ref['logprobs']).max()})"
    )
    prompts = [ref["gen_prompts"][i, :n].tolist() for i, n in enumerate(ref["gen_prompt_lens"])]
    g = generation_fields(re_model, prompts)
    for k in ("gen_tokens", "gen_logits_margin", "gen_logprobs"):
        assert np.array_equal(g[k], ref[k]), f"{case}: reloaded {k} differ"
    if model is not None:
        sd_a = {k: v for k, v in model.state_dict().items()}
        sd_b = re_model.state_dict()
        assert sd_a.keys() == sd_b.keys()
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a), f"{case}: reloaded weights differ"
    return ref, notes


def make_smollm2_case(smol_dir, out_root, verify_only):
    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    npz_path = os.path.join(out_root, "ref", "smollm2.npz")
    model = AutoModelForCausalLM.from_pretrained(smol_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(smol_dir)
    rows = []
    for msg in SMOL_USER_MESSAGES:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        rows.append([int(i) for i in ids])
    rows.append([int(i) for i in tok(SMOL_PLAIN_TEXT, add_special_tokens=False)["input_ids"]])
    tokens, lens = pad_rows(rows)
    mask = (np.arange(tokens.shape[1])[None, :] < lens[:, None]).astype(np.int32)
    ref = {
        "tokens": tokens,
        "mask": mask,
        "logprobs": compute_logprobs(model, tokens, mask),
        "texts": np.array([*SMOL_USER_MESSAGES, SMOL_PLAIN_TEXT]),
    }
    ref.update(generation_fields(model, rows[:3]))
    if verify_only:
        old = dict(np.load(npz_path))
        assert old.keys() == ref.keys(), (sorted(old), sorted(ref))
        for k, v in ref.items():
            assert np.array_equal(old[k], v), f"smollm2: {k} differs from {npz_path}"
    else:
        save_npz_deterministic(npz_path, ref)
    decoded = [tok.decode(t) for t in ref["gen_tokens"]]
    return ref, [f"reply {i}: {d!r}" for i, d in enumerate(decoded)]


def summarize(case, ref, notes, secs):
    m = ref["gen_logits_margin"]
    lp = ref["logprobs"][ref["mask"].astype(bool)]
    lp = lp[lp != 0]
    print(
        f"{case:<20} tokens{list(ref['tokens'].shape)!s:<9} real={int(ref['mask'].sum()):>4} "
        f"mean_lp={lp.mean():8.4f} gen{list(ref['gen_tokens'].shape)!s:<8} "
        f"min_margin={m.min():.2e} n(<1e-3)={int((m < 1e-3).sum())} {secs:5.1f}s"
    )
    for n in notes:
        print(f"{'':<22}{n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    ap.add_argument("--smollm2", default=None, help="converted SmolLM2 HF dir (scripts/convert_smollm2.py)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--cases", default=None, help="comma-separated subset of tiny cases")
    ap.add_argument("--verify-only", action="store_true", help="recompute and compare, write nothing")
    args = ap.parse_args(argv)

    out_root = os.path.abspath(args.out)
    os.makedirs(os.path.join(out_root, "hf"), exist_ok=True)
    os.makedirs(os.path.join(out_root, "ref"), exist_ok=True)
    import torch
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, seed {args.seed}, out {out_root}"
    )
    configs = case_configs()
    names = args.cases.split(",") if args.cases else list(configs)
    t_all = time.time()
    for case in names:
        cls_name, kwargs = configs[case]
        case_seed = args.seed + 1000 * list(configs).index(case)
        t0 = time.time()
        ref, notes = make_tiny_case(case, cls_name, kwargs, out_root, case_seed, args.verify_only)
        summarize(case, ref, notes, time.time() - t0)
    if args.smollm2:
        t0 = time.time()
        ref, notes = make_smollm2_case(args.smollm2, out_root, args.verify_only)
        summarize("smollm2", ref, notes, time.time() - t0)
    total = 0
    for dp, _, fns in os.walk(out_root):
        total += sum(os.path.getsize(os.path.join(dp, f)) for f in fns)
    verb = "verified" if args.verify_only else "wrote + verified (reload bit-exact)"
    print(f"{verb} in {time.time() - t_all:.1f}s; tests/fixtures total {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
