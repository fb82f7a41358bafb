"""The documentation's code runs as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_example_opd_step_runs():
    src = (ROOT / "docs" / "example_opd_step.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", src, re.S))
    assert "make_opd_step" in code
    exec(compile(code, "docs/example_opd_step.md", "exec"), {})


def test_config_reference_is_current():
    """docs/config.md is generated from the config dataclasses; regenerate with `python -m jopd.config`."""
    from jopd.config import config_reference

    doc = (ROOT / "docs" / "config.md").read_text()
    for row in config_reference():
        key = row.split("|")[1].strip()
        assert key in doc, f"docs/config.md is missing {key}; run: python -m jopd.config > docs/config.md"


def test_example_lightning_loop_runs():
    """The notebook-level example: a store, the packed Grain loader and the loop, with a resume, no CLI/Config."""
    src = (ROOT / "docs" / "example_lightning_loop.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", src, re.S))
    assert "run_loop" in code and "make_packed_dataset" in code
    exec(compile(code, "docs/example_lightning_loop.md", "exec"), {})
