"""notebooks/quickstart.ipynb runs top to bottom in a fresh python3 kernel (shortened through its env vars)."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    # The kernel inherits this process's environment: a short run, written under tmp_path, on one intra-op thread
    # (two OpenMP threads on 2 shared cores thrash when other processes compete: see tests/test_train.py).
    monkeypatch.setenv("QUICKSTART_ITERS", "30")
    monkeypatch.setenv("QUICKSTART_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert not errors
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the sample, the loss/lr curves, the predictions
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["iterations"] == 30 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
