"""Tests for jopd.data.arithmetic, .grading and .prompt_files: generation, splits, solution styles, answer
checking, prompt-file loading."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from jopd.data.arithmetic import (
    DIFFICULTY_LEVELS,
    EVAL_FRACTION,
    SUM_SOLUTION_KINDS,
    Difficulty,
    Problem,
    is_heldout,
    make_problems,
    solution_order,
    solution_style,
    solve,
    sum_solution_kind,
    sum_terms,
)
from jopd.data.grading import check_answer, extract_answer
from jopd.data.prompt_files import PromptFileError, load_prompt_file

# ---------------------------------------------------------------------------------------------------------
# Generation and splits
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [2, 3])
def test_eval_split_is_disjoint_from_training_splits(level: int) -> None:
    train = make_problems("sft", 3000, seed=0, difficulty=level) + make_problems("opd", 3000, seed=1,
                                                                                  difficulty=level)
    # Another seed for eval: the partition must not depend on the seed.
    held = make_problems("eval", 2000, seed=7, difficulty=level)
    train_keys = {p.meta["expression"] for p in train}
    held_keys = {p.meta["expression"] for p in held}
    assert train_keys.isdisjoint(held_keys)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held})
    assert all(is_heldout(k) for k in held_keys)
    assert not any(is_heldout(k) for k in train_keys)
    assert {p.meta["split"] for p in held} == {"eval"}


def test_heldout_fraction_is_about_eval_fraction() -> None:
    synthetic = [f"{a}+{b}*{c}" for a in range(30) for b in range(30) for c in range(5)]
    share = sum(is_heldout(k) for k in synthetic) / len(synthetic)
    assert abs(share - EVAL_FRACTION) < 0.02


def test_generation_is_deterministic_by_seed() -> None:
    a = make_problems("sft", 300, seed=3, difficulty=3)
    assert a == make_problems("sft", 300, seed=3, difficulty=3)
    assert a != make_problems("sft", 300, seed=4, difficulty=3)
    # sft and opd draw from the same pool with independent streams.
    assert [p.prompt for p in a] != [p.prompt for p in make_problems("opd", 300, seed=3, difficulty=3)]
    assert make_problems("eval", 5, seed=0)[0].answer == make_problems("eval", 5, seed=0)[0].answer


def test_difficulty_controls_operations_and_operands() -> None:
    for level, diff in DIFFICULTY_LEVELS.items():
        problems = make_problems("sft", 400, seed=0, difficulty=level)
        ops = {p.meta["num_ops"] for p in problems}
        assert ops == set(range(diff.min_ops, diff.max_ops + 1))
        for p in problems:
            assert 0 <= int(p.answer) <= diff.max_value
            assert p.meta["level"] == level
    custom = Difficulty(min_ops=3, max_ops=3, max_operand=5, max_value=50, ops="+-", word_fraction=0.0)
    problems = make_problems("eval", 200, seed=0, difficulty=custom)
    assert all(p.meta["num_ops"] == 3 and p.meta["kind"] == "expr" for p in problems)
    assert all(set(p.meta["expression"]) <= set("0123456789+-()") for p in problems)
    with pytest.raises(ValueError, match="difficulty"):
        make_problems("sft", 1, 0, difficulty=9)
    with pytest.raises(ValueError, match="split"):
        make_problems("train", 1, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_ops"):
        Difficulty(min_ops=2, max_ops=1)


def test_division_is_exact() -> None:
    diff = Difficulty(min_ops=2, max_ops=3, ops="*/", max_operand=12, max_value=144)
    for p in make_problems("sft", 300, seed=0, difficulty=diff):
        assert check_answer(solve(p, "A"), p.answer)
        assert check_answer(solve(p, "B"), p.answer)


def test_unique_problems_and_exhaustion_error() -> None:
    problems = make_problems("eval", 300, seed=0, difficulty=3, unique=True)
    assert len({p.meta["expression"] for p in problems}) == 300
    # Level 1 has only ~200 distinct computations, a fifth of them held out.
    with pytest.raises(ValueError, match="distinct problems"):
        make_problems("eval", 5000, seed=0, difficulty=1, unique=True)
    # A single possible computation lies on one side of the split only: the other side must not hang.
    single = Difficulty(min_ops=1, max_ops=1, min_operand=1, max_operand=1, ops="+")
    empty_side = "sft" if is_heldout("1+1") else "eval"
    with pytest.raises(ValueError, match="yields only 0 problems"):
        make_problems(empty_side, 1, seed=0, difficulty=single)


def test_problem_lengths_fit_tiny_models() -> None:
    # Levels 1-3 fit 60 characters; the sum chains of level 4 are the long-solution level (B restates 5 terms).
    for level in DIFFICULTY_LEVELS:
        limit = 60 if level <= 3 else 80
        for p in make_problems("sft", 1000, seed=0, difficulty=level):
            assert len(p.prompt) <= 48
            for style in ("A", "B", "A2"):
                assert len(solve(p, style)) <= limit, (level, style, p.prompt)
    kinds = {p.meta["kind"] for p in make_problems("sft", 300, seed=0, difficulty=2)}
    assert kinds == {"expr", "word"}


# ---------------------------------------------------------------------------------------------------------
# Solution styles
# ---------------------------------------------------------------------------------------------------------


def test_styles_on_the_canonical_example() -> None:
    problem = Problem("Compute (3+4)*5-6.", "29", {"expression": "(3+4)*5-6"})
    assert solve(problem, "A") == "3+4=7;7*5=35;35-6=29\nanswer: 29"
    assert solve(problem, "B") == "(3+4)*5-6 => 7*5-6 => 35-6 => 29\n#### 29"
    # Right-hand subexpressions are narrated in evaluation order and keep their parentheses in B.
    nested = Problem("What is 9-(2+3)*1?", "4", {"expression": "9-(2+3)*1"})
    assert solve(nested, "A") == "2+3=5;5*1=5;9-5=4\nanswer: 4"
    assert solve(nested, "B") == "9-(2+3)*1 => 9-5*1 => 9-5 => 4\n#### 4"


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_both_styles_are_correct_and_distinct(level: int) -> None:
    for p in make_problems("opd", 500, seed=11, difficulty=level):
        a, b, a2 = solve(p, "A"), solve(p, "B"), solve(p, "A2")
        assert a != b
        assert solution_style(a) == "A" and solution_style(b) == "B" and solution_style(a2) == "A"
        for text in (a, b, a2):
            assert extract_answer(text, last_number_fallback=False) == p.answer
            assert check_answer(text, p.answer)
            assert not check_answer(text, str(int(p.answer) + 1))


def test_level_4_is_flat_sum_chains() -> None:
    problems = make_problems("sft", 2000, seed=0, difficulty=4)
    assert {p.meta["num_ops"] for p in problems} == {2, 3, 4}
    for p in problems:
        terms = sum_terms(p.meta["expression"])
        assert terms is not None and len(terms) == p.meta["num_ops"] + 1 and all(1 <= t <= 29 for t in terms)
        assert "(" not in p.prompt and p.meta["kind"] == "expr" and sum(terms) == int(p.answer)
    assert sum_terms("3+(4+5)") is None and sum_terms("3+4*5") is None and sum_terms("7") == [7]


def test_style_a2_adds_in_one_of_two_orders() -> None:
    left = Problem("Compute 12+7+31+5.", "55", {"expression": "12+7+31+5", "split": "sft", "index": 0})
    texts = {}
    for index in range(40):  # the order is a fixed hash of the problem and its index: both occur
        p = Problem(left.prompt, left.answer, {**left.meta, "index": index})
        texts[solution_order(p)] = solve(p, "A2")
        assert solve(p, "A2") == solve(p, "A2")
    assert texts == {"left": "12+7=19;19+31=50;50+5=55\nanswer: 55",
                     "right": "5+31=36;36+7=43;43+12=55\nanswer: 55"}
    # About half of a dataset in each order; every step a correct sum; the terms used each exactly once.
    problems = make_problems("sft", 2000, seed=1, difficulty=4)
    orders = [solution_order(p) for p in problems]
    assert 0.45 < orders.count("right") / len(orders) < 0.55
    for p, order in zip(problems, orders):
        steps = [tuple(map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", s).groups()))
                 for s in solve(p, "A2").split("\n")[0].split(";")]
        assert all(a + b == c for a, b, c in steps)
        used = [steps[0][0]] + [b for _, b, _ in steps]
        terms = sum_terms(p.meta["expression"])
        assert used == (terms if order == "left" else terms[::-1])
    # Anything but a sum of three or more terms is solved as in style A.
    others = [p for p in make_problems("sft", 300, seed=2, difficulty=2)
              if len(sum_terms(p.meta["expression"]) or []) < 3]
    assert len(others) > 200
    for p in others:
        assert solve(p, "A2") == solve(p, "A")


def test_solve_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="expression"):
        solve(Problem("What is 2+2?", "4", {}), "A")
    with pytest.raises(ValueError, match="evaluates to"):
        solve(Problem("Compute 2+2.", "5", {"expression": "2+2"}), "A")
    with pytest.raises(ValueError, match="style"):
        solve(Problem("Compute 2+2.", "4", {"expression": "2+2"}), "C")  # type: ignore[arg-type]
    assert solution_style("no marker") is None


# ---------------------------------------------------------------------------------------------------------
# Answer extraction and checking
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3+4=7\nanswer: 7", "7"),
        ("=> 35 => 29\n#### 29", "29"),
        ("so \\boxed{29}.", "29"),
        ("The answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}} done", "\\frac{\\sqrt{2}}{2}"),
        ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
        ("**Answer:** 29 apples", "29"),
        ("Answer: $-3$", "-3"),
        ("Answer:\n42", "42"),
        ("first \\boxed{1}, then answer: 2", "2"),
        ("answer: 1 ... final: \\boxed{5}", "5"),
        ("The final answer is \\(x^2\\)", "x^2"),
    ],
)
def test_extract_answer_formats(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_last_number_fallback() -> None:
    assert extract_answer("3+4=7;7*5=35") == "35"
    assert extract_answer("35-6=29 then 7-4") == "4"  # a minus between digits is an operator, not a sign
    assert extract_answer("it is -12") == "-12"
    assert extract_answer("3+4=7;7*5=35", last_number_fallback=False) is None
    assert extract_answer("no digits here") is None
    assert extract_answer("\\boxed{unclosed") is None


@pytest.mark.parametrize(
    ("response", "label"),
    [
        ("answer: 29", "29"),
        ("answer: 29", "29.0"),
        ("answer: +29", "29"),
        ("#### 29.0", "\\boxed{29}"),
        ("\\boxed{29}", "29"),
        ("answer: 1,000", "1000"),
        ("answer: 1/2", "\\frac{1}{2}"),
        ("answer: 0.5", "\\dfrac12"),
        ("answer: -\\frac{3}{4}", "-0.75"),
        ("answer: 29.", "29"),
        ("answer: \\text{(B)}", "(B)"),
    ],
)
def test_check_answer_equivalences(response: str, label: str) -> None:
    assert check_answer(response, label)
    assert check_answer(response, label, use_math_verify=False)


def test_check_answer_rejections() -> None:
    assert not check_answer("answer: 28", "29")
    assert not check_answer("answer: 2.9", "29")
    assert not check_answer("7*5=35;35-6=29", "29")  # no explicit final answer
    assert check_answer("7*5=35;35-6=29", "29", last_number_fallback=True)
    assert not check_answer("answer: 29", "")


def test_check_answer_uses_math_verify_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    fake = types.ModuleType("math_verify")
    fake.parse = lambda text, **_: [text]  # type: ignore[attr-defined]

    def verify(gold: Any, pred: Any, **_: Any) -> bool:
        calls.append((gold, pred))
        return True

    fake.verify = verify  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    assert check_answer("\\boxed{x+1}", "1+x")
    assert calls == [(["\\boxed{1+x}"], ["\\boxed{x+1}"])]
    # Numbers never reach math_verify.
    assert not check_answer("answer: 3", "4")
    assert len(calls) == 1
    assert not check_answer("\\boxed{x+1}", "1+x", use_math_verify=False)


def test_check_answer_with_real_math_verify() -> None:
    pytest.importorskip("math_verify")
    assert check_answer("\\boxed{x+1}", "1+x")
    assert check_answer("answer: \\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2")
    assert check_answer("#### (1, 2)", "(1,2)")
    assert not check_answer("\\boxed{x+2}", "1+x")


def test_check_answer_fallback_without_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    assert check_answer("\\boxed{29}", "29.0")
    assert check_answer("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}")
    assert check_answer("answer: \\left( 1, 2 \\right)", "(1,2)")
    assert not check_answer("\\boxed{x+1}", "1+x")  # symbolic equivalence needs math_verify
    with pytest.raises(ImportError, match="math-verify"):
        check_answer("\\boxed{x+1}", "1+x", use_math_verify=True)


# ---------------------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------------------

DAPO_INSTRUCTION = "Solve the following math problem step by step. The last line should be Answer: $Answer.\n\n"


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _dapo_row(question: str, answer: str) -> dict[str, Any]:
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_INSTRUCTION + question}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "abc"},
    }


def test_load_plain_and_dapo_jsonl(tmp_path: Path) -> None:
    plain = _write_jsonl(tmp_path / "plain.jsonl", [
        {"prompt": "What is 2+2?", "answer": "4"},
        "",  # blank lines are skipped
        {"prompt": "What is 3*3?", "label": 9},
    ])
    problems = load_prompt_file(plain)
    assert [(p.prompt, p.answer) for p in problems] == [("What is 2+2?", "4"), ("What is 3*3?", "9")]
    assert problems[1].meta["line"] == 3 and problems[1].meta["source"] == str(plain)

    dapo = _write_jsonl(tmp_path / "dapo.jsonl", [_dapo_row("Find x.", "34"), _dapo_row("Find y.", "\\frac{1}{2}")] * 3)
    problems = load_prompt_file(dapo)
    assert len(problems) == 6
    assert problems[0].prompt == DAPO_INSTRUCTION + "Find x." and problems[0].answer == "34"
    assert problems[1].answer == "\\frac{1}{2}" and problems[1].meta["data_source"] == "math_dapo"
    assert [p.answer for p in load_prompt_file(dapo, dedupe=True)] == ["34", "\\frac{1}{2}"]
    assert len(load_prompt_file(dapo, limit=4)) == 4


def test_load_conversations_solutions_and_custom_fields(tmp_path: Path) -> None:
    rows = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q1"},
                           {"from": "gpt", "value": "long reasoning \\boxed{7}"}],
         "solution": "We get \\boxed{\\frac{7}{1}}."},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q2"}]}], "answer": "#### 12"},
        {"data": {"question": "Q3"}, "label": "5"},
    ]
    path = _write_jsonl(tmp_path / "conv.jsonl", rows[:2])
    problems = load_prompt_file(path)
    assert [(p.prompt, p.answer) for p in problems] == [("Q1", "\\frac{7}{1}"), ("Q2", "12")]
    nested = _write_jsonl(tmp_path / "nested.jsonl", rows[2:])
    assert load_prompt_file(nested, prompt_field="data.question")[0].prompt == "Q3"
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"prompt": "Q4", "answer": "1"}]))
    assert load_prompt_file(array)[0].meta["row"] == 0
    unlabeled = _write_jsonl(tmp_path / "unlabeled.jsonl", [{"prompt": "Q5"}])
    problem = load_prompt_file(unlabeled, require_answer=False)[0]
    assert problem.answer == "" and problem.meta["has_answer"] is False


@pytest.mark.parametrize(
    ("rows", "line", "message"),
    [
        ([{"prompt": "a", "answer": "1"}, "{not json"], 2, "invalid JSON"),
        ([{"prompt": "a", "answer": "1"}, "", {"prompt": "b"}], 3, "missing answer field.*'label'"),
        ([{"question": "a", "answer": "1"}], 1, "missing prompt field 'prompt'"),
        ([{"prompt": "   ", "answer": "1"}], 1, "empty prompt in field 'prompt'"),
        ([{"prompt": [{"role": "assistant", "content": "x"}], "answer": "1"}], 1, "no user message"),
        ([{"prompt": 5, "answer": "1"}], 1, "field 'prompt' must be a string"),
        ([{"prompt": "a", "answer": ["1", "2"]}], 1, "answer field 'answer' must be a string"),
        (["[1, 2]"], 1, "expected a JSON object"),
    ],
)
def test_prompt_file_errors_name_file_and_line(tmp_path: Path, rows: list[Any], line: int, message: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PromptFileError, match=message) as info:
        load_prompt_file(path)
    assert f"{path}:{line}:" in str(info.value)


def test_prompt_file_other_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_prompt_file(tmp_path / "missing.jsonl")
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(PromptFileError, match="unsupported prompt file type"):
        load_prompt_file(csv)


def test_load_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed: Parquet prompt files unsupported")
    import pyarrow.parquet as pq

    rows = [_dapo_row(f"Question {i}", str(i)) for i in range(5)]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    problems = load_prompt_file(path, limit=3)
    assert [(p.prompt, p.answer) for p in problems] == [(DAPO_INSTRUCTION + f"Question {i}", str(i)) for i in range(3)]
    assert problems[2].meta["row"] == 2

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "ok", "label": "1"}, {"prompt": "", "label": "2"}]), bad)
    with pytest.raises(PromptFileError, match=r"bad\.parquet row 1 \(0-based\): empty prompt"):
        load_prompt_file(bad)


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prompts.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_prompt_file(path)


def test_sum_solution_kind_tells_the_failure_modes_apart() -> None:
    terms = [12, 7, 31, 5]
    kinds = {
        "12+7=19;19+31=50;50+5=55\nanswer: 55": (True, "correct, left to right"),
        "5+31=36;36+7=43;43+12=55\nanswer: 55": (True, "correct, right to left"),
        "12+7=19;19+5=24;24+31=55\nanswer: 55": (True, "correct, orders mixed"),
        "12+7=19;19+31=50;50+12=62\nanswer: 62": (False, "wrong: a term skipped or repeated"),
        "12+7=19;19+31=51;51+5=56\nanswer: 56": (False, "wrong: a wrong sum"),
        "no steps\nanswer: 3": (False, "wrong: a term skipped or repeated"),
        "12+7=19;19+31=50;50+5=55\nanswer: 54": (False, "wrong: other"),
    }
    for text, (correct, kind) in kinds.items():
        assert check_answer(text, "55") is correct
        assert sum_solution_kind(terms, text, correct) == kind, text
    assert set(SUM_SOLUTION_KINDS) == {k for _, k in kinds.values()}
    # Every solution style A2 writes is correct in its own order.
    for p in make_problems("eval", 200, seed=3, difficulty=4):
        order, terms = solution_order(p), sum_terms(p.meta["expression"])
        if terms == terms[::-1]:  # a palindrome reads the same both ways
            continue
        kind = sum_solution_kind(terms, solve(p, "A2"), True)
        assert kind == f"correct, {'left to right' if order == 'left' else 'right to left'}"
