"""The main job runs from a venv that holds only jopd's core dependencies (plus pytest): no extra is needed.

``make test`` builds that venv (``.venv-core``: ``pip install -e . pytest``) and passes its interpreter as
``$JOPD_CORE_PYTHON``. Locally the test is skipped without it; under CI (``CI=true``) a missing venv is a failure,
so the check can never silently disappear.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_shrink

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def core_python() -> str:
    path = os.environ.get("JOPD_CORE_PYTHON")
    if path and Path(path).is_file():
        return path
    problem = f"JOPD_CORE_PYTHON={path!r} is not an interpreter (run `make test`)"
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but the core-only venv is missing: {problem}")
    pytest.skip(problem)


def test_core_venv_has_no_extras(core_python: str):
    code = ("import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None "
            "for m in ('torch', 'pyarrow', 'math_verify', 'jopd', 'jinja2')}))")
    found = json.loads(subprocess.run([core_python, "-c", code], capture_output=True, text=True, check=True,
                                      cwd=ROOT).stdout)
    assert found == {"torch": False, "pyarrow": False, "math_verify": False, "jopd": True, "jinja2": True}


@pytest.mark.slow
def test_tiny_pipeline_runs_from_the_core_venv(core_python: str, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([core_python, "-m", "jopd.main", "--config", "configs/tiny.yaml", "--run-dir",
                           str(tmp_path / "run"), *tiny_shrink()], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "report" in summary
    # Without torch the export's transformers check is skipped, and says so.
    check = json.loads((tmp_path / "run" / "export" / "export_check.json").read_text())
    assert check["transformers_check"].startswith("skipped")
