"""The built-in synthetic arithmetic task: problem generation, the train/eval split and two solution styles.

The task
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

Solution styles (what the teachers learn)
    A: left-to-right binary steps, then ``answer: X``::

        3+4=7;7*5=35;35-6=29
        answer: 29

    B: restate the expression and rewrite it after each reduction, then ``#### X``::

        (3+4)*5-6 => 7*5-6 => 35-6 => 29
        #### 29

    A2: style A with two orders (a multi-modal teacher). A sum of three or more terms is added either left to
    right or right to left, each solution consistently in one order, chosen at random per solution (a fixed hash
    of the problem, so a dataset is reproducible); every other problem is solved as in A::

        12+7=19;19+31=50;50+5=55        (Compute 12+7+31+5., left to right)
        5+31=36;36+7=43;43+12=55        (the same problem, right to left)
        answer: 55

    Taking the next term in the chosen direction needs the solution's first step (which end it started from)
    and where the last term taken sits in the prompt: a small model that cannot keep track mixes the orders and
    skips or repeats a term.

Level 4 (sum chains)
    Sums of three to five terms 1..29 written left to right ("Compute 12+7+31+5."): long enough that one early
    slip (a wrong sum, a skipped term) decides the answer, and the problems on which style A2 has two orders.

Answers are checked by `jopd.data.grading.check_answer`, which reads both styles' final-answer markers.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "DIFFICULTY_LEVELS",
    "EVAL_FRACTION",
    "Difficulty",
    "Problem",
    "Split",
    "Style",
    "difficulty_dict",
    "is_heldout",
    "make_problems",
    "ROUTE_FIELDS",
    "route_tag",
    "SUM_SOLUTION_KINDS",
    "solution_order",
    "solution_style",
    "solve",
    "sum_solution_kind",
    "sum_terms",
]

Split = Literal["sft", "opd", "eval"]
Style = Literal["A", "B", "A2"]

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
        left_operand_prob: Probability that a new operand goes on the left of the running subexpression
            ("x op (...)") rather than on its right; 0 gives flat left-to-right chains ("3+4+5").
    """

    min_ops: int = 1
    max_ops: int = 2
    min_operand: int = 1
    max_operand: int = 9
    max_value: int = 99
    ops: str = "+-*"
    word_fraction: float = 0.25
    max_prompt_chars: int = 48
    left_operand_prob: float = 0.3

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
        if not 0.0 <= self.left_operand_prob <= 1.0:
            raise ValueError(f"left_operand_prob must be in [0, 1], got {self.left_operand_prob}")


# Level n mixes 1..n operations so every level still contains easy problems to bootstrap learning.
DIFFICULTY_LEVELS: dict[int, Difficulty] = {
    1: Difficulty(min_ops=1, max_ops=1, max_operand=9, max_value=99),
    2: Difficulty(min_ops=1, max_ops=2, max_operand=9, max_value=99),
    3: Difficulty(min_ops=1, max_ops=3, max_operand=12, max_value=199),
    # Sum chains of 3..5 terms: the multi-step task of the demo (see "Level 4" above).
    4: Difficulty(min_ops=2, max_ops=4, min_operand=1, max_operand=29, max_value=199, ops="+", word_fraction=0.0,
                  left_operand_prob=0.0),
}


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
            on_right = step == 0 or rng.random() < 1.0 - diff.left_operand_prob
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
    """Write a correct worked solution of a synthetic ``problem`` in ``style`` "A", "B" or "A2" (module doc)."""
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
    if style == "A2":
        terms = sum_terms(tree)
        if terms is None or len(terms) < 3:
            return solve(problem, "A")
        if solution_order(problem) == "right":
            terms = terms[::-1]
        acc, parts = terms[0], []
        for x in terms[1:]:
            parts.append(f"{acc}+{x}={acc + x}")
            acc += x
        return ";".join(parts) + f"\nanswer: {answer}"
    raise ValueError(f"style must be 'A', 'B' or 'A2', got {style!r}")


def sum_terms(tree: _Node | str) -> list[int] | None:
    """The terms of a flat left-to-right sum ("3+4+5" -> [3, 4, 5]; a tree or its expression), else None."""
    node = _parse(tree) if isinstance(tree, str) else tree
    out: list[int] = []
    while isinstance(node, _Op):
        if node.op != "+" or not isinstance(node.right, _Num):
            return None
        out.append(node.right.value)
        node = node.left
    out.append(node.value)
    return out[::-1]


SUM_STEP = re.compile(r"(\d+)\+(\d+)=(\d+)")
# What `sum_solution_kind` tells apart, in report order.
SUM_SOLUTION_KINDS = ("correct, left to right", "correct, right to left", "correct, orders mixed",
                      "wrong: a term skipped or repeated", "wrong: a wrong sum", "wrong: other")


def sum_solution_kind(terms: list[int], text: str, correct: bool) -> str:
    """Which of `SUM_SOLUTION_KINDS` a style-A/A2 ``text`` solving the sum of ``terms`` is (``correct``: its final
    answer was graded right). The steps ``a+b=c`` of its first line are read: the terms taken are the first
    step's two and every later step's second; "orders mixed" = answered right, the terms taken in neither
    order; a wrong sum is reported before a skipped or repeated term (a wrong sum also changes which term looks
    taken)."""
    steps = [tuple(map(int, m)) for m in SUM_STEP.findall(text.split("\n")[0])]
    taken = ([steps[0][0]] + [b for _, b, _ in steps]) if steps else []
    if correct:
        if taken == terms:
            return SUM_SOLUTION_KINDS[0]
        if taken == terms[::-1]:
            return SUM_SOLUTION_KINDS[1]
        return SUM_SOLUTION_KINDS[2]
    if any(a + b != c for a, b, c in steps):
        return SUM_SOLUTION_KINDS[4]
    if sorted(taken) != sorted(terms):
        return SUM_SOLUTION_KINDS[3]
    return SUM_SOLUTION_KINDS[5]


def solution_order(problem: Problem) -> Literal["left", "right"]:
    """The order style A2 adds ``problem``'s terms in: a fixed hash of the prompt and its position in its split
    (so repeated draws of one computation get independent orders, and a dataset is the same on every run)."""
    key = f"jopd-a2-order|{problem.prompt}|{problem.meta.get('split')}|{problem.meta.get('index')}"
    return "right" if hashlib.sha256(key.encode()).digest()[0] % 2 else "left"


# Multi-teacher routing (routing.field): the problem fields a prompt can be routed by, and their values.
ROUTE_FIELDS: dict[str, tuple[str, ...]] = {
    "level": tuple(map(str, DIFFICULTY_LEVELS)), "kind": ("expr", "word"),
    "num_ops": tuple(map(str, range(1, max(d.max_ops for d in DIFFICULTY_LEVELS.values()) + 1)))}


def route_tag(problem: Problem, field: str) -> str:
    """The route of a generated ``problem`` by ``field`` (one of `ROUTE_FIELDS`), as a string ("2", "word")."""
    if field not in ROUTE_FIELDS:
        raise ValueError(f"the arithmetic task routes by {', '.join(sorted(ROUTE_FIELDS))}, not {field!r}")
    value = problem.meta.get(field)
    if value is None:
        raise ValueError(f"problem {problem.prompt!r} has no {field!r} (made with a custom Difficulty?)")
    return str(value)


def solution_style(text: str) -> Style | None:
    """Which style's final-answer marker ``text`` uses last ("A": ``answer:``, "B": ``####``), if any.

    Lets a run report how far a distilled student has drifted from one teacher's style to the other's.
    """
    a = text.rfind("answer:")
    b = text.rfind("####")
    if a < 0 and b < 0:
        return None
    return "A" if a > b else "B"
