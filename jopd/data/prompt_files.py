"""Loading user prompt files: JSONL/JSON or Parquet rows (plain prompts, chat messages, DAPO-Math-17k fields).

`load_prompt_file` turns each row into a `jopd.data.arithmetic.Problem` (prompt text and reference answer);
any row it cannot read raises `PromptFileError` naming the file, the line or row and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jopd.data.arithmetic import Problem
from jopd.data.grading import extract_answer

__all__ = ["PromptFileError", "load_prompt_file"]


class PromptFileError(ValueError):
    """A user prompt file could not be read; the message names the file, the line/row and the field."""


_DEFAULT_ANSWER_FIELDS = ("label", "answer", "solution", "reward_model.ground_truth")
_CONVERSATION_FIELDS = ("conversations", "messages")
_USER_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant", "gpt", "model")


def _get_path(row: Mapping[str, Any], dotted: str) -> Any:
    """``row["a"]["b"]`` for ``dotted == "a.b"``; None if any level is missing."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _message_text(message: Any) -> str:
    """Text of one chat message: ``content`` (HF/OpenAI) or ``value`` (ShareGPT/OpenThoughts)."""
    if not isinstance(message, Mapping):
        raise TypeError(f"chat message must be an object, got {type(message).__name__}")
    content = message.get("content", message.get("value"))
    if isinstance(content, list):  # multimodal content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    if not isinstance(content, str):
        raise TypeError("chat message has no string 'content' (or 'value')")
    return content


def _prompt_from_messages(messages: Sequence[Any]) -> str:
    """The user turn to answer: the last user message before the first assistant message."""
    prompt: str | None = None
    for message in messages:
        role = message.get("role", message.get("from")) if isinstance(message, Mapping) else None
        if role in _ASSISTANT_ROLES:
            break
        if role in _USER_ROLES:
            prompt = _message_text(message)
    if prompt is None:
        raise ValueError("chat message list has no user message (role 'user' or from 'human')")
    return prompt


def _extract_prompt(row: Mapping[str, Any], prompt_field: str) -> str:
    value = _get_path(row, prompt_field)
    source = prompt_field
    if value is None and prompt_field == "prompt":
        # OpenThoughts/ShareGPT rows keep the problem as the first user turn of a conversation.
        for name in _CONVERSATION_FIELDS:
            if (value := row.get(name)) is not None:
                source = name
                break
    if value is None:
        raise ValueError(f"missing prompt field {prompt_field!r}"
                         + (f" (also looked for {', '.join(map(repr, _CONVERSATION_FIELDS))})"
                            if prompt_field == "prompt" else ""))
    if isinstance(value, str):
        text = value
    elif isinstance(value, Mapping):
        text = _message_text(value)
    elif isinstance(value, (list, tuple)):
        text = _prompt_from_messages(value)
    else:
        raise TypeError(f"field {source!r} must be a string or a list of chat messages, got {type(value).__name__}")
    if not text.strip():
        raise ValueError(f"empty prompt in field {source!r}")
    return text


def _extract_label(row: Mapping[str, Any], answer_fields: Sequence[str]) -> str | None:
    for name in answer_fields:
        value = _get_path(row, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError(f"answer field {name!r} must be a string or a number, got {type(value).__name__}")
        text = str(value).strip()
        # Full worked solutions (MATH/GSM8K "solution"/"answer" columns) hold the answer in \boxed{} or after
        # "####"; keep only that part so the label compares cleanly.
        if "\\boxed" in text or "\\fbox" in text or "####" in text:
            text = extract_answer(text, last_number_fallback=False) or text
        if text:
            return text
    return None


def _extract_route(row: Mapping[str, Any], route_field: str) -> str:
    """A row's route (multi-teacher routing): the string or integer at ``route_field``, as a string."""
    value = _get_path(row, route_field)
    if value is None:
        raise ValueError(f"missing route field {route_field!r} (routing.field: every prompt must name its route)")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"route field {route_field!r} must be a string or an integer, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise ValueError(f"empty route in field {route_field!r}")
    return text


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, int], Any]]:
    """(location text, position meta, parsed row) per non-blank line; a .json file may hold one array."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw[: err.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                              f"{err.start}); save the file as UTF-8") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        for index, row in enumerate(rows):
            yield f"{path} item {index} (0-based)", {"row": index}, row
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        yield f"{path}:{lineno}", {"line": lineno}, row


def _iter_parquet(path: Path, columns: Iterable[str]) -> Iterator[tuple[str, dict[str, int], Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"Reading the Parquet prompt file {path} needs pyarrow: pip install pyarrow") from None
    parquet = pq.ParquetFile(path)
    available = set(parquet.schema_arrow.names)
    # Read only the top-level columns we may need: prompt files often carry large extra columns.
    wanted = [c for c in dict.fromkeys(columns) if c in available] or None
    index = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=wanted):
        for row in batch.to_pylist():
            yield f"{path} row {index} (0-based)", {"row": index}, row
            index += 1


def load_prompt_file(path: str | os.PathLike[str], *, prompt_field: str = "prompt",
                     answer_fields: Sequence[str] = _DEFAULT_ANSWER_FIELDS, limit: int | None = None,
                     require_answer: bool = True, dedupe: bool = False,
                     route_field: str | None = None) -> list[Problem]:
    """Load prompts and reference answers from a JSONL (``.jsonl``/``.json``) or Parquet file.

    Accepted row shapes (fields may be dotted paths into nested objects, e.g. "reward_model.ground_truth"):

    * ``{"prompt": "What is 2+2?", "answer": "4"}`` — plain string prompt;
    * DAPO-Math-17k: ``{"prompt": [{"role": "user", "content": ...}], "reward_model": {"ground_truth": "34"}}``;
    * OpenThoughts/ShareGPT: ``{"conversations": [{"from": "user", "value": ...}, ...]}`` (or ``messages``)
      when the row has no ``prompt`` field.

    Args:
        path: The file.
        prompt_field: Field holding the prompt (string, one message, or a list of chat messages; the last user
            message before the first assistant message is used).
        answer_fields: Fields tried in order for the reference answer. Worked solutions containing
            ``\\boxed{}`` or ``####`` are reduced to their final answer.
        limit: Stop after this many problems.
        require_answer: Raise if a row has no answer. With False such rows get ``answer=""`` and
            ``meta["has_answer"] = False`` (fine for distillation, which needs no labels).
        dedupe: Skip rows whose prompt text was already seen (DAPO-Math-17k repeats each prompt many times).
        route_field: Field holding each row's route (multi-teacher routing, a string or integer; dotted paths
            allowed), kept as ``meta["route"]`` (a string); a row without one is an error.

    Raises:
        FileNotFoundError, ImportError (Parquet without pyarrow), PromptFileError naming the file, the
        line (JSONL) or 0-based row (Parquet) and the field that was expected.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file not found: {file}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _iter_jsonl(file)
    elif suffix in (".parquet", ".pq"):
        top_level = [prompt_field.split(".")[0], *_CONVERSATION_FIELDS, *(f.split(".")[0] for f in answer_fields),
                     *([route_field.split(".")[0]] if route_field else [])]
        rows = _iter_parquet(file, top_level)
    else:
        raise PromptFileError(f"{file}: unsupported prompt file type {file.suffix!r} (use .jsonl, .json or .parquet)")

    problems: list[Problem] = []
    seen: set[str] = set()
    for location, position, row in rows:
        if limit is not None and len(problems) >= limit:
            break
        if not isinstance(row, Mapping):
            raise PromptFileError(f"{location}: expected a JSON object per row, got {type(row).__name__}")
        try:
            prompt = _extract_prompt(row, prompt_field)
            answer = _extract_label(row, answer_fields)
            route = _extract_route(row, route_field) if route_field else None
        except (ValueError, TypeError) as err:
            raise PromptFileError(f"{location}: {err}") from None
        if answer is None and require_answer:
            raise PromptFileError(
                f"{location}: missing answer field (expected one of {', '.join(map(repr, answer_fields))}); "
                "pass answer_fields=... or require_answer=False"
            )
        if dedupe:
            if prompt in seen:
                continue
            seen.add(prompt)
        meta: dict[str, Any] = {"source": str(file), **position, "has_answer": answer is not None}
        for key in ("data_source", "id", "ability"):
            if isinstance(row.get(key), (str, int)):
                meta[key] = row[key]
        if route is not None:
            meta["route"] = route
        problems.append(Problem(prompt=prompt, answer=answer or "", meta=meta))
    return problems
