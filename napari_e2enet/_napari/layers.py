"""Volume ⇄ napari layer: the plugin's ONE display convention.

The convention
--------------
A :class:`~napari_e2enet.data.Volume` holds voxels in NIfTI order (X, Y, Z) = (i, j, k) and a
4×4 voxel → RAS+ mm affine. In napari the plugin shows

* **data**: a *view* (no copy) of the array, reoriented to the voxel axes closest to
  **(S, P, L)** — napari axis 0 runs inferior → superior, axis 1 anterior → posterior, axis 2
  right → left (nibabel's ``io_orientation`` picks, for each world axis, the voxel axis nearest to
  it; the view is a transpose plus reversed strides). A channel image (C, X, Y, Z) keeps its
  channel axis in front: (C, S, P, L).
* **world coordinates**: millimetres in DICOM/ITK **LPS+** order reversed, (z, y, x) =
  (S, P, L) = (z_ras, −y_ras, −x_ras), expressed with ``scale`` (the voxel spacing along each
  displayed axis, always positive) and ``translate`` (the position of the voxel grid), ``affine``
  the identity, ``units`` = mm, ``axis_labels`` = ("S", "P", "L").
* **metadata**: ``layer.metadata["napari_e2enet"]`` holds the exact source geometry — the 4×4
  affine, the spatial shape, the source NIfTI header (``binaryblock`` bytes + its class), the
  axis permutation/flips of the view, the source path and the source's ``Volume.meta`` (e.g. the
  DICOM series a Labels layer must reference when it is saved as DICOM-SEG) — see :class:`Geometry`.

Why this one
------------
napari slices along axis 0 and draws axis 1 downwards, axis 2 to the right. With (S, P, L) the
default view is an **axial** slice in the radiological convention every DICOM viewer uses
(anterior at the top, the patient's right on the screen's left), for any acquisition order (an
LPS-stored CT, an RAS-stored MRI or a sagittal scan all come up the same way), and napari world
positions are the LPS millimetres DICOM/ITK tools print. Positive ``scale`` values keep napari's
scale bar, measurements and painting brush sizes right; no voxel is ever resampled or copied, so
painting into a Labels layer writes straight into the (X, Y, Z) array behind it.

Oblique affines
---------------
napari cannot slice a rotated grid in 2D. An affine whose voxel axes are not parallel to the world
axes (beyond 1e-4 in direction cosines) is shown **de-obliqued**: on its own voxel grid, with the
true spacing, its nearest (S, P, L) orientation and its centre voxel at its true world position;
a warning says by how many degrees the display departs from world space. The exact affine stays
in the metadata, so saving writes the source geometry unchanged.

Inverse
-------
:func:`layer_to_volume` undoes the view (flips, transpose) and returns a Volume with the exact
source affine and header from the metadata. A layer without plugin metadata (e.g. painted into a
napari "new labels layer") gets its affine from its napari transform (LPS (z, y, x) → RAS).
:func:`check_same_grid` is the writer's guard that a labels layer still sits on its image's grid.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..data.volume import Volume
from ..errors import InputError
from ..labels import LabelTable

__all__ = [
    "AXIS_LABELS",
    "META_KEY",
    "Geometry",
    "ObliqueWarning",
    "check_same_grid",
    "geometry_of",
    "image_layer_data",
    "label_colormap",
    "label_features",
    "labels_layer_data",
    "labels_layer_kwargs",
    "layer_to_volume",
    "layer_transform",
]

META_KEY = "napari_e2enet"
AXIS_LABELS = ("S", "P", "L")
OBLIQUE_TOL = 1e-4  # direction-cosine tolerance below which an affine counts as axis-aligned

# RAS (x, y, z, 1) -> napari world (S, P, L, 1) = (z, -y, -x, 1)
_RAS_TO_WORLD = np.array([[0.0, 0, 1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]])
_WORLD_TO_RAS = np.linalg.inv(_RAS_TO_WORLD)
# For napari axis n: the RAS axis it follows and the RAS direction of "increasing index".
_TARGET_AXIS = (2, 1, 0)
_TARGET_SIGN = (1.0, -1.0, -1.0)


class ObliqueWarning(UserWarning):
    """The affine is oblique: the display is de-obliqued (saving stays exact)."""


@dataclass(frozen=True)
class Geometry:
    """The source geometry of a layer and the view that shows it.

    ``affine``: (4, 4) voxel (i, j, k) → RAS+ mm, exactly as read. ``shape``: (X, Y, Z).
    ``perm[n]``: the voxel axis that napari axis n shows; ``flip[n]``: whether it runs reversed.
    ``header``: the source NIfTI header bytes (``binaryblock``) and ``header_class`` its type.
    ``meta``: the source ``Volume.meta`` (JSON-able facts such as the DICOM series), carried to the
    Volume that :func:`layer_to_volume` rebuilds.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    perm: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)
    header: bytes | None = None
    header_class: str = "Nifti1Header"
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_volume(cls, volume: Volume, source: str | Path | None = None) -> Geometry:
        """The display orientation nearest (S, P, L) for ``volume``'s affine."""
        affine = np.asarray(volume.affine, dtype=np.float64)
        ornt = nib.orientations.io_orientation(affine)  # per voxel axis: (RAS axis, ±1)
        perm, flip = [], []
        for n in range(3):
            voxel_axis = int(np.flatnonzero(ornt[:, 0] == _TARGET_AXIS[n])[0])
            perm.append(voxel_axis)
            flip.append(bool(ornt[voxel_axis, 1] != _TARGET_SIGN[n]))
        header = volume.header
        return cls(
            affine=affine.copy(),
            shape=volume.spatial_shape,
            perm=(perm[0], perm[1], perm[2]),
            flip=(flip[0], flip[1], flip[2]),
            header=None if header is None else bytes(header.binaryblock),
            header_class=type(header).__name__ if header is not None else "Nifti1Header",
            source=None if source is None else str(source),
            meta=dict(volume.meta),
        )

    # -- views ----------------------------------------------------------------------------------
    @property
    def display_shape(self) -> tuple[int, int, int]:
        return (self.shape[self.perm[0]], self.shape[self.perm[1]], self.shape[self.perm[2]])

    def to_display(self, array: np.ndarray) -> np.ndarray:
        """(X, Y, Z) or (C, X, Y, Z) → a view in display order (S, P, L) / (C, S, P, L)."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + p for p in self.perm)))
        index = (slice(None),) * lead + tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        return out[index]

    def from_display(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_display` (a view)."""
        lead = array.ndim - 3
        index = (slice(None),) * lead + tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        array = array[index]
        inverse = np.argsort(self.perm)
        return np.transpose(array, (*range(lead), *(lead + int(p) for p in inverse)))

    # -- transforms ------------------------------------------------------------------------------
    def index_to_voxel(self) -> np.ndarray:
        """4×4: display index (n0, n1, n2, 1) → source voxel (i, j, k, 1)."""
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        for n, (axis, flipped) in enumerate(zip(self.perm, self.flip, strict=True)):
            m[axis, n] = -1.0 if flipped else 1.0
            if flipped:
                m[axis, 3] = self.shape[axis] - 1
        return m

    def display_affine(self) -> np.ndarray:
        """4×4 exact: display index → napari world (S, P, L) mm."""
        return _RAS_TO_WORLD @ self.affine @ self.index_to_voxel()

    @property
    def obliquity(self) -> float:
        """Largest angle (degrees) between a displayed axis and the world axis it is shown along."""
        lin = self.display_affine()[:3, :3]
        cosines = np.abs(np.diag(lin)) / np.linalg.norm(lin, axis=0)
        return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))

    @property
    def is_oblique(self) -> bool:
        lin = self.display_affine()[:3, :3]
        cosines = np.abs(np.diag(lin)) / np.linalg.norm(lin, axis=0)
        return bool(cosines.min() < 1.0 - OBLIQUE_TOL)

    def scale_translate(self) -> tuple[np.ndarray, np.ndarray]:
        """napari ``scale`` and ``translate`` (3 values each, mm).

        Axis-aligned: exactly the display affine's diagonal and offset. Oblique: the true spacing,
        placed so that the centre voxel sits at its true world position.
        """
        d = self.display_affine()
        lin = d[:3, :3]
        if not self.is_oblique:
            return np.diag(lin).copy(), d[:3, 3].copy()
        scale = np.linalg.norm(lin, axis=0)
        centre = (np.asarray(self.display_shape, dtype=np.float64) - 1.0) / 2.0
        world_centre = lin @ centre + d[:3, 3]
        return scale, world_centre - scale * centre

    # -- header and metadata --------------------------------------------------------------------
    def nifti_header(self) -> nib.Nifti1Header | None:
        if self.header is None:
            return None
        cls = nib.Nifti2Header if self.header_class == "Nifti2Header" else nib.Nifti1Header
        return cls(binaryblock=self.header)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "affine": self.affine.tolist(),
            "shape": list(self.shape),
            "perm": list(self.perm),
            "flip": list(self.flip),
            "header": self.header,
            "header_class": self.header_class,
            "source": self.source,
            "meta": dict(self.meta),
            "convention": "display (S, P, L) view; world LPS mm (z, y, x); see napari_e2enet._napari.layers",
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Geometry:
        try:
            affine = np.asarray(meta["affine"], dtype=np.float64)
            shape = tuple(int(s) for s in meta["shape"])
            perm = tuple(int(p) for p in meta.get("perm", (0, 1, 2)))
            flip = tuple(bool(f) for f in meta.get("flip", (False, False, False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"layer metadata holds no valid source geometry ({exc})") from None
        if affine.shape != (4, 4) or len(shape) != 3 or sorted(perm) != [0, 1, 2] or len(flip) != 3:
            raise InputError("layer metadata holds no valid source geometry")
        header = meta.get("header")
        source_meta = meta.get("meta")
        return cls(affine, shape, perm, flip,  # type: ignore[arg-type]
                   bytes(header) if header is not None else None,
                   str(meta.get("header_class") or "Nifti1Header"), meta.get("source"),
                   dict(source_meta) if isinstance(source_meta, Mapping) else {})


# ---------------------------------------------------------------------------------------------
# Volume -> layer


def _common_kwargs(geometry: Geometry, name: str, lead: int = 0) -> dict[str, Any]:
    scale, translate = geometry.scale_translate()
    if geometry.is_oblique:
        warnings.warn(
            f"{name or 'volume'}: oblique affine ({geometry.obliquity:.1f}° off the world axes); napari shows it "
            "de-obliqued on its voxel grid (positions approximate), saved files keep the exact affine",
            ObliqueWarning, stacklevel=3)
    return {
        "name": name,
        "scale": [1.0] * lead + [float(s) for s in scale],
        "translate": [0.0] * lead + [float(t) for t in translate],
        "units": ("pixel",) * lead + ("mm",) * 3,
        "axis_labels": tuple(f"c{i}" for i in range(lead)) + AXIS_LABELS,
        "metadata": {META_KEY: geometry.to_metadata()},
    }


def image_layer_data(volume: Volume, *, source: str | Path | None = None, name: str | None = None,
                     **extra: Any) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari layer-data tuple ``(data, kwargs, "image")`` for an image Volume.

    (X, Y, Z) → (S, P, L) view; (C, X, Y, Z) → (C, S, P, L) with a unit-scale channel axis.
    Integer images stay in their dtype, float64 becomes float32 (the only copy made).
    """
    geometry = Geometry.from_volume(volume, source)
    array = volume.array
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    lead = array.ndim - 3
    kwargs = _common_kwargs(geometry, name or volume.name, lead)
    low, high = _robust_limits(array)
    kwargs.update({"colormap": "gray", "contrast_limits": [low, high]})
    kwargs.update(extra)
    return geometry.to_display(array), kwargs, "image"


def _robust_limits(array: np.ndarray) -> tuple[float, float]:
    sample = array.reshape(-1)[:: max(1, array.size // 200_000)]
    low, high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    if high <= low:
        high = low + 1.0
    return low, high


def label_colormap(table: LabelTable):
    """A napari ``DirectLabelColormap`` with the table's fixed RGBA colours (background transparent)."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[int | None, Any] = {int(k): tuple(float(c) for c in v) for k, v in table.colors.items()}
    colors[0] = (0.0, 0.0, 0.0, 0.0)
    colors[None] = (0.5, 0.5, 0.5, 1.0)  # ids the table does not know: plain grey
    return DirectLabelColormap(color_dict=colors)


def label_features(table: LabelTable) -> dict[str, list]:
    """``features`` for a Labels layer: one row per id, ``index`` and ``name`` (names on hover)."""
    ids = table.ids
    return {"index": ids, "name": [table.name_of(i) for i in ids]}


def labels_layer_data(volume: Volume, table: LabelTable | None = None, *, source: str | Path | None = None,
                      name: str | None = None, **extra: Any) -> tuple[np.ndarray, dict[str, Any], str]:
    """A layer-data tuple ``(data, kwargs, "labels")`` for a label Volume (same convention)."""
    geometry = Geometry.from_volume(volume, source)
    kwargs = _common_kwargs(geometry, name or volume.name)
    if table is not None:
        kwargs.update({"colormap": label_colormap(table), "features": label_features(table)})
        kwargs["metadata"][META_KEY]["label_table"] = table.to_dict()
    kwargs.update(extra)
    return geometry.to_display(np.asarray(volume.array)), kwargs, "labels"


def labels_layer_kwargs(image_layer: Any, table: LabelTable | None = None, *, name: str | None = None
                        ) -> dict[str, Any]:
    """Kwargs for a Labels layer on ``image_layer``'s grid: its spatial scale/translate/affine,
    units, axis labels and a copy of its geometry metadata (+ colours/names from ``table``)."""
    geometry = geometry_of(image_layer)
    nd = 3
    affine = np.asarray(image_layer.affine.affine_matrix)
    if affine.shape[0] > nd + 1:  # a channel image: keep the spatial block
        affine = np.block([[affine[-nd - 1:-1, -nd - 1:-1], affine[-nd - 1:-1, -1:]],
                           [np.zeros((1, nd)), np.ones((1, 1))]])
    meta = {META_KEY: geometry.to_metadata()}
    kwargs: dict[str, Any] = {
        "name": name or f"{image_layer.name} labels",
        "scale": list(np.asarray(image_layer.scale)[-nd:]),
        "translate": list(np.asarray(image_layer.translate)[-nd:]),
        "affine": affine,
        "units": tuple(image_layer.units)[-nd:],
        "axis_labels": tuple(image_layer.axis_labels)[-nd:],
        "metadata": meta,
    }
    if table is not None:
        kwargs.update({"colormap": label_colormap(table), "features": label_features(table)})
        meta[META_KEY]["label_table"] = table.to_dict()
    return kwargs


# ---------------------------------------------------------------------------------------------
# layer -> Volume


def layer_transform(layer: Any, ndim: int | None = None) -> np.ndarray:
    """The (ndim+1)² matrix napari uses for the layer's data → world (affine ∘ scale/translate/rotate/shear).

    ``layer`` may be a napari layer or a writer's ``meta`` dict (keys scale, translate, rotate,
    shear, affine). Only the last 3 (spatial) axes are returned when ``ndim`` is 3.
    """
    from napari.utils.transforms import Affine

    get = (lambda k: layer.get(k)) if isinstance(layer, Mapping) else (lambda k: getattr(layer, k, None))
    scale = get("scale")
    full_nd = len(scale) if scale is not None else 3
    physical = Affine(
        scale=scale if scale is not None else None,
        translate=get("translate") if get("translate") is not None else None,
        rotate=get("rotate") if get("rotate") is not None else None,
        shear=get("shear") if get("shear") is not None else None,
        ndim=full_nd,
    ).affine_matrix
    affine = get("affine")
    if affine is None:
        extra = np.eye(full_nd + 1)
    else:
        extra = np.asarray(getattr(affine, "affine_matrix", affine), dtype=np.float64)
    matrix = extra @ physical
    nd = ndim or full_nd
    if nd < full_nd:
        matrix = np.block([[matrix[-nd - 1:-1, -nd - 1:-1], matrix[-nd - 1:-1, -1:]],
                           [np.zeros((1, nd)), np.ones((1, 1))]])
    return matrix


def _meta_of(layer: Any) -> Mapping[str, Any] | None:
    meta = layer.get("metadata") if isinstance(layer, Mapping) else getattr(layer, "metadata", None)
    if isinstance(meta, Mapping) and isinstance(meta.get(META_KEY), Mapping):
        return meta[META_KEY]
    return None


def geometry_of(layer: Any, data_shape: tuple[int, ...] | None = None) -> Geometry:
    """The source geometry of a layer (napari layer or writer ``meta`` dict).

    From the plugin metadata when present; otherwise derived from the napari transform (the display
    axes are then the voxel axes and the affine is the layer's world transform turned into RAS).
    """
    meta = _meta_of(layer)
    if meta is not None:
        return Geometry.from_metadata(meta)
    if data_shape is None:
        data_shape = tuple(np.shape(layer.data))
    if len(data_shape) < 3:
        raise InputError(f"layer {getattr(layer, 'name', '')!r} is {len(data_shape)}D; a 3D volume is needed")
    affine = _WORLD_TO_RAS @ layer_transform(layer, 3)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"layer {getattr(layer, 'name', '')!r} has a degenerate transform")
    shape = tuple(int(s) for s in data_shape[-3:])
    return Geometry(affine, (shape[0], shape[1], shape[2]))


def _expected_transform(geometry: Geometry) -> np.ndarray:
    scale, translate = geometry.scale_translate()
    m = np.diag([*scale, 1.0])
    m[:3, 3] = translate
    return m


def layer_to_volume(layer: Any, *, data: Any = None, name: str | None = None, check: bool = True) -> Volume:
    """Invert :func:`image_layer_data` / :func:`labels_layer_data`: the layer as a source-grid Volume.

    ``layer``: a napari layer, or a writer's ``meta`` dict with ``data`` given separately. Returns
    (X, Y, Z) (or (C, X, Y, Z)) voxels with the exact source affine and header. With ``check``,
    raises InputError when the layer's data shape or its napari transform no longer matches the
    recorded source geometry (e.g. the layer was rescaled or moved after loading).
    """
    array = np.asarray(layer.data if data is None else data)
    label = name or (layer.get("name") if isinstance(layer, Mapping) else getattr(layer, "name", "")) or ""
    if array.ndim not in (3, 4):
        raise InputError(f"layer {label!r} has shape {array.shape}; a 3D volume (or C×3D image) is needed")
    geometry = geometry_of(layer, array.shape)
    if tuple(array.shape[-3:]) != geometry.display_shape:
        raise InputError(f"layer {label!r} has shape {array.shape[-3:]} but its source grid is "
                         f"{geometry.display_shape} (in display order)")
    if check and _meta_of(layer) is not None:
        actual = layer_transform(layer, 3)
        if not np.allclose(actual, _expected_transform(geometry), rtol=1e-6, atol=1e-4):
            raise InputError(f"layer {label!r} was moved or rescaled in napari after loading; its transform no "
                             "longer matches its source geometry (reset scale/translate/affine to save it)")
    voxels = geometry.from_display(array)
    return Volume(voxels, geometry.affine.copy(), geometry.nifti_header(), str(label), dict(geometry.meta))


def check_same_grid(image_layer: Any, labels_layer: Any) -> None:
    """InputError unless the labels layer lies on the image layer's voxel grid (shape + geometry)."""
    image_shape = tuple(np.shape(image_layer.data))[-3:]
    labels_shape = tuple(np.shape(labels_layer.data))[-3:]
    if image_shape != labels_shape:
        raise InputError(f"labels layer {labels_layer.name!r} has shape {labels_shape} but image "
                         f"{image_layer.name!r} has {image_shape}")
    if not np.allclose(layer_transform(image_layer, 3), layer_transform(labels_layer, 3), rtol=1e-6, atol=1e-4):
        raise InputError(f"labels layer {labels_layer.name!r} is not aligned with image {image_layer.name!r} "
                         "(different scale/translate/affine)")
    a, b = _meta_of(image_layer), _meta_of(labels_layer)
    if a is not None and b is not None:
        ga, gb = Geometry.from_metadata(a), Geometry.from_metadata(b)
        if ga.shape != gb.shape or ga.perm != gb.perm or ga.flip != gb.flip or not np.allclose(
                ga.affine, gb.affine, rtol=1e-6, atol=1e-4):
            raise InputError(f"labels layer {labels_layer.name!r} and image {image_layer.name!r} come from "
                             "different source grids (affine or shape differ)")
