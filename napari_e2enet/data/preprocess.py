"""Preprocessing: axis order, resampling to the target spacing, intensity normalisation, and the way back.

nnU-Net-style, as in the E2ENet paper (Wu et al., NeurIPS 2024), and docs/CONVENTIONS.md:

- **Orientation.** With ``Plan.orientation = "RAS"`` (every model trained since the option exists) the
  volume is first brought to the closest RAS+ voxel order by permuting and flipping axes only (no
  resampling; nibabel's ``io_orientation``), so the same scan stored in any of the 48 axis orders
  reaches the network as the same array and a model that learned "left" keeps it. ``None`` (model
  files from before) uses the storage order as it comes, as those models were trained.
- **Axis order.** The network sees (C, D, H, W) with D the coarsest axis (ties → Z); the other two
  follow in reverse array order, so isotropic (X, Y, Z) data becomes (Z, Y, X), and Z-coarsest data
  too. The permutation is recorded in ``Inverse`` and undone on the way back.
- **Background.** Skull-stripped MRI (``Plan.norm_nonzero``) is normalised over its foreground: the
  voxels that differ from the image's constant background value, which is 0 unless the volume border
  is dominated by another constant (an intensity offset such as ``scl_inter = 50``).
- **Resampling** (nnU-Net style) keeps the field of view: each axis gets
  ``n' = round(n · spacing / target)`` voxels and voxel *edges* stay aligned (scipy ``zoom`` with
  ``grid_mode=True``). Axes whose size would not change are not touched (identity spacing → no
  resampling at all). Images: cubic B-spline (order 3); when the spacing is anisotropic (max/min >
  ``Plan.anisotropy_threshold``) the coarse axis is resampled separately with linear interpolation to
  avoid spline ringing across thick slices (nnU-Net's "separate z", but linear instead of nearest).
  Labels: per-label linear interpolation then arg-max (default; smooth organ borders) or nearest.
- **Normalisation.** CT: clip to the dataset's foreground 0.5–99.5 percentiles, then z-score with the
  dataset's foreground mean/std. Anything else (MRI, other): per-image, per-channel z-score.
- **Inverse.** ``Inverse.labels_to_source`` maps a (D, H, W) label map back onto the exact source
  grid (X, Y, Z) with nearest-neighbour index mapping — the shape always equals the source shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel import orientations
from scipy import ndimage as ndi

from ..errors import InputError
from .io import float32_voxels
from .volume import Volume

__all__ = [
    "ORIENTATIONS",
    "Inverse",
    "Plan",
    "axis_order",
    "background_value",
    "canonical_orientation",
    "fingerprint",
    "foreground_box",
    "foreground_mask",
    "normalise",
    "preprocess",
    "preprocess_case",
    "preprocess_labels",
]

TRANSPOSE_RULES = ("coarsest_first", "zyx")
ORIENTATIONS = ("RAS",)  # Plan.orientation; None = storage order (model files from before the option)


def axis_order(spacing: tuple[float, float, float], rule: str = "coarsest_first") -> tuple[int, int, int]:
    """Network axis n ← source axis ``order[n]``.

    ``"coarsest_first"``: D is the source axis with the largest spacing (within 0.1 %; ties → Z, then
    Y), H and W are the remaining axes in reverse order. ``"zyx"``: always (Z, Y, X).
    """
    if rule == "zyx":
        return (2, 1, 0)
    if rule != "coarsest_first":
        raise ValueError(f"unknown transpose rule {rule!r} (expected one of {TRANSPOSE_RULES})")
    sp = np.asarray(spacing, dtype=np.float64)
    tied = [k for k in range(3) if sp[k] >= sp.max() * (1 - 1e-3)]
    coarse = max(tied)
    rest = [k for k in (2, 1, 0) if k != coarse]
    return (coarse, rest[0], rest[1])


@dataclass(frozen=True)
class Plan:
    """How a dataset's images are turned into network input (saved with the model).

    Attributes:
        target_spacing: (D, H, W) voxel size in mm, in network order.
        modality: "CT" uses ``ct_clip``/``ct_mean``/``ct_std``; anything else is z-scored per image.
        ct_clip: (lo, hi) HU clip range (foreground 0.5 / 99.5 percentiles).
        ct_mean, ct_std: foreground mean and standard deviation (HU).
        transpose: axis-order rule, ``"coarsest_first"`` (default) or ``"zyx"``.
        anisotropy_threshold: spacing ratio above which the coarse axis is resampled separately.
        label_resampling: ``"linear"`` (per-label linear + arg-max) or ``"nearest"``.
        norm_nonzero: non-CT only: z-score over the foreground voxels (those that differ from the
            background value, see ``background_value``) and keep the background zero (nnU-Net's
            ``use_mask_for_norm`` for skull-stripped MRI such as BraTS or the MNI152 sample: the
            statistics then describe tissue, not how much empty background a field of view holds).
            Such models also predict only inside the foreground's bounding box (``Predictor``).
        orientation: ``"RAS"``: the network sees every volume in the closest RAS+ voxel order
            (permutation and flips only); ``None``: in its storage order (model files from before).
    """

    target_spacing: tuple[float, float, float]
    modality: str = "CT"
    ct_clip: tuple[float, float] | None = None
    ct_mean: float | None = None
    ct_std: float | None = None
    transpose: str = "coarsest_first"
    anisotropy_threshold: float = 3.0
    label_resampling: str = "linear"
    norm_nonzero: bool = False
    orientation: str | None = None

    def __post_init__(self) -> None:
        ts = tuple(float(s) for s in self.target_spacing)
        if len(ts) != 3 or not all(math.isfinite(s) and s > 0 for s in ts):
            raise InputError(
                f"Plan: target_spacing must be three positive numbers, got {self.target_spacing}"
            )
        object.__setattr__(self, "target_spacing", ts)
        if self.ct_clip is not None:
            lo, hi = (float(v) for v in self.ct_clip)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise InputError(f"Plan: ct_clip must be (lo, hi) with lo <= hi, got {self.ct_clip}")
            object.__setattr__(self, "ct_clip", (lo, hi))
        for name in ("ct_mean", "ct_std"):
            value = getattr(self, name)
            if value is not None:
                if not math.isfinite(float(value)):
                    raise InputError(f"Plan: {name} must be finite, got {value}")
                object.__setattr__(self, name, float(value))
        if self.transpose not in TRANSPOSE_RULES:
            raise InputError(f"Plan: transpose must be one of {TRANSPOSE_RULES}, got {self.transpose!r}")
        if self.label_resampling not in ("linear", "nearest"):
            raise InputError(
                f"Plan: label_resampling must be 'linear' or 'nearest', got {self.label_resampling!r}"
            )
        if not self.anisotropy_threshold > 1:
            raise InputError("Plan: anisotropy_threshold must be > 1")
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise InputError(f"Plan: orientation must be one of {ORIENTATIONS} or null, got {self.orientation!r}")

    @property
    def uses_ct_normalisation(self) -> bool:
        return self.modality.upper() == "CT" and self.ct_clip is not None and self.ct_mean is not None

    def replace(self, **changes: Any) -> Plan:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Inverse of ``to_dict``; unknown keys or bad values raise InputError."""
        if not isinstance(data, dict):
            raise InputError("Plan: expected a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"Plan: unknown keys {sorted(unknown)}")
        if "target_spacing" not in data:
            raise InputError("Plan: target_spacing is missing")
        kwargs = dict(data)
        for key in ("target_spacing", "ct_clip"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise InputError(f"Plan: {exc}") from None


@dataclass(frozen=True)
class Inverse:
    """What ``preprocess`` did, so that network outputs can go back to the source grid.

    Attributes:
        source_shape: (X, Y, Z) of the source volume after reorientation (= its storage shape when
            ``to_storage`` is None).
        order: network axis n ← source axis ``order[n]``.
        network_shape: (D, H, W) of the preprocessed array.
        source_affine: the 4×4 affine (voxel → RAS+ mm) of the reoriented source.
        to_storage: nibabel orientation transform (3, 2) from the reoriented voxel order back to the
            storage order, or None when no reorientation was done.
    """

    source_shape: tuple[int, int, int]
    order: tuple[int, int, int]
    network_shape: tuple[int, int, int]
    source_affine: np.ndarray
    to_storage: np.ndarray | None = None

    @property
    def storage_shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) of the volume as stored: the shape results are mapped back to."""
        if self.to_storage is None:
            return self.source_shape
        shape = [0, 0, 0]
        for k, (axis, _) in enumerate(self.to_storage):
            shape[int(axis)] = self.source_shape[k]
        return (shape[0], shape[1], shape[2])

    def _to_storage(self, array: np.ndarray) -> np.ndarray:
        """(..., X, Y, Z) on the reoriented grid → storage voxel order (permutation and flips, exact)."""
        if self.to_storage is None:
            return array
        lead = array.ndim - 3
        out = array
        for k in range(3):  # flips first, in reoriented axes, then one transpose (nibabel's apply_orientation)
            if self.to_storage[k, 1] == -1:
                out = np.flip(out, axis=lead + k)
        axes = [lead + int(k) for k in np.argsort(self.to_storage[:, 0])]
        return np.ascontiguousarray(out.transpose(*range(lead), *axes))

    @property
    def source_shape_network_order(self) -> tuple[int, int, int]:
        s = self.source_shape
        return (s[self.order[0]], s[self.order[1]], s[self.order[2]])

    @property
    def network_spacing(self) -> tuple[float, float, float]:
        """Actual (D, H, W) voxel size in mm of the preprocessed grid (≈ the plan's target)."""
        src = np.linalg.norm(self.source_affine[:3, :3], axis=0)
        m = self.source_shape_network_order
        out = [src[self.order[n]] * m[n] / self.network_shape[n] for n in range(3)]
        return (float(out[0]), float(out[1]), float(out[2]))

    @property
    def network_affine(self) -> np.ndarray:
        """4×4 affine of the preprocessed grid: network voxel (d, h, w, 1) → RAS+ mm."""
        m = self.source_shape_network_order
        to_src = np.zeros((4, 4))
        for n in range(3):
            f = m[n] / self.network_shape[n]
            to_src[self.order[n], n] = f
            to_src[self.order[n], 3] = 0.5 * f - 0.5
        to_src[3, 3] = 1.0
        return self.source_affine @ to_src

    def _nearest_indices(self) -> list[np.ndarray]:
        m = self.source_shape_network_order
        out = []
        for n in range(3):
            k = self.network_shape[n]
            idx = np.floor((np.arange(m[n]) + 0.5) * (k / m[n])).astype(np.intp)
            out.append(np.clip(idx, 0, k - 1))
        return out

    def labels_to_source(self, labels: np.ndarray) -> np.ndarray:
        """(D, H, W) integer labels on the network grid → (X, Y, Z) on the exact source grid, in its
        storage order.

        Nearest-neighbour: each source voxel takes the label of the network voxel containing its
        centre. The dtype is kept; the shape is always ``storage_shape``.
        """
        labels = np.asarray(labels)
        if labels.shape != self.network_shape:
            raise ValueError(f"labels_to_source: expected shape {self.network_shape}, got {labels.shape}")
        if self._is_identity_grid():
            net = labels
        else:
            i0, i1, i2 = self._nearest_indices()
            net = labels[np.ix_(i0, i1, i2)]
        return self._to_storage(np.ascontiguousarray(net.transpose(np.argsort(self.order))))

    def array_to_source(self, array: np.ndarray, order: int = 1) -> np.ndarray:
        """(C, D, H, W) or (D, H, W) float maps (probabilities, logits) → (C, X, Y, Z) / (X, Y, Z)."""
        array = np.asarray(array)
        squeeze = array.ndim == 3
        arr = array[None] if squeeze else array
        if tuple(arr.shape[1:]) != self.network_shape:
            raise ValueError(
                f"array_to_source: expected spatial shape {self.network_shape}, got {arr.shape[1:]}"
            )
        target = self.source_shape_network_order
        if not self._is_identity_grid():
            arr = np.stack([_zoom_to(c, target, order) for c in arr])
        back = self._to_storage(arr.transpose(0, *(1 + np.argsort(self.order))))
        return back[0] if squeeze else back

    def _is_identity_grid(self) -> bool:
        return self.network_shape == self.source_shape_network_order


# ----------------------------------------------------------------------------- resampling


def _zoom_to(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample a 3D array to ``shape`` keeping voxel edges aligned (grid mode)."""
    if tuple(array.shape) == tuple(shape):
        return array
    factors = [t / s for t, s in zip(shape, array.shape, strict=True)]
    out = ndi.zoom(array, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if out.shape != tuple(shape):  # float rounding in scipy's shape computation (never seen, but be exact)
        fixed = np.zeros(shape, out.dtype)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(shape, out.shape, strict=True))
        fixed[sl] = out[sl]
        out = fixed
    return out


def _target_shape(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], target: tuple[float, float, float]
) -> tuple[int, int, int]:
    out = [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)]
    return (out[0], out[1], out[2])


def _resample_image(
    array: np.ndarray, spacing: tuple[float, float, float], new_shape: tuple[int, int, int], plan: Plan
) -> np.ndarray:
    """(D, H, W) float32 image → ``new_shape``: cubic, or cubic in-plane + linear along a coarse axis."""
    if tuple(array.shape) == new_shape:
        return array
    sp = np.asarray(spacing)
    tgt = np.asarray(plan.target_spacing)
    aniso_src = sp.max() / sp.min() > plan.anisotropy_threshold
    aniso_tgt = tgt.max() / tgt.min() > plan.anisotropy_threshold
    if aniso_src or aniso_tgt:
        coarse = int(np.argmax(sp if aniso_src else tgt))
        inplane = tuple(new_shape[k] if k != coarse else array.shape[k] for k in range(3))
        out = _zoom_to(array, inplane, order=3)
        return _zoom_to(out, new_shape, order=1)
    return _zoom_to(array, new_shape, order=3)


def _resample_labels(labels: np.ndarray, new_shape: tuple[int, int, int], method: str) -> np.ndarray:
    if tuple(labels.shape) == new_shape:
        return labels
    if method == "nearest":
        idx = []
        for n in range(3):
            m, k = labels.shape[n], new_shape[n]
            idx.append(np.clip(np.floor((np.arange(k) + 0.5) * (m / k)).astype(np.intp), 0, m - 1))
        return labels[np.ix_(*idx)]
    values = np.unique(labels)
    if values.size == 1:
        return np.full(new_shape, values[0], labels.dtype)
    # Per-label linear interpolation of the one-hot maps, then arg-max. Linear interpolation keeps
    # the one-hot maps summing to 1, so background = 1 - sum(foreground) needs no pass of its own, and
    # each foreground label is resampled only inside its bounding box (+1 voxel): the cost follows
    # the organs' size, not (labels × volume).
    src_shape = labels.shape
    f = np.asarray([m / k for m, k in zip(src_shape, new_shape, strict=True)])
    fg_sum = np.zeros(new_shape, np.float32)
    best = np.zeros(new_shape, np.float32)
    out = np.zeros(new_shape, labels.dtype)
    objects = ndi.find_objects(labels.astype(np.int32, copy=False)) if values.max() < 2**20 else None
    for v in values:
        if v == 0:
            continue
        if objects is not None:
            box = objects[int(v) - 1] if int(v) - 1 < len(objects) else None
            if box is None:
                continue
        else:
            where = np.nonzero(labels == v)
            box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)
        c0 = [max(b.start - 1, 0) for b in box]
        c1 = [min(b.stop + 1, n) for b, n in zip(box, src_shape, strict=True)]
        t0 = [max(math.ceil((b.start - 0.5) / fk - 0.5), 0) for b, fk in zip(box, f, strict=True)]
        t1 = [
            min(math.floor((b.stop + 0.5) / fk - 0.5) + 1, k)
            for b, fk, k in zip(box, f, new_shape, strict=True)
        ]
        if any(b <= a for a, b in zip(t0, t1, strict=True)):
            continue
        crop = (labels[tuple(slice(a, b) for a, b in zip(c0, c1, strict=True))] == v).astype(np.float32)
        offset = (np.asarray(t0) + 0.5) * f - 0.5 - np.asarray(c0)
        out_shape = tuple(b - a for a, b in zip(t0, t1, strict=True))
        score = ndi.affine_transform(crop, f, offset=offset, output_shape=out_shape, order=1, mode="nearest")
        region = tuple(slice(a, b) for a, b in zip(t0, t1, strict=True))
        fg_sum[region] += score
        better = score > best[region]
        best[region][better] = score[better]
        out[region][better] = v
    background = 1.0 - fg_sum
    out[best <= background] = 0
    return out


# ----------------------------------------------------------------------------- normalisation


# A constant that fills at least this share of the volume's border faces, and this share of the whole
# volume, is the image's background value. Skull-stripped and zero-padded scans have 0 there; an
# intensity offset (int16 with scl_inter = 50) moves it. A noisy background never qualifies.
_BACKGROUND_BORDER_SHARE = 0.5
_BACKGROUND_VOLUME_SHARE = 0.05


def _border_values(channel: np.ndarray) -> np.ndarray:
    """The voxels of the six faces of a 3D array (edges counted more than once: fine for a share)."""
    faces = [channel[0], channel[-1], channel[:, 0], channel[:, -1], channel[:, :, 0], channel[:, :, -1]]
    return np.concatenate([f.ravel() for f in faces])


def background_value(channel: np.ndarray) -> float:
    """The constant background value of one (X, Y, Z) channel: the value that fills most of the
    volume border when it fills at least half of it and 5 % of the volume, else 0."""
    border = _border_values(channel)
    values, counts = np.unique(border, return_counts=True)
    k = int(np.argmax(counts))
    value = float(values[k])
    if value == 0 or counts[k] < _BACKGROUND_BORDER_SHARE * border.size:
        return 0.0
    stride = max(1, channel.size // 1_000_000)  # a share, so a strided sample is enough
    share = float(np.mean(channel.reshape(-1)[::stride] == values[k]))
    return value if share >= _BACKGROUND_VOLUME_SHARE else 0.0


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) → bool (X, Y, Z): voxels where any channel differs from its background value."""
    mask = np.zeros(array.shape[1:], bool)
    for channel in array:
        mask |= channel != background_value(channel)
    return mask


def normalise(array: np.ndarray, plan: Plan) -> np.ndarray:
    """(C, ...) float32 → normalised float32 (see the module docstring)."""
    out = np.empty(array.shape, np.float32)
    if plan.uses_ct_normalisation:
        lo, hi = plan.ct_clip  # type: ignore[misc]
        std = max(float(plan.ct_std or 0.0), 1e-8)
        np.clip(array, lo, hi, out=out)
        out -= np.float32(plan.ct_mean)
        out /= np.float32(std)
        return out
    mask = foreground_mask(array) if plan.norm_nonzero else None
    for c in range(array.shape[0]):
        ch = array[c].astype(np.float64, copy=False)
        values = ch[mask] if mask is not None and mask.any() else ch
        mean, std = float(values.mean()), float(values.std())
        out[c] = (array[c] - mean) / max(std, 1e-8)
        if mask is not None:
            out[c][~mask] = 0.0
    return out


# ----------------------------------------------------------------------------- public API


def canonical_orientation(volume: Volume, orientation: str | None) -> tuple[Volume, np.ndarray | None]:
    """``volume`` in the closest ``orientation`` (e.g. "RAS") voxel order: axes permuted and flipped
    only, voxels unchanged, the affine adjusted so every voxel keeps its world position.

    Returns (reoriented Volume (a view where possible), the nibabel orientation transform back to the
    storage order, or None when ``orientation`` is None or the volume is already in that order).
    """
    if orientation is None:
        return volume, None
    ornt = orientations.io_orientation(volume.affine)
    target = orientations.axcodes2ornt(tuple(orientation))
    forward = orientations.ornt_transform(ornt, target)
    if np.array_equal(forward, [[0, 1], [1, 1], [2, 1]]):
        return volume, None
    lead = volume.array.ndim - 3
    array = volume.array
    for k in range(3):
        if forward[k, 1] == -1:
            array = np.flip(array, axis=lead + k)
    axes = [lead + int(k) for k in np.argsort(forward[:, 0])]
    array = array.transpose(*range(lead), *axes)
    affine = volume.affine @ orientations.inv_ornt_aff(forward, volume.spatial_shape)
    out = Volume(array, affine, volume.header, volume.name, dict(volume.meta))
    return out, orientations.ornt_transform(target, ornt)


def _network_view(
    volume: Volume, plan: Plan
) -> tuple[np.ndarray, tuple[int, int, int], tuple[float, float, float]]:
    order = axis_order(volume.spacing, plan.transpose)
    arr = volume.channels()
    arr = arr.transpose(0, 1 + order[0], 1 + order[1], 1 + order[2])
    sp = volume.spacing
    return arr, order, (sp[order[0]], sp[order[1]], sp[order[2]])


def preprocess(image: Volume, plan: Plan) -> tuple[np.ndarray, Inverse]:
    """Image Volume ((X, Y, Z) or (C, X, Y, Z)) → (float32 (C, D, H, W) network input, Inverse)."""
    image, to_storage = canonical_orientation(image, plan.orientation)
    arr, order, spacing = _network_view(image, plan)
    # The network sees float32: a voxel that is NaN/Inf there (a float64 1e300 too) is refused, not
    # normalised into an all-background result. read_image checks the same; this covers API Volumes.
    float32_voxels(arr, image.name or None)
    arr = normalise(arr, plan)
    new_shape = _target_shape(arr.shape[1:], spacing, plan.target_spacing)
    if tuple(arr.shape[1:]) != new_shape:
        arr = np.stack([_resample_image(c, spacing, new_shape, plan) for c in arr])
    out = np.ascontiguousarray(arr, dtype=np.float32)
    inverse = Inverse(image.spatial_shape, order, new_shape, image.affine.copy(), to_storage)
    return out, inverse


def preprocess_labels(label: Volume, plan: Plan) -> np.ndarray:
    """(X, Y, Z) integer label Volume → (D, H, W) labels on the same grid ``preprocess`` gives its image."""
    if label.array.ndim != 3:
        raise InputError(f"label map must be 3D, got shape {label.array.shape}", label.name or None)
    if label.array.dtype.kind not in "biu":
        raise InputError(f"label map must hold integers, got {label.array.dtype}", label.name or None)
    label, _ = canonical_orientation(label, plan.orientation)
    arr, _, spacing = _network_view(label, plan)
    arr = arr[0]
    new_shape = _target_shape(arr.shape, spacing, plan.target_spacing)
    return np.ascontiguousarray(_resample_labels(arr, new_shape, plan.label_resampling))


def preprocess_case(
    image: Volume, label: Volume | None, plan: Plan
) -> tuple[np.ndarray, np.ndarray | None, Inverse]:
    """Image and (optional) label together: (C, D, H, W) float32, (D, H, W) int or None, Inverse."""
    img, inverse = preprocess(image, plan)
    if label is None:
        return img, None, inverse
    if label.spatial_shape != image.spatial_shape:
        raise InputError(
            f"label shape {label.spatial_shape} != image shape {image.spatial_shape}", label.name or None
        )
    lab = preprocess_labels(Volume(label.array, image.affine, None, label.name), plan)
    return img, lab, inverse


def foreground_box(array: np.ndarray) -> tuple[slice, slice, slice] | None:
    """(C, X, Y, Z) → the bounding box of ``foreground_mask`` (nnU-Net's crop), None when empty."""
    mask = foreground_mask(array)
    if not mask.any():
        return None
    box = []
    for k in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return (box[0], box[1], box[2])


def field_of_view(volume: Volume, plan: Plan) -> tuple[slice, slice, slice] | None:
    """Where a model with this plan runs, in ``volume``'s voxels: the foreground's bounding box for
    a plan normalised over the foreground (nnU-Net's crop), else the whole volume; None when the
    image is nothing but its background value. Inference and fine-tuning share it, so that the
    network is taught on what it will be shown."""
    channels = volume.channels()
    if plan.norm_nonzero:
        return foreground_box(channels)
    if all(float(c.min()) == float(c.max()) for c in channels):
        return None
    return tuple(slice(0, n) for n in volume.spatial_shape)  # type: ignore[return-value]


def _nonzero_box_fraction(array: np.ndarray) -> float:
    """Size of the foreground's bounding box (any channel) as a fraction of the image."""
    box = foreground_box(array)
    if box is None:
        return 1.0
    return float(np.prod([b.stop - b.start for b in box]) / np.prod(array.shape[1:]))


def fingerprint(
    dataset: Any,
    *,
    max_voxels_per_case: int = 100_000,
    seed: int = 0,
    transpose: str = "coarsest_first",
    target_spacing: tuple[float, float, float] | None = None,
    orientation: str | None = "RAS",
) -> Plan:
    """Dataset statistics → Plan (nnU-Net style).

    target spacing = per-axis median of the cases' spacings in network order (unless given).
    CT: foreground (label > 0) voxels, at most ``max_voxels_per_case`` per case drawn with a
    generator seeded by (seed, case index); ct_clip = 0.5 / 99.5 percentiles, ct_mean / ct_std of those
    samples. Cases without labels contribute all their voxels. Other modalities: no statistics.
    """
    modality = str(getattr(dataset, "modality", "CT"))
    is_ct = modality.upper() == "CT"
    spacings: list[tuple[float, float, float]] = []
    samples: list[np.ndarray] = []
    nonzero_fractions: list[float] = []
    for i in range(len(dataset)):
        image, label = dataset.load(i)
        if label is not None:  # on the image's grid, whatever its own header says
            label, _ = canonical_orientation(Volume(label.array, image.affine, None, label.name), orientation)
        image, _ = canonical_orientation(image, orientation)
        nonzero_fractions.append(_nonzero_box_fraction(image.channels()))
        order = axis_order(image.spacing, transpose)
        spacings.append((image.spacing[order[0]], image.spacing[order[1]], image.spacing[order[2]]))
        if not is_ct:
            continue
        arr = image.channels()
        if label is not None and label.array.any():
            values = arr[:, label.array > 0].ravel()
        else:
            values = arr.ravel()
        rng = np.random.default_rng([int(seed), i])
        if values.size > max_voxels_per_case:
            values = values[rng.integers(0, values.size, max_voxels_per_case)]
        samples.append(values.astype(np.float64))
    if not spacings:
        raise InputError("fingerprint: the dataset has no cases")
    median = np.median(np.asarray(spacings), axis=0)
    spacing_out = tuple(float(s) for s in (target_spacing if target_spacing is not None else median))
    if not is_ct:
        # nnU-Net's rule: normalise inside the non-zero region when cropping to it would shrink the
        # images to at most 3/4 of their size (skull-stripped MRI).
        norm_nonzero = bool(np.median(nonzero_fractions) <= 0.75)
        return Plan(spacing_out, modality, transpose=transpose, norm_nonzero=norm_nonzero,  # type: ignore[arg-type]
                    orientation=orientation)
    allv = np.concatenate(samples)
    lo, hi = np.percentile(allv, [0.5, 99.5])
    return Plan(
        spacing_out,  # type: ignore[arg-type]
        "CT",
        (float(lo), float(hi)),
        float(allv.mean()),
        float(allv.std()),
        transpose,
        orientation=orientation,
    )
