"""npe2 reader: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr, .seg.nrrd), MetaImage (.mha, .mhd) and
DICOM series (a folder or a .zip) → Image or Labels layers (display convention: layers.py).

A file is opened as **labels** when its voxels are integers and either its name says so
(``label``, ``seg``, ``mask``, ``tissue``, ``gt``, or it sits in ``labelsTr``/``labelsTs``) or it
holds at most 64 distinct non-negative values; anything else is an **image**. Label names and
colours come from a ``labels.json`` next to the file, or the ``dataset.json`` of an nnU-Net/MSD
folder above it, when one is there.

A 3D Slicer segmentation (``.seg.nrrd``, or any NRRD with Slicer's segment fields) always opens
as **labels** with its segment names and colours. A DICOM series opens as an **image**; a folder
or zip holding several image series asks which one (:data:`choose_series`, a Qt list dialog;
cancel opens nothing). The layer's metadata keeps the series (``Volume.meta``), so a Labels layer
made on it (Segment widget) can be saved as DICOM-SEG that references it. DICOM and NRRD need the
``formats`` extra (pydicom/highdicom, pynrrd); without it, opening says so in one line.

Bad files (missing, truncated, not that format, 2D, NaN voxels...) end in ``InputError`` from the
core; the reader turns it into one napari error notification and opens nothing (it returns napari's
"no layers" sentinel, so napari does not add a second, generic error).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import is_volume_file, read_volume, volume_format
from ..errors import InputError
from ..labels import LabelTable
from .layers import image_layer_data, labels_layer_data

LayerData = tuple[Any, dict[str, Any], str]

_LABEL_NAME = re.compile(r"(^|[_\-.])(label|labels|seg|segmentation|mask|tissue|gt|aseg)([_\-.0-9]|$)", re.I)
_LABEL_DIRS = {"labelstr", "labelsts", "labels", "segmentations", "masks"}
MAX_LABEL_VALUES = 64


def _is_dicom(path: str | Path) -> bool:
    from ..data.dicom import is_dicom_source

    return volume_format(path) == "dicom" and is_dicom_source(path)


def napari_get_reader(path: str | Sequence[str]) -> Callable[..., list[LayerData]] | None:
    """Return :func:`read_volumes` for NIfTI/NRRD/MetaImage files and DICOM folders or zips (or a
    list of them), else None (napari then asks other readers)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(is_volume_file(p) or _is_dicom(p) for p in paths):
        return None
    return read_volumes


def _ask_series(path: Path, series: list) -> str | None:
    """Qt list dialog: which of ``series`` (``DicomSeries``) to open; None when cancelled."""
    from qtpy.QtWidgets import QInputDialog

    items = [f"{s.description or '(no description)'} — {s.modality} {s.columns}×{s.rows}×{s.num_slices} — {s.uid}"
             for s in series]
    item, ok = QInputDialog.getItem(None, "Open DICOM series",
                                    f"{path.name} holds {len(series)} image series; open:", items, 0, False)
    return series[items.index(item)].uid if ok and item in items else None


#: ``(source, [DicomSeries, ...]) -> series UID or None``: asked when a DICOM source holds several
#: image series (None: open nothing). A Qt dialog by default; tests replace it.
choose_series: Callable[[Path, list], str | None] = _ask_series


def read_volumes(path: str | Sequence[str], stack: bool = False) -> list[LayerData]:
    """Read files and DICOM sources into layer-data tuples (one layer per path)."""
    from napari.utils.notifications import show_error

    paths = [path] if isinstance(path, str | Path) else list(path)
    layers = []
    try:
        for p in paths:
            series = None
            if volume_format(p) == "dicom":
                from ..data.dicom import list_dicom_series

                found = list_dicom_series(p)
                if len(found) > 1:
                    series = choose_series(Path(p), found)
                    if series is None:
                        continue  # cancelled: nothing from this source
            layers.append(read_layer_data(p, series=series))
    except InputError as err:
        show_error(str(err))
        return [(None,)]  # type: ignore[list-item]  # napari's "read, nothing to add" sentinel
    return layers or [(None,)]  # type: ignore[list-item]


read_nifti = read_volumes  # the name of this reader before it read other formats


def read_layer_data(path: str | Path, kind: str | None = None, *, series: str | None = None) -> LayerData:
    """One file or DICOM source as a layer-data tuple; ``kind`` forces "image" or "labels"."""
    path = Path(path)
    fmt = volume_format(path)
    if fmt == "dicom":
        volume = read_volume(path, series=series)
        if kind == "labels":
            raise InputError("a DICOM series is an image; it cannot open as labels", path)
        return image_layer_data(volume, source=path)
    table = None
    if fmt == "nrrd":
        from ..data.nrrd import read_nrrd_and_table

        volume, table = read_nrrd_and_table(path, allow_channels=True)
        if table is not None and kind != "image":  # a Slicer segmentation: labels with its names
            return labels_layer_data(volume, table, source=path)
    else:
        volume = read_volume(path, allow_channels=True)
    if kind is None:
        kind = "labels" if looks_like_labels(path, volume.array) else "image"
    if kind == "labels":
        if volume.array.ndim != 3:
            raise InputError(f"label map must be 3D, got shape {volume.array.shape}", path)
        array = volume.array
        if array.dtype.kind == "f":
            array = array.astype(np.int32)
        volume.array = array
        return labels_layer_data(volume, find_label_table(path), source=path)
    return image_layer_data(volume, source=path)


def looks_like_labels(path: Path, array: np.ndarray) -> bool:
    """Integer voxels, and a label-ish name/folder or few distinct values (see module docstring)."""
    if array.ndim != 3:
        return False
    if array.dtype.kind == "f":
        sample = array.reshape(-1)[:: max(1, array.size // 100_000)]
        if not np.all(sample == np.round(sample)):
            return False
    elif array.dtype.kind not in "iub":
        return False
    name = path.name
    if _LABEL_NAME.search(name) or path.parent.name.lower() in _LABEL_DIRS:
        return array.dtype.kind != "f" or float(array.min()) >= 0
    if array.dtype.kind == "f" or float(array.min()) < 0:
        return False
    if float(array.max()) > 10_000:
        return False
    values = np.unique(array.reshape(-1)[:: max(1, array.size // 2_000_000)])
    return values.size <= MAX_LABEL_VALUES


def find_label_table(path: Path) -> LabelTable | None:
    """``labels.json`` beside the file, else a ``dataset.json`` one or two folders up; None if none."""
    candidates = [(path.parent / "labels.json", False), (path.parent / "dataset.json", True),
                  (path.parent.parent / "dataset.json", True)]
    for candidate, is_dataset in candidates:
        if candidate.is_file():
            try:
                return LabelTable.from_dataset_json(candidate) if is_dataset else LabelTable.from_json(candidate)
            except (InputError, ValueError):
                continue
    return None
