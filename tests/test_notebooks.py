"""The ablation notebooks: stored clean (no outputs), and each runs end to end in smoke mode
(tiny generated data, 2 steps per run) from a temporary folder, leaving its table and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
#: notebook -> the runs it compares (rows of its table)
EXPECTED_RUNS = {
    "context_modules": 4,
    "fcn_skips": 3,
    "losses": 5,
    "segnet_decoders": 3,
    "semi_supervised": 7,  # supervised at 4 labelled fractions, the method at the 3 below full
}


def test_the_studies_are_there():
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(EXPECTED_RUNS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has a count"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "one cell tagged `parameters` (papermill injects after it)"
    assert 'MODE = "smoke"' in "".join(tagged[0]["source"])


def execute(path: Path, workdir: Path, parameters: str):
    """Run the notebook in a fresh kernel in `workdir`, with `parameters` in a cell after the
    parameters cell (what papermill does with -p)."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return nb


# the four take about 85 s together on 2 CPU cores (19-24 s each; about twice that when the
# cores are busy): none is marked slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    nb = execute(path, tmp_path, 'MODE = "smoke"')
    out = tmp_path / "results" / path.stem
    for name in ("runs.csv", "runs.md", "per_class_iou.png", "miou_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == EXPECTED_RUNS[path.stem]
    for row in rows:
        assert 0.0 <= float(row["mIoU"]) <= 1.0
        assert int(row["params"]) > 0
    # every run has its own run directory under runs/<notebook>/, named by the sweep
    run_dirs = sorted((tmp_path / "runs" / path.stem).glob("version_*"))
    assert len(run_dirs) == len(rows)
    names = {json.loads((d / "sweep.json").read_text())["name"] for d in run_dirs}
    assert names == {row["run"] for row in rows}
    # the notebook showed the table and the plots
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    shown = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "mIoU %" in shown and "params (M)" in shown
