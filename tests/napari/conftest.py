"""GUI test set-up: Xvfb (pytest-xvfb), tiny models, the screenshot option.

GUI tests are marked ``@pytest.mark.gui`` and skipped cleanly when napari/Qt are not installed or
no display is available (pytest-xvfb starts an Xvfb when the binary exists; see scripts/setup.sh).

``--update-screenshots`` copies the screenshots the tests take (always into a temporary folder)
to ``docs/screenshots/`` (the README's pictures).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"


def _gui_available() -> str | None:
    """None when GUI tests can run, else the reason they are skipped."""
    try:
        import napari  # noqa: F401
        import qtpy  # noqa: F401
    except Exception as exc:
        return f"napari/Qt not importable ({type(exc).__name__}: {exc})"
    if os.environ.get("QT_QPA_PLATFORM", "") == "offscreen":
        return "QT_QPA_PLATFORM=offscreen cannot draw napari canvases; run under Xvfb"
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return "no display (install Xvfb: scripts/setup.sh) "
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gui_available()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _runs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own runs folder (never the user's home)."""
    root = tmp_path / "runs"
    monkeypatch.setenv("NAPARI_E2ENET_RUNS", str(root))
    return root


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)


def _save_tiny_model(path: Path, target_spacing: tuple[float, float, float], labels: dict[int, str],
                     seed: int = 0, modality: str = "MRI") -> Path:
    from napari_e2enet import create_model
    from napari_e2enet.data import Plan
    from napari_e2enet.labels import LabelTable
    from napari_e2enet.training import save_model

    model = create_model("e2enet_small", num_classes=max(labels) + 1, widths=(4, 8, 8), pools=((2, 2, 2),) * 2,
                         sparsity=0.8, seed=seed)
    plan = Plan(target_spacing=target_spacing, modality=modality)
    metadata = {"plan": plan.to_dict(), "labels": LabelTable(labels).to_dict(),
                "train_config": {"data": {"patch": [16, 16, 16]}, "sparsity": {"sparsity": 0.8}}}
    return save_model(model, path, metadata=metadata)


@pytest.fixture
def notes():
    """Notifications dispatched during the test (napari's notification manager)."""
    from napari.utils.notifications import notification_manager

    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class tiny E2ENet whose plan resamples to 8 mm (the MNI sample → 25×29×24 voxels)."""
    folder = tmp_path_factory.mktemp("tiny_model")
    return _save_tiny_model(folder / "model.safetensors", (8.0, 8.0, 8.0), {1: "CSF/other", 2: "grey matter"})


@pytest.fixture(scope="session")
def tiny_model_fine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny network with a finer plan (4 mm): more tiles, for cancellation tests."""
    folder = tmp_path_factory.mktemp("tiny_model_fine")
    return _save_tiny_model(folder / "model.safetensors", (4.0, 4.0, 4.0), {1: "CSF/other", 2: "grey matter"})


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small anisotropic, axis-flipped (LPS-stored) phantom CT and its labels as NIfTI files."""
    from napari_e2enet.data import make_phantom, write_volume

    folder = tmp_path_factory.mktemp("phantom")
    image, labels = make_phantom(3, shape=(40, 32, 20), spacing=(1.5, 1.2, 3.0))
    labels.array = np.where(labels.array > 2, 0, labels.array).astype(np.uint8)  # keep ids 0..2
    return {"image": write_volume(image, folder / "phantom_ct.nii.gz"),
            "labels": write_volume(labels, folder / "phantom_ct_seg.nii.gz")}


@pytest.fixture(scope="session")
def tiny_phantom_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny 3-class model for the phantom files (plan at 3 mm isotropic)."""
    folder = tmp_path_factory.mktemp("tiny_phantom_model")
    return _save_tiny_model(folder / "model.safetensors", (3.0, 3.0, 3.0), {1: "spleen", 2: "right kidney"},
                            modality="MRI")


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """Screenshots go to a temporary folder; ``--update-screenshots`` copies them to docs/screenshots/."""
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    if request.config.getoption("--update-screenshots", default=False):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for png in sorted(folder.glob("*.png")):
            shutil.copy2(png, SCREENSHOTS / png.name)
