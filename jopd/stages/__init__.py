"""The pipeline: its stages in order, each a module with ``inputs(run)`` and ``execute(run)``.

prepare → teacher_data → sft → rollout → precompute → train (Lightning OPD) → online (standard OPD) → eval →
export → report. ``jopd.pipeline.run_stage`` decides for each whether to skip, resume or refuse it.
"""

from __future__ import annotations

from jopd import config
from jopd.pipeline import Stage
from jopd.stages import (
    evaluate,
    export,
    online,
    precompute,
    prepare,
    report,
    rollout,
    sft,
    teacher_data,
    train,
)

_MODULES = {"prepare": prepare, "teacher_data": teacher_data, "sft": sft, "rollout": rollout,
            "precompute": precompute, "train": train, "online": online, "eval": evaluate, "export": export,
            "report": report}
# Stages whose outputs are not (only) their own RUN_DIR/<name> directory (checked when the stage is skipped).
_OUTPUTS = {
    "train": lambda run: [run.layout.stage("train")]
    + [run.layout.arm(a.name) for a in run.cfg.arms if a.mode == "lightning"],
    "online": lambda run: [run.layout.stage("online")]
    + [run.layout.arm(a.name) for a in run.cfg.arms if a.mode == "online"],
    "report": lambda run: [run.layout.stage("report"), run.layout.report, run.layout.plots],
}
# The order is the config's (config.STAGES validates `stages:` before anything is imported).
STAGES: tuple[Stage, ...] = tuple(Stage(name, _MODULES[name].inputs, _MODULES[name].execute, _OUTPUTS.get(name))
                                  for name in config.STAGES)


def stage(name: str) -> Stage:
    """The stage called ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages: {list(config.STAGES)}")
