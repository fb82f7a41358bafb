"""Tokenizer utilities: a tiny character-level chat tokenizer and chat-template encoding helpers.

The demo trains models from scratch, so it needs a tokenizer small enough (~100 ids) that the embedding
and output layers stay cheap on CPU. Rather than a bespoke Python tokenizer, we build a standard
`tokenizers` JSON file plus `tokenizer_config.json` with a Jinja chat template, so the rest of jopd can use
exactly the same code path (``AutoTokenizer`` + ``apply_chat_template``) for the toy tokenizer and for real
HF tokenizers such as SmolLM2's or Qwen3's.

Layout of the character tokenizer's vocabulary::

    0 <pad>   1 <bos>   2 <eos> (also end of turn)   3 <|user|>   4 <|assistant|>   5 <unk>
    6.. every printable ASCII character (digits, letters, punctuation, space, newline), then extra_chars

Chat format rendered by its template (no separators: every character costs a model step)::

    <bos><|user|>{user text}<eos><|assistant|>{assistant text}<eos>

Distillation compares per-token log-probs of teacher and student, which is only meaningful when both
index the same vocabulary: `tokenizer_fingerprint` and `check_same_vocab` guard that.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the tokenizer utilities do not need JAX, which importing jopd.models brings in
    from jopd.models.config import ModelConfig

__all__ = [
    "ASSISTANT_TOKEN",
    "BOS_TOKEN",
    "CHAR_CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "USER_TOKEN",
    "VocabMismatchError",
    "build_char_tokenizer",
    "check_same_vocab",
    "encode_chat_prompt",
    "encode_response",
    "end_of_turn_id",
    "load_tokenizer",
    "stop_ids",
    "template_uses_enable_thinking",
    "tokenizer_fingerprint",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
UNK_TOKEN = "<unk>"
# Order fixes the ids: <pad> must be 0 so right-padded batches can be built with zeros.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, UNK_TOKEN)

# Every printable ASCII character except the exotic whitespace (\t, \r, \x0b, \x0c), which the task never
# produces and which would only add dead rows to the embedding table.
_BASE_CHARS: str = string.digits + string.ascii_letters + string.punctuation + " \n"

CHAR_CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('The jopd character tokenizer only supports user and assistant messages, got role '"
    " + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# How many differing ids check_same_vocab lists in its error message.
_MAX_REPORTED_DIFFS = 5


class VocabMismatchError(ValueError):
    """Two tokenizers that must share a vocabulary (teacher and student) map some id to different tokens."""


def build_char_tokenizer(out_dir: str | os.PathLike[str], *, extra_chars: str = "") -> Path:
    """Build the character-level chat tokenizer and save it in the standard HF layout.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (with the Jinja ``chat_template`` and the
    special-token names) and ``special_tokens_map.json`` into ``out_dir``, so that
    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it.

    Args:
        out_dir: Directory to write into (created if missing).
        extra_chars: Additional single characters to append to the vocabulary (duplicates of existing
            characters are ignored), e.g. non-ASCII symbols a custom task needs. Unknown characters
            otherwise encode to ``<unk>``.

    Returns:
        ``out_dir`` as a `Path`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars: list[str] = []
    for ch in _BASE_CHARS + extra_chars:
        if ch not in chars:
            chars.append(ch)
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Isolate every single character (including "\n": [\s\S] rather than "." which skips newlines) so the
    # WordLevel model sees one character per "word".
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates tokens verbatim; without a decoder `decode` would join them with spaces.
    tok.decoder = decoders.Fuse()
    # Special tokens are matched as whole strings before pre-tokenization, so "<eos>" in rendered chat text
    # becomes one id instead of five characters.
    tok.add_special_tokens(list(SPECIAL_TOKENS))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))

    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "additional_special_tokens": [USER_TOKEN, ASSISTANT_TOKEN],
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "chat_template": CHAR_CHAT_TEMPLATE,
        # The template writes <bos> itself; nothing else should add special tokens behind our back.
        "add_bos_token": False,
        "add_eos_token": False,
        # The default clean-up would delete spaces before punctuation and break exact round-trips.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "padding_side": "right",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out


def load_tokenizer(tokenizer_or_dir: Any) -> Any:
    """Return ``tokenizer_or_dir`` itself if it is a tokenizer, else load it with ``AutoTokenizer``."""
    if isinstance(tokenizer_or_dir, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer_or_dir))
    return tokenizer_or_dir


def _chat_template_text(tokenizer: Any) -> str:
    """All chat template source of ``tokenizer`` as one string ('' if it has none)."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return ""
    if isinstance(template, Mapping):  # named templates ("default", "tool_use", ...)
        return "\n".join(str(t) for t in template.values())
    return str(template)


def template_uses_enable_thinking(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template reads an ``enable_thinking`` variable (Qwen3-style)."""
    return "enable_thinking" in _chat_template_text(tokenizer)


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool,
                 enable_thinking: bool) -> str:
    if not _chat_template_text(tokenizer):
        raise ValueError(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no chat template; "
            "jopd needs one to format prompts (set tokenizer.chat_template or use an instruct tokenizer)."
        )
    kwargs: dict[str, Any] = {}
    # Only templates that read the flag get it: other templates ignore unknown variables today, but passing
    # it unconditionally would silently do nothing and hide a misconfiguration.
    if template_uses_enable_thinking(tokenizer):
        kwargs["enable_thinking"] = enable_thinking
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    # add_special_tokens=False: exactly what apply_chat_template(tokenize=True) does, so templates that
    # write their own BOS do not get a second one from the post-processor.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat_prompt(tokenizer: Any, user_text: str, *, enable_thinking: bool = False) -> list[int]:
    """Token ids of a single-turn chat prompt ending with the assistant header (the generation prompt).

    The template is rendered to text once and tokenized once with ``add_special_tokens=False`` — the same
    path as ``apply_chat_template(tokenize=True)`` — so ids match what HF would feed the model.

    Args:
        tokenizer: A HF tokenizer with a chat template (our character tokenizer, SmolLM2, Qwen3, ...).
        user_text: The user message.
        enable_thinking: Passed to the template only if it uses the variable (Qwen3). Default False because
            the distillation budgets here are far too short for long hidden reasoning.
    """
    text = _render_chat(
        tokenizer, [{"role": "user", "content": user_text}], add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )
    return _encode_plain(tokenizer, text)


def end_of_turn_id(tokenizer: Any) -> int:
    """The id that closes an assistant turn in this tokenizer's chat template.

    Found by rendering a conversation with a sentinel assistant reply and taking the first special/added
    token after it (``<|im_end|>`` for ChatML templates such as SmolLM2's and Qwen3's, ``<eos>`` for the
    character tokenizer). This is what SFT targets must end with and what generation should stop on;
    it differs from ``eos_token_id`` for base-model tokenizers (Qwen3-Base: eos ``<|endoftext|>``, turns end
    with ``<|im_end|>``). Falls back to ``eos_token_id`` if the template shows nothing special after the reply.
    """
    sentinel = "JOPD_END_OF_TURN_PROBE"
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    # Added tokens flagged special (ChatML's <|im_end|> often is not in all_special_ids); non-special added
    # tokens such as Qwen3's <think> are ordinary text and must not be mistaken for the turn end.
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special_ids.update(int(i) for i, tok in added.items() if getattr(tok, "special", False))
    if _chat_template_text(tokenizer):
        text = _render_chat(
            tokenizer,
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}],
            add_generation_prompt=False,
            enable_thinking=False,
        )
        cut = text.rfind(sentinel)
        if cut >= 0:
            for tid in _encode_plain(tokenizer, text[cut + len(sentinel):]):
                if tid in special_ids:
                    return int(tid)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("Cannot determine the end-of-turn id: the chat template shows no special token after "
                         "an assistant reply and the tokenizer has no eos_token_id.")
    return int(eos)


def stop_ids(tokenizer: Any, model_config: ModelConfig) -> tuple[int, ...]:
    """Ids that end a response, sorted: the chat template's end-of-turn id plus the model config's EOS ids.

    Generation stops on either: an instruct model closes its turn with the former, a base model may emit the
    latter instead.
    """
    return tuple(sorted({end_of_turn_id(tokenizer)} | {int(e) for e in model_config.eos_token_id}))


def encode_response(tokenizer: Any, text: str, add_eos: bool = True) -> list[int]:
    """Token ids of an assistant response, followed by the end-of-turn id (see `end_of_turn_id`) if asked.

    Concatenated after `encode_chat_prompt`'s ids this gives the SFT sequence; the closing id teaches the
    model to stop.
    """
    ids = _encode_plain(tokenizer, text)
    if add_eos:
        ids.append(end_of_turn_id(tokenizer))
    return ids


def _id_to_token(tokenizer: Any) -> dict[int, str]:
    """The real id → token mapping (base vocabulary plus added/special tokens), independent of model padding."""
    mapping: dict[int, str] = {}
    # Sorted so that, should two strings share an id (malformed added tokens), the choice is deterministic.
    for token, idx in sorted(tokenizer.get_vocab().items()):
        mapping.setdefault(int(idx), token)
    return mapping


def _hash_mapping(mapping: dict[int, str]) -> str:
    payload = json.dumps(sorted(mapping.items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer_or_dir: Any) -> str:
    """A stable SHA-256 hex digest of the tokenizer's id → token mapping, added and special tokens included.

    Two tokenizers with equal fingerprints index the same vocabulary, so per-token log-probs of models using
    them are comparable. Chat templates and special-token roles are deliberately not hashed: they change how
    text is formatted, not what an id means.
    """
    return _hash_mapping(_id_to_token(load_tokenizer(tokenizer_or_dir)))


def check_same_vocab(tok_a: Any, tok_b: Any, *, name_a: str = "tokenizer A",
                     name_b: str = "tokenizer B") -> str:
    """Raise `VocabMismatchError` unless both tokenizers map every id to the same token.

    Args:
        tok_a, tok_b: Tokenizers or tokenizer directories.
        name_a, name_b: Human-readable names (e.g. "teacher", "student") used in the error message.

    Returns:
        The shared fingerprint (see `tokenizer_fingerprint`).

    An id present in only one tokenizer's vocabulary is a difference; rows a model pads its embedding to
    beyond the tokenizer's vocabulary are not considered (they are not part of either tokenizer).
    """
    map_a = _id_to_token(load_tokenizer(tok_a))
    map_b = _id_to_token(load_tokenizer(tok_b))
    if map_a != map_b:
        missing = "<absent>"
        diffs = [i for i in sorted(set(map_a) | set(map_b)) if map_a.get(i) != map_b.get(i)]
        shown = "; ".join(
            f"id {i}: {map_a.get(i, missing)!r} in {name_a} vs {map_b.get(i, missing)!r} in {name_b}"
            for i in diffs[:_MAX_REPORTED_DIFFS]
        )
        more = f" (and {len(diffs) - _MAX_REPORTED_DIFFS} more)" if len(diffs) > _MAX_REPORTED_DIFFS else ""
        raise VocabMismatchError(
            f"Tokenizers {name_a!r} ({len(map_a)} tokens) and {name_b!r} ({len(map_b)} tokens) have different "
            f"vocabularies: {len(diffs)} ids differ, first: {shown}{more}. Teacher and student must share "
            "one tokenizer for on-policy distillation."
        )
    return _hash_mapping(map_a)
