"""npe2 reader: NIfTI files (.nii, .nii.gz) → Image or Labels layers (display convention: layers.py).

A file is opened as **labels** when its voxels are integers and either its name says so
(``label``, ``seg``, ``mask``, ``tissue``, ``gt``, or it sits in ``labelsTr``/``labelsTs``) or it
holds at most 64 distinct non-negative values; anything else is an **image**. Label names and
colours come from a ``labels.json`` next to the file, or the ``dataset.json`` of an nnU-Net/MSD
folder above it, when one is there.

Bad files (missing, truncated, not NIfTI, 2D, NaN voxels...) end in ``InputError`` from the core;
the reader turns it into one napari error notification and opens nothing (it returns napari's
"no layers" sentinel, so napari does not add a second, generic error).

DICOM series folders are not read: no DICOM library (pydicom, SimpleITK, itk) is installed with the
plugin, and a half-done DICOM reader that mis-orders slices is worse than none. Convert with
``dcm2niix`` first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import NIFTI_SUFFIXES, read_volume
from ..errors import InputError
from ..labels import LabelTable
from .layers import image_layer_data, labels_layer_data

LayerData = tuple[Any, dict[str, Any], str]

_LABEL_NAME = re.compile(r"(^|[_\-.])(label|labels|seg|segmentation|mask|tissue|gt|aseg)([_\-.0-9]|$)", re.I)
_LABEL_DIRS = {"labelstr", "labelsts", "labels", "segmentations", "masks"}
MAX_LABEL_VALUES = 64


def _is_nifti(path: str | Path) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(s) and len(name) > len(s) for s in NIFTI_SUFFIXES)


def napari_get_reader(path: str | Sequence[str]) -> Callable[..., list[LayerData]] | None:
    """Return :func:`read_nifti` for a NIfTI path (or a list of them), else None."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(_is_nifti(p) for p in paths):
        return None
    return read_nifti


def read_nifti(path: str | Sequence[str], stack: bool = False) -> list[LayerData]:
    """Read one or more NIfTI files into layer-data tuples (one layer per file)."""
    from napari.utils.notifications import show_error

    paths = [path] if isinstance(path, str | Path) else list(path)
    try:
        return [read_layer_data(p) for p in paths]
    except InputError as err:
        show_error(str(err))
        return [(None,)]  # type: ignore[list-item]  # napari's "read, nothing to add" sentinel


def read_layer_data(path: str | Path, kind: str | None = None) -> LayerData:
    """One NIfTI file as a layer-data tuple; ``kind`` forces "image" or "labels"."""
    path = Path(path)
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
