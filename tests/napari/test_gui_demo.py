"""``napari-e2enet demo --gui`` (README): the demo, then napari with its image and labels, then a clean exit.

The window is closed by the CLI's hidden ``--gui-close-after`` (a QTimer in the viewer process);
pytest-xvfb gives this process, and so the viewer process it starts, a display.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_e2enet.errors import InputError


def _demo_cli(out: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "demo", "--sample", "ct", "--out", str(out),
                           "--device", "cpu", *extra], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def gui_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One `demo --sample ct --gui` run (about 30-50 s on the 2-core CPU) shared by the two gui tests."""
    out = tmp_path_factory.mktemp("demo_gui") / "demo"
    return out, _demo_cli(out, "--gui", "--gui-close-after", "1")


@pytest.mark.gui
@pytest.mark.slow
def test_demo_gui_opens_napari_with_the_demo_layers_and_exits(gui_demo):
    out, proc = gui_demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # the viewer process names the layers it holds once they are in the viewer
    assert "demo --gui: napari shows phantom_ct, phantom-abdomen-ct labels" in proc.stderr, proc.stderr[-2000:]
    assert {"phantom_ct.nii.gz", "phantom_ct_labels.nii.gz", "labels.json", "report.json"} <= {
        p.name for p in out.iterdir()}


@pytest.mark.gui
@pytest.mark.slow
def test_demo_layers_share_the_image_grid_and_carry_the_organ_names(gui_demo, make_napari_viewer):
    from napari_e2enet._napari.demo_viewer import demo_layer_data
    from napari_e2enet._napari.layers import check_same_grid

    out, proc = gui_demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    viewer = make_napari_viewer()
    (image, image_kw, image_kind), (labels, labels_kw, labels_kind) = demo_layer_data(out)
    assert (image_kind, labels_kind) == ("image", "labels")
    image_layer = viewer.add_image(image, **image_kw)
    labels_layer = viewer.add_labels(labels, **labels_kw)
    check_same_grid(image_layer, labels_layer)  # raises if the labels would sit off the image
    assert list(image_layer.contrast_limits) == [-160.0, 240.0]  # the CT soft-tissue window
    names = set(labels_layer.features["name"])
    assert {"liver", "spleen", "aorta"} <= names
    assert len(np.unique(labels_layer.data)) >= 12  # the organs the demo found, not an empty layer


def test_demo_gui_without_a_display_is_one_line_before_any_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    out = tmp_path / "demo"
    proc = _demo_cli(out, "--gui", env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "--gui needs" in proc.stderr
    assert not out.exists()  # refused before the demo ran: nothing written


def test_demo_layer_data_without_a_demo_names_the_report(tmp_path):
    from napari_e2enet._napari.demo_viewer import demo_layer_data

    with pytest.raises(InputError, match=r"report\.json: no demo results here"):
        demo_layer_data(tmp_path)
    (tmp_path / "report.json").write_text('{"labels": "x.nii.gz"}')
    with pytest.raises(InputError, match=r"report\.json: not a demo report \(KeyError"):
        demo_layer_data(tmp_path)
