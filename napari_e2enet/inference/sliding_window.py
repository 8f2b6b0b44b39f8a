"""Sliding-window inference with Gaussian blending and bounded memory.

Why not MONAI's ``sliding_window_inference``: it allocates the blended output for the whole
volume, (K, D, H, W) float32 plus a count map — 5 GB for a 300×512×512 CT with 16 classes — before
the argmax. Here memory is bounded by the patch and one slab of the volume: tiles are visited slab
by slab along an outer axis (then along a middle one), weighted logits are accumulated only in
cells (a block of the outer axis × a band of the middle axis × all of the inner axis, cut at the
tile borders) that a future tile can still touch, and a cell is arg-maxed into the label volume
and freed as soon as no remaining tile covers it — about (p_outer − stride) × (S_middle + p_middle)
× S_inner voxels × K open at a time, less than one patch-deep slab. The sweep order is chosen per
volume to make that smallest (a 300×512×512 CT is swept along H, then W, with all of D inner:
0.54× the open voxels of a D-first sweep by ``sweep_order``'s estimate; measured with a stand-in
predictor, the process peak went from 1709 to 1567 MB).

Blending: logits are weighted by a Gaussian importance map (σ = patch · ``sigma_scale``, centred,
floor ``max(min, 1e-3)`` — MONAI's ``compute_importance_map``) and summed. The division by the
summed weights that nnU-Net and MONAI do is skipped: it is a positive per-voxel factor and does not
change the argmax. Tile placement is nnU-Net's (``compute_steps_for_sliding_window``): the number
of tiles per axis is ``ceil((size - patch) / (patch · (1 - overlap))) + 1`` and their starts are
spread evenly from 0 to ``size - patch`` (``placement="monai"`` reproduces MONAI's tiles
instead). Volumes smaller than the patch along an axis are padded symmetrically with zeros (as
nnU-Net and MONAI do); the padding never reaches the label volume. Tests check the labels against
MONAI (same tiles: equal in float32, >= 99.9 % in float16) and against a dense reference.

Consumption (the project's "long work" convention)::

    result = None
    for event in iter_sliding_window(image, model, patch=(64, 128, 128), num_classes=16, stop=stop):
        if isinstance(event, TileProgress):
            bar.update(event.done, event.total)
        else:                              # the last item of a completed run
            result = event
    if result is None: ...                 # ``stop`` was set: the generator ended early
    labels = result.labels                 # (D, H, W) uint8 (int16 if num_classes > 256)

or simply ``labels = sliding_window_argmax(image, model, patch=..., num_classes=...)``.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SlidingWindowCancelled",
    "SlidingWindowResult",
    "TileProgress",
    "gaussian_importance_map",
    "sweep_order",
    "iter_sliding_window",
    "sliding_window_argmax",
    "tile_starts",
]

Predictor = Callable[[torch.Tensor], torch.Tensor]

# Accumulation precision, measured with ``benchmarks/sliding_window_memory.py`` (300×512×512, 16
# classes, patch 128³, overlap 0.5, random 3×3×3 conv stand-in whose logits have many near-ties;
# peak RSS of the whole process incl. the 300 MiB input and ~280 MiB of torch):
#   float32   3193 MiB peak, the reference labels     (MONAI, same tiles: 6355 MiB, 99.999999 % equal)
#   float16   2209 MiB peak, 99.92 % equal to float32  (buffer 1 GiB instead of 2 GiB)
#   bfloat16  2208 MiB peak, 99.37 % equal to float32  (8 mantissa bits: ~8x more flips)
# (those rows with a patch-deep D ring; with open cells, nnU-Net tile placement: float32
# 2599 MB, float16 1987 MB, 99.92 % equal, 125 s each; float16 since inference no longer imports
# the training stack: 1709 MB D-major, 1567 MB with the sweep order "auto" picks, 53 s each.)
# Time was the same within the noise of the shared machine. float16 is the default: half the
# memory of float32 (which would miss the 3 GB budget), and it flips labels only where the two
# best blended logits are within ~1e-3 of each other; nnU-Net v2 also accumulates logits in
# float16. float16 can overflow (65504) for huge logits: the buffer is promoted to float32 on the
# fly when a batch's weighted logits times the maximal tile overlap could exceed ``_FP16_SAFE``.
DEFAULT_ACCUMULATE_DTYPE = torch.float16
_FP16_SAFE = 60000.0
_FINALIZE_CHUNK_VOXELS = 1 << 22  # argmax in chunks of ~4 M voxels (int64 temporaries of 32 MB)


@dataclass(frozen=True)
class TileProgress:
    """Emitted after each forward batch: ``done`` of ``total`` tiles have been blended."""

    done: int
    total: int


@dataclass(frozen=True)
class SlidingWindowResult:
    """The last item of a completed ``iter_sliding_window`` (never yielded when stopped).

    Attributes:
        labels: (D, H, W) argmax labels, uint8 (int16 when num_classes > 256).
        num_tiles: tiles blended.
        buffer_shape: (K, R, S_middle, S_inner): the accumulation never covered more than a slab
            of R slices along the sweep's outer axis at one time (it holds less: only the open
            cells of that slab); the other two are the sizes of the middle and inner axes.
        accumulate_dtype: the dtype the accumulation ended in (float16 may be promoted to float32).
        peak_open_bytes: the most bytes of accumulation held at one time.
        sweep_axes: (outer, middle, inner) spatial axes of the sweep, e.g. (0, 1, 2) = D-major.
    """

    labels: np.ndarray
    num_tiles: int
    buffer_shape: tuple[int, ...]
    accumulate_dtype: torch.dtype
    peak_open_bytes: int = 0
    sweep_axes: tuple[int, int, int] = (0, 1, 2)


class SlidingWindowCancelled(RuntimeError):
    """Raised by ``sliding_window_argmax`` when its ``stop`` event was set."""


def _triple(value: int | float | Sequence, name: str, kind: type) -> tuple:
    vals = tuple(value) if isinstance(value, Sequence) else (value,) * 3
    if len(vals) != 3:
        raise ValueError(f"{name} must be one number or three (D, H, W), got {value!r}")
    return tuple(kind(v) for v in vals)


def tile_starts(size: int, patch: int, overlap: float, placement: str = "nnunet") -> list[int]:
    """Tile start positions along one axis of length ``size >= patch``.

    ``placement="nnunet"`` (default, nnU-Net's ``compute_steps_for_sliding_window``):
    ``ceil((size - patch) / (patch · (1 - overlap))) + 1`` tiles, evenly spread from 0 to
    ``size - patch`` (rounded, duplicates dropped), so consecutive starts are at most
    ``ceil(patch · (1 - overlap))`` apart. ``placement="monai"`` (MONAI's ``dense_patch_slices``): starts at multiples of
    ``int(patch · (1 - overlap))``, the last one moved back to end at ``size``.
    """
    if size < patch:
        raise ValueError(f"size {size} is smaller than the patch {patch}: pad first")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if placement == "monai":
        if size == patch:
            return [0]
        interval = max(int(patch * (1.0 - overlap)), 1)
        n = next(i for i in range(size) if i * interval + patch >= size) + 1
        return [i * interval - max(i * interval + patch - size, 0) for i in range(n)]
    if placement != "nnunet":
        raise ValueError(f"placement must be 'nnunet' or 'monai', got {placement!r}")
    step = patch * (1.0 - overlap)
    n = math.ceil((size - patch) / step) + 1 if size > patch else 1
    if n == 1:
        return [0]
    actual = (size - patch) / (n - 1)
    return sorted({round(actual * i) for i in range(n)})


def sweep_order(size: Sequence[int], patch: Sequence[int], starts: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """The (outer, middle, inner) axis order that keeps the fewest voxels open in the sliding
    window: the estimate is ``ov_o · S_m · S_i + p_o · ov_m · S_i`` (ov = patch − the largest
    step between tile starts, the part a tile shares with the next one), smallest first, ties in
    favour of D-major. ``size``: the (padded) volume, ``starts``: the tile starts per axis."""
    shared = []
    for p, st in zip(patch, starts, strict=True):
        steps = [b - a for a, b in itertools.pairwise(st)]
        shared.append(max(0, p - max(steps)) if steps else 0)

    def open_voxels(order: tuple[int, ...]) -> int:
        o, m, i = order
        return shared[o] * size[m] * size[i] + patch[o] * shared[m] * size[i]

    return min(itertools.permutations(range(3)), key=open_voxels)  # type: ignore[return-value]


def gaussian_importance_map(
    patch: Sequence[int], sigma_scale: float | Sequence[float] = 0.125, min_value: float = 1e-3
) -> torch.Tensor:
    """Gaussian importance weights of shape ``patch`` (float32), as MONAI's ``compute_importance_map``.

    Separable Gaussian centred on the patch centre ``(p - 1) / 2`` with σ = p · sigma_scale per axis,
    peak ≈ 1, floored at ``max(min(map), min_value)`` so that no voxel of a tile gets zero weight.
    """
    scales = sigma_scale if isinstance(sigma_scale, Sequence) else [sigma_scale] * len(patch)
    weights: torch.Tensor | None = None
    for i, (p, s) in enumerate(zip(patch, scales, strict=True)):
        sigma = p * float(s)
        x = torch.arange(p, dtype=torch.float32) - (p - 1) / 2.0
        g = torch.exp(x**2 / (-2 * sigma**2))
        weights = g if weights is None else weights.unsqueeze(-1) * g[(None,) * i]
    assert weights is not None
    floor = max(float(weights.min()), min_value)
    return weights.clamp_(min=floor)


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles go on a (virtually) padded volume, and the order they are visited in.

    ``shape``: the image's (D, H, W); ``padded``: at least the patch along each axis (padded
    symmetrically, ``pad_before`` maps padded to image coordinates); ``starts``: the tile starts
    per axis on the padded volume; ``order``: the (outer, middle, inner) sweep axes.
    """

    shape: tuple[int, int, int]
    patch: tuple[int, int, int]
    pad_before: tuple[int, int, int]
    starts: tuple[list[int], list[int], list[int]]
    order: tuple[int, int, int]

    @classmethod
    def plan(
        cls,
        shape: Sequence[int],
        patch: tuple[int, int, int],
        overlaps: Sequence[float],
        placement: str,
        sweep: str | Sequence[int],
    ) -> TileGrid:
        padded = [max(s, p) for s, p in zip(shape, patch, strict=True)]
        pad_before = tuple((ps - s) // 2 for ps, s in zip(padded, shape, strict=True))
        starts = tuple(tile_starts(ps, p, o, placement) for ps, p, o in zip(padded, patch, overlaps, strict=True))
        if isinstance(sweep, str):
            if sweep != "auto":
                raise ValueError(f"sweep must be 'auto' or three axes, got {sweep!r}")
            order = sweep_order(padded, patch, starts)
        else:
            order = tuple(int(a) for a in sweep)  # type: ignore[assignment]
            if sorted(order) != [0, 1, 2]:
                raise ValueError(f"sweep must be a permutation of (0, 1, 2), got {sweep!r}")
        return cls(tuple(shape), patch, pad_before, starts, order)  # type: ignore[arg-type]

    def image_range(self, axis: int, start: int) -> tuple[int, int]:
        """The image voxels [lo, hi) along ``axis`` of the tile starting at padded ``start``."""
        a = start - self.pad_before[axis]
        return max(a, 0), min(a + self.patch[axis], self.shape[axis])

    def tiles(self) -> list[tuple[int, int, int]]:
        """Start triples (D, H, W), visited outer-major, then middle, then inner."""
        outer, middle, inner = self.order
        found = []
        for a in self.starts[outer]:
            for b in self.starts[middle]:
                for c in self.starts[inner]:
                    start = [0, 0, 0]
                    start[outer], start[middle], start[inner] = a, b, c
                    found.append(tuple(start))
        return found  # type: ignore[return-value]

    def max_overlap(self) -> int:
        """The most tiles covering one voxel (bounds the float16 sums)."""
        most = 1
        for axis, st in enumerate(self.starts):
            cover = np.zeros(self.shape[axis], dtype=np.int64)
            for s0 in st:
                a, b = self.image_range(axis, s0)
                cover[a:b] += 1
            most *= int(cover.max())
        return most

    def cut_tile(self, image: torch.Tensor, start: tuple[int, int, int]) -> torch.Tensor:
        """The tile's (C, pd, ph, pw) voxels of ``image``, zero-padded where it leaves the image."""
        ranges = [self.image_range(a, start[a]) for a in range(3)]
        tile = image[:, ranges[0][0] : ranges[0][1], ranges[1][0] : ranges[1][1], ranges[2][0] : ranges[2][1]]
        pads: list[int] = []
        for a in (2, 1, 0):  # F.pad lists the last axis first
            lo, hi = ranges[a]
            lead = lo - (start[a] - self.pad_before[a])
            pads += [lead, self.patch[a] - (hi - lo) - lead]
        return F.pad(tile, pads) if any(pads) else tile


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


def _trim_heap() -> None:
    """glibc's ``malloc_trim(0)``: return the free pages inside the C heap to the system. Why:
    the tiles' temporaries (float16 cell parts, arg-max chunks, the tile input, the network's
    own scratch) are allocated below glibc's mmap threshold, and the heap kept ~110-150 MiB of
    them resident between tiles at 300×512×512 (stand-in predictor, 1 thread: sliding-window
    peak 1409 → 1213 MiB with a trim after each batch). Costs well under a millisecond a batch."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def argmax_into(view: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[...] = view.argmax(0)``: a running max over classes, ~5x faster than ``argmax`` (a
    strided reduction on CPU); strict ">" keeps the first maximal class, as ``argmax`` does."""
    best = view[0].clone()
    dst.zero_()
    for k in range(1, view.shape[0]):
        better = view[k] > best
        torch.maximum(best, view[k], out=best)
        dst.masked_fill_(better, k)


class CellAccumulator:
    """Blended logits held only where a future tile can still add to them, arg-maxed into
    ``labels`` as soon as the last tile covering them is in.

    The outer and middle axes are cut at every tile border (image coordinates); a cell is one
    outer block × one middle band × all of the inner axis. It is allocated (zeros) when a batch
    first touches it and arg-maxed into the labels once the last batch touching it is blended.
    Tiles go outer-major, then middle, so the open cells are the part of the current tile row
    that the next row overlaps (all of the middle axis) plus the bands of the current row not yet
    passed: about (p_outer - stride) × (S_middle + p_middle) × S_inner voxels, where one ring of
    the patch depth held p_outer × S_middle × S_inner (0.65× in the tests' geometry; measured at
    300×512×512, 16 classes, 128³, float16 with a stand-in predictor, D-first sweep: process
    peak 2209 → 1987 MB). Cells are not recycled: a few hundred fresh allocations of ≤ 64 MiB
    per such volume are cheap next to the forwards, and a pool keyed by shape would hold more
    memory.

    Use: ``add(weighted_tile, start)`` for each tile of batch ``bi``, then ``close(bi)``.
    """

    def __init__(
        self,
        grid: TileGrid,
        batches: Sequence[Sequence[tuple[int, int, int]]],
        num_classes: int,
        dtype: torch.dtype,
    ) -> None:
        self.grid = grid
        self.num_classes = num_classes
        self.dtype = dtype
        outer, middle, _ = grid.order
        self.cuts: dict[int, list[int]] = {}
        for axis in (outer, middle):
            edges = {0, grid.shape[axis]}
            for st in grid.starts[axis]:
                edges.update(grid.image_range(axis, st))
            self.cuts[axis] = sorted(edges)
        last_batch: dict[tuple[int, int], int] = {}
        for bi, batch in enumerate(batches):
            for start in batch:
                for key in self._keys(start):
                    last_batch[key] = bi
        self._closing: dict[int, list[tuple[int, int]]] = {}
        for key, bi in last_batch.items():
            self._closing.setdefault(bi, []).append(key)
        self.labels = np.zeros(grid.shape, dtype=np.uint8 if num_classes <= 256 else np.int16)
        self._labels_t = torch.from_numpy(self.labels)
        self.cells: dict[tuple[int, int], torch.Tensor] = {}
        self.open_bytes = self.peak_open_bytes = 0
        self.open_span = 0  # most outer-axis slices spanned by the open cells at one time

    def _span(self, axis: int, lo: int, hi: int) -> range:
        return range(bisect.bisect_left(self.cuts[axis], lo), bisect.bisect_left(self.cuts[axis], hi))

    def _keys(self, start: tuple[int, int, int]) -> Iterator[tuple[int, int]]:
        """The (outer block, middle band) cells the tile at ``start`` touches."""
        outer, middle, _ = self.grid.order
        for i in self._span(outer, *self.grid.image_range(outer, start[outer])):
            for j in self._span(middle, *self.grid.image_range(middle, start[middle])):
                yield i, j

    def region(self, i: int, j: int) -> tuple[slice, slice, slice]:
        """The cell's voxels in (D, H, W) image coordinates."""
        outer, middle, inner = self.grid.order
        region = [slice(0, self.grid.shape[inner])] * 3
        region[outer] = slice(self.cuts[outer][i], self.cuts[outer][i + 1])
        region[middle] = slice(self.cuts[middle][j], self.cuts[middle][j + 1])
        return tuple(region)  # type: ignore[return-value]

    def _cell(self, key: tuple[int, int]) -> torch.Tensor:
        found = self.cells.get(key)
        if found is None:
            size = [r.stop - r.start for r in self.region(*key)]
            found = self.cells[key] = torch.zeros((self.num_classes, *size), dtype=self.dtype)
            self.open_bytes += found.numel() * found.element_size()
            self.peak_open_bytes = max(self.peak_open_bytes, self.open_bytes)
            blocks = [k[0] for k in self.cells]
            cuts = self.cuts[self.grid.order[0]]
            self.open_span = max(self.open_span, cuts[max(blocks) + 1] - cuts[min(blocks)])
        return found

    def add(self, weighted: torch.Tensor, start: tuple[int, int, int]) -> None:
        """Add one tile's (K, pd, ph, pw) weighted logits at padded ``start``. Logits in another
        dtype than ``self.dtype`` are rounded to it one cell's part at a time (the same rounding as
        converting the whole tile first, without a tile-sized copy: 64 MiB at 16 × 128³ in float16)."""
        grid, inner = self.grid, self.grid.order[2]
        ranges = [grid.image_range(a, start[a]) for a in range(3)]
        # the tile's voxel of image coordinate x along axis a is at x - shift[a]
        shift = [start[a] - grid.pad_before[a] for a in range(3)]
        for key in self._keys(start):
            region = self.region(*key)
            src: list[slice] = [slice(None)]
            dst: list[slice] = [slice(None)]
            for a in range(3):
                if a == inner:  # the cell holds all of it: the tile's part
                    lo, hi = ranges[a]
                    dst.append(slice(lo, hi))
                else:  # the tile holds all of the cell's part
                    lo, hi = region[a].start, region[a].stop
                    dst.append(slice(None))
                src.append(slice(lo - shift[a], hi - shift[a]))
            part = weighted[tuple(src)]
            cell = self._cell(key)
            # rounded first, then added: a mixed-dtype += would add before rounding
            cell[tuple(dst)] += part if part.dtype == cell.dtype else part.to(cell.dtype)

    def close(self, batch_index: int) -> None:
        """Arg-max and free the cells that no batch after ``batch_index`` touches, then give the C
        heap's free pages back to the system (see :func:`_trim_heap`)."""
        outer = self.grid.order[0]
        for key in self._closing.get(batch_index, ()):
            acc = self.cells.pop(key)
            self.open_bytes -= acc.numel() * acc.element_size()
            dst = self._labels_t[self.region(*key)]
            rows = acc.shape[1 + outer]
            rows_per_chunk = max(1, _FINALIZE_CHUNK_VOXELS * rows // max(1, acc[0].numel()))
            for c in range(0, rows, rows_per_chunk):
                m = min(rows_per_chunk, rows - c)
                argmax_into(acc.narrow(1 + outer, c, m), dst.narrow(outer, c, m))
        _trim_heap()

    def promote_to_float32(self) -> None:
        """Turn the open cells (and later ones) float32: the float16 sums could overflow."""
        self.dtype = torch.float32
        for key in list(self.cells):
            self.open_bytes += self.cells[key].numel() * 2
            self.cells[key] = self.cells[key].float()
        self.peak_open_bytes = max(self.peak_open_bytes, self.open_bytes)


class _Weighting:
    """Multiplies a batch of logits by the Gaussian map, in float32; ``CellAccumulator.add``
    rounds them to the accumulation dtype cell by cell. A CPU float32 output is weighted in place
    (it is the predictor's fresh result); other outputs go through a reused float32 scratch (fresh
    100 MB allocations page-fault on CPU; 128 MiB at 16 × 128³). There is no tile-sized float16
    copy: it was held through the next forward (64 MiB at 16 × 128³, at the whole-volume peak).
    In float16 it tracks the largest weighted logit and promotes ``acc`` to float32 when the sums
    could pass ``_FP16_SAFE``."""

    def __init__(self, weights: torch.Tensor, batch_shape: tuple[int, ...], max_overlap: int) -> None:
        self.weights = weights
        self.batch_shape = batch_shape  # (tiles_per_batch, K, pd, ph, pw)
        self.max_overlap = max_overlap
        self.peak_abs = 0.0
        self._scratch32: torch.Tensor | None = None

    def __call__(self, out: torch.Tensor, acc: CellAccumulator) -> torch.Tensor:
        nb = out.shape[0]
        if out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous():
            weighted = out.mul_(self.weights)
        elif out.device.type == "cpu":
            if self._scratch32 is None:
                self._scratch32 = torch.empty(self.batch_shape, dtype=torch.float32)
            weighted = torch.mul(out, self.weights, out=self._scratch32[:nb])
        else:
            weighted = (out.float() * self.weights).cpu()
        if acc.dtype == torch.float16:
            lo_v, hi_v = torch.aminmax(weighted)
            self.peak_abs = max(self.peak_abs, -float(lo_v), float(hi_v))
            if self.peak_abs * self.max_overlap > _FP16_SAFE:  # rare: logits too large for float16 sums
                acc.promote_to_float32()
        return weighted


def _check_arguments(
    image: torch.Tensor, num_classes: int, tiles_per_batch: int, accumulate_dtype: torch.dtype,
    patch: int | Sequence[int], overlap: float | Sequence[float],
) -> tuple[tuple[int, int, int], tuple[float, float, float], tuple[int, int, int]]:
    """Raise ValueError for a bad argument; return the patch, the overlaps and the (D, H, W) shape."""
    if image.ndim != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {tuple(image.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if tiles_per_batch < 1:
        raise ValueError(f"tiles_per_batch must be >= 1, got {tiles_per_batch}")
    if accumulate_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"accumulate_dtype must be a float dtype, got {accumulate_dtype}")
    patch_size = _triple(patch, "patch", int)
    if min(patch_size) < 1:
        raise ValueError(f"patch must be positive, got {patch!r}")
    overlaps = _triple(overlap, "overlap", float)
    shape = tuple(int(s) for s in image.shape[1:])
    if min(shape) < 1:
        raise ValueError(f"image has an empty spatial axis: {tuple(image.shape)}")
    return patch_size, overlaps, shape  # type: ignore[return-value]


def _forward(predictor: Predictor, x: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    """The predictor's logits for a batch of tiles, checked against the (B, K, pd, ph, pw) expected."""
    out = predictor(x)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"predictor returned {got}, expected {expected}")
    return out


def iter_sliding_window(
    image: torch.Tensor,
    predictor: Predictor,
    *,
    patch: int | Sequence[int],
    num_classes: int,
    overlap: float | Sequence[float] = 0.5,
    tiles_per_batch: int = 1,
    sigma_scale: float | Sequence[float] = 0.125,
    accumulate_dtype: torch.dtype = DEFAULT_ACCUMULATE_DTYPE,
    stop: threading.Event | None = None,
    device: torch.device | str | None = None,
    placement: str = "nnunet",
    sweep: str | Sequence[int] = "auto",
) -> Iterator[TileProgress | SlidingWindowResult]:
    """Blend ``predictor`` over ``image`` tile by tile; yield progress, then the result.

    Args:
        image: (C, D, H, W) tensor (already normalised; a numpy array is wrapped), any device;
            not modified.
        predictor: maps (B, C, pd, ph, pw) to (B, K, pd, ph, pw) logits, e.g. a model in eval mode.
            Called under ``torch.inference_mode()``. Its output is consumed (a contiguous CPU
            float32 one weighted in place) before the next call, which may overwrite it.
        patch: tile size (pd, ph, pw) in voxels, or one int for a cube.
        num_classes: K, the number of output channels of ``predictor``.
        overlap: fraction of the patch shared by neighbouring tiles, in [0, 1), per axis or one.
        tiles_per_batch: tiles per ``predictor`` call (B).
        sigma_scale: Gaussian σ as a fraction of the patch size.
        accumulate_dtype: dtype of the open-slab buffer (float16 default, see module comment;
            float32 or bfloat16 also accepted).
        stop: when set, the generator ends before the next forward batch (so within one batch
            of tiles) without yielding a ``SlidingWindowResult``.
        device: where tiles go for ``predictor`` (default: the image's device). Accumulation is on
            the CPU (host memory is what needs bounding).
        placement: ``"nnunet"`` (tiles evenly spread) or ``"monai"`` (regular stride, last tile
            flush with the end), see ``tile_starts``.
        sweep: the order in which tiles are visited, (outer, middle, inner) spatial axes of the
            (D, H, W) volume, e.g. ``(0, 1, 2)`` (D-major); ``"auto"`` picks the order that holds
            the fewest open voxels (see ``sweep_order``). Labels do not depend on it beyond the
            rounding of the float16 sums.

    Yields:
        ``TileProgress(done, total)`` after every forward batch, then, if the run completed,
        one ``SlidingWindowResult`` as the last item. When ``stop`` is set the generator simply
        ends (the project's convention for long work): no result means cancelled.

    Peak memory: the input, the uint8 labels (D·H·W bytes), the open cells in ``accumulate_dtype``
    (within a slab of R slices along the outer axis, R ≤ the patch + the span of tile starts inside
    one batch; see ``SlidingWindowResult.peak_open_bytes``), and one batch of logits.
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    patch_size, overlaps, shape = _check_arguments(image, num_classes, tiles_per_batch, accumulate_dtype, patch,
                                                   overlap)
    device = torch.device(device) if device is not None else image.device

    grid = TileGrid.plan(shape, patch_size, overlaps, placement, sweep)
    tiles = grid.tiles()
    total = len(tiles)
    batches = [tiles[i : i + tiles_per_batch] for i in range(0, total, tiles_per_batch)]
    acc = CellAccumulator(grid, batches, num_classes, accumulate_dtype)
    weights = gaussian_importance_map(patch_size, sigma_scale).to(device)
    weigh = _Weighting(weights, (tiles_per_batch, num_classes, *patch_size), grid.max_overlap())
    done = 0
    for bi, batch in enumerate(batches):
        if stop is not None and stop.is_set():
            return
        with torch.inference_mode():
            x = torch.stack([grid.cut_tile(image, start) for start in batch]).to(device)
            out = _forward(predictor, x, (len(batch), num_classes, *patch_size))
            weighted = weigh(out, acc)
            for t, start in enumerate(batch):
                acc.add(weighted[t], start)
            del out, x, weighted
            acc.close(bi)
        done += len(batch)
        yield TileProgress(done, total)

    buffer_shape = (num_classes, acc.open_span, shape[grid.order[1]], shape[grid.order[2]])
    yield SlidingWindowResult(acc.labels, done, buffer_shape, acc.dtype, acc.peak_open_bytes, grid.order)


def sliding_window_argmax(
    image: torch.Tensor,
    predictor: Predictor,
    *,
    patch: int | Sequence[int],
    num_classes: int,
    overlap: float | Sequence[float] = 0.5,
    tiles_per_batch: int = 1,
    sigma_scale: float | Sequence[float] = 0.125,
    accumulate_dtype: torch.dtype = DEFAULT_ACCUMULATE_DTYPE,
    stop: threading.Event | None = None,
    device: torch.device | str | None = None,
    placement: str = "nnunet",
    sweep: str | Sequence[int] = "auto",
) -> np.ndarray:
    """``iter_sliding_window`` run to the end; returns the (D, H, W) labels.

    Raises:
        SlidingWindowCancelled: if ``stop`` was set before the last tile.
    """
    result: SlidingWindowResult | None = None
    done = 0
    for event in iter_sliding_window(
        image,
        predictor,
        patch=patch,
        num_classes=num_classes,
        overlap=overlap,
        tiles_per_batch=tiles_per_batch,
        sigma_scale=sigma_scale,
        accumulate_dtype=accumulate_dtype,
        stop=stop,
        device=device,
        placement=placement,
        sweep=sweep,
    ):
        if isinstance(event, SlidingWindowResult):
            result = event
        else:
            done = event.done
    if result is None:
        raise SlidingWindowCancelled(f"sliding window stopped after {done} tiles")
    return result.labels
