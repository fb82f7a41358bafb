"""A verifiable arithmetic task, two solution styles, answer checking, and a loader for user prompt files.

The synthetic task
    Problems are small integer arithmetic expressions ("Compute (3+4)*5-6.") or the same computation told as
    a short word problem ("Ann has 3 pens, gets 4, loses 2. How many?"). Difficulty = number of operations and
    operand range (see `Difficulty` / `DIFFICULTY_LEVELS`). Every intermediate value is a non-negative integer
    no larger than ``max_value`` and divisions are exact, so tiny character-level models can learn the task.

Held-out guarantee
    Each problem has a canonical key: its arithmetic expression with minimal parentheses (the word form of
    ``3+4-2`` has key ``3+4-2`` too). A fixed hash of the key — independent of the seed, so different seeds
    cannot leak — puts ~20% of all keys in "eval" and the rest in "train". Splits "sft" and "opd" both draw
    from train (they may overlap each other) and "eval" from the held-out keys, so no held-out computation
    ever appears in training data, in any surface form.

Solution styles (what the two teachers learn)
    A: left-to-right binary steps, then ``answer: X``::

        3+4=7;7*5=35;35-6=29
        answer: 29

    B: restate the expression and rewrite it after each reduction, then ``#### X``::

        (3+4)*5-6 => 7*5-6 => 35-6 => 29
        #### 29

Answer checking
    `extract_answer` understands ``answer: X``, ``The answer is X``, ``#### X`` and ``\\boxed{X}`` (nested
    braces), with an optional last-number fallback. `check_answer` compares numerically first (``29`` ==
    ``29.0`` == ``+29`` == ``\\boxed{29}``, ``1/2`` == ``\\frac{1}{2}`` == ``0.5``), then symbolically with
    ``math_verify`` when that package is installed, else with a normalised string comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DIFFICULTY_LEVELS",
    "EVAL_FRACTION",
    "Difficulty",
    "Problem",
    "PromptFileError",
    "Split",
    "Style",
    "check_answer",
    "difficulty_dict",
    "extract_answer",
    "is_heldout",
    "load_prompt_file",
    "make_problems",
    "solution_style",
    "solve",
]

Split = Literal["sft", "opd", "eval"]
Style = Literal["A", "B"]

# Fraction of canonical problem keys reserved for evaluation.
EVAL_FRACTION = 0.2
# Bump only together with a deliberate change of the train/eval partition (it salts the split hash).
_SPLIT_SALT = "jopd-arith-split-v1"


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer.

    ``meta`` carries provenance: for synthetic problems ``expression`` (canonical key, used by `solve`),
    ``num_ops``, ``kind`` ("expr" or "word") and ``split``; for loaded files ``source`` and ``line``/``row``.
    """

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the synthetic generator.

    Attributes:
        min_ops, max_ops: Number of binary operations, drawn uniformly from this range.
        min_operand, max_operand: Range of the numbers written in the problem (``*`` and ``/`` use at least 2
            so they are never trivial).
        max_value: Upper bound for every intermediate and final value (all are >= 0).
        ops: Operators to use, a subset of ``"+-*/"``; division is always exact.
        word_fraction: Probability of telling a problem as a word problem when its shape allows it (a chain
            of +, -, doubling/tripling/halving applied to a running total that fits ``max_prompt_chars``).
        max_prompt_chars: Word problems longer than this fall back to the expression form.
    """

    min_ops: int = 1
    max_ops: int = 2
    min_operand: int = 1
    max_operand: int = 9
    max_value: int = 99
    ops: str = "+-*"
    word_fraction: float = 0.25
    max_prompt_chars: int = 48

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if not 0 <= self.min_operand <= self.max_operand:
            raise ValueError(f"need 0 <= min_operand <= max_operand, got {self.min_operand}, {self.max_operand}")
        if self.max_value < self.max_operand:
            raise ValueError(f"max_value ({self.max_value}) must be >= max_operand ({self.max_operand})")
        if not self.ops or set(self.ops) - set("+-*/"):
            raise ValueError(f"ops must be a non-empty subset of '+-*/', got {self.ops!r}")
        if not 0.0 <= self.word_fraction <= 1.0:
            raise ValueError(f"word_fraction must be in [0, 1], got {self.word_fraction}")


# Level n mixes 1..n operations so every level still contains easy problems to bootstrap learning.
DIFFICULTY_LEVELS: dict[int, Difficulty] = {
    1: Difficulty(min_ops=1, max_ops=1, max_operand=9, max_value=99),
    2: Difficulty(min_ops=1, max_ops=2, max_operand=9, max_value=99),
    3: Difficulty(min_ops=1, max_ops=3, max_operand=12, max_value=199),
}


class PromptFileError(ValueError):
    """A user prompt file could not be read; the message names the file, the line/row and the field."""


# ---------------------------------------------------------------------------------------------------------
# Expression trees
# ---------------------------------------------------------------------------------------------------------

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass(frozen=True)
class _Num:
    value: int


@dataclass(frozen=True)
class _Op:
    op: str
    left: _Node
    right: _Node


_Node = _Num | _Op


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0 or a % b:
        raise ValueError(f"{a}/{b} is not an exact integer division")
    return a // b


def _evaluate(node: _Node) -> int:
    if isinstance(node, _Num):
        return node.value
    return _apply(node.op, _evaluate(node.left), _evaluate(node.right))


def _render(node: _Node) -> str:
    """Minimal-parenthesis rendering that `_parse` maps back to the same tree.

    A right operand of equal precedence keeps its parentheses ("3+(4-2)"): dropping them would keep the value
    but change the evaluation order the solutions narrate.
    """
    if isinstance(node, _Num):
        return str(node.value)
    left, right = _render(node.left), _render(node.right)
    prec = _PRECEDENCE[node.op]
    if isinstance(node.left, _Op) and _PRECEDENCE[node.left.op] < prec:
        left = f"({left})"
    if isinstance(node.right, _Op) and _PRECEDENCE[node.right.op] <= prec:
        right = f"({right})"
    return f"{left}{node.op}{right}"


_EXPR_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


def _parse(expression: str) -> _Node:
    """Parse a non-negative integer expression with + - * / and parentheses (left-associative)."""
    tokens: list[str] = []
    for number, other in _EXPR_TOKEN.findall(expression.strip()):
        if number:
            tokens.append(number)
        elif other in "+-*/()":
            tokens.append(other)
        elif not other.isspace():
            raise ValueError(f"unexpected character {other!r} in expression {expression!r}")
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"unexpected end of expression {expression!r}")
        pos += 1
        return tokens[pos - 1]

    def factor() -> _Node:
        tok = take()
        if tok == "(":
            node = expr()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            return node
        if not tok.isdigit():
            raise ValueError(f"expected a number at {tok!r} in {expression!r}")
        return _Num(int(tok))

    def binary(operand: Any, ops: str) -> _Node:
        node = operand()
        while (tok := peek()) is not None and tok in ops:
            take()
            node = _Op(tok, node, operand())
        return node

    def term() -> _Node:
        return binary(factor, "*/")

    def expr() -> _Node:
        return binary(term, "+-")

    tree = expr()
    if pos != len(tokens):
        raise ValueError(f"trailing input {''.join(tokens[pos:])!r} in expression {expression!r}")
    return tree


def _reduce_once(node: _Op) -> tuple[_Node, tuple[int, str, int, int]]:
    """Evaluate the leftmost innermost operation; return the new tree and the step (a, op, b, result)."""
    if isinstance(node.left, _Num) and isinstance(node.right, _Num):
        a, b = node.left.value, node.right.value
        result = _apply(node.op, a, b)
        return _Num(result), (a, node.op, b, result)
    if isinstance(node.left, _Op):
        new_left, step = _reduce_once(node.left)
        return _Op(node.op, new_left, node.right), step
    assert isinstance(node.right, _Op)  # the left child is a number, so the work is on the right
    new_right, step = _reduce_once(node.right)
    return _Op(node.op, node.left, new_right), step


def _reductions(tree: _Node) -> list[tuple[_Node, tuple[int, str, int, int]]]:
    """All (tree after the step, step) pairs until a single number remains."""
    out = []
    while isinstance(tree, _Op):
        tree, step = _reduce_once(tree)
        out.append((tree, step))
    return out


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------

_EXPR_TEMPLATES = ("Compute {e}.", "What is {e}?", "Evaluate {e}.")
_NAMES = ("Ann", "Bo", "Cy", "Dan", "Eve", "Max", "Sam", "Tim", "Zoe", "Liz")
_ITEMS = ("pens", "cards", "eggs", "coins", "books", "cups", "apples")
_WORD_PLUS = ("gets {x}", "buys {x}", "finds {x}")
_WORD_MINUS = ("loses {x}", "sells {x}", "gives away {x}")
_WORD_SCALE = {("*", 2): "doubles them", ("*", 3): "triples them", ("/", 2): "halves them"}


def is_heldout(key: str) -> bool:
    """Whether the canonical problem ``key`` belongs to the held-out (eval) split. Seed-independent."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1_000_000 < EVAL_FRACTION * 1_000_000


def _operand_choices(op: str, acc: int, on_right: bool, diff: Difficulty) -> list[int]:
    """Operands x such that ``acc op x`` (or ``x op acc``) stays a non-negative integer <= max_value."""
    lo = max(diff.min_operand, 2) if op in "*/" else diff.min_operand
    candidates = range(lo, diff.max_operand + 1)
    out = []
    for x in candidates:
        a, b = (acc, x) if on_right else (x, acc)
        if op == "/" and (b == 0 or a % b):
            continue
        value = _apply(op, a, b)
        if 0 <= value <= diff.max_value:
            out.append(x)
    return out


def _random_tree(rng: random.Random, num_ops: int, diff: Difficulty) -> _Node:
    """Grow an expression by combining the running subexpression with a fresh operand, num_ops times.

    Operands are drawn only from values that keep every intermediate legal, so no rejection loop is needed
    except in the rare dead end where no operator/side admits any operand.
    """
    while True:
        tree: _Node = _Num(rng.randint(diff.min_operand, diff.max_operand))
        acc = _evaluate(tree)
        for step in range(num_ops):
            # Mostly extend on the right (reads left to right); sometimes put the new operand first so
            # shapes such as "3+4*5" and "9-(2+3)" also occur. The first step has no distinct left form.
            on_right = step == 0 or rng.random() < 0.7
            options = [(op, on_right) for op in diff.ops]
            rng.shuffle(options)
            for op, right in options:
                choices = _operand_choices(op, acc, right, diff)
                if choices:
                    x = rng.choice(choices)
                    tree = _Op(op, tree, _Num(x)) if right else _Op(op, _Num(x), tree)
                    acc = _evaluate(tree)
                    break
            else:
                break  # dead end: restart from a new first operand
        else:
            return tree


def _word_prompt(rng: random.Random, tree: _Node, diff: Difficulty) -> str | None:
    """Tell ``tree`` as a running-total story, or None if its shape or length does not allow it."""
    steps: list[str] = []
    node = tree
    while isinstance(node, _Op):
        if not isinstance(node.right, _Num):
            return None  # the running total must always be the left operand
        x = node.right.value
        if node.op == "+":
            steps.append(rng.choice(_WORD_PLUS).format(x=x))
        elif node.op == "-":
            steps.append(rng.choice(_WORD_MINUS).format(x=x))
        elif (node.op, x) in _WORD_SCALE:
            steps.append(_WORD_SCALE[(node.op, x)])
        else:
            return None
        node = node.left
    assert isinstance(node, _Num)
    item = rng.choice(_ITEMS)
    if node.value == 1:
        item = item[:-1]  # all items are regular plurals: "1 pen", "1 apple"
    prompt = f"{rng.choice(_NAMES)} has {node.value} {item}, {', '.join(reversed(steps))}. How many?"
    return prompt if len(prompt) <= diff.max_prompt_chars else None


def _resolve_difficulty(difficulty: int | Difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in DIFFICULTY_LEVELS:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY_LEVELS)} or a Difficulty, got {difficulty!r}")
    return DIFFICULTY_LEVELS[difficulty]


# make_problems gives up after this many draws in a row that it could not use.
_MAX_CONSECUTIVE_MISSES = 20_000


def make_problems(split: Split, n: int, seed: int, difficulty: int | Difficulty = 2, *,
                  unique: bool = False) -> list[Problem]:
    """Generate ``n`` problems of ``split`` deterministically from ``seed``.

    Args:
        split: "sft" or "opd" (both drawn from the train keys, with independent random streams, so they may
            overlap) or "eval" (held-out keys only; see `is_heldout`).
        n: Number of problems.
        seed: Random seed; the same (split, n, seed, difficulty) always gives the same list.
        difficulty: A level from `DIFFICULTY_LEVELS` (1..3) or a custom `Difficulty`.
        unique: Return problems with pairwise distinct computations (canonical expressions; a word problem
            and the bare expression of the same computation count as one). Small difficulty settings have
            few of them (level 1: ~200 before the split), so this raises ValueError when the split cannot
            supply ``n``. Without it problems are i.i.d. draws and may repeat.
    """
    if split not in ("sft", "opd", "eval"):
        raise ValueError(f"split must be 'sft', 'opd' or 'eval', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    diff = _resolve_difficulty(difficulty)
    want_heldout = split == "eval"
    # A string seed is hashed with SHA-512 by `random`, so streams are stable across runs and platforms.
    rng = random.Random(f"jopd-arith|{split}|{seed}")
    level = difficulty if isinstance(difficulty, int) else None

    problems: list[Problem] = []
    seen: set[str] = set()
    misses = 0
    while len(problems) < n:
        num_ops = rng.randint(diff.min_ops, diff.max_ops)
        tree = _random_tree(rng, num_ops, diff)
        key = _render(tree)
        # Rejected draws: wrong side of the split, or (unique) a computation already taken. Tiny custom
        # difficulties may have no key at all on one side, so a long run of rejections ends in an error.
        if is_heldout(key) != want_heldout or (unique and key in seen):
            misses += 1
            if misses > _MAX_CONSECUTIVE_MISSES:
                raise ValueError(
                    f"split {split!r} at this difficulty yields only {len(problems)} "
                    f"{'distinct ' if unique else ''}problems (asked for {n}); lower n, raise the difficulty"
                    + (" or pass unique=False" if unique else "")
                )
            continue
        misses = 0
        seen.add(key)
        prompt = _word_prompt(rng, tree, diff) if rng.random() < diff.word_fraction else None
        kind = "word" if prompt is not None else "expr"
        if prompt is None:
            prompt = rng.choice(_EXPR_TEMPLATES).format(e=key)
        meta = {
            "task": "arith",
            "split": split,
            "kind": kind,
            "expression": key,
            "num_ops": num_ops,
            "level": level,
            "index": len(problems),
        }
        problems.append(Problem(prompt=prompt, answer=str(_evaluate(tree)), meta=meta))
    return problems


def difficulty_dict(difficulty: int | Difficulty) -> dict[str, Any]:
    """The resolved generator settings as a plain dict (for logging run configs)."""
    return asdict(_resolve_difficulty(difficulty))


# ---------------------------------------------------------------------------------------------------------
# Solution styles
# ---------------------------------------------------------------------------------------------------------


def solve(problem: Problem, style: Style) -> str:
    """Write a correct worked solution of a synthetic ``problem`` in ``style`` "A" or "B" (see module doc)."""
    expression = problem.meta.get("expression")
    if not isinstance(expression, str):
        raise TypeError("solve() needs a synthetic problem with meta['expression'] (from make_problems)")
    tree = _parse(expression)
    answer = _evaluate(tree)
    if str(answer) != problem.answer:
        raise ValueError(f"meta['expression'] {expression!r} evaluates to {answer}, not the answer "
                         f"{problem.answer!r}")
    steps = _reductions(tree)
    if style == "A":
        chain = ";".join(f"{a}{op}{b}={r}" for _, (a, op, b, r) in steps) or str(answer)
        return f"{chain}\nanswer: {answer}"
    if style == "B":
        chain = " => ".join([_render(tree)] + [_render(t) for t, _ in steps])
        return f"{chain}\n#### {answer}"
    raise ValueError(f"style must be 'A' or 'B', got {style!r}")


def solution_style(text: str) -> Style | None:
    """Which style's final-answer marker ``text`` uses last ("A": ``answer:``, "B": ``####``), if any.

    Lets a run report how far a distilled student has drifted from one teacher's style to the other's.
    """
    a = text.rfind("answer:")
    b = text.rfind("####")
    if a < 0 and b < 0:
        return None
    return "A" if a > b else "B"


# ---------------------------------------------------------------------------------------------------------
# Answer extraction and checking
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# User prompt files (DAPO-Math-17k style JSONL / Parquet)
# ---------------------------------------------------------------------------------------------------------

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


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, int], Any]]:
    """(location text, position meta, parsed row) per non-blank line; a .json file may hold one array."""
    text = path.read_text(encoding="utf-8")
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
                     require_answer: bool = True, dedupe: bool = False) -> list[Problem]:
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
        top_level = [prompt_field.split(".")[0], *_CONVERSATION_FIELDS, *(f.split(".")[0] for f in answer_fields)]
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
        problems.append(Problem(prompt=prompt, answer=answer or "", meta=meta))
    return problems
