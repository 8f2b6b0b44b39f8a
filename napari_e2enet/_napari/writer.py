"""npe2 writers: a Labels or Image layer → a file on its source geometry, the format by extension.

Labels: ``.nii.gz`` / ``.nii`` (NIfTI), ``.nrrd``, ``.seg.nrrd`` (a 3D Slicer segmentation with the
layer's label names and colours), ``.mha`` / ``.mhd``, ``.dcm`` (DICOM-SEG: the layer must lie on a
DICOM image's grid with that image's plugin metadata, as layers made by the Segment widget do; the
file references that series). Images: ``.nii.gz`` / ``.nii``, ``.nrrd``, ``.mha`` / ``.mhd``.

The layer's plugin metadata (``layers.META_KEY``) gives the exact source affine and header, so the
written file re-reads in nibabel with the identical affine, shape and orientation codes. Before
writing, the layer's napari transform is checked against that geometry (a layer moved or rescaled
after loading is refused rather than silently written on the wrong grid). A layer without plugin
metadata is written with the affine its napari transform implies (LPS display → RAS file).

Writing goes through the core's atomic ``write_volume``. Errors are ``InputError`` (one line naming
the file): napari shows them as an error notification and reports the save as failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import write_volume
from ..errors import InputError
from ..labels import LabelTable
from .layers import META_KEY, layer_to_volume


def _label_table(meta: dict[str, Any]) -> LabelTable | None:
    """The label table the reader or the Segment widget stored in the layer's plugin metadata."""
    plugin = (meta.get("metadata") or {}).get(META_KEY) or {}
    table = plugin.get("label_table")
    if not table:
        return None
    try:
        return LabelTable.from_dict(table)
    except ValueError:
        return None


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Single-layer writer for Labels layers (integer voxels, uint8/int16/int32 on disk; names and
    colours into .seg.nrrd and DICOM-SEG)."""
    array = np.asarray(data)
    if array.ndim != 3:
        raise InputError(f"labels layer {meta.get('name')!r} is {array.ndim}D; only 3D label maps are written",
                         path)
    try:
        volume = layer_to_volume(meta, data=array)
    except InputError as err:
        raise InputError(str(err), path) from None
    if Path(path).name.lower().endswith(".dcm") and volume.meta.get("format") != "dicom":
        raise InputError("DICOM-SEG needs a labels layer on a DICOM image's grid (make it with the Segment widget "
                         "on an image opened from a DICOM folder or zip); save as .nii.gz or .seg.nrrd instead",
                         path)
    return [str(write_volume(volume, path, like=volume, label_table=_label_table(meta)))]


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Single-layer writer for Image layers (stored as float32; a (C, ...) image as a 4D series /
    channels)."""
    try:
        volume = layer_to_volume(meta, data=np.asarray(data))
    except InputError as err:
        raise InputError(str(err), path) from None
    volume.array = np.asarray(volume.array, dtype=np.float32)
    return [str(write_volume(volume, Path(path)))]
