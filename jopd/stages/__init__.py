"""Pipeline stages, one module each, in order:

prepare → teacher_data → sft → rollout → precompute → train (Lightning OPD) → online (standard OPD)
→ eval → export → report.
"""

from __future__ import annotations

import importlib

from jopd.stages.base import RunContext, Stage, StageError, run_stage

_MODULES = {
    "prepare": "jopd.stages.prepare",
    "teacher_data": "jopd.stages.teacher_data",
    "sft": "jopd.stages.sft",
    "rollout": "jopd.stages.rollout",
    "precompute": "jopd.stages.precompute",
    "train": "jopd.stages.train",
    "online": "jopd.stages.online",
    "eval": "jopd.stages.evaluate",
    "export": "jopd.stages.export",
    "report": "jopd.stages.report",
}


def get_stage(name: str) -> Stage:
    """The stage object for ``name`` (each module defines ``STAGE``)."""
    if name not in _MODULES:
        raise KeyError(f"unknown stage {name!r}; stages: {list(_MODULES)}")
    return importlib.import_module(_MODULES[name]).STAGE


__all__ = ["RunContext", "Stage", "StageError", "get_stage", "run_stage"]
