"""Multi-teacher routing of prompts (``routing.field`` / ``routing.teachers``, docs/multi-teacher.md).

Every prompt has a route: the value of one of its fields (a prompt file's row field, read by
``load_prompt_file(route_field=...)``; or a generated arithmetic problem's ``level`` / ``kind`` / ``num_ops``,
`jopd.data.arithmetic.route_tag`). Each route has a teacher. Here, with no model or run directory involved:

- :func:`assign_routes`: the route of every prompt of every split, checked against the route -> teacher map: a
  value the map does not list is refused naming the prompt (file:line) and the field, and so is a mapped
  route without prompts in some split (its teacher would write no SFT data, score no rollout, be evaluated on
  nothing);
- :func:`stratified_order`: the order in which batches take rows of several routes: every route spread evenly,
  so each batch holds the routes in proportion to their rows (to within a row or two).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from jopd.data.arithmetic import Problem, route_tag
from jopd.data.prompt_files import PromptFileError

__all__ = ["ROUTE", "RouteError", "assign_routes", "problem_route", "route_groups", "stratified_order"]

ROUTE = "route"  # a prompt row's route in RUN_DIR/prepare/prompts/{sft,opd,eval}.jsonl (routed runs only)


class RouteError(PromptFileError):
    """Prompts that cannot be routed: a route value without a teacher, a prompt without a route, a route
    without prompts. The message names the prompt (file:line) or the route, and the field."""


def _where(split: str, index: int, problem: Problem) -> str:
    meta = problem.meta
    if "source" in meta and "line" in meta:
        return f"{meta['source']}:{meta['line']}"
    if "source" in meta and "row" in meta:
        return f"{meta['source']} row {meta['row']} (0-based)"
    return f"{split} prompt {index} ({problem.prompt!r})"


def problem_route(problem: Problem, task_kind: str, field: str) -> str:
    """The route of one prompt: a prompt file's ``meta["route"]`` (read with ``route_field``), or the
    arithmetic task's ``route_tag``."""
    if task_kind == "arithmetic":
        return route_tag(problem, field)
    route = problem.meta.get(ROUTE)
    if route is None:
        raise ValueError(f"prompt {problem.prompt[:40]!r} was loaded without its route field {field!r}")
    return str(route)


def assign_routes(splits: Mapping[str, Sequence[Problem]], *, task_kind: str, field: str,
                  routes: Mapping[str, str]) -> dict[str, list[str]]:
    """The route of every prompt, per split (same order), checked against ``routes`` (route -> teacher).

    Raises RouteError naming the first prompts (file:line) whose route has no teacher, or the routes that have
    no prompts in a split (a teacher with no prompts)."""
    out: dict[str, list[str]] = {}
    for split, problems in splits.items():
        values = []
        for i, p in enumerate(problems):
            try:
                values.append(problem_route(p, task_kind, field))
            except ValueError as e:
                raise RouteError(f"{_where(split, i, p)}: {e}") from None
        unknown = [(i, v) for i, v in enumerate(values) if v not in routes]
        if unknown:
            shown = "; ".join(f"{_where(split, i, problems[i])}: {field} = {v!r}" for i, v in unknown[:3])
            raise RouteError(
                f"{len(unknown)} {split} prompt(s) have a route with no teacher ({shown}"
                f"{' ...' if len(unknown) > 3 else ''}); routing.teachers maps {sorted(routes)}: add the route(s) "
                f"{sorted({v for _, v in unknown})} to routing.teachers or remove those prompts")
        out[split] = values
    for split, values in out.items():
        empty = sorted(set(routes) - set(values))
        if empty:
            raise RouteError(
                f"routing.teachers: route(s) {', '.join(f'{r!r} (teacher {routes[r]})' for r in empty)} have no "
                f"{split} prompts among the {len(values)} (field {field!r}); every route needs SFT, OPD and eval "
                "prompts (its teacher writes, scores and is measured on them): remove the route or add prompts")
    return out


def route_groups(routes: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """int32 [N]: the index in ``names`` of each item's route."""
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index[r] for r in routes], np.int32)


def stratified_order(groups: Sequence[int] | np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """A permutation of ``range(N)`` that spreads every group evenly: group g's i-th item (its items shuffled by
    ``rng``, else in index order) takes the ideal position (i + 1/2) N / n_g, and items are sorted by ideal
    position (ties by group). Every prefix of m items then holds m n_g / N items of group g to within 1/2 with two
    groups (about 1 with up to 8), so a batch cut from it (a difference of two prefixes) holds its share of each
    group to within one item with two groups and about two with up to 8 (tests/test_multi_teacher.py).

    ``groups``: int [N], the group of each item. Returns int64 [N].
    """
    groups = np.asarray(groups, np.int64)
    n = len(groups)
    position = np.empty(n, np.float64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if rng is not None:
            idx = rng.permutation(idx)
        position[idx] = (np.arange(len(idx)) + 0.5) * (n / len(idx))
    return np.lexsort((groups, position))
