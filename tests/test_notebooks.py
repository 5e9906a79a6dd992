"""Every notebook runs top to bottom in a real Jupyter kernel.

The six run in one kernel, its namespace emptied (``%reset -f``) before each, so that a notebook can use nothing
another one defined, while the kernel starts and imports TensorFlow once instead of six times. They share one
scratch folder, as a user's notebooks share data/notebooks/; notebook 6 adapts to 30 clothing photos of each
class instead of all 3,781 (SIMILAR_FINDER_TUTORIAL_SET=small, see notebooks/tutorial.py).
"""
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits the environment it starts in
        env.setenv("SIMILAR_FINDER_TUTORIAL_WORK", str(tmp_path_factory.mktemp("notebooks")))
        env.setenv("SIMILAR_FINDER_TUTORIAL_SET", "small")
        manager = KernelManager(kernel_name="python3")
        manager.start_kernel(cwd=str(NOTEBOOKS[0].parent))
    yield manager
    manager.shutdown_kernel(now=True)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%reset -f")]), km=kernel).execute()
    NotebookClient(notebook, timeout=600, km=kernel).execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images or path.stem.startswith(("01", "05")), "figures should be shown inline"
