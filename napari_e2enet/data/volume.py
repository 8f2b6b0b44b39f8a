"""``Volume``: a voxel array with its geometry (docs/CONVENTIONS.md, "Axes and geometry").

``Volume.array`` is in NIfTI voxel order (X, Y, Z) = (i, j, k), exactly as nibabel returns it, with
an optional leading channel axis for images: (C, X, Y, Z). ``Volume.affine`` is the 4×4 voxel → RAS+
millimetre matrix of the source file, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from ..errors import InputError

__all__ = ["Volume"]


@dataclass
class Volume:
    """A 3D image or label map with its geometry.

    Attributes:
        array: (X, Y, Z) or (C, X, Y, Z) voxels in NIfTI voxel order.
        affine: (4, 4) float64, voxel index (i, j, k, 1) → RAS+ millimetres.
        header: the source NIfTI header (kept so a written result carries the same metadata).
        name: a display name (case id, layer name, file stem).
        meta: JSON-able facts about the source that a writer may need, e.g. for a DICOM series
            ``{"format": "dicom", "path": <folder or zip>, "series_uid": ...}`` so that a DICOM-SEG
            can reference it. Empty for NIfTI (its header carries everything).
    """

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        affine = np.asarray(self.affine, dtype=np.float64)
        where = self.name or None
        if affine.shape != (4, 4):
            raise InputError(f"affine must be 4x4, got shape {affine.shape}", where)
        if not np.all(np.isfinite(affine)):
            raise InputError("affine contains NaN or Inf", where)
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError("affine is singular (a zero or degenerate voxel axis)", where)
        self.affine = affine
        if self.array.ndim not in (3, 4):
            raise InputError(
                f"expected a 3D (X, Y, Z) or channels-first 4D (C, X, Y, Z) array, got shape {self.array.shape}",
                where,
            )
        if min(self.array.shape) < 1:
            raise InputError(f"empty array of shape {self.array.shape}", where)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (sx, sy, sz) in mm, in array order: the column norms of the affine."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(X, Y, Z): the last three axes of ``array``."""
        shape = self.array.shape[-3:]
        return (int(shape[0]), int(shape[1]), int(shape[2]))

    @property
    def num_channels(self) -> int:
        """1 for a 3D array, C for a (C, X, Y, Z) array."""
        return 1 if self.array.ndim == 3 else int(self.array.shape[0])

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Axis codes of the voxel axes, e.g. ``("L", "P", "S")`` (nibabel ``aff2axcodes``)."""
        codes = nib.aff2axcodes(self.affine)
        return (str(codes[0]), str(codes[1]), str(codes[2]))

    def channels(self) -> np.ndarray:
        """The array with a channel axis always present: (C, X, Y, Z) (a view, no copy)."""
        return self.array[None] if self.array.ndim == 3 else self.array

    def with_array(self, array: np.ndarray, name: str | None = None) -> Volume:
        """A new Volume on the same grid (same affine and header) holding ``array``."""
        array = np.asarray(array)
        if tuple(array.shape[-3:]) != self.spatial_shape:
            raise ValueError(f"with_array: spatial shape {array.shape[-3:]} != {self.spatial_shape}")
        return Volume(array, self.affine.copy(), self.header, self.name if name is None else name, dict(self.meta))

    def crop(self, box: tuple[slice, slice, slice]) -> Volume:
        """The part inside ``box`` (voxel slices, step 1) as a view, with the affine that keeps it in
        place in world space."""
        if all(b.start in (0, None) and b.stop in (n, None) for b, n in zip(box, self.spatial_shape, strict=True)):
            return self
        shift = np.eye(4)
        shift[:3, 3] = [b.start or 0 for b in box]
        index = (..., *box)  # built apart: mypy reads x[(a, *b)] as the 3.11-only x[a, *b]
        return Volume(self.array[index], self.affine @ shift, self.header, self.name, dict(self.meta))

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Volume(name={self.name!r}, shape={self.array.shape}, dtype={self.array.dtype}, "
            f"spacing=({spacing}), orientation={''.join(self.orientation)})"
        )
