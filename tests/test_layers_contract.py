"""The import layers (pyproject.toml ``[tool.importlinter]``) hold, and the check really checks.

``lint-imports`` runs on the package as it is (any broken contract fails the test with
import-linter's report), then on a copy with one planted upward import and one planted circle, which
must be reported: a contract that cannot break would pass silently forever.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "napari_e2enet"
PYPROJECT = ROOT / "pyproject.toml"


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` without its cache (the cache folders would land in the working tree). Not a
    skip when import-linter is missing: it is in the ``test`` extra, and a missing check must fail."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", "--config", str(cwd / "pyproject.toml")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _contracts() -> dict[str, dict]:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def _top_level_modules() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | \
        {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def test_the_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout, result.stdout[-2000:]


def test_every_module_has_a_layer_and_only_the_face_may_import_qt():
    contracts = _contracts()
    layered = {name.strip() for layer in contracts["layers"]["layers"] for name in layer.split("|")}
    modules = _top_level_modules()
    assert modules == layered, f"not in a layer: {sorted(modules - layered)}; gone: {sorted(layered - modules)}"
    assert contracts["layers"]["layers"][0] == "_napari"
    core = {m.removeprefix("napari_e2enet.") for m in contracts["qt-free-core"]["source_modules"]}
    assert core == modules - {"_napari"}, f"core modules the Qt ban misses: {sorted(modules - {'_napari'} - core)}"
    assert {"napari", "qtpy", "magicgui", "vispy"} <= set(contracts["qt-free-core"]["forbidden_modules"])


def _package_copy(tmp_path: Path) -> Path:
    """The package's Python files (no resources) and pyproject.toml under ``tmp_path``."""
    shutil.copytree(PACKAGE, tmp_path / "napari_e2enet",
                    ignore=lambda folder, names: [n for n in names if n in ("resources", "__pycache__")
                                                  or (Path(folder, n).is_file() and not n.endswith(".py"))])
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    return tmp_path


def _plant(module: Path, line: str) -> None:
    text = module.read_text()
    ast.parse(text)  # the copy still parses; the planted import is appended at the end
    module.write_text(text + "\n" + line + "\n")


@pytest.mark.parametrize(("where", "line", "expected"), [
    # the circle this issue removed: inference reading model files through training
    ("inference/predictor.py", "from ..training import checkpoint  # planted", "napari_e2enet.training"),
    # a model importing the data layer (models sit below data)
    ("models/blocks.py", "from ..data import volume  # planted", "napari_e2enet.data"),
    # the core importing Qt
    ("metrics.py", "import qtpy  # planted", "qtpy"),
    # the circle this issue removed inside data, as a function-level import
    ("data/phantom.py", "def _planted():\n    from .dataset import Case\n    return Case", "dataset"),
])
def test_a_planted_import_breaks_a_contract(tmp_path, where, line, expected):
    copy = _package_copy(tmp_path)
    _plant(copy / "napari_e2enet" / where, line)
    result = _lint_imports(copy, pythonpath=copy)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    assert expected in result.stdout.split("Broken contracts")[-1], result.stdout[-3000:]
