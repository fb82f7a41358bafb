"""Tests for jopd.data.tokenizer: the character tokenizer, chat encoding and vocabulary fingerprints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jopd.data.arithmetic import make_problems, solve
from jopd.data.tokenizer import (
    ASSISTANT_TOKEN,
    SPECIAL_TOKENS,
    USER_TOKEN,
    VocabMismatchError,
    build_char_tokenizer,
    check_same_vocab,
    encode_chat_prompt,
    encode_response,
    end_of_turn_id,
    stop_ids,
    template_uses_enable_thinking,
    tokenizer_fingerprint,
)
from jopd.models.config import ModelConfig


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_char_tokenizer(tmp_path_factory.mktemp("char_tok"))


@pytest.fixture(scope="module")
def char_tok(char_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(char_dir)


# ---------------------------------------------------------------------------------------------------------
# Character tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_files_vocab_and_special_ids(char_dir: Path, char_tok: Any) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (char_dir / name).is_file()
    config = json.loads((char_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<eos>" and config["pad_token"] == "<pad>" and config["bos_token"] == "<bos>"
    assert "{%" in config["chat_template"]
    assert len(char_tok) == len(SPECIAL_TOKENS) + 96 == 102
    assert (char_tok.pad_token_id, char_tok.bos_token_id, char_tok.eos_token_id) == (0, 1, 2)
    assert char_tok.convert_tokens_to_ids([USER_TOKEN, ASSISTANT_TOKEN]) == [3, 4]
    assert char_tok.unk_token_id == 5
    assert PreTrainedTokenizerFast(tokenizer_file=str(char_dir / "tokenizer.json")).get_vocab() == char_tok.get_vocab()


def test_round_trip_is_exact(char_tok: Any) -> None:
    texts = [
        "Compute (3+4)*5-6.",
        "Ann has 3 pens, gets 4, loses 2. How many?",
        "  two  spaces , before. punctuation !\nnew\n\nlines ",
        "~`!@#$%^&*()_+-=[]{}|\\;':\",./<>?",
    ]
    for p in make_problems("sft", 50, seed=0, difficulty=3):
        texts += [p.prompt, solve(p, "A"), solve(p, "B")]
    for text in texts:
        ids = char_tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one id per character
        assert char_tok.decode(ids) == text
        assert char_tok.unk_token_id not in ids


def test_unknown_and_extra_chars(tmp_path: Path, char_tok: Any) -> None:
    assert char_tok.encode("é", add_special_tokens=False) == [char_tok.unk_token_id]
    extra = AutoTokenizer.from_pretrained(build_char_tokenizer(tmp_path, extra_chars="é×a"))
    assert len(extra) == len(char_tok) + 2  # "a" already exists
    assert extra.decode(extra.encode("3×4é", add_special_tokens=False)) == "3×4é"


# ---------------------------------------------------------------------------------------------------------
# Chat encoding
# ---------------------------------------------------------------------------------------------------------


def _char_ids(tok: Any, text: str) -> list[int]:
    return [tok.convert_tokens_to_ids(c) for c in text]


def test_encode_chat_prompt_and_response(char_tok: Any) -> None:
    prompt = encode_chat_prompt(char_tok, "What is 3+4?")
    assert prompt == [1, 3, *_char_ids(char_tok, "What is 3+4?"), 2, 4]
    assert prompt == char_tok.apply_chat_template(
        [{"role": "user", "content": "What is 3+4?"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    response = encode_response(char_tok, "3+4=7\nanswer: 7")
    assert response == [*_char_ids(char_tok, "3+4=7\nanswer: 7"), char_tok.eos_token_id]
    assert encode_response(char_tok, "7", add_eos=False) == _char_ids(char_tok, "7")
    assert end_of_turn_id(char_tok) == char_tok.eos_token_id
    assert not template_uses_enable_thinking(char_tok)


def test_prompt_plus_response_matches_full_conversation(char_tok: Any) -> None:
    # No drift: the SFT sequence equals the tokenized rendering of the whole two-turn conversation.
    user, reply = "Evaluate 9-(2+3)*1.", "9-(2+3)*1 => 9-5*1 => 9-5 => 4\n#### 4"
    full = char_tok.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], tokenize=False
    )
    assert encode_chat_prompt(char_tok, user) + encode_response(char_tok, reply) == char_tok.encode(
        full, add_special_tokens=False
    )


def test_template_rejects_system_role(char_tok: Any) -> None:
    with pytest.raises(Exception, match="only supports user and assistant"):
        char_tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


QWEN3_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
SMOLLM2_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chatml_tokenizer(tmp_path: Path, template: str, eos: str) -> Any:
    """A ChatML tokenizer (character vocab + <|im_start|>/<|im_end|>/<|endoftext|>) with ``template``."""
    from tokenizers import Tokenizer

    base = build_char_tokenizer(tmp_path / "base", extra_chars="")
    raw = Tokenizer.from_file(str(base / "tokenizer.json"))
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, pad_token="<pad>", chat_template=template)


def test_qwen3_style_template_gets_enable_thinking(tmp_path: Path) -> None:
    # Like Qwen3-Base: eos is <|endoftext|> but assistant turns end with <|im_end|>.
    tok = _chatml_tokenizer(tmp_path, QWEN3_LIKE_TEMPLATE, eos="<|endoftext|>")
    assert template_uses_enable_thinking(tok)
    no_think = tok.decode(encode_chat_prompt(tok, "hi"))
    assert no_think == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.decode(encode_chat_prompt(tok, "hi", enable_thinking=True)).endswith("assistant\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end != tok.eos_token_id
    assert encode_response(tok, "ok")[-1] == im_end


def _model_config(eos_token_id: tuple[int, ...]) -> ModelConfig:
    return ModelConfig(model_type="qwen3", vocab_size=128, hidden_size=8, intermediate_size=16, num_layers=1,
                       num_heads=1, num_kv_heads=1, head_dim=8, eos_token_id=eos_token_id)


def test_stop_ids_join_the_end_of_turn_and_the_model_eos_ids(tmp_path: Path, char_tok: Any) -> None:
    # Qwen3-Base-like: the model's eos (<|endoftext|>) is not what closes a chat turn (<|im_end|>).
    tok = _chatml_tokenizer(tmp_path, QWEN3_LIKE_TEMPLATE, eos="<|endoftext|>")
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert stop_ids(tok, _model_config((eot,))) == tuple(sorted((im_end, eot)))
    assert stop_ids(tok, _model_config((eot, 7, im_end))) == tuple(sorted({im_end, eot, 7}))
    assert stop_ids(tok, _model_config(())) == (im_end,)
    assert stop_ids(char_tok, _model_config((char_tok.eos_token_id,))) == (char_tok.eos_token_id,)


def test_smollm2_style_template_gets_no_enable_thinking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = _chatml_tokenizer(tmp_path, SMOLLM2_LIKE_TEMPLATE, eos="<|im_end|>")
    seen: list[dict[str, Any]] = []
    original = tok.apply_chat_template

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", recording)
    ids = encode_chat_prompt(tok, "What is 2+2?")
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert seen and all("enable_thinking" not in kw for kw in seen)
    assert end_of_turn_id(tok) == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_missing_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    tok = _chatml_tokenizer(tmp_path, SMOLLM2_LIKE_TEMPLATE, eos="<|im_end|>")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat_prompt(tok, "hi")


def test_real_smollm2_tokenizer_if_available() -> None:
    model_dir = os.environ.get("JOPD_SMOLLM2_DIR")
    if not model_dir or not (Path(model_dir) / "tokenizer.json").is_file():
        pytest.skip("JOPD_SMOLLM2_DIR with a SmolLM2 tokenizer not available (set by `make test`)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert encode_chat_prompt(tok, "What is 2+2?") == list(expected)
    assert encode_response(tok, "4")[-1] == end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


# ---------------------------------------------------------------------------------------------------------
# Fingerprints and vocabulary checks
# ---------------------------------------------------------------------------------------------------------


def test_fingerprint_is_stable(tmp_path: Path, char_dir: Path, char_tok: Any) -> None:
    fp = tokenizer_fingerprint(char_tok)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert tokenizer_fingerprint(char_dir) == fp == tokenizer_fingerprint(str(char_dir))
    assert tokenizer_fingerprint(build_char_tokenizer(tmp_path / "again")) == fp
    assert tokenizer_fingerprint(build_char_tokenizer(tmp_path / "more", extra_chars="é")) != fp
    assert check_same_vocab(char_tok, char_dir, name_a="teacher", name_b="student") == fp


def _swap_ids(src: Path, dst: Path, a: str, b: str) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def test_check_same_vocab_reports_changed_ids(tmp_path: Path, char_dir: Path, char_tok: Any) -> None:
    swapped = _swap_ids(char_dir, tmp_path / "swapped", "a", "b")
    assert tokenizer_fingerprint(swapped) != tokenizer_fingerprint(char_dir)
    a_id = char_tok.convert_tokens_to_ids("a")
    with pytest.raises(VocabMismatchError) as info:
        check_same_vocab(char_dir, swapped, name_a="teacher", name_b="student")
    message = str(info.value)
    assert "'teacher'" in message and "'student'" in message and "2 ids differ" in message
    assert f"id {a_id}: 'a' in teacher vs 'b' in student" in message


def test_check_same_vocab_counts_ids_missing_from_one_side(tmp_path: Path, char_tok: Any) -> None:
    bigger = build_char_tokenizer(tmp_path / "bigger", extra_chars="é")
    with pytest.raises(VocabMismatchError, match=r"id 102: '<absent>' in small vs 'é' in big"):
        check_same_vocab(char_tok, bigger, name_a="small", name_b="big")
