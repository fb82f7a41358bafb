"""Answer extraction and checking: the final answer a response states, compared with a reference label.

`extract_answer` understands ``answer: X``, ``The answer is X``, ``#### X`` and ``\\boxed{X}`` (nested
braces), with an optional last-number fallback. `check_answer` compares numerically first (``29`` ==
``29.0`` == ``+29`` == ``\\boxed{29}``, ``1/2`` == ``\\frac{1}{2}`` == ``0.5``), then symbolically with
``math_verify`` when that package is installed, else with a normalised string comparison.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

__all__ = ["check_answer", "extract_answer"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]*)")
# "answer: X", "Answer: X", "**Answer:** X", "The final answer is X". Requiring ":" or "is" keeps prose
# such as "let me answer this" from matching. The answer may also sit on the next line ("Answer:\n29").
_ANSWER_PHRASE = re.compile(r"(?i)\banswer\s*(?:is\b\s*:?|:)\**\s*([^\n]*)")
_NUMBER = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+"
_LAST_NUMBER = re.compile(r"(?:(?<![\w)\].])[+-])?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
_LEADING_NUMBER = re.compile(rf"^({_NUMBER})\s+[A-Za-z]")


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """(start, content) of every ``\\boxed{...}`` / ``\\fbox{...}`` with balanced (nested) braces."""
    out = []
    for match in _BOXED.finditer(text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append((match.start(), text[match.end():i - 1]))
    return out


def _clean_answer(raw: str) -> str:
    """Strip the wrapping a final answer tends to come with: math delimiters, markdown, trailing period."""
    s = raw.strip()
    for _ in range(3):  # wrappers nest, e.g. "$\boxed{29}$."
        before = s
        s = s.strip().rstrip(".;,").strip()
        boxed = _boxed_contents(s)
        if boxed and boxed[0][0] == 0:
            s = boxed[0][1]
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
                s = s[len(left):len(s) - len(right)]
        if s == before:
            break
    s = s.strip()
    # "29 apples" -> "29": a number followed by words is a number with a unit, not an expression.
    lead = _LEADING_NUMBER.match(s)
    return lead.group(1) if lead else s


def extract_answer(text: str, *, last_number_fallback: bool = True) -> str | None:
    """The final answer stated in ``text``, or None.

    Looks for ``\\boxed{...}`` (nested braces OK), ``#### X`` and ``answer: X`` / ``the answer is X``; when
    several occur, the one starting last wins (a model's final statement). If none occurs and
    ``last_number_fallback`` is set, returns the last number in the text.
    """
    candidates: list[tuple[int, str]] = list(_boxed_contents(text))
    candidates += [(m.start(), m.group(1)) for m in _HASHES.finditer(text)]
    candidates += [(m.start(), m.group(1)) for m in _ANSWER_PHRASE.finditer(text)]
    for _, raw in sorted(candidates, key=lambda c: c[0], reverse=True):
        cleaned = _clean_answer(raw)
        if cleaned:
            return cleaned
    if last_number_fallback:
        numbers = _LAST_NUMBER.findall(text)
        if numbers:
            return numbers[-1]
    return None


_FRAC = re.compile(r"^([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{([+-]?\d+)\}$|^([+-]?)\\[dt]?frac(\d)(\d)$")


def _parse_number(text: str) -> Fraction | None:
    """Exact value of an integer, decimal, ``a/b`` or ``\\frac{a}{b}`` literal; None for anything else."""
    s = text.strip().replace("\u2212", "-").replace("{,}", ",").replace("\\!", "").replace(" ", "")
    s = s.rstrip(".") if re.fullmatch(r"[+-]?\d+\.", s) else s
    if re.fullmatch(_NUMBER, s):
        return Fraction(s.replace(",", "").lstrip("+"))
    if m := re.fullmatch(r"([+-]?\d+)/([+-]?\d+)", s):
        num, den = int(m.group(1)), int(m.group(2))
        return Fraction(num, den) if den else None
    if m := _FRAC.match(s):
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5), m.group(6))
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    return None


def _normalize_text(text: str) -> str:
    """Canonical spelling of a LaTeX-ish answer for the string comparison fallback."""
    s = text
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right)(?=[()\[\]|.]|\\[{}])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    for spacing in ("\\!", "\\,", "\\;", "\\:", "\\ ", "$"):
        s = s.replace(spacing, "")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def _math_verify_equal(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    # math_verify's timeouts use SIGALRM, which only works on the main thread; elsewhere run without them.
    on_main = threading.current_thread() is threading.main_thread()
    timeout = 5 if on_main else None
    # Wrapping both sides in \boxed{} makes math_verify read them as LaTeX answers (e.g. "(1,2)", "x+1"),
    # which bare strings are not reliably.
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def _have_math_verify() -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def check_answer(response: str, label: str, *, last_number_fallback: bool = False,
                 use_math_verify: bool | None = None) -> bool:
    """Whether ``response`` states an answer equal to ``label``.

    Args:
        response: Model output (the whole solution).
        label: Reference answer, e.g. "29", "\\frac{1}{2}" or "\\boxed{29}".
        last_number_fallback: Accept the last number of the response when it states no explicit final
            answer. Off by default: a truncated chain whose last intermediate happens to equal the answer
            should not count as solved.
        use_math_verify: True requires ``math_verify``, False never uses it, None uses it if installed.
            Purely numeric answers are always compared exactly without it.
    """
    pred = extract_answer(response, last_number_fallback=last_number_fallback)
    if pred is None:
        return False
    gold = _clean_answer(str(label))
    if not gold:
        return False
    gold_num, pred_num = _parse_number(gold), _parse_number(pred)
    if gold_num is not None and pred_num is not None:
        return gold_num == pred_num
    if _normalize_text(gold) == _normalize_text(pred):
        return True
    if use_math_verify is None:
        use_math_verify = _have_math_verify()
    elif use_math_verify and not _have_math_verify():
        raise ImportError("check_answer(use_math_verify=True) needs math-verify: pip install math-verify")
    if use_math_verify:
        return _math_verify_equal(gold, pred)
    return False
