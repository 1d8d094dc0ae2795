"""Every notebook in notebooks/ runs top to bottom on CPU at its small sizes without an error.

The notebooks read `JACT_NOTEBOOK_SMALL=1` and shrink their models, steps and searches; their
first cell installs jact only where it cannot be imported, so here it does nothing.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# A small run compiles far more than it computes; LLVM's optimisation does not pay here (as in
# tests/test_models.py). XLA's memory analysis, which the notebooks plot, does not depend on it.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_notebooks_exist():
  assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_flax.ipynb", "03_sensitivity.ipynb",
                                         "04_max_batch.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
  monkeypatch.setenv("JACT_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip())
  notebook = nbformat.read(path, as_version=4)
  assert notebook.cells[0].cell_type == "code" and "REPO_URL" in notebook.cells[0].source
  # Raises CellExecutionError, with the failing cell and its traceback, when a cell fails.
  NotebookClient(notebook, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
