"""Project-level contracts: the import rule, the manifest, CI = the README's test command."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")


def test_core_imports_without_qt_or_napari():
    core = [
        "napari_e2enet", "napari_e2enet.config", "napari_e2enet.models", "napari_e2enet.models.cost",
        "napari_e2enet.sparse", "napari_e2enet.data", "napari_e2enet.training", "napari_e2enet.training.loop",
        "napari_e2enet.inference",
        "napari_e2enet.metrics", "napari_e2enet.labels", "napari_e2enet.cli",
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {core!r}:\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {GUI_MODULES!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core pulled in GUI modules: {out.stdout}"


def test_inference_does_not_load_the_training_stack():
    """``predict`` starts without MONAI/matplotlib (~190 MiB of resident memory and ~2.5 s of
    import time here); the training names still resolve on first use."""
    code = (
        "import sys\n"
        "import napari_e2enet.inference, napari_e2enet.inference.fastpath\n"
        "from napari_e2enet.training import load_model\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & {'monai', 'matplotlib', 'pandas'})))\n"
        "from napari_e2enet.training import Trainer, DeepSupervisionLoss\n"
        "DeepSupervisionLoss()\n"  # MONAI loads when the training loss is built, not before
        "print('monai' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"], f"inference pulled in: {out.stdout}"


def test_manifest_and_resources_are_real_files_and_git_holds_no_links():
    """A git symlink is a text file on Windows checkouts and a link in the sdist: none anywhere."""
    import napari_e2enet

    package = Path(napari_e2enet.__file__).parent
    for path in (package / "napari.yaml", package / "resources", package / "resources" / "models"):
        assert path.exists() and not path.is_symlink(), path
    assert not (ROOT / "napari.yaml").exists(), "one manifest: napari_e2enet/napari.yaml"
    if (ROOT / ".git").exists():
        staged = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True)
        assert [line for line in staged.stdout.splitlines() if line.startswith("120000")] == []


def test_npe2_validate_passes():
    npe2 = pytest.importorskip("npe2")
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-e2enet")
    assert manifest.name == "napari-e2enet"
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-e2enet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    del npe2


def test_every_manifest_command_imports():
    pytest.importorskip("npe2")
    import importlib

    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-e2enet")
    for cmd in manifest.contributions.commands or []:
        module, _, attr = cmd.python_name.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        assert callable(obj), cmd.id


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    test_cmds = [line.strip() for b in blocks for line in b.splitlines() if "pytest" in line]
    assert test_cmds, "README has no test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmds[0] in ci
