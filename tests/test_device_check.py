"""``scripts/device_check.sh OUT --small``: every part runs on CPU and is reported in the JSON and the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "opd_step", "torch_reference", "compare", "decode", "tiny_pipeline")


@pytest.mark.slow
def test_device_check_small(tmp_path: Path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # one CPU device, as on the lent machine
    out = tmp_path / "device_check"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), str(out), "--small"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    report = json.loads((out / "device_check.json").read_text())
    assert set(report["parts"]) == set(PARTS)
    for name, part in report["parts"].items():
        assert isinstance(part["status"], str) and part["status"], name
        assert part["wall_s"] <= part["limit_s"] + 5, name
    # On this CPU every part that can run must have run.
    for name in ("env", "opd_step", "decode", "tiny_pipeline"):
        assert report["parts"][name]["status"] == "ok", (name, report["parts"][name])
    torch_status = report["parts"]["torch_reference"]["status"]
    try:
        import torch  # noqa: F401
    except ImportError:
        assert torch_status == "skipped: torch not installed"
    else:
        assert torch_status == "ok" and report["parts"]["compare"]["status"] == "ok"
    rows = report["parts"]["opd_step"]["rows"]
    assert {r["remat"] for r in rows} == {"dots", "full"} and all(r["head"] == "fused" for r in rows)
    decode = report["parts"]["decode"]["rows"]
    assert sorted(r["batch"] for r in decode) == [1, 16, 64]
    assert report["parts"]["decode"]["target"] == "unknown device: no bandwidth limit"

    table = (out / "device_check.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    titles = [part["title"] for part in report["parts"].values()]
    for title in titles:
        assert any(line.startswith(f"| **{title}** |") for line in lines), title
