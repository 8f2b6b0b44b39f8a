"""``napari-e2enet demo --gui``: napari with the demo's image and predicted labels.

The CLI runs this module in its own process (``python -m napari_e2enet._napari.demo_viewer OUT``)
after the demo has written ``OUT``: the CLI stays free of Qt (the layers contract in
pyproject.toml), and whatever happens in the window cannot undo the files already written.

``demo_layer_data(out_dir)`` reads the folder through the plugin's own reader (so the layers have
the same geometry, names and colours as when the user opens the files in napari), without Qt.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .reader import LayerData, read_layer_data

# Soft-tissue window (HU) for the CT phantom, as demo.CT_WINDOW; repeated here because importing
# demo would load the predictor stack just for two numbers.
_CT_WINDOW = [-160.0, 240.0]


def demo_layer_data(out_dir: str | Path) -> list[LayerData]:
    """The image and the predicted labels of a finished demo in ``out_dir`` as layer-data tuples
    (labels named and coloured by the ``labels.json`` the demo writes beside them)."""
    out = Path(out_dir)
    report_file = out / "report.json"
    try:
        report: dict[str, Any] = json.loads(report_file.read_text(encoding="utf-8"))
        image_file, labels_file = out / report["image"], out / report["labels"]
    except FileNotFoundError:
        raise InputError("no demo results here (report.json is missing); run napari-e2enet demo first",
                         report_file) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"not a demo report ({type(exc).__name__}: {exc})", report_file) from None
    image = read_layer_data(image_file, kind="image")
    labels = read_layer_data(labels_file, kind="labels")
    image[1]["name"] = image_file.name.split(".")[0]
    if str(report.get("sample", "")).startswith("phantom_ct"):
        image[1]["contrast_limits"] = list(_CT_WINDOW)
    labels[1].update({"name": f"{report.get('model', 'E2ENet')} labels", "opacity": 0.5})
    return [image, labels]


def show_demo(out_dir: str | Path, *, close_after: float | None = None) -> list[str]:
    """Open napari with the demo's layers and run its event loop until the window closes (or, with
    ``close_after``, that many seconds after it opened: the tests' way to close it). Returns the
    names of the layers the viewer held."""
    import napari
    from qtpy.QtCore import QTimer

    layers = demo_layer_data(out_dir)
    viewer = napari.Viewer(title=f"napari-e2enet demo: {Path(out_dir).name}")
    for data, kwargs, kind in layers:
        if kind == "image":
            viewer.add_image(data, **kwargs)
        else:
            viewer.add_labels(data, **kwargs)
    viewer.dims.ndisplay = 2
    viewer.reset_view()
    names = [layer.name for layer in viewer.layers]
    sys.stderr.write(f"demo --gui: napari shows {', '.join(names)} (close the window to exit)\n")
    if close_after is not None:
        QTimer.singleShot(int(close_after * 1000), viewer.close)
    napari.run()
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="napari-e2enet demo --gui", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the demo's output folder")
    parser.add_argument("--close-after", type=float, default=None, help=argparse.SUPPRESS)  # tests
    args = parser.parse_args(argv)
    try:
        show_demo(args.out, close_after=args.close_after)
    except InputError as exc:
        sys.stderr.write(f"napari-e2enet demo --gui: error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
