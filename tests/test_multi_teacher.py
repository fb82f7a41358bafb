"""Multi-teacher OPD (``routing.field`` / ``routing.teachers``, docs/multi-teacher.md).

Unit tests: the stratified order and its bounds, routes read from prompt files and the arithmetic task with
errors naming file:line and the field, the config's checks, route-stratified batches over several stores that
cover every row and resume exactly, the per-route evaluation's aggregation.

One shrunk CLI run of configs/tiny-multi-teacher.yaml (two teachers routed by difficulty level; arms: sampled-token,
+ top-k JSD, refresh_every 2, online, online with the teachers swapped), then: each route's SFT data is exactly what
its teacher samples (and not what the other teacher would), each teacher's store holds exactly its route's
rollouts scored by it (against the full-logits reference head), online batches score every row with its route's
teacher, the consistency rule refuses a teacher swap per route, and eval and the report are per teacher.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_shrink, write_jsonl

from jopd import sharding
from jopd.config import ConfigValidationError, load_config
from jopd.data import arithmetic
from jopd.data.loader import StoreSlices
from jopd.data.prompt_files import PromptFileError, load_prompt_file
from jopd.data.routing import RouteError, assign_routes, stratified_order
from jopd.data.store import RolloutStore
from jopd.io import read_json, read_jsonl
from jopd.multi_teacher import evaluate_routes, route_inputs, scored_routes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny-multi-teacher.yaml")
# 4 steps: the refresh_every 2 arm trains steps 3-4 on a refresh generation.
SHRINK = [*tiny_shrink(), "opd.steps=4", "opd.checkpoint_every=4", "opd.eval_every=4"]


# ------------------------------------------------------------------------------------------ stratified order
def _windows(groups: np.ndarray, size: int) -> np.ndarray:
    """Per-group counts of consecutive batches of ``size`` items: [batches, groups]."""
    n = len(groups) // size * size
    onehot = groups[:n, None] == np.arange(groups.max() + 1)[None]
    return onehot.reshape(-1, size, onehot.shape[1]).sum(1)


@pytest.mark.parametrize("num_groups, bound", [(2, 1.0), (3, 2.0), (8, 2.5)])
def test_stratified_order_gives_every_batch_its_share_of_each_group(num_groups, bound):
    rng = np.random.default_rng(num_groups)
    for trial in range(100):
        sizes = rng.integers(1, 60, num_groups)
        groups = rng.permutation(np.repeat(np.arange(num_groups), sizes))
        order = stratified_order(groups, np.random.default_rng(trial))
        assert sorted(order.tolist()) == list(range(len(groups)))  # a permutation: every item once
        for size in (2, 5, 8):
            counts = _windows(groups[order], size)
            assert np.abs(counts - size * sizes / sizes.sum()).max() <= bound, (sizes, size)
        # within a group the rng shuffles; without one the items keep their order
        plain = stratified_order(groups)
        for g in range(num_groups):
            members = [i for i in plain if groups[i] == g]
            assert members == sorted(members)
    # a uniform permutation does not keep the shares (so the bound above is the order's doing)
    groups = np.repeat([0, 1], 32)
    shuffled = [_windows(groups[np.random.default_rng(seed).permutation(64)], 8) for seed in range(10)]
    assert max(np.abs(w - 4).max() for w in shuffled) >= 2


# ---------------------------------------------------------------------------------------------- routing
def test_prompt_file_routes_and_their_errors_name_the_row_and_field(tmp_path):
    good = tmp_path / "p.jsonl"
    write_jsonl(good, [{"prompt": "1+1?", "answer": "2", "meta": {"subject": "add"}},
                       {"prompt": "2*3?", "answer": "6", "meta": {"subject": 7}}])
    rows = load_prompt_file(good, route_field="meta.subject")
    assert [p.meta["route"] for p in rows] == ["add", "7"]
    assert "route" not in load_prompt_file(good)[0].meta  # one-teacher runs read no route

    missing = tmp_path / "missing.jsonl"
    write_jsonl(missing, [{"prompt": "1+1?", "answer": "2", "domain": "math"}, {"prompt": "x?", "answer": "1"}])
    with pytest.raises(PromptFileError, match=rf"{missing}:2: missing route field 'domain'"):
        load_prompt_file(missing, route_field="domain")
    nested = tmp_path / "nested.jsonl"
    write_jsonl(nested, [{"prompt": "1+1?", "answer": "2", "domain": ["a"]}])
    with pytest.raises(PromptFileError, match=rf"{nested}:1: route field 'domain' must be a string or an integer"):
        load_prompt_file(nested, route_field="domain")

    splits = {"sft": load_prompt_file(good, route_field="meta.subject")}
    with pytest.raises(RouteError, match=rf"{good}:2: meta.subject = '7'.*maps \['add', 'mul'\]"):
        assign_routes(splits, task_kind="prompt_file", field="meta.subject", routes={"add": "A", "mul": "B"})
    splits = {"sft": splits["sft"][:1], "opd": load_prompt_file(good, route_field="meta.subject")}
    with pytest.raises(RouteError, match=r"route\(s\) '7' \(teacher B\) have no sft prompts"):
        assign_routes(splits, task_kind="prompt_file", field="meta.subject", routes={"add": "A", "7": "B"})
    assert assign_routes({"opd": splits["opd"]}, task_kind="prompt_file", field="meta.subject",
                         routes={"add": "A", "7": "B"}) == {"opd": ["add", "7"]}


def test_arithmetic_routes_by_level_kind_or_operations():
    problems = arithmetic.make_problems("sft", 40, 0, 2)
    assert {arithmetic.route_tag(p, "level") for p in problems} == {"2"}
    kinds = {arithmetic.route_tag(p, "kind") for p in problems}
    assert kinds == {"expr", "word"}
    assert {arithmetic.route_tag(p, "num_ops") for p in problems} == {"1", "2"}
    with pytest.raises(ValueError, match="routes by kind, level, num_ops"):
        arithmetic.route_tag(problems[0], "colour")
    with pytest.raises(RouteError, match=r"sft prompt\(s\) have a route with no teacher \(sft prompt \d+ "
                                         r"\('[^']+'\): num_ops = '2'.*add the route\(s\) \['2'\]"):
        assign_routes({"sft": problems}, task_kind="arithmetic", field="num_ops", routes={"1": "A"})


def _problems(*overrides: str) -> str:
    with pytest.raises(ConfigValidationError) as e:
        load_config(CONFIG, list(overrides), check_files=False)
    return "\n".join(e.value.problems)


def test_config_checks_the_route_maps_and_keeps_one_teacher_runs_unchanged():
    cfg = load_config(CONFIG, check_files=False)
    assert cfg.routing.enabled and cfg.arms[0].routes(cfg.routing) == {"1": "A", "2": "B"}
    assert cfg.arm("swapped_online").routes(cfg.routing) == {"1": "B", "2": "A"}
    assert scored_routes(cfg) == {"A": ["1"], "B": ["2"]}  # the swap is an online arm: no store needs it
    swapped = load_config(CONFIG, ["arms.4.mode=lightning"], check_files=False)
    assert scored_routes(swapped) == {"A": ["1", "2"], "B": ["1", "2"]}  # a lightning swap needs both

    assert "routing.teachers.3: unknown teacher 'C'" in _problems("routing.teachers={1: A, 3: C}")
    assert "'5' is not a value of the arithmetic task's 'level' (values: 1, 2, 3, 4)" in _problems(
        "routing.teachers={1: A, 2: B, 5: A}")
    assert "routing.field: the arithmetic task routes by kind, level, num_ops, got 'colour'" in _problems(
        "routing.field=colour")
    assert "arms[0].teachers: must map the routes of routing.teachers (['1', '2']); missing ['2']" in _problems(
        "arms.0.teachers={1: B}")
    assert "arms[0].teachers.2: unknown teacher 'Z'" in _problems("arms.0.teachers={1: A, 2: Z}")
    assert "precompute.teachers: teacher 'B' is given no route" in _problems("routing.teachers={1: A, 2: A}")
    assert "arms[0] (routed): lightning arm's teacher 'B' of route '2' is not in precompute.teachers" in _problems(
        "precompute.teachers=[A]")
    assert "routing.teachers: routes need routing.field" in _problems("routing.field=null")

    tiny = load_config(str(ROOT / "configs" / "tiny.yaml"), check_files=False)
    assert not tiny.routing.enabled and all(a.routes(tiny.routing) == {} for a in tiny.arms)
    assert "teachers" not in repr(tiny.arms[0])  # the form in which arms enter stage fingerprints
    assert route_inputs(types.SimpleNamespace(cfg=tiny), tiny.arms) == {}
    assert "arms[0].teachers: a route -> teacher map needs routing.field" in "\n".join(pytest.raises(
        ConfigValidationError, load_config, str(ROOT / "configs" / "tiny.yaml"), ["arms.0.teachers={1: A}"],
        check_files=False).value.problems)


def test_routes_are_checked_before_any_stage(tmp_path):
    from jopd import preflight

    cfg = load_config(CONFIG, ["task.difficulty=[1]"], check_files=False)  # no level-2 prompts
    assert "routing.teachers: route(s) '2' (teacher B) have no sft prompts" in "\n".join(preflight.problems(cfg))
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"prompt": f"{i}+1?", "answer": str(i + 1), **({"domain": "math"} if i != 5 else {})}
                          for i in range(12)])
    files = load_config(data={"task": {"kind": "prompt_file", "prompt_file": str(prompts), "num_sft_prompts": 4,
                                       "num_opd_prompts": 4, "num_eval_prompts": 2},
                              "routing": {"field": "domain", "teachers": {"math": "A"}},
                              "teachers": {"A": {"path": "unused"}}, "student": {"path": "unused"},
                              "precompute": {"teachers": ["A"]}}, check_files=False)
    assert f"{prompts}:6: missing route field 'domain'" in "\n".join(preflight._split_sizes(files)[1])


# ---------------------------------------------------------------------------------------------- batches
def _store(path: Path, n: int, tag: int) -> str:
    store = RolloutStore.create(path, num_rows=n, max_len=16, rows_per_chunk=4, attrs={})
    for c in range(store.num_chunks):
        lo, hi = store.chunk_rows(c)
        m = hi - lo
        tokens = np.zeros((m, 16), np.int32)
        tokens[:, :5] = (tag + np.arange(lo, hi))[:, None]  # each row's id in its tokens
        store.write_rollout_chunk(c, tokens=tokens, prompt_len=np.full(m, 2), response_len=np.full(m, 3),
                                  behaviour_logprobs=np.zeros((m, 16)), ended_with_eos=np.ones(m, bool),
                                  truncated=np.zeros(m, bool), prompt_index=np.arange(lo, hi),
                                  sample_index=np.zeros(m, np.int32))
        store.write_teacher_chunk(c, -np.ones((m, 16)))
    return str(path)


def test_sliced_batches_hold_the_routes_in_proportion_and_resume_exactly(tmp_path):
    from jopd.training import OPD_FIELDS, store_batches

    a, b = _store(tmp_path / "a", 14, 1000), _store(tmp_path / "b", 9, 2000)
    slices = StoreSlices(((a, 2, 14), (b, 3, 9)))  # 12 rows of a (route 0), 6 of b (route 1)
    want = {1000 + i for i in range(2, 14)} | {2000 + i for i in range(3, 9)}

    def ids(batch):
        return batch["tokens"][:, 0].tolist()

    data = store_batches(slices, batch_size=6, token_budget=None, row_len=None, seed=3, num_steps=9,
                         fields=OPD_FIELDS)
    epochs = [[ids(next(data)) for _ in range(3)] for _ in range(2)]
    for epoch in epochs:
        assert sorted(i for batch in epoch for i in batch) == sorted(want)  # every routed row once per epoch
        assert all(sum(i >= 2000 for i in batch) == 2 for batch in epoch)  # 4 + 2 rows: the 12 : 6 share
    assert epochs[0] != epochs[1]  # reshuffled within each route
    assert f"{a} rows" in data.describe(1) and f"{b} rows" in data.describe(1)
    state = data.data_iterator.get_state()
    expected = ids(next(data))
    again = store_batches(slices, batch_size=6, token_budget=None, row_len=None, seed=3, num_steps=9,
                          fields=OPD_FIELDS)
    again.data_iterator.set_state(state)
    assert ids(next(again)) == expected

    packed = store_batches(slices, batch_size=6, token_budget=64, row_len=16, seed=3, num_steps=4,
                           fields=OPD_FIELDS)
    seen = []
    for _ in range(2):  # 18 sequences of 5 tokens: 3 per 16-token row, 12 per batch
        batch = next(packed)
        seen += [int(t) for row, seg in zip(batch["tokens"], batch["segment_ids"]) for t, s in
                 zip(row, seg) if s and t]
    assert set(seen) == want


def test_route_evaluation_aggregates_every_prompt_against_its_own_teacher():
    prompts = [{"i": i} for i in range(7)]
    routes = ["x", "y", "x", "y", "y", "x", "y"]
    teachers = {"x": "TA", "y": "TB"}
    calls = []

    def evaluate(rows, teacher):  # accuracy 1 for even prompts; KL sums per teacher, tokens per prompt
        calls.append((teacher, [r["i"] for r in rows]))
        acc = [float(r["i"] % 2 == 0) for r in rows]
        tokens = 3 * len(rows) if teacher == "TA" else 5 * len(rows)
        kl = 0.5 if teacher == "TA" else 0.25
        return {"accuracy": float(np.mean(acc)), "per_prompt_accuracy": acc, "num_prompts": len(rows),
                "num_responses": len(rows), "num_correct": int(sum(acc)), "eos_rate": 1.0,
                "mean_response_len": 4.0, "generated_tokens": 10, "reverse_kl": kl, "reverse_kl_seq": 2 * kl,
                "kl_num_sequences": len(rows), "kl_response_tokens": tokens, "samples": [{"prompt": "p"}]}

    out = evaluate_routes(evaluate, prompts, routes, teachers)
    assert calls == [("TA", [0, 2, 5]), ("TB", [1, 3, 4, 6])]
    assert out["per_prompt_accuracy"] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0] and out["accuracy"] == 4 / 7
    assert out["reverse_kl"] == pytest.approx((0.5 * 9 + 0.25 * 20) / 29)  # per token over both routes
    assert out["reverse_kl_seq"] == pytest.approx((1.0 * 3 + 0.5 * 4) / 7)
    assert out["num_prompts"] == 7 and out["kl_response_tokens"] == 29
    assert out["per_route"]["x"]["reverse_kl"] == 0.5 and out["per_route"]["y"]["accuracy"] == 0.5


# ------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def routed_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("multi") / "run"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "jopd.main", "--config", CONFIG, "--run-dir", str(run_dir),
                           *SHRINK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def mesh():
    return sharding.single_device_mesh()


@pytest.fixture(scope="module")
def models(routed_run, mesh):
    from jopd.models import load_pretrained

    dirs = {"A": routed_run / "prepare" / "teachers" / "A", "B": routed_run / "prepare" / "teachers" / "B",
            "sft": routed_run / "sft" / "model"}
    return {name: load_pretrained(path, mesh=mesh) for name, path in dirs.items()}


def _reference_logprobs(model, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Full-vocabulary [B, T, V] logits, no chunking: the independent reference of every head."""
    from jopd.models import naive_logprobs_fn

    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int32)
    return np.asarray(jax.device_get(naive_logprobs_fn(model.params, model.config, tokens, mask)))


def _route_of_rows(run: Path, split: str) -> list[str]:
    return [r["route"] for r in read_jsonl(run / "prepare" / "prompts" / f"{split}.jsonl")]


@pytest.mark.slow
def test_cli_runs_two_teachers_with_topk_jsd_a_refresh_every_2_and_online_arms(routed_run):
    from jopd.config import STAGES

    for stage in STAGES:
        assert (routed_run / stage / "DONE.json").is_file(), stage
    prepared = read_json(routed_run / "prepare" / "DONE.json")["outputs"]["prompts_per_route"]
    assert prepared == {"sft": {"1": 16, "2": 16}, "opd": {"1": 8, "2": 8}, "eval": {"1": 4, "2": 4}}
    for arm in ("routed", "routed_jsd", "routed_refresh", "routed_online", "swapped_online"):
        meta = read_json(routed_run / "arms" / arm / "meta.json")
        assert meta["complete"] and meta["steps"] == 4
        teachers = {"1": "B", "2": "A"} if arm == "swapped_online" else {"1": "A", "2": "B"}
        assert {r: v["teacher_name"] for r, v in meta["routes"].items()} == teachers
        assert meta["consistent_teacher"] is (arm != "swapped_online")
        assert all(v["consistent_teacher"] is (arm != "swapped_online") for v in meta["routes"].values())
        rows = read_jsonl(routed_run / "metrics" / f"arm_{arm}.jsonl")
        evals = [r for r in rows if "eval/accuracy" in r]
        assert [r["step"] for r in evals] == [0, 4]
        assert all({"eval/routes/1/reverse_kl", "eval/routes/2/reverse_kl"} <= set(r) for r in evals)
    jsd = [r for r in read_jsonl(routed_run / "metrics" / "arm_routed_jsd.jsonl") if "loss" in r]
    assert len(jsd) == 4 and all(np.isfinite(r["topk_jsd"]) for r in jsd)

    # refresh_every 2: generation 1 (steps 3-4) sampled by the step-2 student, each route scored by its teacher
    refresh = read_json(routed_run / "arms" / "routed_refresh" / "meta.json")["refresh"]
    assert refresh["every"] == 2 and refresh["generations"] == 1 and refresh["consistent_teacher"]
    gen = routed_run / "arms" / "routed_refresh" / "generations" / "0001"
    routes = _route_of_rows(routed_run, "opd")
    for teacher, route in (("A", "1"), ("B", "2")):
        store = RolloutStore.open(gen / teacher / "store")
        store.verify()
        assert store.attrs["teacher_name"] == teacher and store.attrs["policy_step"] == 2
        assert store.attrs["routes"] == {route: [0, store.num_rows]} and store.num_rows == 8  # 2 steps x 8, 8 : 8
        assert {routes[i] for i in store.read_rows(range(store.num_rows), ["prompt_index"])["prompt_index"]} == {route}


@pytest.mark.slow
def test_sft_data_of_each_route_is_what_its_teacher_samples(routed_run, models):
    from jopd.data import tokenizer as toklib
    from jopd.pipeline import derive_seed, model_fingerprint
    from jopd.sampling import generate

    cfg = load_config(CONFIG, SHRINK, check_files=False)
    meta = read_json(routed_run / "teacher_data" / "meta.json")
    for route, teacher in (("1", "A"), ("2", "B")):
        assert meta["teachers"][route] == {"teacher_name": teacher, "teacher_fingerprint": model_fingerprint(
            routed_run / "prepare" / "teachers" / teacher)}
    sft_meta = read_json(routed_run / "sft" / "meta.json")
    assert sft_meta["sft_teachers"] == meta["teachers"]
    rows = read_jsonl(routed_run / "teacher_data" / "sft.jsonl")
    assert [r["route"] for r in rows] == _route_of_rows(routed_run, "sft")
    assert all(r["teacher_name"] == {"1": "A", "2": "B"}[r["route"]] for r in rows)

    # Part 0 holds teacher A's first prompts, part 1 teacher B's (16 each, teacher_data.batch_size 32): each is
    # re-sampled exactly by its teacher with the part's seed, and not by the other teacher.
    tok = toklib.load_tokenizer(str(routed_run / "prepare" / "tokenizer"))
    s = cfg.teacher_data
    for part, (teacher, other) in enumerate((("A", "B"), ("B", "A"))):
        mine = [r for r in rows if r["teacher_name"] == teacher]

        def sample(name, mine=mine, part=part):
            res = generate(models[name], [r["prompt_ids"] for r in mine], max_new_tokens=s.max_new_tokens,
                           temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                           eos_token_id=toklib.stop_ids(tok, models[name].config), seed=derive_seed(s.seed, part),
                           batch_size=s.batch_size)
            return [res.response(j) for j in range(len(mine))]

        assert sample(teacher) == [r["response_ids"] for r in mine], teacher
        assert sample(other) != [r["response_ids"] for r in mine], other


@pytest.mark.slow
def test_each_teacher_store_holds_its_routes_rollouts_with_its_logprobs(routed_run, models):
    rollout = RolloutStore.open(routed_run / "rollout" / "store")
    source = rollout.read_rows(range(rollout.num_rows), rollout.group_fields("rollout"))
    routes = np.asarray(_route_of_rows(routed_run, "opd"))[source["prompt_index"]]
    for teacher, other, route in (("A", "B", "1"), ("B", "A", "2")):
        store = RolloutStore.open(routed_run / "precompute" / teacher / "store")
        store.verify()
        mine = np.flatnonzero(routes == route)
        assert store.attrs["routes"] == {route: [0, len(mine)]} and store.num_rows == len(mine) == 8
        data = store.read_rows(range(store.num_rows))
        for field in ("tokens", "prompt_len", "response_len", "behaviour_logprobs", "prompt_index", "sample_index"):
            np.testing.assert_array_equal(data[field], source[field][mine], err_msg=field)
        resp = data["response_mask"].astype(bool)
        lengths = data["prompt_len"] + data["response_len"]
        ref = _reference_logprobs(models[teacher], data["tokens"], lengths)
        np.testing.assert_allclose(data["teacher_logprobs"][resp], ref[resp], atol=2e-5)
        assert (data["teacher_logprobs"][~resp] == 0).all()
        assert np.abs(_reference_logprobs(models[other], data["tokens"], lengths)[resp] - ref[resp]).max() > 1e-2
        # top-k (precompute.topk 8): the teacher's own most likely ids
        assert data["teacher_topk_logprobs"][resp][:, 0].max() <= 0 and store.topk == 8


@pytest.mark.slow
def test_online_batches_score_every_row_with_its_routes_teacher(routed_run, models):
    from jopd.config import SamplingSection
    from jopd.data import tokenizer as toklib
    from jopd.training import OnlineBatches

    prompts = read_jsonl(routed_run / "prepare" / "prompts" / "opd.jsonl")
    names = ["1", "2"]
    route_index = [names.index(r) for r in _route_of_rows(routed_run, "opd")]
    tok = toklib.load_tokenizer(str(routed_run / "prepare" / "tokenizer"))
    batches = OnlineBatches(prompts, models["sft"], [models["A"], models["B"]], batch_size=8, seed=0,
                            sampling=SamplingSection(max_new_tokens=16, batch_size=8),
                            stop_ids=toklib.stop_ids(tok, models["sft"].config), routes=route_index)
    loop = types.SimpleNamespace(step=0, train_state=types.SimpleNamespace(params=models["sft"].params))
    batches.on_start(loop)
    for step in (1, 2):
        indices = batches.prompt_indices(step)
        assert sorted(route_index[i] for i in indices) == [0] * 4 + [1] * 4  # 8 : 8 prompts, 4 + 4 per batch
        batch = next(batches)
        resp = batch["response_mask"].astype(bool)
        lengths = np.array([np.flatnonzero(r).max() + 1 for r in resp])  # prompt + response
        for row, i in enumerate(indices):
            ref = _reference_logprobs(models["AB"[route_index[i]]], batch["tokens"][row:row + 1],
                                      lengths[row:row + 1])[0]
            np.testing.assert_allclose(batch["teacher_logprobs"][row][resp[row]], ref[resp[row]], atol=2e-5)
        loop.step = step
    with pytest.raises(ValueError, match="one teacher per route"):
        OnlineBatches(prompts, models["sft"], models["A"], batch_size=6, seed=0, sampling=SamplingSection(),
                      stop_ids=[1], routes=route_index)


@pytest.mark.slow
def test_teacher_consistency_is_checked_per_route(routed_run, tmp_path, mesh):
    from jopd.layout import RunLayout
    from jopd.pipeline import Run, StageError, run_stage
    from jopd.stages import stage

    run_dir = tmp_path / "run"
    shutil.copytree(routed_run, run_dir, ignore=lambda d, names: [n for n in names if Path(d) == routed_run and n in (
        "train", "online", "arms", "eval", "export", "report", "metrics", "tb")])

    def train(arm: str):
        shutil.rmtree(run_dir / "train", ignore_errors=True)  # each attempt is refused before any training
        cfg = load_config(CONFIG, [*SHRINK, f"run_dir={run_dir}", "stages=[train]", f"arms=[{arm}]"],
                          check_files=False)
        return run_stage(stage("train"), Run(cfg, RunLayout.for_config(cfg), mesh))

    with pytest.raises(StageError, match=r"arm 'swap': its teacher 'B' of route '1' .* is not the teacher that "
                                         r"wrote the route's SFT data, 'A'.*allow_inconsistent_teacher"):
        train("{name: swap, mode: lightning, teachers: {1: B, 2: A}}")
    # allowed, the ablation needs teacher B's scores of route 1, which precompute did not make for this config
    with pytest.raises(StageError, match=r"holds no rows of route '1'.*re-run precompute"):
        train("{name: swap, mode: lightning, teachers: {1: B, 2: A}, allow_inconsistent_teacher: true}")


@pytest.mark.slow
def test_eval_and_report_are_per_teacher(routed_run):
    results = read_json(routed_run / "eval" / "results.json")
    models = ["base", "sft", "teacher:A", "teacher:B", *(f"arm:{a}" for a in (
        "routed", "routed_jsd", "routed_refresh", "routed_online", "swapped_online"))]
    assert set(results) == set(models)
    routes = _route_of_rows(routed_run, "eval")
    for name in models:
        res = results[name]
        per = res["per_route"]
        assert set(per) == {"1", "2"} and per["1"]["num_prompts"] == per["2"]["num_prompts"] == 4
        mixed = [per[r]["per_prompt_accuracy"][routes[:i].count(r)] for i, r in enumerate(routes)]
        assert res["per_prompt_accuracy"] == mixed
        tokens = per["1"]["kl_response_tokens"] + per["2"]["kl_response_tokens"]
        assert res["reverse_kl"] == pytest.approx(sum(per[r]["reverse_kl"] * per[r]["kl_response_tokens"]
                                                      for r in per) / tokens)
    # each route against its own teacher: a teacher is at KL ~0 on its route, not on the other one's
    assert abs(results["teacher:A"]["per_route"]["1"]["reverse_kl"]) < 1e-4
    assert abs(results["teacher:B"]["per_route"]["2"]["reverse_kl"]) < 1e-4
    assert results["teacher:A"]["per_route"]["2"]["reverse_kl"] > 1e-2
    assert results["teacher:B"]["per_route"]["1"]["reverse_kl"] > 1e-2

    report = (routed_run / "report.md").read_text()
    section = report[report.index("## Per teacher (prompts routed by `level`)"):]
    assert "| 1 | A | A | 16 | 8 | 4 |" in section and "| 2 | B | B | 16 | 8 | 4 |" in section
    for name in models:
        per = results[name]["per_route"]
        cells = (f"| {name} | {per['1']['accuracy']:.3f} | {per['1']['reverse_kl']:.4f} | "
                 f"{per['2']['accuracy']:.3f} | {per['2']['reverse_kl']:.4f} |")
        assert cells in section, name
    assert "| swapped_online | online | 1 | B | A | no (ablation) |" in section
    assert "| routed_refresh | lightning | 2 | B | B | yes |" in section
