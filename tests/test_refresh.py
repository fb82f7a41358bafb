"""The refresh schedule (``opd.refresh_every`` / an arm's ``refresh_every``): every N steps the arm's current
student re-samples rollouts and its teacher re-scores them into a new store generation.

Checked here: which steps train on which generation (and a resumed source skips what was trained on); each
generation's rows are the student OF ITS STEP's samples (behaviour log-probs equal that student's log-probs and
not the SFT student's) scored by the teacher (its log-probs recomputed on the stored tokens), on the prompts of
the online steps it serves; a crash inside a refresh resumes it chunk by chunk and ends bit-identical to the
uninterrupted arm; the teacher is checked again at every generation; the config refuses a schedule on online
arms and keeps the fingerprints of runs without one.
"""

from __future__ import annotations

import dataclasses
import shutil
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from test_stages_train import (  # noqa: F401 - the stage test's fixtures
    Interrupt,
    InterruptAt,
    arm_params,
    assets,
    compilation_cache,
    make_run,
    mesh,
    metric_rows,
)

from jopd import arms, training
from jopd.config import ConfigValidationError, load_config
from jopd.data.store import RolloutStore
from jopd.io import read_json
from jopd.models import load_pretrained, naive_logprobs_fn
from jopd.pipeline import Run, StageError, run_stage
from jopd.stages import stage
from jopd.stages import train as train_mod

FRESH = [{"name": "fresh", "mode": "lightning", "teacher": "A", "refresh_every": 2}]
# 5 steps: generation 0 (the precomputed store) for steps 1-2, generation 1 for 3-4, generation 2 for step 5;
# each generation is 2 x 4 rows in two chunks of 4 (a crash can leave one written).
OPD = {"steps": 5, "keep_checkpoints": 10}


def _run(root: Path, assets: Path, mesh, arm_list=FRESH, **opd) -> Run:  # noqa: F811
    ctx = make_run(root, assets, mesh, arm_list, **{**OPD, **opd})
    cfg = dataclasses.replace(ctx.cfg, rollout=dataclasses.replace(ctx.cfg.rollout, rows_per_chunk=4))
    return Run(cfg, ctx.layout, ctx.mesh)


# ---------------------------------------------------------------------------------------------- the source
class _FakeLoop:
    def __init__(self, step: int):
        self.step, self.train_state = step, types.SimpleNamespace(params=None)


class _Counter:
    def __init__(self, tag: str):
        self.tag, self.i, self.data_iterator = tag, 0, f"{tag}-iterator"

    def __next__(self):
        self.i += 1
        return {"from": self.tag, "index": self.i}

    def describe(self, step: int) -> str:
        return f"{self.tag} step {step}"


def test_steps_take_their_generation_and_a_resume_skips_what_was_trained():
    made: list[tuple[int, int]] = []

    def make(g, loop):
        made.append((g, loop.step))
        return Path(f"/gen/{g}"), {"gen_s": 1.5, "score_s": 0.5}

    source = training.RefreshBatches(_Counter("g0"), every=3, make_generation=make,
                                     open_batches=lambda path, g: _Counter(f"g{g}"))
    assert source.data_iterator == "g0-iterator"
    loop = _FakeLoop(0)
    source.on_start(loop)
    got = []
    for step in range(1, 8):
        got.append(next(source))
        got[-1]["phases"] = dict(source.last_phases)
        loop.step = step
    assert [(b["from"], b["index"]) for b in got] == [("g0", 1), ("g0", 2), ("g0", 3), ("g1", 1), ("g1", 2),
                                                      ("g1", 3), ("g2", 1)]
    assert made == [(1, 3), (2, 6)]  # generation g is made by the student of step g N
    assert got[3]["phases"] == {"refresh_gen_s": 1.5, "refresh_score_s": 0.5} and got[4]["phases"] == {}
    assert source.describe(7) == "generation 2 (/gen/2): g2 step 1"
    assert source.describe(5) == "generation 1, batch 2 of 3"

    resumed = training.RefreshBatches(_Counter("g0"), every=3, make_generation=make,
                                      open_batches=lambda path, g: _Counter(f"g{g}"))
    resumed.on_start(_FakeLoop(4))  # a checkpoint of step 4: step 5 is generation 1's second batch
    assert next(resumed) == {"from": "g1", "index": 2}
    with pytest.raises(ValueError, match="every"):
        training.RefreshBatches(_Counter("g0"), every=0, make_generation=make, open_batches=None)


# ------------------------------------------------------------------------------------------------ the stage
def _generation(ctx: Run, g: int) -> RolloutStore:
    return RolloutStore.open(ctx.layout.arm_generation("fresh", g))


def test_generations_are_the_students_of_their_steps_scored_by_the_teacher(tmp_path, assets, mesh):  # noqa: F811
    ctx = _run(tmp_path / "fresh", assets, mesh)
    assert train_mod.inputs(ctx)["refresh"] == {"fresh": 2}
    out = run_stage(stage("train"), ctx)["arms"]["fresh"]
    gens = [_generation(ctx, g) for g in (1, 2)]
    for g, store in enumerate(gens, start=1):
        store.verify()
        assert store.num_rows == 8 and store.attrs["policy_step"] == 2 * g and store.attrs["generation"] == g
        rows = store.read_rows(range(8), ["prompt_index"])
        assert rows["prompt_index"].tolist() == training.prompt_stream(12, ctx.cfg.seed, 8 * g, 8)
    assert not ctx.layout.arm_generation("fresh", 3).exists()
    refresh = out["refresh"]
    assert refresh["every"] == 2 and refresh["generations"] == 2 and refresh["consistent_teacher"]
    assert [p["policy_step"] for p in refresh["per_generation"]] == [2, 4]
    assert refresh["tokens_generated"] == sum(int(s.read_rows(range(8), ["response_len"])["response_len"].sum())
                                              for s in gens) == refresh["tokens_scored"]
    rows = [r for r in metric_rows(ctx, "arm_fresh") if "loss" in r]
    assert [("refresh_gen_s" in r) for r in rows] == [False, False, True, False, True]
    from jopd.report.text import render_report

    report, _ = render_report(ctx.cfg, ctx.layout)  # the per-refresh costs next to the one-off ones
    line = next(x for x in report.splitlines() if x.startswith("| fresh | 2 | 2 |"))
    assert f"{refresh['tokens_generated']:,}" in line and line.endswith("| yes |")

    # The student of step 2 = the same arm trained 2 steps without a schedule (generation 0 is the same store).
    two = _run(tmp_path / "two", assets, mesh, [{"name": "fresh", "mode": "lightning", "teacher": "A"}], steps=2)
    run_stage(stage("train"), two)
    step2 = load_pretrained(two.layout.arm_model("fresh"), mesh=mesh)
    sft = load_pretrained(ctx.layout.sft_model, mesh=mesh)
    teacher = load_pretrained(ctx.layout.teacher("A"), mesh=mesh)
    data = gens[0].read_rows(range(8), ["tokens", "response_mask", "behaviour_logprobs", "teacher_logprobs",
                                        "prompt_len", "response_len"])
    mask = (np.arange(data["tokens"].shape[1])[None] < (data["prompt_len"] + data["response_len"])[:, None])
    resp = data["response_mask"].astype(bool)

    def logprobs(model):  # the unchunked reference head, full [B, T, V] logits
        return np.asarray(jax.device_get(naive_logprobs_fn(model.params, model.config, data["tokens"],
                                                           mask.astype(np.int32))))

    np.testing.assert_allclose(data["behaviour_logprobs"][resp], logprobs(step2)[resp], atol=2e-5)
    assert np.abs(data["behaviour_logprobs"][resp] - logprobs(sft)[resp]).max() > 1e-3  # not the SFT student's
    np.testing.assert_allclose(data["teacher_logprobs"][resp], logprobs(teacher)[resp], atol=2e-5)
    assert (data["teacher_logprobs"][~resp] == 0).all()


def test_a_crash_inside_a_refresh_resumes_it_and_ends_identical(tmp_path, assets, mesh):  # noqa: F811
    ref = _run(tmp_path / "ref", assets, mesh)
    run_stage(stage("train"), ref)

    ctx = _run(tmp_path / "crash", assets, mesh)
    with pytest.raises(Interrupt):  # after step 3 (generation 1 made); the last checkpoint is step 2's
        run_stage(stage("train"), Run(ctx.cfg, ctx.layout, ctx.mesh, hooks=(InterruptAt(3),)))
    # What a crash in the middle of generation 1 leaves: its first chunks written, the rest not.
    gen1 = ctx.layout.arm_generation("fresh", 1)
    for group in ("rollout", "teacher"):
        (gen1 / "progress" / group / "000001.json").unlink()
    (gen1.parent / "meta.json").unlink()
    out = run_stage(stage("train"), ctx)["arms"]["fresh"]
    assert out["resumed_from_step"] == 2
    jax.tree.map(np.testing.assert_array_equal, arm_params(ref, "fresh"), arm_params(ctx, "fresh"))
    for g in (1, 2):
        a, b = _generation(ref, g), _generation(ctx, g)
        for field, x in a.read_rows(range(8)).items():
            np.testing.assert_array_equal(x, b.read_rows(range(8))[field], err_msg=f"generation {g} {field}")
    # The resumed run redid only the missing chunk of generation 1.
    per_gen = {p["generation"]: p["cost"] for p in out["refresh"]["per_generation"]}
    full = {p["generation"]: p["cost"] for p in read_json(ref.layout.arm_meta("fresh"))["refresh"]["per_generation"]}
    assert 0 < per_gen[1]["tokens_generated"] < full[1]["tokens_generated"]


def test_the_teacher_is_checked_again_at_every_generation(tmp_path, assets, mesh):  # noqa: F811
    ctx = _run(tmp_path / "run", assets, mesh)
    with pytest.raises(Interrupt):
        run_stage(stage("train"), Run(ctx.cfg, ctx.layout, ctx.mesh, hooks=(InterruptAt(2),)))
    # Teacher A's weights change between generation 0 (scored by precompute) and generation 1.
    teacher_dir = ctx.layout.teacher("A")
    other = load_pretrained(ctx.layout.teacher("B"), mesh=mesh)
    shutil.rmtree(teacher_dir)
    from jopd.models import save_pretrained

    save_pretrained(other, teacher_dir, tokenizer_dir=str(ctx.layout.tokenizer))
    with pytest.raises(StageError, match="not the teacher that wrote the SFT data"):
        run_stage(stage("train"), ctx)


# ------------------------------------------------------------------------------------------------ the config
def _cfg(arm: dict, **opd):
    import json

    overrides = [f"arms=[{json.dumps({'teacher': 'A', **arm})}]", *(f"opd.{k}={v}" for k, v in opd.items())]
    return load_config("configs/tiny.yaml", overrides, check_files=False)


def test_config_refuses_a_schedule_on_online_arms_and_defaults_keep_fingerprints():
    with pytest.raises(ConfigValidationError, match=r"arms\[0\].refresh_every: a refresh schedule is for lightning"):
        _cfg({"name": "o", "mode": "online", "refresh_every": 2})
    with pytest.raises(ConfigValidationError, match=r"opd.refresh_every: must be >= 0"):
        _cfg({"name": "l"}, refresh_every=-1)
    default, every = _cfg({"name": "l"}), _cfg({"name": "l"}, refresh_every=3)
    assert repr(default.opd) == repr(every.opd) and repr(default.arms) == repr(_cfg({"name": "l",
                                                                                     "refresh_every": 0}).arms)
    run = types.SimpleNamespace(cfg=every)
    assert every.arms[0].refresh(every.opd) == 3
    assert arms.refresh_inputs(run, every.arms) == {"refresh": {"l": 3}}
    assert arms.refresh_inputs(types.SimpleNamespace(cfg=default), default.arms) == {}
    online = _cfg({"name": "o", "mode": "online"}, refresh_every=3)  # opd's schedule is for lightning arms
    assert online.arms[0].refresh(online.opd) == 0
