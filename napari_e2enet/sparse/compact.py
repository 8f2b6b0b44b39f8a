"""Mask → compact inference forms for E2ENet's kernel-sparse layers, and the CPU kernels that run them.

DSFF (spec E2ENET.md §2) masks whole kernels: a bool ``kernel_mask`` of shape ``weight.shape[:2]``
on every fusion conv ((out, in), weight (O, I, 1, 3, 3)) and every up ConvTranspose3d ((in, out),
weight (I, O, kd, kh, kw)); masked kernels are stored as zeros. This module turns such a layer into
a form that skips the pruned kernels for real (:func:`conv_csc`, :func:`convt_csr`) and holds the
kernels that run it (:func:`load_kernels` → :class:`Kernels`).

Measured (the project's shared 2-core Xeon, AVX-512, fp32; one layer shaped like the paper
network's level-0 fusion conv: 96 → 48 channels over 16 × 128 × 128 voxels, random masks; time
relative to oneDNN's dense ``conv2d`` in ``channels_last`` on the same data, same process,
interleaved; single-thread CPU time, which the co-tenants of the machine disturb least):

=========================================================  ============  ============
method                                                     density 0.1   density 0.2
=========================================================  ============  ============
oneDNN dense conv2d, channels_last (zeros kept)            1.00          1.00
oneDNN dense conv2d, contiguous                            ~2.1          ~2.1
oneDNN grouped conv (6 or 12 groups; "regroup" pieces)     1.2–1.6       —
``torch.sparse`` CSR (MKL) per tap, im2col-free            ~2.4          —
``torch.sparse`` CSR on an im2col matrix                   ~8            —
compaction (drop unused input / dead output channels)      ~1.00         1.00
**this module's kernel** (``e2e_sconv133``)                **0.26–0.40** **0.50–0.56**
=========================================================  ============  ============

Compaction gains nothing for random masks: at S = 0.9 an input channel of a 96 → 48 layer is
unused by all 48 outputs with probability 0.9^48 ≈ 0.6 %. Regrouping dense pieces needs outputs
that share input sets, which random masks do not have, and oneDNN's small/grouped convolutions run
at 10–30 % of its dense efficiency. ``torch.sparse`` on CPU (MKL SpMM) is slower than the dense
convolution even at 10 % density. So the sparse path is a small C kernel library, compiled on first
use with the system C compiler (cached under ``~/.cache/napari-e2enet/kernels``, keyed by source,
flags, compiler and CPU; ``$CC`` and ``$NAPARI_E2ENET_CACHE`` are honoured,
``NAPARI_E2ENET_NO_KERNELS=1`` disables it). It is portable C with GCC/Clang vector extensions
(AVX-512 → 8-row tiles; AVX2/NEON builds use 4-row tiles) and OpenMP, sharing PyTorch's libgomp.
Without a compiler :func:`load_kernels` returns ``None`` and callers use the dense PyTorch path.

The sparse (1,3,3) conv ``e2e_sconv133`` (stride 1; the only strided convs are in the dense
encoder):

- layout "PP" (padded planar, one sample; :class:`PaddedPlanar`): channel-major planes with a zero
  halo row above and below and zero padding columns on the right, so the 3 × 3 window needs no
  bounds checks, and rows are 64-byte aligned;
- weights in CSC order by input channel (:class:`CSCConv`): for one tile of 8 rows × 16 voxels
  the 30 input vectors of a channel are loaded once, then each active (out, in) kernel costs 72
  vector FMAs into that output's accumulator tile (L1), so work ∝ active kernels; per input
  channel and tile there is a fixed cost of 30 loads, which is why block masks (fewer input
  channels touched) run ~1.2–1.4× faster than random masks of the same density;
- the restricted depth shift costs nothing (each input channel carries a depth offset and is read
  from slice d ± 1), and the fusion concat [forward | up | down] is never built: the channels are
  pointers into the three source tensors;
- "lazy" InstanceNorm (:class:`LazyNorm`): a conv writes its raw output plus per-channel sums and
  sums of squares from the same pass; its consumers (the next convs, the up ConvTranspose, the
  max-pool, the head) apply ``leaky(a·x + b)`` on load, so normalisation costs no memory pass;
- software prefetch of the next tile's rows, streaming stores for outputs > 16 MB, dynamic
  OpenMP scheduling (robust when the other core is busy), one thread for small jobs.

At density 1 it reaches ~0.65–0.9 × oneDNN's dense speed on the same layer, so the break-even
density is ≈ 0.6–0.7; ``accelerate`` switches to the dense path at a mean density ≥ 0.5.

Also here: ``e2e_convt`` (sparse ConvTranspose3d, kernel == stride ∈ {1, 2}³, CSR by output,
:class:`CSRConvT`), ``e2e_maxpool``, ``e2e_head`` (1×1×1 head into the final (K, D, H, W)
logits) on PP tensors, and channels-last helpers for the dense encoder (``cl_shift``: depth shift
+ depth stride + fused norm in one copy; ``cl_stats``: InstanceNorm statistics in double;
``cl_norm_act``; ``cl_to_pp``). :class:`BufferPool` keeps the buffers across calls in one arena
planned from the first call's lifetimes: first-touch page faults cost ~200 ms per 400 MB here, as
much as two passes over the data, and the plan keeps the arena near the live peak.

Block masks: :func:`block_size` detects masks constant over b × b (out, in) blocks and
:func:`uniform_block_masks` draws them (what a ``block`` option of DSFF would produce); both
unstructured and block masks run through the same kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CSCConv",
    "CSRConvT",
    "Kernels",
    "BufferPool",
    "LazyNorm",
    "PaddedPlanar",
    "block_size",
    "channel_usage",
    "conv_csc",
    "convt_csr",
    "depth_offsets",
    "effective_mask",
    "load_kernels",
    "uniform_block_masks",
]

# --------------------------------------------------------------------------------------------
# Masks → compact forms
# --------------------------------------------------------------------------------------------


def effective_mask(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Kernels that are active *and* not all zero, bool of shape ``weight.shape[:2]``.

    A kernel the mask keeps but whose weights are all zero (e.g. regrown at zero and never
    updated) contributes nothing, so skipping it is exact.
    """
    taps = 1
    for k in weight.shape[2:]:
        taps *= int(k)
    nonzero = weight.detach().reshape(weight.shape[0], weight.shape[1], taps).ne(0).any(-1)
    if mask is None:
        return nonzero
    if tuple(mask.shape) != tuple(weight.shape[:2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} != kernel shape {tuple(weight.shape[:2])}")
    return nonzero & mask.to(device=nonzero.device, dtype=torch.bool)


def channel_usage(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For an (out, in) kernel mask: indices of input channels some output uses and of output
    channels with at least one input (int64, sorted)."""
    return mask.any(0).nonzero().flatten(), mask.any(1).nonzero().flatten()


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


def block_size(mask: torch.Tensor, candidates: tuple[int, ...] = (16, 8, 4, 2)) -> int:
    """Largest b in ``candidates`` such that the 2-D mask is constant over aligned b × b blocks
    (both dimensions divisible by b); 1 when none is."""
    m = mask.bool()
    rows, cols = m.shape
    for b in candidates:
        if rows % b or cols % b:
            continue
        blocks = m.reshape(rows // b, b, cols // b, b)
        if bool((blocks == blocks[:, :1, :, :1]).all()):
            return b
    return 1


def uniform_block_masks(model: torch.nn.Module, sparsity: float, block: int, seed: int = 0,
                        dead_channels: int = 0) -> dict[str, torch.Tensor]:
    """Random block masks for every maskable weight of an ``E2ENet``: the (out, in) kernel mask
    is constant over aligned ``block`` × ``block`` blocks, ``round((1 - S) · blocks)`` blocks
    active per layer (at least one), drawn with a private generator (global RNG untouched).

    Layers whose channel counts are not multiples of ``block`` fall back to the largest power of
    two that divides both. ``dead_channels`` > 0 additionally switches off that many whole input
    and output channels per layer (for tests of compaction). This mirrors what a ``block``
    option of the DSFF updater would keep invariant (see the accelerate module docstring).
    """
    generator = torch.Generator().manual_seed(seed)
    masks: dict[str, torch.Tensor] = {}
    for mw in model.maskable():  # type: ignore[attr-defined]
        rows, cols = mw.kernel_shape
        b = block
        while b > 1 and (rows % b or cols % b):
            b //= 2
        nb_r, nb_c = rows // b, cols // b
        n = nb_r * nb_c
        active = max(1, round((1.0 - sparsity) * n))
        order = torch.randperm(n, generator=generator)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[order[:active]] = True
        mask = flat.view(nb_r, nb_c).repeat_interleave(b, 0).repeat_interleave(b, 1)
        if dead_channels:
            dead_r = torch.randperm(rows, generator=generator)[:dead_channels]
            dead_c = torch.randperm(cols, generator=generator)[:dead_channels]
            mask[dead_r, :] = False
            mask[:, dead_c] = False
        masks[mw.name] = mask.contiguous()
    return masks


# --------------------------------------------------------------------------------------------
# Padded planar ("PP") tensors
# --------------------------------------------------------------------------------------------

_PRE = 16  # zero floats before the first plane (the left neighbour of voxel (0, 0, 0))
_ROW_BLOCK = 8  # rows per kernel tile (AVX-512 build; 4 otherwise) — the slack covers both


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
        slack = (_ROW_BLOCK + 4) * self.P + 64
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
            self.buffer = None  # type: ignore[assignment]

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


def _norm_ptrs(norm: LazyNorm | None) -> tuple[int | None, int | None, int | None]:
    if norm is None:
        return None, None, None
    return norm.a.data_ptr(), norm.b.data_ptr(), norm.s.data_ptr()


# --------------------------------------------------------------------------------------------
# The C kernels
# --------------------------------------------------------------------------------------------

KERNEL_SOURCE = r"""
/* napari-e2enet sparse inference kernels. Layout "PP" (padded planar), one sample: a channel is
   D planes of (H+2) rows x P floats, P % 16 == 0, P >= W+1; voxel (d,h,w) sits at
   d*(H+2)*P + (h+1)*P + w; rows 0 and H+1 and columns W..P-1 of every row are zero, so the left
   neighbour of column 0 is the zero padding of the row above. Every PP buffer has 16 zero floats
   before its first plane and slack after its last (read, never used). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#define TID() omp_get_thread_num()
#else
#define TID() 0
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int i16 __attribute__((vector_size(64)));
#if defined(__clang__)
#define ILO(e, f) __builtin_shufflevector(e, f, 0,16,1,17,2,18,3,19,4,20,5,21,6,22,7,23)
#define IHI(e, f) __builtin_shufflevector(e, f, 8,24,9,25,10,26,11,27,12,28,13,29,14,30,15,31)
#else
#define ILO(e, f) __builtin_shuffle(e, f, (i16){0,16,1,17,2,18,3,19,4,20,5,21,6,22,7,23})
#define IHI(e, f) __builtin_shuffle(e, f, (i16){8,24,9,25,10,26,11,27,12,28,13,29,14,30,15,31})
#endif
#define LDU(p) (*(const v16u *)(p))
#define LDA(p) (*(const v16 *)(p))
#define BC(s) ((v16){0} + (float)(s))
#if defined(__AVX512F__)
#define RB 8
#else
#define RB 4
#endif

/* Dynamic scheduling: on a shared machine one thread may get less CPU than the other; static
   partitions would then wait for it at the barrier. Chunks keep neighbouring tiles together. */
#ifdef E2E_STATIC
#define SCHED(n) static
#else
#define SCHED(n) dynamic, (n)
#endif

#ifndef E2E_PF
#define E2E_PF 32 /* floats ahead of the tile: the line the next tile of this row reads first */
#endif

int e2e_abi(void) { return 2000 + RB; }

static inline void store_n(float *dst, const float *src16, int n) {
    memcpy(dst, src16, sizeof(float) * (size_t)n);
}

static inline void store_v(float *dst, v16 v, int n, int nt) {
    if (n >= 16) {
#if defined(__AVX512F__)
        if (nt) { _mm512_stream_ps(dst, (__m512)v); return; }
#endif
        *(v16u *)dst = v;
        return;
    }
    float tmp[16] __attribute__((aligned(64)));
    *(v16 *)tmp = v;
    store_n(dst, tmp, n);
}

static inline v16 vmax(v16 a, v16 b) {
    const i16 g = a > b;
    return (v16)((g & (i16)a) | (~g & (i16)b));
}

static inline void fence(void) {
#if defined(__AVX512F__)
    _mm_sfence();
#endif
}

/* "Lazy" instance norm: a PP tensor may hold a conv's raw output while its consumers read
   leaky(a[c] * x + b[c], s[c]) (the InstanceNorm affine and LeakyReLU of that conv): the
   normalisation costs no pass of its own. ia == NULL means every channel is read as stored. */
static inline v16 xform(v16 x, float a, float b, float s) {
    const v16 v = BC(a) * x + BC(b);
    return vmax(v, BC(s) * v); /* leaky ReLU for 0 <= s <= 1 */
}

static inline int is_identity(const float *ia, const float *ib, const float *is, int i) {
    return ia == NULL || (ia[i] == 1.f && ib[i] == 0.f && is[i] == 1.f);
}

/* Sparse (1,3,3) convolution, stride 1, zero padding (0,1,1), with a per-input-channel depth
   offset (the restricted depth shift: channel i reads slice d + dshift[i], zero outside).
   chan[i]: address of input channel i (plane 0, row 0, column 0) in a PP tensor of shape (D,H,W),
   read through the lazy norm (ia, ib, is). Weights in CSC by input channel: outputs
   rowidx[colptr[i]..colptr[i+1]), taps wts[9k..9k+9).
   out: O channels PP (64-byte aligned), channel stride ostride floats; raw conv output, interior
   and halo written, for the output depths [d0, d1) only (a caller may feed the input in depth
   pieces: only slices d0-1 .. d1 of each input channel are read).
   stats (optional): stats[o] += sum, stats[O+o] += sum of squares.
   nt: use streaming stores for the output (large outputs). */
void e2e_sconv133(int I, int O, int D, int d0, int d1, int H, int W, int P,
                  const int64_t *chan, const int *dshift,
                  const float *ia, const float *ib, const float *is,
                  const int *colptr, const int *rowidx, const float *wts,
                  float *out, int64_t ostride, double *stats, int nt, int nthreads)
{
    const int nwb = (W + 15) / 16, nhb = (H + RB - 1) / RB;
    const int ntask = (d1 - d0) * nhb * nwb;
    const size_t plane = (size_t)(H + 2) * P;
    double *tst = stats ? calloc((size_t)nthreads * 2 * O, sizeof(double)) : NULL;
#pragma omp parallel num_threads(nthreads)
    {
        float *acc = aligned_alloc(64, sizeof(float) * (size_t)O * RB * 16);
        double *st = tst ? tst + (size_t)TID() * 2 * O : NULL;
#pragma omp for schedule(SCHED(nwb))
        for (int task = 0; task < ntask; task++) {
            const int wb = task % nwb, hb = (task / nwb) % nhb, d = d0 + task / (nwb * nhb);
            const int h0 = hb * RB, w0 = wb * 16;
            const int nrow = H - h0 < RB ? H - h0 : RB, ncol = W - w0 < 16 ? W - w0 : 16;
            v16 lanes, mleft, mright;
            for (int t = 0; t < 16; t++) {
                lanes[t] = t < ncol ? 1.f : 0.f;
                mleft[t] = (w0 + t - 1 >= 0) ? 1.f : 0.f;  /* column w-1 inside the image */
                mright[t] = (w0 + t + 1 < W) ? 1.f : 0.f;  /* column w+1 inside the image */
            }
            memset(acc, 0, sizeof(float) * (size_t)O * RB * 16);
            for (int i = 0; i < I; i++) {
                const int k0 = colptr[i], k1 = colptr[i + 1];
                if (k0 == k1) continue;
                const int ds = d + dshift[i];
                if (ds < 0 || ds >= D) continue;
                const float *rp = (const float *)(intptr_t)chan[i] + (size_t)ds * plane + (size_t)h0 * P + w0;
                {   /* prefetch the lines this thread's next tile reads from this channel */
                    const float *np = wb + 1 < nwb ? rp + E2E_PF : rp + (size_t)RB * P - w0;
                    for (int j = 0; j < RB + 2; j++) __builtin_prefetch(np + (size_t)j * P, 0, 2);
                }
                v16 X[3 * (RB + 2)];
                if (is_identity(ia, ib, is, i)) {
#pragma GCC unroll 16
                    for (int j = 0; j < RB + 2; j++) {
                        const float *r = rp + (size_t)j * P;
                        X[3 * j] = LDU(r - 1); X[3 * j + 1] = LDA(r); X[3 * j + 2] = LDU(r + 1);
                    }
                } else {
                    const float a = ia[i], b = ib[i], sl = is[i];
                    for (int j = 0; j < RB + 2; j++) {
                        const int hh = h0 + j - 1;
                        if (hh < 0 || hh >= H) { X[3 * j] = X[3 * j + 1] = X[3 * j + 2] = (v16){0}; continue; }
                        const float *r = rp + (size_t)j * P;
                        X[3 * j] = xform(LDU(r - 1), a, b, sl) * mleft;
                        X[3 * j + 1] = xform(LDA(r), a, b, sl);
                        X[3 * j + 2] = xform(LDU(r + 1), a, b, sl) * mright;
                    }
                }
                for (int k = k0; k < k1; k++) {
                    float *acc_o = acc + (size_t)rowidx[k] * RB * 16;
                    const float *q = wts + 9 * (size_t)k;
                    const v16 q0 = BC(q[0]), q1 = BC(q[1]), q2 = BC(q[2]), q3 = BC(q[3]), q4 = BC(q[4]),
                              q5 = BC(q[5]), q6 = BC(q[6]), q7 = BC(q[7]), q8 = BC(q[8]);
                    v16 A[RB], B[RB];
#pragma GCC unroll 16
                    for (int j = 0; j < RB; j++) { A[j] = LDA(acc_o + 16 * j); B[j] = (v16){0}; }
#pragma GCC unroll 16
                    for (int j = 0; j < RB + 2; j++) {
                        const v16 xl = X[3 * j], xc = X[3 * j + 1], xr = X[3 * j + 2];
                        /* one FMA per tap; three independent accumulator chains per input row */
                        if (j < RB) A[j] += q0 * xl;
                        if (j >= 1 && j - 1 < RB) B[j - 1] += q3 * xl;
                        if (j >= 2) A[j - 2] += q6 * xl;
                        if (j < RB) A[j] += q1 * xc;
                        if (j >= 1 && j - 1 < RB) B[j - 1] += q4 * xc;
                        if (j >= 2) A[j - 2] += q7 * xc;
                        if (j < RB) A[j] += q2 * xr;
                        if (j >= 1 && j - 1 < RB) B[j - 1] += q5 * xr;
                        if (j >= 2) A[j - 2] += q8 * xr;
                    }
#pragma GCC unroll 16
                    for (int j = 0; j < RB; j++) *(v16 *)(acc_o + 16 * j) = A[j] + B[j];
                }
            }
            const int c0 = w0, c1 = wb == nwb - 1 ? P : w0 + ncol;
            for (int o = 0; o < O; o++) {
                float *pl = out + (size_t)o * ostride + (size_t)d * plane;
                v16 s = (v16){0}, s2 = (v16){0};
                for (int j = 0; j < nrow; j++) {
                    v16 v = LDA(acc + ((size_t)o * RB + j) * 16);
                    float *row = pl + (size_t)(h0 + j + 1) * P;
                    if (ncol < 16) v *= lanes;
                    store_v(row + w0, v, ncol, nt);
                    s += v; s2 += v * v;
                    if (wb == nwb - 1 && P > w0 + ncol) memset(row + w0 + ncol, 0, sizeof(float) * (size_t)(P - w0 - ncol));
                }
                if (hb == 0) memset(pl + c0, 0, sizeof(float) * (size_t)(c1 - c0));
                if (hb == nhb - 1) memset(pl + (size_t)(H + 1) * P + c0, 0, sizeof(float) * (size_t)(c1 - c0));
                if (st) {
                    float sa = 0.f, sb = 0.f;
                    for (int t = 0; t < 16; t++) { sa += s[t]; sb += s2[t]; }
                    st[o] += sa; st[O + o] += sb;
                }
            }
        }
        free(acc);
        fence();
    }
    if (stats) {
        for (int t = 0; t < nthreads; t++)
            for (int j = 0; j < 2 * O; j++) stats[j] += tst[(size_t)t * 2 * O + j];
        free(tst);
    }
}

/* 1x1x1 head without bias on a PP tensor read through the lazy norm: out[k, d, h, w] =
   sum_c wh[k*C + c] * x'[c, d, h, w]; out is a dense (K, D, H, W) float32 array. */
void e2e_head(int C, int D, int H, int W, int P, const float *x, int64_t cstride,
              const float *ia, const float *ib, const float *is, int K, const float *wh, float *out, int nthreads)
{
    const int nwb = (W + 15) / 16, ntask = D * H * nwb;
    const size_t plane = (size_t)(H + 2) * P, ostride = (size_t)D * H * W;
#pragma omp parallel num_threads(nthreads)
    {
        v16 *xs = aligned_alloc(64, sizeof(v16) * (size_t)C);
#pragma omp for schedule(SCHED(4 * nwb))
        for (int task = 0; task < ntask; task++) {
            const int wb = task % nwb, h = (task / nwb) % H, d = task / (nwb * H);
            const int w0 = wb * 16, ncol = W - w0 < 16 ? W - w0 : 16;
            const float *xb = x + (size_t)d * plane + (size_t)(h + 1) * P + w0;
            for (int c = 0; c < C; c++) {
                const v16 v = LDA(xb + (size_t)c * cstride);
                xs[c] = is_identity(ia, ib, is, c) ? v : xform(v, ia[c], ib[c], is[c]);
            }
            float *ob = out + ((size_t)d * H + h) * W + w0;
            for (int k0 = 0; k0 < K; k0 += 8) {
                const int kn = K - k0 < 8 ? K - k0 : 8;
                v16 A[8];
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) A[k] = (v16){0};
                for (int c = 0; c < C; c++) {
                    const v16 v = xs[c];
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++) if (k < kn) A[k] += BC(wh[(size_t)(k0 + k) * C + c]) * v;
                }
                for (int k = 0; k < kn; k++) store_v(ob + (size_t)(k0 + k) * ostride, A[k], ncol, 0);
            }
        }
        free(xs);
    }
}

static inline __attribute__((always_inline)) void convt_acc(const int KK, const int NV, v16 *acc, const float *ib,
                                                            int64_t bstride, const int *colidx, const float *wts,
                                                            int k0, int k1)
{
    v16 A[8], B[8];
#pragma GCC unroll 8
    for (int p = 0; p < KK; p++) { A[p] = (v16){0}; B[p] = (v16){0}; }
    for (int k = k0; k < k1; k++) {
        const float *xp = ib + (size_t)colidx[k] * bstride;
        const v16 x0 = LDA(xp), x1 = NV > 1 ? LDA(xp + 16) : (v16){0};
        const float *q = wts + (size_t)KK * k;
#pragma GCC unroll 8
        for (int p = 0; p < KK; p++) {
            const v16 w = BC(q[p]);
            A[p] += w * x0;
            if (NV > 1) B[p] += w * x1;
        }
    }
#pragma GCC unroll 8
    for (int p = 0; p < KK; p++) { acc[p] = A[p]; acc[8 + p] = B[p]; }
}

/* Sparse ConvTranspose3d with kernel == stride == (kd,kh,kw), kw in {1,2}, no bias.
   in: Ci channels PP (Dl, Hl, Wl, pitch Pl), channel c at in + c*istride, read through the lazy
   norm (ia, iib, is). CSR by output channel: inputs colidx[rowptr[o]..rowptr[o+1]), taps
   wts[K*k..K*k+K) in (a,b,c) order, K = kd*kh*kw <= 8. Tiles of one low-res row x 32 voxels.
   out: O channels PP (Dl*kd, Hl*kh, Wl*kw, pitch P), channel stride ostride; halo written. */
void e2e_convt(int Ci, int O, int Dl, int Hl, int Wl, int Pl, int kd, int kh, int kw,
               const float *in, int64_t istride, const float *ia, const float *iib, const float *is,
               const int *rowptr, const int *colidx, const float *wts,
               float *out, int P, int64_t ostride, int nt, int nthreads)
{
    const int K = kd * kh * kw, H = Hl * kh, W = Wl * kw;
    const int nwb = (Wl + 31) / 32, ntask = Dl * Hl * nwb;
    const size_t iplane = (size_t)(Hl + 2) * Pl, oplane = (size_t)(H + 2) * P;
#pragma omp parallel num_threads(nthreads)
    {
        v16 *acc = aligned_alloc(64, sizeof(v16) * 16);
        v16 *xt = aligned_alloc(64, sizeof(v16) * 2 * (size_t)(Ci > 0 ? Ci : 1));
#pragma omp for schedule(SCHED(2 * nwb))
        for (int task = 0; task < ntask; task++) {
            const int wb = task % nwb, hl = (task / nwb) % Hl, dl = task / (nwb * Hl);
            const int w0 = wb * 32, ncol = Wl - w0 < 32 ? Wl - w0 : 32, nv = ncol > 16 ? 2 : 1;
            const int oc0 = kw * w0, oc1 = wb == nwb - 1 ? P : kw * (w0 + ncol);
            const float *src = in + (size_t)dl * iplane + (size_t)(hl + 1) * Pl + w0;
            const float *ib = src;
            int64_t bstride = istride;
            if (ia != NULL) {  /* apply the lazy norm once per tile and input channel */
                for (int c = 0; c < Ci; c++) {
                    for (int v = 0; v < nv; v++) {
                        const v16 x = LDA(src + (size_t)c * istride + 16 * v);
                        xt[2 * c + v] = is_identity(ia, iib, is, c) ? x : xform(x, ia[c], iib[c], is[c]);
                    }
                }
                ib = (const float *)xt;
                bstride = 32;
            }
            for (int o = 0; o < O; o++) {
                const int k0 = rowptr[o], k1 = rowptr[o + 1];
                if (K == 8) { if (nv == 2) convt_acc(8, 2, acc, ib, bstride, colidx, wts, k0, k1); else convt_acc(8, 1, acc, ib, bstride, colidx, wts, k0, k1); }
                else if (K == 4) { if (nv == 2) convt_acc(4, 2, acc, ib, bstride, colidx, wts, k0, k1); else convt_acc(4, 1, acc, ib, bstride, colidx, wts, k0, k1); }
                else if (K == 2) { if (nv == 2) convt_acc(2, 2, acc, ib, bstride, colidx, wts, k0, k1); else convt_acc(2, 1, acc, ib, bstride, colidx, wts, k0, k1); }
                else convt_acc(1, 2, acc, ib, bstride, colidx, wts, k0, k1);
                float *ob = out + (size_t)o * ostride;
                for (int a = 0; a < kd; a++) {
                    float *pl = ob + (size_t)(kd * dl + a) * oplane;
                    for (int b = 0; b < kh; b++) {
                        const int h = kh * hl + b;
                        float *row = pl + (size_t)(h + 1) * P;
                        for (int v = 0; v < nv; v++) {
                            const int n = ncol - 16 * v < 16 ? ncol - 16 * v : 16;
                            float *dst = row + kw * (w0 + 16 * v);
                            if (kw == 1) store_v(dst, acc[8 * v + a * kh + b], n, nt);
                            else {
                                const v16 e = acc[8 * v + (a * kh + b) * 2], f = acc[8 * v + (a * kh + b) * 2 + 1];
                                store_v(dst, ILO(e, f), 2 * n, nt);
                                if (2 * n > 16) store_v(dst + 16, IHI(e, f), 2 * n - 16, nt);
                            }
                        }
                        if (wb == nwb - 1) memset(row + W, 0, sizeof(float) * (size_t)(P - W));
                        if (h == 0) memset(pl + oc0, 0, sizeof(float) * (size_t)(oc1 - oc0));
                        if (h == H - 1) memset(pl + (size_t)(H + 1) * P + oc0, 0, sizeof(float) * (size_t)(oc1 - oc0));
                    }
                }
            }
        }
        free(acc);
        free(xt);
        fence();
    }
}

/* Channels-last (D, H, W, C) float32 -> PP (C, D, H, W) with halo; out channel stride ostride. */
void e2e_cl_to_pp(int D, int H, int W, int C, const float *x, float *out, int P, int64_t ostride, int nthreads)
{
    const size_t plane = (size_t)(H + 2) * P;
#pragma omp parallel for num_threads(nthreads) schedule(SCHED(8))
    for (int dh = 0; dh < D * H; dh++) {
        const int d = dh / H, h = dh % H;
        const float *src = x + (size_t)dh * W * C;
        for (int c = 0; c < C; c++) {
            float *pl = out + (size_t)c * ostride + (size_t)d * plane;
            float *row = pl + (size_t)(h + 1) * P;
            for (int w = 0; w < W; w++) row[w] = src[(size_t)w * C + c];
            memset(row + W, 0, sizeof(float) * (size_t)(P - W));
            if (h == 0) memset(pl, 0, sizeof(float) * (size_t)P);
            if (h == H - 1) memset(pl + (size_t)(H + 1) * P, 0, sizeof(float) * (size_t)P);
        }
    }
}

/* Channels-last depth shift with optional fused affine + LeakyReLU:
   out[d', p, c] = f(x[sd*d' + delta_r, p, c]) for channels c in run r = [rs[r], rs[r+1]),
   zero where the source depth is outside [0, Din); f(v) = leaky(v*scale[c] + shift[c], slope),
   or f(v) = v when scale is NULL. x: Din x HW rows of C floats; out: Dout x HW rows of C. */
void e2e_cl_shift(int Dout, int Din, int64_t HW, int C, const float *x, float *out, int nrun,
                  const int *rs, const int *rdelta, int sd, const float *scale, const float *shift,
                  float slope, int nthreads)
{
    const int64_t blk = 64, nb = (HW + blk - 1) / blk;
#pragma omp parallel for num_threads(nthreads) schedule(SCHED(64))
    for (int64_t t = 0; t < (int64_t)Dout * nb; t++) {
        const int d = (int)(t / nb);
        const int64_t p0 = (t % nb) * blk, p1 = p0 + blk < HW ? p0 + blk : HW;
        for (int r = 0; r < nrun; r++) {
            const int c0 = rs[r], c1 = rs[r + 1], ds = sd * d + rdelta[r];
            for (int64_t p = p0; p < p1; p++) {
                float *o = out + ((size_t)d * HW + p) * C;
                if (ds < 0 || ds >= Din) { memset(o + c0, 0, sizeof(float) * (size_t)(c1 - c0)); continue; }
                const float *i = x + ((size_t)ds * HW + p) * C;
                if (scale) for (int c = c0; c < c1; c++) { float v = i[c] * scale[c] + shift[c]; o[c] = v > 0.f ? v : v * slope; }
                else for (int c = c0; c < c1; c++) o[c] = i[c];
            }
        }
    }
}

/* Channels-last statistics: x is P rows of C floats (row stride C); stats[c] = sum over rows,
   stats[C+c] = sum of squares (float partial sums over 256 rows, accumulated in double). */
void e2e_cl_stats(int64_t P, int C, const float *x, double *stats, int nthreads)
{
    const int64_t nblk = (P + 255) / 256;
    double *tst = calloc((size_t)nthreads * 2 * C, sizeof(double));
#pragma omp parallel num_threads(nthreads)
    {
        double *st = tst + (size_t)TID() * 2 * C;
        float *a = aligned_alloc(64, sizeof(float) * (size_t)(2 * C + 32));
        float *b = a + C + 16;
#pragma omp for schedule(SCHED(16))
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t r0 = blk * 256, r1 = r0 + 256 < P ? r0 + 256 : P;
            for (int c = 0; c < C; c++) { a[c] = 0.f; b[c] = 0.f; }
            for (int64_t r = r0; r < r1; r++) {
                const float *row = x + (size_t)r * C;
                for (int c = 0; c < C; c++) { const float v = row[c]; a[c] += v; b[c] += v * v; }
            }
            for (int c = 0; c < C; c++) { st[c] += a[c]; st[C + c] += b[c]; }
        }
        free(a);
    }
    for (int c = 0; c < 2 * C; c++) stats[c] = 0.0;
    for (int t = 0; t < nthreads; t++)
        for (int c = 0; c < 2 * C; c++) stats[c] += tst[(size_t)t * 2 * C + c];
    free(tst);
}

/* Channels-last, in place: x = leaky_relu(x * scale[c] + shift[c], slope) on P rows of C floats. */
void e2e_cl_norm_act(int64_t P, int C, float *x, const float *scale, const float *shift, float slope, int nthreads)
{
    const int64_t nblk = (P + 63) / 64;
#pragma omp parallel for num_threads(nthreads) schedule(SCHED(64))
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t r0 = blk * 64, r1 = r0 + 64 < P ? r0 + 64 : P;
        for (int64_t r = r0; r < r1; r++) {
            float *row = x + (size_t)r * C;
            for (int c = 0; c < C; c++) { float v = row[c] * scale[c] + shift[c]; row[c] = v > 0.f ? v : v * slope; }
        }
    }
}

/* Max pool with kernel == stride == (kd,kh,kw): PP in (C, D, H, W, pitch Pi), read through the
   lazy norm (ia, ib, is) -> PP out (C, D/kd, H/kh, W/kw, pitch P), stored normalised; halo written. */
void e2e_maxpool(int C, int D, int H, int W, int Pi, int kd, int kh, int kw,
                 const float *in, int64_t istride, const float *ia, const float *ib, const float *is,
                 float *out, int P, int64_t ostride, int nthreads)
{
    const int Do = D / kd, Ho = H / kh, Wo = W / kw;
    const size_t iplane = (size_t)(H + 2) * Pi, oplane = (size_t)(Ho + 2) * P;
    const int nrows = C * Do * (Ho + 2);
#pragma omp parallel for num_threads(nthreads) schedule(SCHED(16))
    for (int r = 0; r < nrows; r++) {
        const int c = r / (Do * (Ho + 2)), rem = r % (Do * (Ho + 2)), d = rem / (Ho + 2), hr = rem % (Ho + 2);
        float *row = out + (size_t)c * ostride + (size_t)d * oplane + (size_t)hr * P;
        if (hr == 0 || hr == Ho + 1) { memset(row, 0, sizeof(float) * (size_t)P); continue; }
        const int h = hr - 1;
        const float *base = in + (size_t)c * istride + (size_t)(kd * d) * iplane + (size_t)(kh * h + 1) * Pi;
        const int idn = is_identity(ia, ib, is, c);
        const float fa = idn ? 1.f : ia[c], fb = idn ? 0.f : ib[c], fs = idn ? 1.f : is[c];
        if (kw == 2) {
            for (int w0 = 0; w0 < Wo; w0 += 16) {
                v16 m = BC(-__builtin_inff());
                for (int a = 0; a < kd; a++)
                    for (int b = 0; b < kh; b++) {
                        const float *src = base + (size_t)a * iplane + (size_t)b * Pi + 2 * w0;
                        v16 e = LDA(src), f = LDA(src + 16);
                        if (!idn) { e = xform(e, fa, fb, fs); f = xform(f, fa, fb, fs); }
#if defined(__clang__)
                        const v16 ev = __builtin_shufflevector(e, f, 0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30);
                        const v16 od = __builtin_shufflevector(e, f, 1,3,5,7,9,11,13,15,17,19,21,23,25,27,29,31);
#else
                        const v16 ev = __builtin_shuffle(e, f, (i16){0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30});
                        const v16 od = __builtin_shuffle(e, f, (i16){1,3,5,7,9,11,13,15,17,19,21,23,25,27,29,31});
#endif
                        m = vmax(m, vmax(ev, od));
                    }
                store_v(row + w0, m, Wo - w0 < 16 ? Wo - w0 : 16, 0);
            }
        } else {
            for (int w = 0; w < Wo; w++) {
                float m = -__builtin_inff();
                for (int a = 0; a < kd; a++)
                    for (int b = 0; b < kh; b++) {
                        const float *src = base + (size_t)a * iplane + (size_t)b * Pi + (size_t)kw * w;
                        for (int e = 0; e < kw; e++) {
                            float v = src[e] * fa + fb;
                            v = v > 0.f ? v : v * fs;
                            m = v > m ? v : m;
                        }
                    }
                row[w] = m;
            }
        }
        memset(row + Wo, 0, sizeof(float) * (size_t)(P - Wo));
    }
}
"""

_ABI_BASE = 2000


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and flags."""
    text = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text or platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("NAPARI_E2ENET_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "napari-e2enet"
    return base / "kernels"


_FLAG_SETS = (
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=fast", "-fopenmp"],
    ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"],
    ["-O3", "-march=native", "-ffp-contract=fast"],
    ["-O3", "-ffp-contract=fast"],
)


class Kernels:
    """The compiled kernel library (see the module docstring); methods take PP tensors.

    Every call uses ``torch.get_num_threads()`` threads and releases the GIL.
    """

    def __init__(self, lib: ctypes.CDLL, path: Path, flags: list[str]) -> None:
        self.lib, self.path, self.flags = lib, path, flags
        self.openmp = "-fopenmp" in flags
        self.row_block = lib.e2e_abi() - _ABI_BASE
        i, i64, p, f = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        lib.e2e_sconv133.argtypes = [i, i, i, i, i, i, i, i, p, p, p, p, p, p, p, p, p, i64, p, i, i]
        lib.e2e_sconv133.restype = None
        lib.e2e_convt.argtypes = [i, i, i, i, i, i, i, i, i, p, i64, p, p, p, p, p, p, p, i, i64, i, i]
        lib.e2e_convt.restype = None
        lib.e2e_maxpool.argtypes = [i, i, i, i, i, i, i, i, p, i64, p, p, p, p, i, i64, i]
        lib.e2e_maxpool.restype = None
        lib.e2e_head.argtypes = [i, i, i, i, i, p, i64, p, p, p, i, p, p, i]
        lib.e2e_head.restype = None
        lib.e2e_cl_stats.argtypes = [i64, i, p, p, i]
        lib.e2e_cl_stats.restype = None
        lib.e2e_cl_norm_act.argtypes = [i64, i, p, p, p, f, i]
        lib.e2e_cl_norm_act.restype = None
        lib.e2e_cl_to_pp.argtypes = [i, i, i, i, p, p, i, i64, i]
        lib.e2e_cl_to_pp.restype = None
        lib.e2e_cl_shift.argtypes = [i, i, i64, i, p, p, i, p, p, i, p, p, f, i]
        lib.e2e_cl_shift.restype = None

    @staticmethod
    def _threads(work: int = 1 << 62) -> int:
        """``torch.get_num_threads()``, or 1 for small jobs (``work`` ~ output floats): a parallel
        region costs a wake-up and a barrier, which on a busy machine can cost milliseconds."""
        return 1 if work < _SMALL_JOB else max(1, torch.get_num_threads())

    def sconv133(self, conv: CSCConv, channel_ptrs: torch.Tensor, dshift: torch.Tensor,
                 out: PaddedPlanar, stats: torch.Tensor | None, *, norm: LazyNorm | None = None,
                 streaming: bool = False, depth_range: tuple[int, int] | None = None) -> None:
        """out = conv(inputs) for a CSC (1,3,3) conv (raw, no bias). ``channel_ptrs`` (I,) int64
        addresses of the input channels (PP tensors of out's D, H, W and pitch; an address may
        point before its buffer when only a depth piece is stored, see ``depth_range``),
        ``dshift`` (I,) int32 depth offsets, ``norm`` the per-input-channel lazy norm (None: read
        as stored); ``stats`` (2·O,) float64 accumulates per-channel sum and sum of squares of out.
        ``depth_range`` (d0, d1): write only output slices [d0, d1), which read input slices
        d0 - 1 .. d1 (default: all)."""
        if conv.weights.shape[1] != 9:
            raise ValueError("e2e_sconv133 needs 3 × 3 taps")
        d0, d1 = depth_range if depth_range is not None else (0, out.D)
        if not 0 <= d0 <= d1 <= out.D:
            raise ValueError(f"sconv133: depth range {depth_range} outside [0, {out.D}]")
        na, nb, ns = _norm_ptrs(norm)
        with _record("e2e_sconv133"):
            self.lib.e2e_sconv133(
                conv.in_channels, conv.out_channels, out.D, d0, d1, out.H, out.W, out.P,
                channel_ptrs.data_ptr(), dshift.data_ptr(), na, nb, ns,
                conv.colptr.data_ptr(), conv.rowidx.data_ptr(), conv.weights.data_ptr(),
                out.base, out.cstride, stats.data_ptr() if stats is not None else None,
                int(streaming), self._threads(out.C * out.cstride * (d1 - d0) // max(out.D, 1)))

    def convt(self, conv: CSRConvT, x: PaddedPlanar, out: PaddedPlanar, *, norm: LazyNorm | None = None,
              streaming: bool = False, depth_range: tuple[int, int] | None = None) -> None:
        """out = ConvTranspose3d(x') for a CSR transposed conv with kernel == stride, x' = x read
        through ``norm``. ``depth_range`` (lo, hi): only input slices [lo, hi), written to out's
        planes 0 .. kd·(hi - lo) (out may then hold fewer planes than kd·x.D)."""
        kd, kh, kw = conv.kernel
        lo, hi = depth_range if depth_range is not None else (0, x.D)
        if not 0 <= lo <= hi <= x.D or kd * (hi - lo) > out.D:
            raise ValueError(f"convt: depth range {depth_range} does not fit the input or the output")
        na, nb, ns = _norm_ptrs(norm)
        plane = (x.H + 2) * x.P
        with _record("e2e_convt"):
            self.lib.e2e_convt(x.C, conv.out_channels, hi - lo, x.H, x.W, x.P, kd, kh, kw, x.base + 4 * lo * plane,
                               x.cstride, na, nb, ns, conv.rowptr.data_ptr(), conv.colidx.data_ptr(),
                               conv.weights.data_ptr(), out.base, out.P, out.cstride, int(streaming),
                               self._threads(out.C * out.cstride * kd * (hi - lo) // max(out.D, 1)))

    def head(self, x: PaddedPlanar, weight: torch.Tensor, out: torch.Tensor, *,
             norm: LazyNorm | None = None) -> None:
        """out (K, D, H, W) float32 contiguous = 1×1×1 conv (``weight`` (K, C) float32) of x'."""
        if not out.is_contiguous() or out.dtype != torch.float32 or tuple(out.shape) != (weight.shape[0], x.D, x.H, x.W):
            raise ValueError("head: out must be a contiguous float32 (K, D, H, W) tensor")
        na, nb, ns = _norm_ptrs(norm)
        with _record("e2e_head"):
            self.lib.e2e_head(x.C, x.D, x.H, x.W, x.P, x.base, x.cstride, na, nb, ns, weight.shape[0],
                              weight.data_ptr(), out.data_ptr(), self._threads(out.numel()))

    def cl_stats(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel (sum, sum of squares), (2·C,) float64, of a float32 tensor whose memory is
        rows of C contiguous channels (a channels_last (N, C, H, W) tensor)."""
        c = x.shape[1]
        _check_rows(x)
        stats = torch.empty(2 * c, dtype=torch.float64)
        with _record("e2e_cl_stats"):
            self.lib.e2e_cl_stats(x.numel() // c, c, x.data_ptr(), stats.data_ptr(), self._threads(x.numel()))
        return stats

    def cl_norm_act(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, slope: float) -> None:
        """In place on a channels_last float32 tensor: x = leaky_relu(x · scale[c] + shift[c], slope)."""
        c = x.shape[1]
        _check_rows(x)
        with _record("e2e_cl_norm_act"):
            self.lib.e2e_cl_norm_act(x.numel() // c, c, x.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                                 float(slope), self._threads(x.numel()))

    def cl_to_pp(self, x: torch.Tensor, pool: BufferPool | None = None) -> PaddedPlanar:
        """A folded (D, C, H, W) float32 channels_last tensor → PP (C, D, H, W)."""
        _check_rows(x)
        d, c, h, w = x.shape
        out = PaddedPlanar(c, d, h, w, pool=pool)
        with _record("e2e_cl_to_pp"):
            self.lib.e2e_cl_to_pp(d, h, w, c, x.data_ptr(), out.base, out.P, out.cstride,
                                  self._threads(x.numel()))
        return out

    def cl_shift(self, x: torch.Tensor, runs: torch.Tensor, d_out: int, stride: int = 1,
                 scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                 slope: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Depth-shifted (and depth-strided) copy of a folded (D, C, H, W) float32 channels_last
        tensor, optionally with a fused affine + LeakyReLU: out[d, c] = f(x[stride·d + δ(c), c]).
        ``runs`` (R, 3) int32 rows (c0, c1, δ) covering the channels in order; ``out`` optional
        (d_out, C, H, W) channels_last destination."""
        _check_rows(x)
        d_in, c, h, w = x.shape
        if out is None:
            out = torch.empty((d_out, c, h, w), dtype=torch.float32, memory_format=torch.channels_last)
        elif tuple(out.shape) != (d_out, c, h, w):
            raise ValueError("cl_shift: out has the wrong shape")
        _check_rows(out)
        starts = torch.cat([runs[:, 0], runs[-1:, 1]]).to(torch.int32).contiguous()
        deltas = runs[:, 2].to(torch.int32).contiguous()
        with _record("e2e_cl_shift"):
            self.lib.e2e_cl_shift(d_out, d_in, h * w, c, x.data_ptr(), out.data_ptr(), runs.shape[0],
                                  starts.data_ptr(), deltas.data_ptr(), stride,
                                  scale.data_ptr() if scale is not None else None,
                                  shift.data_ptr() if shift is not None else None, float(slope),
                                  self._threads(out.numel()))
        return out

    def maxpool(self, x: PaddedPlanar, kernel: tuple[int, int, int], out: PaddedPlanar, *,
                norm: LazyNorm | None = None) -> None:
        """out = MaxPool3d(kernel, stride=kernel)(x'), x' = x read through ``norm``; out holds
        normalised values."""
        kd, kh, kw = kernel
        na, nb, ns = _norm_ptrs(norm)
        with _record("e2e_maxpool"):
            self.lib.e2e_maxpool(x.C, x.D, x.H, x.W, x.P, kd, kh, kw, x.base, x.cstride, na, nb, ns, out.base,
                                 out.P, out.cstride, self._threads(x.C * x.cstride))


_record = torch.profiler.record_function  # labels the kernels in torch.profiler traces


def _check_rows(x: torch.Tensor) -> None:
    if x.dtype != torch.float32 or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("expected a float32 channels_last (N, C, H, W) tensor")


_LOCK = threading.Lock()
_LAST_BUILD_ERROR = ""
_SMALL_JOB = 1 << 17  # floats; below this a kernel runs on one thread
_LOADED: dict[str, Kernels | None] = {}


def _build(cc: str, flags: list[str], target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "e2e_kernels.c"
        src.write_text(KERNEL_SOURCE, encoding="utf-8")
        out = Path(tmp) / target.name
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(out), str(src)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.SubprocessError):
            return False
        if proc.returncode != 0 or not out.exists():
            global _LAST_BUILD_ERROR
            _LAST_BUILD_ERROR = (proc.stderr or proc.stdout or "").strip()[-2000:]
            return False
        os.replace(out, target)  # atomic: concurrent builders end with one complete file
    return True


def load_kernels() -> Kernels | None:
    """Compile (once, cached on disk) and load the kernels; ``None`` if that is not possible
    (no C compiler, not Linux/macOS, ``NAPARI_E2ENET_NO_KERNELS`` set). Never raises."""
    if os.environ.get("NAPARI_E2ENET_NO_KERNELS", "") not in ("", "0"):
        return None
    with _LOCK:
        cc = _compiler()
        key = cc or ""
        if key in _LOADED:
            return _LOADED[key]
        result: Kernels | None = None
        if cc is not None and os.name == "posix":
            try:
                version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError):
                version = ""
            for flags in _FLAG_SETS:
                digest = hashlib.sha256(
                    "\0".join([KERNEL_SOURCE, " ".join(flags), version, _cpu_signature(), torch.__version__]).encode()
                ).hexdigest()[:20]
                target = _cache_dir() / f"e2e_kernels-{digest}.so"
                try:
                    if not target.exists() and not _build(cc, flags, target):
                        continue
                    lib = ctypes.CDLL(str(target))
                    if lib.e2e_abi() < _ABI_BASE or lib.e2e_abi() >= _ABI_BASE + 100:
                        continue
                    result = Kernels(lib, target, flags)
                    break
                except OSError:
                    continue
            if result is None:
                last = _LAST_BUILD_ERROR.splitlines()[-1:] or ["no compiler output"]
                warnings.warn("napari-e2enet: could not build the sparse CPU kernels; using the dense "
                              f"PyTorch path ({last[0][:200]})", RuntimeWarning, stacklevel=2)
        _LOADED[key] = result
        return result


def depth_offsets(channels: int, enabled: bool = True) -> torch.Tensor:
    """Per-channel depth offset of the restricted depth shift, (channels,) int32: +1 for the first
    ``tensor_split`` group (reads slice d+1), 0 for the second, -1 for the third; zeros when
    ``enabled`` is False or channels < 3."""
    out = torch.zeros(channels, dtype=torch.int32)
    if enabled and channels >= 3:
        g0, g1 = (channels + 2) // 3, (channels + 1) // 3
        out[:g0] = 1
        out[g0 + g1:] = -1
    return out

