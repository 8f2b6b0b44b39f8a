"""npe2 writers: a Labels or Image layer → NIfTI (.nii.gz / .nii) on its source geometry.

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
from .layers import layer_to_volume


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Single-layer writer for Labels layers (integer voxels, uint8/int16/int32 on disk)."""
    array = np.asarray(data)
    if array.ndim != 3:
        raise InputError(f"labels layer {meta.get('name')!r} is {array.ndim}D; only 3D label maps are written",
                         path)
    try:
        volume = layer_to_volume(meta, data=array)
    except InputError as err:
        raise InputError(str(err), path) from None
    return [str(write_volume(volume, path))]


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Single-layer writer for Image layers (stored as float32; a (C, ...) image as a 4D series)."""
    try:
        volume = layer_to_volume(meta, data=np.asarray(data))
    except InputError as err:
        raise InputError(str(err), path) from None
    volume.array = np.asarray(volume.array, dtype=np.float32)
    return [str(write_volume(volume, Path(path)))]
