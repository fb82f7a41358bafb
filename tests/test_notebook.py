"""notebooks/quickstart.ipynb runs top to bottom (CPU, one device) and shows what it promises.

The notebook's cell tagged ``parameters`` is replaced to shrink its ``configs/tiny.yaml`` run (the same
shrinking as tests/test_multiprocess.py, on one device, without the export stage) and to write the run into a
temporary directory. The kernel runs with the notebook's own directory as its working directory, so the setup
cell finds this checkout as a user opening the notebook from ``notebooks/`` would.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import nbclient
import nbformat
from conftest import tiny_shrink

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
ARMS = ("lightning_A", "lightning_B", "online_A")
SHRINK = tiny_shrink(eval_every=0)  # no in-loop eval: the eval stage scores each arm
STAGES = "prepare,teacher_data,sft,rollout,precompute,train,online,eval,report"  # tiny.yaml's, less export


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        for mime in ("text/plain", "text/markdown"):
            parts.append(out.get("data", {}).get(mime, ""))
    return "".join(parts)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and 'CONFIG = "configs/tiny.yaml"' in tagged[0].source
    assert "OVERRIDES = []" in tagged[0].source  # the notebook's default is the full tiny.yaml


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = (f'CONFIG = "configs/tiny.yaml"\nRUN_DIR = {str(tmp_path / "run")!r}\n'
                     f"OVERRIDES = {SHRINK!r}\nSTAGES = {STAGES!r}\n")

    # The kernel: this interpreter (a kernelspec named python3 that shadows any user-level one), one CPU device
    # (conftest's simulated 8 devices are for the other tests), and the checkout found from notebooks/.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (jopd test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JOPD_SOURCE", raising=False)

    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:80]

    (step_cell,) = [c for c in code if "make_opd_step" in c.source]
    m = re.search(r"step 1: loss (\S+),", _outputs_text(step_cell))
    assert m, _outputs_text(step_cell)
    assert math.isfinite(float(m.group(1)))

    (table_cell,) = [c for c in code if "Markdown(" in c.source]
    md = "".join(o.get("data", {}).get("text/markdown", "") for o in table_cell.outputs)
    assert "## Results" in md and "| model | kind | teacher |" in md
    for arm in ARMS:
        assert f"| arm {arm} |" in md, arm
    assert "not trained" not in md and "not evaluated" not in md

    pngs = [o["data"]["image/png"] for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert pngs and all(len(p) > 1000 for p in pngs)
    assert (tmp_path / "run" / "report.md").is_file()
