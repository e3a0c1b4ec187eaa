"""Every notebook in notebooks/ runs top to bottom in a real Jupyter kernel (nbclient), on CPU, and the
test fails on the first cell that raises, naming it; so the examples people start from cannot rot.

The kernel is the interpreter running pytest (jupyter_client maps the `python3` kernel's `python` to
`sys.executable`), with the repository root on PYTHONPATH, so it imports this checkout's `cp_attn`.
Notebooks are committed without outputs (small diffs, no stale pictures); that is checked too.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; the slowest starts 4 CP ranks (about 10-30 s on a loaded 2-core machine)


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    stored = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stored, f"{path.name}: cells {stored} carry outputs; clear them before committing"


@pytest.mark.multiproc  # notebooks 01 and 03 start gloo ranks through cp_attn.launch_local
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)  # raises CellExecutionError with the failing cell's source and traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
