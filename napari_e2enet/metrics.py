"""Segmentation metrics on integer label arrays: Dice, NSD (surface Dice) and HD95.

Pure functions plus a small accumulator, in the MONAI style. Inputs are integer label arrays
(numpy or torch, any integer dtype) of identical shape, 2D or 3D; ``spacing`` is the voxel size in
mm along the array axes (in the same axis order as the array). Distances and tolerances are in mm.

The algorithms are those of the references, re-implemented in numpy/scipy so that one call does
not pay MONAI's import time, one-hot conversion or per-direction re-cropping:

- ``surface_dice`` is MONAI's ``compute_surface_dice(..., use_subvoxels=True)``, i.e. DeepMind's
  ``surface-distance``: surface elements are the 2×2×2 neighbourhood codes of the mask (marching-
  cubes style surfels) weighted by their area in mm² (contour length in mm in 2D), distances are
  exact Euclidean distances between surfel positions, a surfel counts as "correct" when its
  distance to the other surface is ``<= tolerance``. Agrees with MONAI to < 1e-6 (tested).
- ``hd95`` is MONAI's ``compute_hausdorff_distance(percentile=95)``: edge voxels are the mask voxels
  with a 6-neighbour outside the mask, distances are exact Euclidean distances between edge voxels
  (physical coordinates), HD95 = max of the two directed 95th percentiles (linear interpolation).
- Both masks are first cropped to the bounding box of their union (plus one voxel of zero
  padding, like MONAI's crop): surface points and their distances are unchanged by the crop.
- All surface points of both masks lie on one integer grid, so "within ``tolerance``" for NSD is
  exactly membership of a binary dilation of the other surface by the ball of grid offsets within
  ``tolerance`` mm (used while that ball has <= 125 offsets); otherwise, and for HD95, exact
  Euclidean distances come from a k-d tree (scipy ``cKDTree``) over the surface points that are
  not on the other surface (those are at distance 0). Measured on a 200×200×100 two-blob case
  (0.8×0.8×2 mm, 2 cores, shared machine): NSD 0.26–0.68 s vs MONAI 3.7–5.7 s, HD95 1.2–1.7 s vs
  MONAI 1.5–2.6 s; a dense distance transform of the box was slower than both of ours.

Empty classes (the nnU-Net v2 and MONAI convention):

================================  ========  ========  ========
case                              Dice      NSD       HD95
================================  ========  ========  ========
label absent in pred and ref      NaN       NaN       NaN
absent in exactly one of them     0.0       0.0       inf
================================  ========  ========  ========

NaN means "not defined for this case" (nnU-Net v2 and MONAI Dice/NSD/HD agree): means
(``evaluate``, ``MetricAccumulator``) skip NaN, so the mean is over the classes present in the
reference or the prediction. ``inf`` is not skipped: a missed or hallucinated organ makes the mean
HD95 infinite, as MONAI's plain Hausdorff distance does (MONAI's *percentile* variant returns NaN
here — the interpolated quantile of an all-inf vector — which would silently drop the failure from
a NaN-skipping mean, so we do not copy it). JSON writers must map ``inf``/NaN themselves (e.g. to
``null`` or a string): ``json.dumps`` writes the non-standard ``Infinity``/``NaN``.
"""

from __future__ import annotations

import base64
import itertools
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from napari_e2enet.errors import InputError

__all__ = [
    "MetricAccumulator",
    "dice",
    "evaluate",
    "hd95",
    "surface_dice",
]

METRIC_NAMES = ("dice", "nsd", "hd95")

# DeepMind surface-distance's table of surfel normals for the 256 codes of a 2×2×2 neighbourhood
# (as shipped in MONAI's ``monai.metrics.utils._get_neighbour_code_to_normals_table``): shape
# (256, 4, 3), values are multiples of 1/8, stored ×8 as int8, zlib + base64. A test checks it
# against MONAI's copy. Embedded so that computing NSD does not import MONAI (~5 s).
_NORMALS_B64 = (
    "eNp1louywyAIRAPJ/39xouWheEzbO507BhVxhWWPY/2JSI17X+PWDtW5hvaj6aFlry3XYes1vXX4NEt9mss2915+hOZ2jYnl"
    "x+zSbXzbGtXcfsVvntuPX4GatzV1r3iE9uM2e4/PWD+mzNIsoNjSBevDf8aQ8eeULTnP0+JLS13Bjdrcm3r86dYW1/iFp8R5"
    "8yxdQNw21VXbjF8K8/UEsT6nnsfOteC7zXb4TP/zCa6FuaFsey30cF7xF/7uQdv5PDavcRe+V5u5YRvM0YDrivDK0T2W5PoZ"
    "52NHJT7+Ore5dbjWIPJnHXF5qD0y7Tkfw6/7HbXs5T+v0OKXdvOfn/mMrf3I83hqKTvHK7PMOy5s+Ax4w55bTsPf4vcnCz8i"
    "9J+f7nOWQOW/b3cMxzvawH5h9qc0/D2dRK4DazyuVvFUjaT/nLK9z3kGXBI53+bVViVJ/Klf8qpB+a+cyfvKDD5nPWd84Hex"
    "/5Z+TRPYhY/7xJrijd63/KxP314lMPN/GAtzxDPeZby9nyAzf4qaahxUcBXmWReVt4ltVL4sGokMGBwCTogaafmZ4GcJnFGD"
    "Iz/vxV0Gjt9JNTOhTZzdc4QdRaLFY8WlsgU/uBfxCCmw7J21jzz8yfmvNf2Pz3UWY0BsjJl34SfvTkyIFTEktsRcvviZd//5"
    "pmgBKweYG8wZ5tIAYlzhnXsDFuQqc/iV24Uha4E1wtphTbHWEv/5udVm1SxrmTW+d9HFCeQKcgi5hZyzc9HiKHIXOY1cRw58"
    "cWNxJrmUHPvNvd9cTQ5/cTslQ/WC7x4xMJmtJJErrH72oAx+9Sz0MvY49j72RPbKVw+t3sqey17MHs3ezZ7OXk8NQG1AzUAt"
    "QY1B7UFNQq1CDUPeoOahFqJGonaipqLWogajNqNm27RcZ+0v7Sd/tOKmIaEtqTm3Kto1amnXl6YtzKmBqY2pmamlqbE37S1/"
    "tPofnuffB27wDsA="
)


def _normals_table() -> np.ndarray:
    """(256, 4, 3) float64 surfel normals of DeepMind's table; their norms are unit-spacing areas."""
    raw = zlib.decompress(base64.b64decode(_NORMALS_B64))
    return np.frombuffer(raw, dtype=np.int8).reshape(256, 4, 3).astype(np.float64) / 8.0


@lru_cache(maxsize=64)
def _code_to_measure(spacing: tuple[float, ...]) -> np.ndarray:
    """Surfel area (mm², 3D) or contour length (mm, 2D) for every neighbourhood code.

    Same formulas and precision as DeepMind surface-distance / MONAI ``get_code_to_measure_table``
    (float32 in 3D, float64 in 2D); sums are taken in float64.
    """
    if len(spacing) == 3:
        s = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]])
        normals = _normals_table().astype(np.float32)
        table = np.linalg.norm(normals * s.astype(np.float32), axis=-1).sum(-1)
        return table.astype(np.float32)
    first, second = spacing
    diag = 0.5 * math.hypot(first, second)
    table = np.zeros(16, dtype=np.float64)
    for code, value in {
        0b0001: diag,
        0b0010: diag,
        0b0011: second,
        0b0100: diag,
        0b0101: first,
        0b0110: 2 * diag,
        0b0111: diag,
        0b1000: diag,
        0b1001: 2 * diag,
        0b1010: first,
        0b1011: diag,
        0b1100: second,
        0b1101: diag,
        0b1110: diag,
    }.items():
        table[code] = value
    return table


# ---------------------------------------------------------------------------------------------
# input handling


def _as_array(a: Any, name: str) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor without importing torch
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer)):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise InputError(f"{name} must be an integer label array, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise InputError(f"{name} must be a 2D or 3D label array, got shape {arr.shape}")
    return arr


def _check_pair(pred: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    p, r = _as_array(pred, "pred"), _as_array(ref, "ref")
    if p.shape != r.shape:
        raise InputError(f"pred and ref have different shapes: {p.shape} vs {r.shape}")
    return p, r


def _check_spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64)).ravel()
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"spacing must be {ndim} positive finite numbers (mm), got {spacing!r}")
    return tuple(float(s) for s in sp)


def _check_tolerance(tolerance: float) -> float:
    t = float(tolerance)
    if not math.isfinite(t) or t < 0:
        raise InputError(f"tolerance must be a finite number >= 0 (mm), got {tolerance!r}")
    return t


def _union_box(p: np.ndarray, r: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box (tuple of slices) of ``p | r`` (bool arrays), or None when both are empty."""
    union = p | r
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def _merge_boxes(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------
# binary kernels (inputs: bool masks already cropped to the union box)


def _dice_binary(p: np.ndarray, r: np.ndarray) -> float:
    sp, sr = np.count_nonzero(p), np.count_nonzero(r)
    if sp + sr == 0:
        return math.nan
    return 2.0 * np.count_nonzero(p & r) / (sp + sr)


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Codes of every 2^n neighbourhood of the zero-padded mask (shape + 1 per axis), MONAI's bits."""
    m = np.pad(mask, 1).astype(np.uint8)
    nd = m.ndim
    code = np.zeros(tuple(s - 1 for s in m.shape), dtype=np.uint8)
    nbits = 2**nd
    for idx, offs in enumerate(itertools.product((0, 1), repeat=nd)):
        sl = tuple(slice(o, o + s - 1) for o, s in zip(offs, m.shape, strict=True))
        code |= m[sl] << np.uint8(nbits - 1 - idx)
    return code


def _surfels(mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Surfel grid (bool, mask shape + 1 per axis) and the area (mm², mm in 2D) at every grid point."""
    code = _neighbour_codes(mask)
    full = 2 ** (2**mask.ndim) - 1
    edges = (code != 0) & (code != full)
    return edges, _code_to_measure(spacing)[code]


def _edge_grid(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a 6- (4- in 2D) neighbour outside the mask, on the zero-padded grid."""
    m = np.pad(mask, 1)
    interior = m.copy()
    for axis in range(m.ndim):
        interior &= np.roll(m, 1, axis=axis)
        interior &= np.roll(m, -1, axis=axis)
    return m & ~interior


def _directed_distances(
    src: np.ndarray, dst: np.ndarray, spacing: tuple[float, ...], upper: float = math.inf
) -> np.ndarray:
    """For every True point of grid ``src`` (C order), the distance in mm to the nearest True point
    of grid ``dst`` (same grid); ``inf`` beyond ``upper``. Points on both grids are 0 without a
    search, the rest go through a k-d tree of ``dst`` (exact Euclidean)."""
    d = np.zeros(np.count_nonzero(src), dtype=np.float64)
    todo = (src & ~dst)[src]
    if todo.any():
        scale = np.asarray(spacing, dtype=np.float64)
        query = np.argwhere(src & ~dst).astype(np.float64) * scale
        tree = cKDTree(np.argwhere(dst).astype(np.float64) * scale, leafsize=32)
        d[todo] = tree.query(query, k=1, distance_upper_bound=upper)[0]
    return d


_MAX_BALL = 125  # above this many offsets a k-d tree beats a dense binary dilation (measured)


@lru_cache(maxsize=64)
def _tolerance_ball(spacing: tuple[float, ...], tol: float) -> np.ndarray:
    """Grid offsets within ``tol`` mm (bool, odd shape, centred), compared as MONAI does (float32)."""
    radius = [math.floor(tol / s) for s in spacing]
    grids = np.meshgrid(
        *[np.arange(-k, k + 1) * s for k, s in zip(radius, spacing, strict=True)], indexing="ij"
    )
    dist = np.sqrt(sum(g * g for g in grids)).astype(np.float32)
    return dist <= np.float32(tol)


def _within_tolerance(src: np.ndarray, dst: np.ndarray, spacing: tuple[float, ...], tol: float) -> np.ndarray:
    """For every True point of grid ``src``: is a True point of grid ``dst`` within ``tol`` mm?"""
    ball = _tolerance_ball(spacing, tol)
    if ball.sum() <= _MAX_BALL:
        # all surface points live on one integer grid: "distance <= tol" is exactly membership of
        # the dilation of dst by the ball of grid offsets within tol
        return ndimage.binary_dilation(dst, structure=ball)[src]
    # MONAI keeps distances as float32 and compares them with the threshold in float32; prune the
    # search just above the threshold and do the same comparison (ties then agree exactly).
    upper = float(tol) * (1 + 1e-6) + 1e-9
    return _directed_distances(src, dst, spacing, upper).astype(np.float32) <= np.float32(tol)


def _nsd_binary(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...], tol: float) -> float:
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return math.nan
    if not p_any or not r_any:
        return 0.0
    edges_p, area_p = _surfels(p, spacing)
    edges_r, area_r = _surfels(r, spacing)
    area_p, area_r = area_p[edges_p].astype(np.float64), area_r[edges_r].astype(np.float64)
    ok_p = _within_tolerance(edges_p, edges_r, spacing, tol)
    ok_r = _within_tolerance(edges_r, edges_p, spacing, tol)
    total = area_p.sum() + area_r.sum()
    if total == 0:
        return math.nan
    good = area_p[ok_p].sum() + area_r[ok_r].sum()
    return float(good / total)


def _hd95_binary(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...], percentile: float = 95.0) -> float:
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return math.nan
    if not p_any or not r_any:
        return math.inf
    ep, er = _edge_grid(p), _edge_grid(r)
    d_pr = _directed_distances(ep, er, spacing).astype(np.float32)
    d_rp = _directed_distances(er, ep, spacing).astype(np.float32)
    q = percentile / 100.0
    return float(max(np.quantile(d_pr, q), np.quantile(d_rp, q)))


# ---------------------------------------------------------------------------------------------
# public per-label functions


def _crop_binary(pred: Any, ref: Any, label: int) -> tuple[np.ndarray, np.ndarray]:
    p_full, r_full = _check_pair(pred, ref)
    p, r = p_full == label, r_full == label
    box = _union_box(p, r)
    if box is None:
        return p[(slice(0, 0),) * p.ndim], r[(slice(0, 0),) * r.ndim]
    return p[box], r[box]


def dice(pred: Any, ref: Any, label: int) -> float:
    """Dice of one label: 2|P∩R| / (|P| + |R|).

    Args:
        pred, ref: integer label arrays of identical shape (2D or 3D).
        label: the label id to score.
    Returns:
        Dice in [0, 1]; NaN when the label is absent in both; 0.0 when absent in exactly one.
    """
    p, r = _check_pair(pred, ref)
    return _dice_binary(p == label, r == label)


def surface_dice(
    pred: Any, ref: Any, label: int, spacing: Sequence[float] | None, tolerance: float = 1.0
) -> float:
    """Normalised surface Dice (NSD) of one label at ``tolerance`` mm, using real voxel spacing.

    The fraction of the two surfaces' area (mm²) that lies within ``tolerance`` mm of the other
    surface. Same algorithm and numbers as MONAI ``compute_surface_dice(use_subvoxels=True)``
    (DeepMind surface-distance).

    Args:
        pred, ref: integer label arrays of identical shape (2D or 3D).
        label: the label id to score.
        spacing: voxel size in mm per array axis (None = 1 mm isotropic).
        tolerance: accepted surface deviation in mm (>= 0).
    Returns:
        NSD in [0, 1]; NaN when the label is absent in both; 0.0 when absent in exactly one.
    """
    p, r = _crop_binary(pred, ref, label)
    return _nsd_binary(p, r, _check_spacing(spacing, p.ndim), _check_tolerance(tolerance))


def hd95(pred: Any, ref: Any, label: int, spacing: Sequence[float] | None) -> float:
    """95th-percentile symmetric Hausdorff distance of one label, in mm.

    Same algorithm and numbers as MONAI ``compute_hausdorff_distance(percentile=95)``.

    Args:
        pred, ref: integer label arrays of identical shape (2D or 3D).
        label: the label id to score.
        spacing: voxel size in mm per array axis (None = 1 mm isotropic).
    Returns:
        HD95 in mm; NaN when the label is absent in both; inf when absent in exactly one.
    """
    p, r = _crop_binary(pred, ref, label)
    return _hd95_binary(p, r, _check_spacing(spacing, p.ndim))


# ---------------------------------------------------------------------------------------------
# several labels at once


def _label_table(labels: Mapping[int, str] | Iterable[int]) -> dict[int, str]:
    if isinstance(labels, Mapping):
        table = {int(k): str(v) for k, v in labels.items()}
    else:
        table = {int(k): str(int(k)) for k in labels}
    if not table:
        raise InputError("labels: at least one label id is needed")
    if len(set(table.values())) != len(table):
        raise InputError(f"labels: class names must be unique, got {sorted(table.values())}")
    return table


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return math.fsum(vals) / len(vals) if vals else math.nan


def _objects(a: np.ndarray, max_label: int) -> list[tuple[slice, ...] | None]:
    """Bounding boxes of labels 1..max_label (scipy find_objects; one pass over the volume)."""
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        a = np.where(a < 0, 0, a)
    return ndimage.find_objects(a, max_label=max_label)


def _label_boxes(a: np.ndarray, ids: list[int]) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box of each label id in ``ids`` (sorted, positive), from one scipy pass.

    Sparse ids are first mapped to 1..len(ids), so time and memory follow how many labels there are,
    not how large their ids are: a label id of 2·10⁹ would otherwise ask ``find_objects`` for a list of
    2·10⁹ entries (a MemoryError).
    """
    if not ids:
        return {}
    if ids[-1] <= 4 * len(ids) + 1024:
        boxes = _objects(a, ids[-1])
        return {k: boxes[k - 1] for k in ids}
    lookup = np.asarray(ids, dtype=np.int64)
    pos = np.minimum(np.searchsorted(lookup, a), len(ids) - 1)
    compact = np.where(lookup[pos] == a, pos + 1, 0).astype(np.int32)
    boxes = ndimage.find_objects(compact, max_label=len(ids))
    return {k: boxes[i] for i, k in enumerate(ids)}


def evaluate(
    pred: Any,
    ref: Any,
    labels: Mapping[int, str] | Iterable[int],
    spacing: Sequence[float] | None,
    tolerance: float = 1.0,
) -> dict[str, Any]:
    """Dice, NSD@``tolerance`` mm and HD95 (mm) for several labels of one case.

    Args:
        pred, ref: integer label arrays of identical shape (2D or 3D).
        labels: ``{label_id: name}`` or a list of label ids (then the names are ``str(id)``).
            Background (0) is scored only if listed.
        spacing: voxel size in mm per array axis (None = 1 mm isotropic).
        tolerance: NSD tolerance in mm.

    Returns:
        ``{"dice": {"mean": m, "per_class": {name: v}}, "nsd": {...}, "hd95": {...},
        "labels": {name: id}, "present": {name: [in_pred, in_ref]}, "spacing": [..],
        "tolerance_mm": t}``. ``mean`` is over the classes present in the reference or the
        prediction (NaN per-class values are skipped; NaN if no listed class is present anywhere).
        See the module docstring for empty classes.
    """
    p_full, r_full = _check_pair(pred, ref)
    sp = _check_spacing(spacing, p_full.ndim)
    tol = _check_tolerance(tolerance)
    table = _label_table(labels)
    ids = sorted(k for k in table if k > 0)
    boxes_p, boxes_r = _label_boxes(p_full, ids), _label_boxes(r_full, ids)

    out: dict[str, Any] = {m: {"mean": math.nan, "per_class": {}} for m in METRIC_NAMES}
    present: dict[str, list[bool]] = {}
    for label, name in table.items():
        if label > 0:
            box = _merge_boxes(boxes_p[label], boxes_r[label])
        else:
            box = _union_box(p_full == label, r_full == label)
        if box is None:
            p = r = np.zeros((0,) * p_full.ndim, dtype=bool)
        else:
            p, r = p_full[box] == label, r_full[box] == label
        present[name] = [bool(p.any()), bool(r.any())]
        out["dice"]["per_class"][name] = _dice_binary(p, r)
        out["nsd"]["per_class"][name] = _nsd_binary(p, r, sp, tol)
        out["hd95"]["per_class"][name] = _hd95_binary(p, r, sp)
    for m in METRIC_NAMES:
        out[m]["mean"] = _nanmean(out[m]["per_class"].values())
    out["labels"] = {name: label for label, name in table.items()}
    out["present"] = present
    out["spacing"] = list(sp)
    out["tolerance_mm"] = tol
    return out


class MetricAccumulator:
    """Collects per-case ``evaluate`` results and reports per-class means over cases.

    Usage::

        acc = MetricAccumulator({1: "liver", 2: "spleen"}, tolerance=1.0)
        for pred, ref, spacing in cases:
            acc.update(pred, ref, spacing, case="case_001")
        summary = acc.aggregate()
        summary["dice"]["mean"], summary["nsd"]["per_class"]["liver"]

    Per-class mean over cases skips NaN (cases where the class is absent in both prediction and
    reference), so it is the mean over the cases where the class is present somewhere; ``mean`` is
    the mean of the per-class means (nnU-Net's "foreground mean"). ``inf`` HD95 values propagate.
    """

    def __init__(self, labels: Mapping[int, str] | Iterable[int], tolerance: float = 1.0) -> None:
        self.labels = _label_table(labels)
        self.tolerance = _check_tolerance(tolerance)
        self.cases: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.cases)

    def reset(self) -> None:
        self.cases.clear()

    def update(
        self, pred: Any, ref: Any, spacing: Sequence[float] | None, case: str | None = None
    ) -> dict[str, Any]:
        """Evaluate one case, store it and return its ``evaluate`` result (with ``"case"``)."""
        result = evaluate(pred, ref, self.labels, spacing, self.tolerance)
        self.add(result, case)
        return result

    def add(self, result: Mapping[str, Any], case: str | None = None) -> None:
        """Store an already computed ``evaluate`` result (must use the same label names)."""
        names = set(self.labels.values())
        for m in METRIC_NAMES:
            if set(result[m]["per_class"]) != names:
                raise InputError(
                    f"result has classes {sorted(result[m]['per_class'])}, expected {sorted(names)}"
                )
        stored = dict(result)
        stored["case"] = case if case is not None else str(len(self.cases))
        self.cases.append(stored)

    def aggregate(self) -> dict[str, Any]:
        """``{"dice": {"mean", "per_class", "num_cases": {name: n}}, "nsd": ..., "hd95": ..., "num_cases": N}``.

        ``per_class[name]`` is the mean over cases where the class was present (NaN if none);
        ``num_cases[name]`` how many cases entered it.
        """
        out: dict[str, Any] = {"num_cases": len(self.cases)}
        for m in METRIC_NAMES:
            per_class: dict[str, float] = {}
            counts: dict[str, int] = {}
            for name in self.labels.values():
                vals = [float(c[m]["per_class"][name]) for c in self.cases]
                vals = [v for v in vals if not math.isnan(v)]
                counts[name] = len(vals)
                per_class[name] = math.fsum(vals) / len(vals) if vals else math.nan
                if any(math.isinf(v) for v in vals):
                    per_class[name] = math.inf
            out[m] = {"mean": _nanmean(per_class.values()), "per_class": per_class, "num_cases": counts}
        return out
