"""Compact inference forms for E2ENet's kernel-sparse layers, and the Python side of the CPU
kernels that run them.

DSFF masks whole kernels: a bool ``kernel_mask`` of shape ``weight.shape[:2]`` on every fusion
conv ((out, in), weight (O, I, 1, 3, 3)) and every up ConvTranspose3d ((in, out), weight
(I, O, kd, kh, kw)); masked kernels are stored as zeros. This module turns such a layer (its
mask read through :func:`napari_e2enet.sparse.compact.effective_mask`) into a form that skips the
pruned kernels for real (:func:`conv_csc`, :func:`convt_csr`), holds the padded planar feature
maps the kernels read and write (:class:`PaddedPlanar`, :class:`LazyNorm`, :class:`BufferPool`)
and wraps the kernels themselves (:class:`Kernels`, :func:`load_kernels`).

Why: on CPU neither oneDNN (dense or grouped) nor ``torch.sparse`` gains from 80-90 % kernel
sparsity, a small C library does. The C source, its build per CPU family and its checked ctypes
bindings live in :mod:`napari_e2enet.inference.cpu`; the measurements, the layout and the design
choices are in ``docs/cpu-fast-path.md``. Without a C compiler :func:`load_kernels` returns
``None`` and callers use the dense PyTorch path (:func:`kernel_status` says why).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...models.blocks import shift_group_sizes
from ...sparse.compact import effective_mask
from .bindings import PAD_FLOATS, KernelLibrary, best_library, bf16_weight_pairs, pp_slack

__all__ = [
    "CSCConv",
    "CSRConvT",
    "ComputedUp",
    "Kernels",
    "BufferPool",
    "LazyNorm",
    "PaddedPlanar",
    "conv_csc",
    "convt_csr",
    "depth_offsets",
    "kernel_status",
    "load_kernels",
]

# --------------------------------------------------------------------------------------------
# Masks → compact forms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CSCConv:
    """A kernel-sparse (1, kh, kw) convolution in CSC order by input channel.

    ``colptr`` (I+1,) int32, ``rowidx`` (nnz,) int32 output channel of each active kernel,
    ``weights`` (nnz, kh*kw) float32 taps (row-major over (kh, kw)). The outputs of input ``i``
    are ``rowidx[colptr[i]:colptr[i+1]]`` (ascending).
    """

    in_channels: int
    out_channels: int
    colptr: torch.Tensor
    rowidx: torch.Tensor
    weights: torch.Tensor
    # (nnz, 12) int32 bf16 pairs (bindings.bf16_weight_pairs): the conv then runs with bf16
    # products (Kernels.sconv133 on a CPU with AVX512-BF16); None: fp32
    weight_pairs: torch.Tensor | None = None

    def in_bf16(self) -> CSCConv:
        """This conv with bf16 products (weights rounded to bf16, kept as the kernel's pairs)."""
        return replace(self, weight_pairs=bf16_weight_pairs(self.weights))

    @property
    def nnz(self) -> int:
        return int(self.rowidx.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.in_channels * self.out_channels)


def conv_csc(weight: torch.Tensor, mask: torch.Tensor | None = None) -> CSCConv:
    """Conv3d weight (O, I, 1, kh, kw) (or Conv2d (O, I, kh, kw)) and its (O, I) kernel mask → CSC."""
    w = weight.detach().float()
    if w.dim() == 5:
        if w.shape[2] != 1:
            raise ValueError(f"conv_csc needs a depth-1 kernel, got {tuple(w.shape[2:])}")
        w = w[:, :, 0]
    active = effective_mask(w, mask)  # (O, I)
    o_count, i_count = active.shape
    by_input = active.t()  # (I, O)
    idx = by_input.nonzero()  # rows sorted by input, then output
    colptr = torch.zeros(i_count + 1, dtype=torch.int32)
    colptr[1:] = by_input.sum(1).cumsum(0).to(torch.int32)
    rowidx = idx[:, 1].to(torch.int32).contiguous()
    ntaps = int(w.shape[2]) * int(w.shape[3])
    taps = w.permute(1, 0, 2, 3)[idx[:, 0], idx[:, 1]].reshape(idx.shape[0], ntaps).contiguous()
    return CSCConv(i_count, o_count, colptr, rowidx, taps)


@dataclass(frozen=True)
class CSRConvT:
    """A kernel-sparse ConvTranspose3d (kernel == stride == ``kernel``) in CSR order by output.

    ``rowptr`` (O+1,) int32, ``colidx`` (nnz,) int32 input channel of each active kernel,
    ``weights`` (nnz, kd*kh*kw) float32 taps in (kd, kh, kw) row-major order.
    """

    in_channels: int
    out_channels: int
    kernel: tuple[int, int, int]
    rowptr: torch.Tensor
    colidx: torch.Tensor
    weights: torch.Tensor

    @property
    def nnz(self) -> int:
        return int(self.colidx.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.in_channels * self.out_channels)


def convt_csr(weight: torch.Tensor, mask: torch.Tensor | None = None) -> CSRConvT:
    """ConvTranspose3d weight (I, O, kd, kh, kw) and its (I, O) kernel mask → CSR by output."""
    w = weight.detach().float()
    active = effective_mask(w, mask)  # (I, O)
    i_count, o_count = active.shape
    by_output = active.t()  # (O, I)
    idx = by_output.nonzero()
    rowptr = torch.zeros(o_count + 1, dtype=torch.int32)
    rowptr[1:] = by_output.sum(1).cumsum(0).to(torch.int32)
    colidx = idx[:, 1].to(torch.int32).contiguous()
    kernel = (int(w.shape[2]), int(w.shape[3]), int(w.shape[4]))
    ntaps = kernel[0] * kernel[1] * kernel[2]
    taps = w.permute(1, 0, 2, 3, 4)[idx[:, 0], idx[:, 1]].reshape(idx.shape[0], ntaps).contiguous()
    return CSRConvT(i_count, o_count, kernel, rowptr, colidx, taps)


# --------------------------------------------------------------------------------------------
# Padded planar ("PP") tensors
# --------------------------------------------------------------------------------------------

_PRE = PAD_FLOATS  # zero floats before the first plane (the left neighbour of voxel (0, 0, 0))


def _pitch(width: int) -> int:
    return ((width + 1 + 15) // 16) * 16


class BufferPool:
    """Memory for the fast path's large float32 buffers, planned from the first call.

    Why: freshly allocated memory costs a page fault per 4 KiB on first touch (measured here:
    ~200 ms extra for a 400 MB buffer, about two full passes over it), and glibc returns every
    allocation above 32 MB to the OS on free, so the fast path keeps its buffers between calls.
    It allocates the same sizes in the same order on every call for one patch shape, so the first
    call (between :meth:`begin` and :meth:`end`) records each buffer's size and lifetime (take to
    give) and the pool then lays all of them out in one arena, greedy by size (largest first, each
    at the lowest offset free for its whole lifetime; Pisarchyk & Lee 2020, the TFLite planner).
    Later calls get views of the arena: no page faults, and the arena is close to the largest
    total live at any moment. Measured at 128³ (E2ENet S = 0.9): 2360 MiB kept with one buffer
    per size, which this replaced, vs 1678 MiB with the plan (1307 MiB since the up-sampled
    inputs are computed in depth pieces, with the encoder's buffers in the same arena).

    A call that departs from the plan (another take order or size) gets fresh memory from that
    point and the next call records again. Calls outside ``begin``/``end`` get fresh memory.
    Not thread-safe: one pool per module, one forward at a time.
    """

    _ALIGN = 16  # floats: buffer offsets stay 64-byte aligned

    def __init__(self) -> None:
        self.enabled = True
        self._plan: list[tuple[int, int]] | None = None  # (size, offset) per take, in take order
        self._arena: torch.Tensor | None = None
        self._active = False  # between begin() and end()
        self._recording = False
        self._record: list[list[int]] = []  # [size, first step, last step] per take
        self._live: dict[int, int] = {}  # data_ptr -> record index, while recording
        self._step = 0
        self._cursor = 0
        self._departed = False

    def begin(self) -> None:
        """Start one forward call."""
        self._active = True
        self._recording = self.enabled and self._plan is None
        self._record, self._live = [], {}
        self._step = self._cursor = 0
        self._departed = False

    def end(self, *, completed: bool = True) -> None:
        """End the call; after a completed recording call, make the plan and the arena."""
        if self._departed or not completed:
            self._plan, self._arena = None, None
        elif self._recording and self._record:
            for rec in self._record:
                if rec[2] < 0:  # never given back: live to the end of the call
                    rec[2] = self._step
            self._plan, total = _plan_offsets(self._record, self._ALIGN)
            # touched once now, so that the next call does not pay the page faults
            self._arena = torch.zeros(max(total, 1), dtype=torch.float32)
        self._active = self._recording = False
        self._record, self._live = [], {}

    def take(self, n: int) -> torch.Tensor:
        if self._active and self._plan is not None and not self._departed:
            i = self._cursor
            self._cursor += 1
            if i < len(self._plan) and self._plan[i][0] == n and self._arena is not None:
                offset = self._plan[i][1]
                return self._arena[offset:offset + n]
            self._departed = True
        t = torch.empty(n, dtype=torch.float32)
        if self._recording:
            self._live[t.data_ptr()] = len(self._record)
            self._record.append([n, self._step, -1])
            self._step += 1
        return t

    def give(self, t: torch.Tensor) -> None:
        if self._recording:
            idx = self._live.pop(t.data_ptr(), None)
            if idx is not None:
                self._record[idx][2] = self._step
                self._step += 1

    def clear(self) -> None:
        """Drop the plan and the arena (the next call records again)."""
        self._plan, self._arena = None, None

    @property
    def nbytes(self) -> int:
        """Bytes held between calls (the arena)."""
        return 4 * self._arena.numel() if self._arena is not None else 0


def _plan_offsets(record: list[list[int]], align: int) -> tuple[list[tuple[int, int]], int]:
    """Offsets (in floats) for buffers ``[size, first step, last step]``: greedy by size, each
    buffer at the lowest offset where it overlaps no placed buffer whose lifetime it shares
    (lifetimes are half-open step intervals). Returns ((size, offset) per buffer, arena size)."""
    placed: list[tuple[int, int, int, int]] = []  # offset, end, first, last
    offsets = [0] * len(record)
    order = sorted(range(len(record)), key=lambda i: (-record[i][0], i))
    total = 0
    for i in order:
        size, first, last = record[i]
        need = -(-size // align) * align
        busy = sorted((o, e) for o, e, f, lst in placed if f < last and first < lst)
        offset = 0
        for o, e in busy:
            if o - offset >= need:
                break
            offset = max(offset, e)
        offsets[i] = offset
        placed.append((offset, offset + need, first, last))
        total = max(total, offset + need)
    return [(record[i][0], offsets[i]) for i in range(len(record))], total


class PaddedPlanar:
    """One sample's feature map (C, D, H, W) float32 in the kernels' padded planar layout.

    Memory: ``_PRE`` zero floats, then C × D planes of (H + 2) rows × P floats
    (P = ``pitch`` = W + 1 rounded up to 16), then zero slack. Voxel (c, d, h, w) is at
    ``c·cstride + d·(H+2)·P + (h+1)·P + w`` from :attr:`base`; rows 0 and H+1 and columns
    W..P-1 of every row are zero (the kernels rely on it; only the kernels write PP tensors).
    """

    __slots__ = ("C", "D", "H", "P", "W", "buffer", "pool")

    def __init__(self, channels: int, depth: int, height: int, width: int, *,
                 pool: BufferPool | None = None) -> None:
        self.C, self.D, self.H, self.W = channels, depth, height, width
        self.P = _pitch(width)
        n = channels * self.cstride
        slack = pp_slack(self.P)  # what a tile of the widest build (8 rows) reads past the last plane
        self.pool = pool
        self.buffer = pool.take(_PRE + n + slack) if pool is not None else torch.empty(_PRE + n + slack)
        self.buffer[:_PRE].zero_()
        self.buffer[_PRE + n:].zero_()
        if self.buffer.data_ptr() % 64:
            raise RuntimeError("PaddedPlanar: allocator returned a buffer that is not 64-byte aligned")

    def release(self) -> None:
        """Hand the buffer back to its pool (the tensor must not be used afterwards). The
        reference is dropped too: in the pool's recording call the buffer is fresh memory, which
        is then freed at once instead of when the tensor object goes (that call's peak was 1 GB
        above the planned calls' at 128³)."""
        if self.pool is not None:
            self.pool.give(self.buffer)
            self.pool = None
            self.buffer = None

    @property
    def cstride(self) -> int:
        """Floats between consecutive channels."""
        return self.D * (self.H + 2) * self.P

    @property
    def planes(self) -> torch.Tensor:
        """(C, D, H+2, P) view of the stored planes, halo included."""
        return self.buffer[_PRE:_PRE + self.C * self.cstride].view(self.C, self.D, self.H + 2, self.P)

    @property
    def interior(self) -> torch.Tensor:
        """(C, D, H, W) strided view of the voxels."""
        return self.planes[:, :, 1:self.H + 1, :self.W]

    @property
    def base(self) -> int:
        """Address of channel 0, plane 0, row 0, column 0."""
        return self.buffer.data_ptr() + 4 * _PRE

    def channel_ptrs(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) int64 addresses of channels ``idx`` (default: all)."""
        ch = torch.arange(self.C, dtype=torch.int64) if idx is None else idx
        return self.base + ch * (4 * self.cstride)

    @classmethod
    def from_dense(cls, x: torch.Tensor, *, pool: BufferPool | None = None) -> PaddedPlanar:
        """From any (C, D, H, W) tensor (any strides or float dtype)."""
        c, d, h, w = x.shape
        out = cls(c, d, h, w, pool=pool)
        planes = out.planes
        planes[:, :, 0].zero_()
        planes[:, :, h + 1].zero_()
        planes[:, :, 1:h + 1, w:].zero_()
        out.interior.copy_(x)
        return out

    def to_dense(self) -> torch.Tensor:
        """(C, D, H, W) contiguous copy of the voxels."""
        return self.interior.contiguous()


@dataclass
class LazyNorm:
    """How consumers read a PP tensor holding a conv's raw output: ``leaky(a·x + b, s)`` per
    channel, i.e. InstanceNorm's affine (a = γ/σ, b = β − μ·a) and LeakyReLU (slope s) are applied
    on load instead of in a pass of their own. (C,) float32 each."""

    a: torch.Tensor
    b: torch.Tensor
    s: torch.Tensor

    @staticmethod
    def identity(channels: int) -> LazyNorm:
        return LazyNorm(torch.ones(channels), torch.zeros(channels), torch.ones(channels))

    @staticmethod
    def cat(norms: list[LazyNorm]) -> LazyNorm:
        return LazyNorm(torch.cat([n.a for n in norms]), torch.cat([n.b for n in norms]),
                        torch.cat([n.s for n in norms]))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised values of a (C, ...) tensor (reference implementation)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        v = x * self.a.view(shape) + self.b.view(shape)
        return torch.where(v > 0, v, v * self.s.view(shape))


@dataclass
class ComputedUp:
    """Input channels of a (1,3,3) conv that the kernel computes as it reads them: channel
    ``first + c`` is output ``up_map[c]`` ((C,) int32, -1: no kernels read it) of ``conv`` (kernel
    == stride == (2, 2, 2)) applied to ``deep`` read through ``norm``."""

    first: int
    up_map: torch.Tensor
    conv: CSRConvT
    deep: PaddedPlanar
    norm: LazyNorm | None


def _norm_vectors(norm: LazyNorm | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    return None if norm is None else (norm.a, norm.b, norm.s)


# --------------------------------------------------------------------------------------------
# The C kernels (napari_e2enet/inference/cpu: kernels.c, its build and checked bindings)
# --------------------------------------------------------------------------------------------


class Kernels:
    """The compiled kernel library on this module's compact forms and PP tensors.

    Every call uses ``torch.get_num_threads()`` threads (one for small jobs) and releases the
    GIL; the bindings check every argument before it reaches C and raise ``ValueError``.
    """

    def __init__(self, library: KernelLibrary) -> None:
        self.library = library
        self.path: Path = library.path
        self.flags: list[str] = list(library.flags)
        self.family: str = library.family
        self.openmp: bool = library.openmp
        self.row_block: int = library.row_block
        self.bf16: bool = library.bf16  # sconv133 runs a CSCConv.in_bf16() with bf16 products

    @property
    def backend(self) -> str:
        """``sparse-<family>``: the name the inference reports (``sparse-avx512``, ``sparse-avx2``,
        ``sparse-generic``)."""
        return f"sparse-{self.family}"

    @staticmethod
    def _threads(work: int = 1 << 62) -> int:
        """``torch.get_num_threads()``, or 1 for small jobs (``work`` ~ output floats): a parallel
        region costs a wake-up and a barrier, which on a busy machine can cost milliseconds."""
        return 1 if work < _SMALL_JOB else max(1, torch.get_num_threads())

    def sconv133(self, conv: CSCConv, channel_ptrs: torch.Tensor, dshift: torch.Tensor,
                 out: PaddedPlanar, stats: torch.Tensor | None, *, norm: LazyNorm | None = None,
                 streaming: bool = False, depth_range: tuple[int, int] | None = None,
                 up: ComputedUp | None = None) -> None:
        """out = conv(inputs) for a CSC (1,3,3) conv (raw, no bias). ``channel_ptrs`` (I,) int64
        addresses of the input channels (PP tensors of out's D, H, W and pitch; an address may
        point before its buffer when only a depth piece is stored, see ``depth_range``),
        ``dshift`` (I,) int32 depth offsets, ``norm`` the per-input-channel lazy norm (None: read
        as stored); ``stats`` (2·O,) float64 accumulates per-channel sum and sum of squares of out.
        ``depth_range`` (d0, d1): write only output slices [d0, d1), which read input slices
        d0 - 1 .. d1 (default: all). ``up``: input channels computed in the kernel from a deeper
        tensor (fp32 weights only; their ``channel_ptrs`` are not read)."""
        if conv.weights.shape[-1] != 9:
            raise ValueError("e2e_sconv133 needs 3 × 3 taps")
        if conv.out_channels != out.C or conv.in_channels != channel_ptrs.numel():
            raise ValueError(f"sconv133: a {conv.in_channels} → {conv.out_channels} conv got "
                             f"{channel_ptrs.numel()} input channels and {out.C} output channels")
        d0, d1 = depth_range if depth_range is not None else (0, out.D)
        common = {"chan": channel_ptrs, "dshift": dshift, "colptr": conv.colptr, "rowidx": conv.rowidx, "out": out,
                  "depth_range": (d0, d1), "norm": _norm_vectors(norm), "stats": stats, "streaming": streaming,
                  "threads": self._threads(out.C * out.cstride * (d1 - d0) // max(out.D, 1))}
        if up is not None:
            if conv.weight_pairs is not None:
                raise ValueError("sconv133: computed up channels need the fp32 weights")
            with _record("e2e_sconv133_up"):
                self.library.sconv133_up(weights=conv.weights, up_first=up.first, up_map=up.up_map, deep=up.deep,
                                         rowptr=up.conv.rowptr, colidx=up.conv.colidx, up_weights=up.conv.weights,
                                         deep_norm=_norm_vectors(up.norm), **common)
        elif conv.weight_pairs is not None:
            with _record("e2e_sconv133_bf16"):
                self.library.sconv133_bf16(weight_pairs=conv.weight_pairs, **common)
        else:
            with _record("e2e_sconv133"):
                self.library.sconv133(weights=conv.weights, **common)

    def convt(self, conv: CSRConvT, x: PaddedPlanar, out: PaddedPlanar, *, norm: LazyNorm | None = None,
              streaming: bool = False, depth_range: tuple[int, int] | None = None) -> None:
        """out = ConvTranspose3d(x') for a CSR transposed conv with kernel == stride, x' = x read
        through ``norm``. ``depth_range`` (lo, hi): only input slices [lo, hi), written to out's
        planes 0 .. kd·(hi - lo) (out may then hold fewer planes than kd·x.D)."""
        if conv.out_channels != out.C or conv.in_channels != x.C:
            raise ValueError(f"convt: a {conv.in_channels} → {conv.out_channels} transposed conv got "
                             f"{x.C} input channels and {out.C} output channels")
        kd = conv.kernel[0]
        lo, hi = depth_range if depth_range is not None else (0, x.D)
        with _record("e2e_convt"):
            self.library.convt(x=x, rowptr=conv.rowptr, colidx=conv.colidx, weights=conv.weights,
                               kernel=conv.kernel, out=out, depth_range=(lo, hi), norm=_norm_vectors(norm),
                               streaming=streaming,
                               threads=self._threads(out.C * out.cstride * kd * (hi - lo) // max(out.D, 1)))

    def head(self, x: PaddedPlanar, weight: torch.Tensor, out: torch.Tensor, *,
             norm: LazyNorm | None = None) -> None:
        """out (K, D, H, W) float32 contiguous = 1×1×1 conv (``weight`` (K, C) float32) of x'."""
        with _record("e2e_head"):
            self.library.head(x=x, weight=weight, out=out, norm=_norm_vectors(norm),
                              threads=self._threads(out.numel()))

    def cl_stats(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel (sum, sum of squares), (2·C,) float64, of a float32 or bfloat16 tensor whose
        memory is rows of C contiguous channels (a channels_last (N, C, H, W) tensor)."""
        stats = torch.empty(2 * x.shape[1], dtype=torch.float64)
        with _record("e2e_cl_stats"):
            self.library.cl_stats(x=x, stats=stats, threads=self._threads(x.numel()))
        return stats

    def cl_norm_act(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, slope: float) -> None:
        """In place on a channels_last float32 tensor: x = leaky_relu(x · scale[c] + shift[c], slope)."""
        with _record("e2e_cl_norm_act"):
            self.library.cl_norm_act(x=x, scale=scale, shift=shift, slope=slope, threads=self._threads(x.numel()))

    def cl_to_pp(self, x: torch.Tensor, pool: BufferPool | None = None) -> PaddedPlanar:
        """A folded (D, C, H, W) float32 or bfloat16 channels_last tensor → float32 PP (C, D, H, W)."""
        d, c, h, w = x.shape
        out = PaddedPlanar(c, d, h, w, pool=pool)
        with _record("e2e_cl_to_pp"):
            self.library.cl_to_pp(x=x, out=out, threads=self._threads(x.numel()))
        return out

    def cl_shift(self, x: torch.Tensor, runs: torch.Tensor, d_out: int, stride: int = 1,
                 scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                 slope: float = 1.0, out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Depth-shifted (and depth-strided) copy of a folded (D, C, H, W) float32 or bfloat16
        channels_last tensor, optionally with a fused affine + LeakyReLU: out[d, c] = f(x[stride·d +
        δ(c), c]). ``runs`` (R, 3) int32 rows (c0, c1, δ) covering the channels in order; ``out``
        optional (d_out, C, H, W) channels_last destination, else a new one of ``dtype``."""
        if x.dim() != 4:
            raise ValueError(f"cl_shift: expected a folded (D, C, H, W) tensor, got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if out is None:
            out = torch.empty((d_out, c, h, w), dtype=dtype, memory_format=torch.channels_last)
        elif tuple(out.shape) != (d_out, c, h, w):
            raise ValueError("cl_shift: out has the wrong shape")
        if runs.dim() != 2 or runs.shape[1] != 3 or runs.shape[0] < 1:
            raise ValueError(f"cl_shift: runs must be (R ≥ 1, 3) rows (c0, c1, δ), got shape {tuple(runs.shape)}")
        starts = torch.cat([runs[:, 0], runs[-1:, 1]]).to(torch.int32).contiguous()
        deltas = runs[:, 2].to(torch.int32).contiguous()
        with _record("e2e_cl_shift"):
            self.library.cl_shift(x=x, out=out, starts=starts, deltas=deltas, stride=stride, scale=scale,
                                  shift=shift, slope=slope, threads=self._threads(out.numel()))
        return out

    def maxpool(self, x: PaddedPlanar, kernel: tuple[int, int, int], out: PaddedPlanar, *,
                norm: LazyNorm | None = None) -> None:
        """out = MaxPool3d(kernel, stride=kernel)(x'), x' = x read through ``norm``; out holds
        normalised values."""
        with _record("e2e_maxpool"):
            self.library.maxpool(x=x, kernel=tuple(int(k) for k in kernel), out=out,  # type: ignore[arg-type]
                                 norm=_norm_vectors(norm), threads=self._threads(x.C * x.cstride))


_record = torch.profiler.record_function  # labels the kernels in torch.profiler traces

_LOCK = threading.Lock()
_SMALL_JOB = 1 << 17  # floats; below this a kernel runs on one thread
_LOADED: dict[str, Kernels] = {}  # by library path: one wrapper per loaded library
_WARNED: set[str] = set()


def kernel_status() -> tuple[Kernels | None, str]:
    """The kernels (compiled once, cached on disk) and a one-line reason: how they were built,
    or why there are none (no C compiler, ``NAPARI_E2ENET_NO_KERNELS`` set, build failed).
    Never raises; a failed build on a machine that has a compiler is also warned about once."""
    library, reason = best_library()
    if library is None:
        if reason.startswith("kernel build failed") and reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"napari-e2enet: could not build the sparse CPU kernels; using the dense "
                          f"PyTorch path ({reason[:300]})", RuntimeWarning, stacklevel=2)
        return None, reason
    with _LOCK:
        key = str(library.path)
        if key not in _LOADED:
            _LOADED[key] = Kernels(library)
        return _LOADED[key], reason


def load_kernels() -> Kernels | None:
    """The kernels, or ``None`` where they cannot be had (see :func:`kernel_status`). Never raises."""
    return kernel_status()[0]


def depth_offsets(channels: int, enabled: bool = True) -> torch.Tensor:
    """Per-channel depth offset of the restricted depth shift, (channels,) int32: +1 for the first
    ``tensor_split`` group (reads slice d+1), 0 for the second, -1 for the third; zeros when
    ``enabled`` is False or channels < 3. The groups are :func:`models.blocks.shift_group_sizes`,
    the same arithmetic the model's own shift uses."""
    out = torch.zeros(channels, dtype=torch.int32)
    if enabled and channels >= 3:
        g0, g1, _ = shift_group_sizes(channels)
        out[:g0] = 1
        out[g0 + g1:] = -1
    return out
