"""The notebooks run top to bottom (at their small CI budget), so they cannot rot.

Each notebook is executed with nbclient in a fresh ``python3`` kernel of *this* interpreter, from
a temporary working directory (nothing is written into the repository); any cell error fails.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ("01_quickstart.ipynb", "02_training_dsff.ipynb", "03_benchmarks.ipynb")
CELL_TIMEOUT_S = 600


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_three_walkthroughs_exist():
    assert {p.name for p in _notebooks()} >= set(EXPECTED)


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path: Path):
    """Valid nbformat 4, kernel python3, no stored outputs or execution counts."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: stored outputs in a code cell"
            assert cell.execution_count is None, f"{path.name}: stored execution count"


@pytest.fixture
def this_python_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernelspec that runs this interpreter (not whatever python3 another Jupyter
    installation registered), found first through ``JUPYTER_PATH``."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the notebooks' run folders end up in here
    return "python3"


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, this_python_kernel: str):
    work = tmp_path / "work"
    work.mkdir()
    copy = work / path.name
    shutil.copyfile(path, copy)
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=this_python_kernel,
                                     resources={"metadata": {"path": str(work)}}, allow_errors=False)
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell failed\n{str(exc)[-4000:]}")
    executed = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in executed), f"{path.name}: not every code cell ran"
    errors = [o for c in executed for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert sorted(p.name for p in work.iterdir()) == [path.name], "the notebook wrote into its working folder"
