"""Stage ``report``: ``RUN_DIR/report.md`` and ``RUN_DIR/plots/*.png`` from what the other stages recorded
(``jopd.report``: results table, Lightning-vs-online speed-ups, teacher consistency, computed findings, plots)."""

from __future__ import annotations

from typing import Any

from jopd.io import read_json
from jopd.pipeline import Run
from jopd.report import UPSTREAM, write_report


def inputs(run: Run) -> dict[str, Any]:
    upstream = {s: read_json(run.layout.done(s))["fingerprint"] if run.layout.done(s).is_file() else None
                for s in UPSTREAM}
    routing = {"routing": run.cfg.routing, "routes": {a.name: a.routes(run.cfg.routing) for a in run.cfg.arms}} \
        if run.cfg.routing.enabled else {}  # multi-teacher runs only: one-teacher runs keep their fingerprint
    return {"upstream": upstream, "arms": run.cfg.arms, "sft_teacher": run.cfg.sft_teacher, **routing}


def execute(run: Run) -> dict[str, Any]:
    return write_report(run.cfg, run.layout, is_main_process=run.is_main)
