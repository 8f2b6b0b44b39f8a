"""Typed ctypes bindings of ``kernels.c``: one signature table, and checks before any pointer crosses.

:data:`SIGNATURES` spells every exported function exactly as ``kernels.h`` declares it (a test
parses the header and compares), and the ctypes ``argtypes`` are derived from it, so the Python
and C sides cannot drift apart silently. Every :class:`KernelLibrary` method checks the dtypes,
shapes, contiguity, devices and alignment of what it is given, and the index arrays the C code
follows (CSC/CSR pointers and indices), and raises ``ValueError`` before calling into C: a wrong
argument must cost the caller an exception, not the process (and a napari user's unsaved labels).

The one thing not checked is where the input-channel addresses of :meth:`KernelLibrary.sconv133`
point (they may address channels of three different tensors, or a depth piece of one, see
``PaddedPlanar.channel_ptrs``); they are checked to be non-null and 64-byte aligned.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeAlias

import numpy as np
import torch

from . import build as _build

__all__ = [
    "ABI_VERSION",
    "PAD_FLOATS",
    "SIGNATURES",
    "bf16_weight_pairs",
    "KernelBuildError",
    "KernelLibrary",
    "PPLike",
    "best_library",
    "load",
    "pp_slack",
]

ABI_VERSION = 10  # E2E_ABI_VERSION in kernels.h
PAD_FLOATS = 16  # E2E_PAD_FLOATS: zero floats before a PP buffer's first plane
ALIGN_BYTES = 64
KernelBuildError = _build.KernelBuildError

# (return type, ((parameter type, name), ...)) per exported function, spelled as in kernels.h with
# pointer types written "T *".
SIGNATURES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "e2e_abi_version": ("int", ()),
    "e2e_row_block": ("int", ()),
    "e2e_sconv133": ("void", (
        ("int", "I"), ("int", "O"), ("int", "D"), ("int", "d0"), ("int", "d1"), ("int", "H"), ("int", "W"),
        ("int", "P"), ("const int64_t *", "chan"), ("const int *", "dshift"),
        ("const float *", "ia"), ("const float *", "ib"), ("const float *", "is"),
        ("const int *", "colptr"), ("const int *", "rowidx"), ("const float *", "wts"),
        ("float *", "out"), ("int64_t", "ostride"), ("double *", "stats"), ("int", "nt"), ("int", "nthreads"))),
    "e2e_sconv133_up": ("int", (
        ("int", "I"), ("int", "O"), ("int", "D"), ("int", "d0"), ("int", "d1"), ("int", "H"), ("int", "W"),
        ("int", "P"), ("const int64_t *", "chan"), ("const int *", "dshift"),
        ("const float *", "ia"), ("const float *", "ib"), ("const float *", "is"),
        ("const int *", "colptr"), ("const int *", "rowidx"), ("const float *", "wts"),
        ("float *", "out"), ("int64_t", "ostride"), ("double *", "stats"), ("int", "nt"), ("int", "nthreads"),
        ("int", "u0"), ("int", "u1"), ("const int *", "umap"), ("const float *", "deep"), ("int", "Hl"),
        ("int", "Pl"), ("int64_t", "dstride"), ("const float *", "da"), ("const float *", "db"),
        ("const float *", "ds"), ("const int *", "urowptr"), ("const int *", "ucolidx"),
        ("const float *", "uwts"))),
    "e2e_bf16_built": ("int", ()),
    "e2e_sconv133_bf16": ("int", (
        ("int", "I"), ("int", "O"), ("int", "D"), ("int", "d0"), ("int", "d1"), ("int", "H"), ("int", "W"),
        ("int", "P"), ("const int64_t *", "chan"), ("const int *", "dshift"),
        ("const float *", "ia"), ("const float *", "ib"), ("const float *", "is"),
        ("const int *", "colptr"), ("const int *", "rowidx"), ("const uint32_t *", "wpairs"),
        ("float *", "out"), ("int64_t", "ostride"), ("double *", "stats"), ("int", "nt"), ("int", "nthreads"))),
    "e2e_head": ("void", (
        ("int", "C"), ("int", "D"), ("int", "H"), ("int", "W"), ("int", "P"), ("const float *", "x"),
        ("int64_t", "cstride"), ("const float *", "ia"), ("const float *", "ib"), ("const float *", "is"),
        ("int", "K"), ("const float *", "wh"), ("float *", "out"), ("int", "nthreads"))),
    "e2e_convt": ("void", (
        ("int", "Ci"), ("int", "O"), ("int", "Dl"), ("int", "Hl"), ("int", "Wl"), ("int", "Pl"),
        ("int", "kd"), ("int", "kh"), ("int", "kw"), ("const float *", "in"), ("int64_t", "istride"),
        ("const float *", "ia"), ("const float *", "iib"), ("const float *", "is"),
        ("const int *", "rowptr"), ("const int *", "colidx"), ("const float *", "wts"),
        ("float *", "out"), ("int", "P"), ("int64_t", "ostride"), ("int", "nt"), ("int", "nthreads"))),
    "e2e_cl_to_pp": ("void", (
        ("int", "D"), ("int", "H"), ("int", "W"), ("int", "C"), ("const void *", "x"), ("int", "xbf16"),
        ("float *", "out"), ("int", "P"), ("int64_t", "ostride"), ("int", "nthreads"))),
    "e2e_cl_shift": ("void", (
        ("int", "Dout"), ("int", "Din"), ("int64_t", "HW"), ("int", "C"), ("const void *", "x"), ("int", "xbf16"),
        ("void *", "out"), ("int", "obf16"), ("int", "nrun"), ("const int *", "rs"), ("const int *", "rdelta"), ("int", "sd"),
        ("const float *", "scale"), ("const float *", "shift"), ("float", "slope"), ("int", "nthreads"))),
    "e2e_cl_stats": ("void", (
        ("int64_t", "P"), ("int", "C"), ("const void *", "x"), ("int", "xbf16"), ("double *", "stats"),
        ("int", "nthreads"))),
    "e2e_cl_norm_act": ("void", (
        ("int64_t", "P"), ("int", "C"), ("float *", "x"), ("const float *", "scale"), ("const float *", "shift"),
        ("float", "slope"), ("int", "nthreads"))),
    "e2e_maxpool": ("void", (
        ("int", "C"), ("int", "D"), ("int", "H"), ("int", "W"), ("int", "Pi"), ("int", "kd"), ("int", "kh"),
        ("int", "kw"), ("const float *", "in"), ("int64_t", "istride"),
        ("const float *", "ia"), ("const float *", "ib"), ("const float *", "is"),
        ("float *", "out"), ("int", "P"), ("int64_t", "ostride"), ("int", "nthreads"))),
    # the training kernels (kernels_train.c)
    "e2e_tconv_fwd": ("int", (
        ("int", "N"), ("int", "I"), ("int", "O"), ("int", "D"), ("int", "H"), ("int", "W"), ("const int64_t *", "xa"),
        ("const int *", "ishift"), ("int", "OG"), ("const int *", "ptr"), ("const int *", "idx"),
        ("const float *", "wts"), ("const int64_t *", "ya"), ("const int *", "oshift"), ("int", "nthreads"))),
    "e2e_tconv_dw": ("int", (
        ("int", "N"), ("int", "I"), ("int", "O"), ("int", "D"), ("int", "H"), ("int", "W"), ("const int64_t *", "xa"),
        ("const int *", "ishift"), ("const int64_t *", "dya"), ("int", "CH"), ("const int *", "ptr"),
        ("const int *", "idx"), ("double *", "dw"), ("int", "nthreads"))),
    "e2e_upconv_fwd": ("int", (
        ("int", "N"), ("int", "I"), ("int", "O"), ("int", "D"), ("int", "H"), ("int", "W"), ("int", "kd"),
        ("int", "kh"), ("int", "kw"), ("const float *", "x"), ("const int *", "ptr"), ("const int *", "idx"),
        ("const float *", "wts"), ("float *", "y"), ("int", "nthreads"))),
    "e2e_upconv_dx": ("int", (
        ("int", "N"), ("int", "I"), ("int", "O"), ("int", "D"), ("int", "H"), ("int", "W"), ("int", "kd"),
        ("int", "kh"), ("int", "kw"), ("const float *", "dy"), ("const int *", "ptr_t"), ("const int *", "idx_t"),
        ("const float *", "wts_t"), ("float *", "dx"), ("int", "nthreads"))),
    "e2e_upconv_dw": ("int", (
        ("int", "N"), ("int", "I"), ("int", "O"), ("int", "D"), ("int", "H"), ("int", "W"), ("int", "kd"),
        ("int", "kh"), ("int", "kw"), ("const float *", "x"), ("const float *", "dy"), ("const int *", "ptr"),
        ("const int *", "idx"), ("double *", "dw"), ("int", "nthreads"))),
}

_CTYPES: dict[str, type | None] = {"void": None, "int": ctypes.c_int, "int64_t": ctypes.c_int64,
                                    "float": ctypes.c_float}
_INT_MAX = 2**31 - 1


def _ctype(spelling: str) -> type | None:
    return ctypes.c_void_p if spelling.endswith("*") else _CTYPES[spelling]


class PPLike(Protocol):
    """What the bindings read of a padded planar tensor (``napari_e2enet.inference.cpu.compact.PaddedPlanar``):
    its geometry and the float32 buffer holding ``PAD_FLOATS`` zeros, C·D·(H+2)·P floats and slack."""

    C: int
    D: int
    H: int
    W: int
    P: int
    buffer: torch.Tensor


TrainData: TypeAlias = torch.Tensor | Sequence[torch.Tensor]
"""A training kernel's (N, C, D, H, W) float32 data: one contiguous tensor, or several that stand
for their concatenation along the channels."""


def pp_slack(pitch: int, row_block: int = 8) -> int:
    """Floats a PP buffer needs after its last plane: a convolution tile reads ``row_block`` + 2
    rows from its first row and 16 floats past a row's end (default: enough for every build)."""
    return (row_block + 4) * pitch + 64


# (first, second) tap of each of the 12 bf16 pairs of e2e_sconv133_bf16 (kernels.h); 9: zero
_BF16_PAIRS = ((0, 3), (1, 4), (2, 5), (6, 9), (7, 9), (8, 9), (9, 0), (9, 1), (9, 2), (3, 6), (4, 7), (5, 8))


def bf16_weight_pairs(weights: torch.Tensor) -> torch.Tensor:
    """(nnz, 9) float32 taps → (nnz, 12) int32 bf16 pairs (round to nearest even) in the order
    ``e2e_sconv133_bf16`` reads them: the low 16 bits hold the pair's first tap."""
    bits = weights.detach().to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    bits = torch.cat([bits, torch.zeros_like(bits[:, :1])], dim=1)  # column 9: the zero tap
    first = bits[:, [a for a, _ in _BF16_PAIRS]]
    second = bits[:, [b for _, b in _BF16_PAIRS]]
    word = first | (second << 16)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()


# --------------------------------------------------------------------------------------------
# Checks (each raises ValueError naming the function and the argument)
# --------------------------------------------------------------------------------------------


def _tensor(fn: str, name: str, t: object, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> int:
    """Address of a contiguous CPU tensor of ``dtype`` (and ``shape``)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{fn}: {name} is on {t.device}, the kernels run on the CPU")
    if t.dtype != dtype:
        raise ValueError(f"{fn}: {name} must be {dtype}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous")
    return t.data_ptr()


def _channels_last(fn: str, name: str, t: object, shape: tuple[int, ...] | None = None, *,
                   bf16: bool = False) -> int:
    """Address of a float32 (or, with ``bf16``, float32 or bfloat16) 4-D channels_last CPU tensor
    (rows of C contiguous channels)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
    if t.device.type != "cpu" or t.dtype not in dtypes or t.dim() != 4:
        kinds = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{fn}: {name} must be a {kinds} 4-D CPU tensor, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{fn}: {name} must be channels_last (N, C, H, W) memory")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")
    return t.data_ptr()


def _norm(fn: str, norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
          channels: int) -> tuple[int | None, int | None, int | None]:
    """Addresses of a lazy norm's (a, b, s) vectors, or three NULLs."""
    if norm is None:
        return None, None, None
    a, b, s = norm
    return (_tensor(fn, "norm a", a, torch.float32, (channels,)), _tensor(fn, "norm b", b, torch.float32, (channels,)),
            _tensor(fn, "norm s", s, torch.float32, (channels,)))


def _pp(fn: str, name: str, x: PPLike, row_block: int, *, channels: int | None = None,
        dims: tuple[int | None, int | None, int | None] = (None, None, None)) -> int:
    """Address of a PP tensor's channel 0, plane 0, row 0 after checking its geometry and buffer."""
    c, d, h, w, p = (getattr(x, a, None) for a in ("C", "D", "H", "W", "P"))
    if not (isinstance(c, int) and isinstance(d, int) and isinstance(h, int) and isinstance(w, int)
            and isinstance(p, int)):
        raise ValueError(f"{fn}: {name} is not a padded planar tensor (C, D, H, W, P ints)")
    if min(d, h, w) < 1 or c < 0 or p % 16 or p < w + 1:
        raise ValueError(f"{fn}: {name} has an impossible PP geometry C={c} D={d} H={h} W={w} P={p}")
    if channels is not None and c != channels:
        raise ValueError(f"{fn}: {name} has {c} channels, expected {channels}")
    for axis, have, want in zip("DHW", (d, h, w), dims):
        if want is not None and have != want:
            raise ValueError(f"{fn}: {name} has {axis}={have}, expected {want}")
    buf = getattr(x, "buffer", None)
    if buf is None:
        raise ValueError(f"{fn}: {name} has no buffer (released to its pool)")
    need = PAD_FLOATS + c * d * (h + 2) * p + pp_slack(p, row_block)
    _tensor(fn, f"{name}.buffer", buf, torch.float32)
    if buf.dim() != 1 or buf.numel() < need:
        raise ValueError(f"{fn}: {name}.buffer holds {buf.numel()} floats, the layout needs a 1-D buffer of {need}")
    if buf.data_ptr() % ALIGN_BYTES:
        raise ValueError(f"{fn}: {name}.buffer is not {ALIGN_BYTES}-byte aligned")
    if max(c * d * (h + 2) * p, d * h * w) > 2**62 or max(c, d, h, w, p) > _INT_MAX:
        raise ValueError(f"{fn}: {name} is too large for the kernels' index types")
    return buf.data_ptr() + 4 * PAD_FLOATS


def _sparse_index(fn: str, ptr_name: str, ptr: torch.Tensor, idx_name: str, idx: torch.Tensor,
                  rows: int, bound: int) -> int:
    """Check a CSC/CSR structure: ``ptr`` (rows+1,) int32 from 0, non-decreasing, to nnz;
    ``idx`` (nnz,) int32 in [0, bound). Returns nnz. (NumPy views: a torch op per check would
    cost ~10 µs each, a tenth of a small kernel call.)"""
    _tensor(fn, ptr_name, ptr, torch.int32, (rows + 1,))
    _tensor(fn, idx_name, idx, torch.int32)
    p, i = ptr.numpy(), idx.numpy()
    nnz = i.size
    if i.ndim != 1 or p[0] != 0 or p[-1] != nnz or (p[1:] < p[:-1]).any():
        raise ValueError(f"{fn}: {ptr_name} must rise from 0 to len({idx_name}) = {nnz}")
    if nnz and (i.min() < 0 or i.max() >= bound):
        raise ValueError(f"{fn}: {idx_name} holds indices outside [0, {bound})")
    return nnz


def _threads(fn: str, threads: int) -> int:
    if not isinstance(threads, int) or not 1 <= threads <= 4096:
        raise ValueError(f"{fn}: threads must be an int in [1, 4096], got {threads!r}")
    return threads


# --------------------------------------------------------------------------------------------
# The library
# --------------------------------------------------------------------------------------------


class KernelLibrary:
    """One compiled and loaded kernel library (a :class:`build.Build`) with checked methods.

    Every method takes ``threads`` (OpenMP threads; ignored by a build without OpenMP) and
    releases the GIL while the C code runs.
    """

    def __init__(self, built: _build.Build) -> None:
        self.build = built
        self.path: Path = built.path
        self.family: str = built.family
        self.flags: tuple[str, ...] = built.flags
        self.openmp: bool = built.openmp
        try:
            lib = ctypes.CDLL(str(built.path))
        except OSError as exc:
            raise KernelBuildError(f"cannot load {built.path.name}: {exc}") from None
        for name, (restype, params) in SIGNATURES.items():
            try:
                func = getattr(lib, name)
            except AttributeError:
                raise KernelBuildError(f"{built.path.name} does not export {name}") from None
            func.restype = _ctype(restype)
            func.argtypes = [_ctype(t) for t, _ in params]
        version = lib.e2e_abi_version()
        if version != ABI_VERSION:
            raise KernelBuildError(f"{built.path.name} has kernel ABI {version}, these bindings need {ABI_VERSION}")
        self._lib = lib
        self.row_block: int = lib.e2e_row_block()
        # bf16 dot products: built in (AVX-512 family, a compiler that knows them) and run by this CPU
        self.bf16: bool = bool(lib.e2e_bf16_built()) and "avx512_bf16" in (_build.cpu_flags() or set())

    def describe(self) -> str:
        """One line: family, compiler, OpenMP."""
        return f"{self.family} kernels ({Path(self.build.compiler).name}, {'OpenMP' if self.openmp else 'one thread'})"

    # -- padded planar kernels ---------------------------------------------------------------
    def sconv133(self, *, chan: torch.Tensor, dshift: torch.Tensor, colptr: torch.Tensor, rowidx: torch.Tensor,
                 weights: torch.Tensor, out: PPLike, depth_range: tuple[int, int],
                 norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 stats: torch.Tensor | None = None, streaming: bool = False, threads: int = 1) -> None:
        """Sparse (1,3,3) convolution into ``out`` (see kernels.h). ``chan`` (I,) int64 input
        channel addresses (PP tensors shaped like ``out``), ``dshift`` (I,) int32 in {-1, 0, 1},
        CSC ``colptr`` (I+1,) / ``rowidx`` (nnz,) int32, ``weights`` (nnz, 9) float32, ``norm``
        (a, b, s) (I,) float32 each, ``stats`` (2·O,) float64 accumulated."""
        args = self._sconv_args("sconv133", chan, dshift, colptr, rowidx, weights, torch.float32, 9, out,
                                depth_range, norm, stats, streaming, threads)
        self._lib.e2e_sconv133(*args)

    def sconv133_bf16(self, *, chan: torch.Tensor, dshift: torch.Tensor, colptr: torch.Tensor,
                      rowidx: torch.Tensor, weight_pairs: torch.Tensor, out: PPLike, depth_range: tuple[int, int],
                      norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      stats: torch.Tensor | None = None, streaming: bool = False, threads: int = 1) -> None:
        """:meth:`sconv133` with bf16 products (fp32 sums): ``weight_pairs`` (nnz, 12) int32 from
        :func:`bf16_weight_pairs`. Only where :attr:`bf16` (else ``ValueError``)."""
        if not self.bf16:
            raise ValueError("sconv133_bf16: this library or CPU has no AVX512-BF16")
        args = self._sconv_args("sconv133_bf16", chan, dshift, colptr, rowidx, weight_pairs, torch.int32, 12, out,
                                depth_range, norm, stats, streaming, threads)
        if self._lib.e2e_sconv133_bf16(*args) != 0:
            raise ValueError("sconv133_bf16: not built into this library")

    def sconv133_up(self, *, chan: torch.Tensor, dshift: torch.Tensor, colptr: torch.Tensor, rowidx: torch.Tensor,
                    weights: torch.Tensor, out: PPLike, depth_range: tuple[int, int], up_first: int,
                    up_map: torch.Tensor, deep: PPLike, rowptr: torch.Tensor, colidx: torch.Tensor,
                    up_weights: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    deep_norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    stats: torch.Tensor | None = None, streaming: bool = False, threads: int = 1) -> None:
        """:meth:`sconv133` whose input channels ``up_first`` .. ``up_first + len(up_map)`` are the
        ConvTranspose3d (kernel == stride == 2) of ``deep`` (read through ``deep_norm``), computed in
        the kernel: channel ``up_first + c`` is output ``up_map[c]`` ((C,) int32, -1: no kernels read
        it) of the CSR ``rowptr`` / ``colidx`` / ``up_weights`` (nnz, 8). Their ``chan`` entries are
        not read. ``out`` W a multiple of 16, H and D twice ``deep``'s."""
        fn = "sconv133_up"
        u0 = int(up_first)
        _tensor(fn, "up_map", up_map, torch.int32)
        u1 = u0 + up_map.numel()
        if up_map.dim() != 1 or not isinstance(chan, torch.Tensor) or not 0 <= u0 <= u1 <= chan.numel():
            raise ValueError(f"{fn}: up channels [{u0}, {u1}) outside the input channels")
        args = self._sconv_args(fn, chan, dshift, colptr, rowidx, weights, torch.float32, 9, out, depth_range, norm,
                                stats, streaming, threads, computed=(u0, u1))
        read = colptr.numpy()[u0 + 1:u1 + 1] > colptr.numpy()[u0:u1]
        if (up_map.numpy()[read] < 0).any():  # the kernel would read zeros for them
            raise ValueError(f"{fn}: an up channel with active kernels has no ConvT output (up_map -1)")
        deep_base = _pp(fn, "deep", deep, self.row_block, dims=(out.D // 2, out.H // 2, out.W // 2))
        if out.W % 16 or out.D % 2 or out.H % 2:
            raise ValueError(f"{fn}: out must have W a multiple of 16 and even D and H, got {out.D, out.H, out.W}")
        outputs = int(rowptr.numel()) - 1
        nnz = _sparse_index(fn, "rowptr", rowptr, "colidx", colidx, outputs, deep.C)
        _tensor(fn, "up_weights", up_weights, torch.float32, (nnz, 8))
        used = up_map.numpy()
        if used.size and (used.min() < -1 or used.max() >= outputs):
            raise ValueError(f"{fn}: up_map holds indices outside [-1, {outputs})")
        da, db, ds = _norm(fn, deep_norm, deep.C)
        code = self._lib.e2e_sconv133_up(*args, u0, u1, up_map.data_ptr(), deep_base, deep.H, deep.P,
                                         deep.D * (deep.H + 2) * deep.P, da, db, ds, rowptr.data_ptr(),
                                         colidx.data_ptr(), up_weights.data_ptr())
        if code == 1:
            raise MemoryError(f"{fn}: the kernel could not allocate its up-sampling strips")
        if code != 0:
            raise ValueError(f"{fn}: the kernel refused the geometry (code {code})")

    def _sconv_args(self, fn: str, chan: torch.Tensor, dshift: torch.Tensor, colptr: torch.Tensor,
                    rowidx: torch.Tensor, weights: torch.Tensor, wdtype: torch.dtype, wcols: int, out: PPLike,
                    depth_range: tuple[int, int], norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                    stats: torch.Tensor | None, streaming: bool, threads: int,
                    computed: tuple[int, int] = (0, 0)) -> tuple[object, ...]:
        """The checked C arguments of the sparse (1,3,3) convolutions (they differ in the weights);
        the channels ``computed`` (first, end) are made in the kernel, their addresses not read."""
        i_count = chan.numel() if isinstance(chan, torch.Tensor) else -1
        _tensor(fn, "chan", chan, torch.int64, (i_count,))
        o_count = getattr(out, "C", -1)
        out_base = _pp(fn, "out", out, self.row_block)
        nnz = _sparse_index(fn, "colptr", colptr, "rowidx", rowidx, i_count, o_count)
        _tensor(fn, "weights", weights, wdtype, (nnz, wcols))
        _tensor(fn, "dshift", dshift, torch.int32, (i_count,))
        if i_count and np.abs(dshift.numpy()).max() > 1:
            raise ValueError(f"{fn}: dshift must be -1, 0 or 1 (the restricted depth shift)")
        p, addresses = colptr.numpy(), chan.numpy()
        active = p[1:] > p[:-1]
        active[computed[0]:computed[1]] = False
        read = addresses[active]  # the channels whose memory the kernel reads
        if (read == 0).any() or (read % ALIGN_BYTES).any():
            raise ValueError(f"{fn}: an input channel with active kernels has a null or unaligned address")
        d0, d1 = depth_range
        if not 0 <= d0 <= d1 <= out.D:
            raise ValueError(f"{fn}: depth range {depth_range} outside [0, {out.D}]")
        stats_ptr = None if stats is None else _tensor(fn, "stats", stats, torch.float64, (2 * o_count,))
        ia, ib, is_ = _norm(fn, norm, i_count)
        return (i_count, o_count, out.D, d0, d1, out.H, out.W, out.P, chan.data_ptr(), dshift.data_ptr(), ia, ib,
                is_, colptr.data_ptr(), rowidx.data_ptr(), weights.data_ptr(), out_base,
                out.D * (out.H + 2) * out.P, stats_ptr, int(bool(streaming)), _threads(fn, threads))

    def convt(self, *, x: PPLike, rowptr: torch.Tensor, colidx: torch.Tensor, weights: torch.Tensor,
              kernel: tuple[int, int, int], out: PPLike, depth_range: tuple[int, int] | None = None,
              norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              streaming: bool = False, threads: int = 1) -> None:
        """Sparse ConvTranspose3d, kernel == stride ∈ {1, 2}³, of input slices ``depth_range``
        of ``x`` into planes 0 .. kd·(hi - lo) of ``out``. CSR by output: ``rowptr`` (O+1,),
        ``colidx`` (nnz,) int32, ``weights`` (nnz, kd·kh·kw) float32."""
        fn = "convt"
        if len(kernel) != 3 or any(k not in (1, 2) for k in kernel):
            raise ValueError(f"{fn}: kernel must be 3 factors of 1 or 2, got {kernel}")
        kd, kh, kw = (int(k) for k in kernel)
        in_base = _pp(fn, "x", x, self.row_block)
        o_count = getattr(out, "C", -1)
        nnz = _sparse_index(fn, "rowptr", rowptr, "colidx", colidx, o_count, x.C)
        _tensor(fn, "weights", weights, torch.float32, (nnz, kd * kh * kw))
        lo, hi = depth_range if depth_range is not None else (0, x.D)
        if not 0 <= lo <= hi <= x.D:
            raise ValueError(f"{fn}: depth range {depth_range} outside the input's [0, {x.D}]")
        out_base = _pp(fn, "out", out, self.row_block, dims=(None, x.H * kh, x.W * kw))
        if kd * (hi - lo) > out.D:
            raise ValueError(f"{fn}: {kd * (hi - lo)} output planes do not fit out (D={out.D})")
        ia, ib, is_ = _norm(fn, norm, x.C)
        plane = (x.H + 2) * x.P
        self._lib.e2e_convt(x.C, o_count, hi - lo, x.H, x.W, x.P, kd, kh, kw, in_base + 4 * lo * plane,
                            x.D * plane, ia, ib, is_, rowptr.data_ptr(), colidx.data_ptr(), weights.data_ptr(),
                            out_base, out.P, out.D * (out.H + 2) * out.P, int(bool(streaming)),
                            _threads(fn, threads))

    def maxpool(self, *, x: PPLike, kernel: tuple[int, int, int], out: PPLike,
                norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, threads: int = 1) -> None:
        """MaxPool3d(kernel, stride=kernel) of x (read through ``norm``) into ``out``."""
        fn = "maxpool"
        if len(kernel) != 3 or any(not isinstance(k, int) or k < 1 for k in kernel):
            raise ValueError(f"{fn}: kernel must be 3 positive ints, got {kernel}")
        kd, kh, kw = kernel
        in_base = _pp(fn, "x", x, self.row_block)
        out_base = _pp(fn, "out", out, self.row_block, channels=x.C, dims=(x.D // kd, x.H // kh, x.W // kw))
        ia, ib, is_ = _norm(fn, norm, x.C)
        self._lib.e2e_maxpool(x.C, x.D, x.H, x.W, x.P, kd, kh, kw, in_base, x.D * (x.H + 2) * x.P, ia, ib, is_,
                              out_base, out.P, out.D * (out.H + 2) * out.P, _threads(fn, threads))

    def head(self, *, x: PPLike, weight: torch.Tensor, out: torch.Tensor,
             norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, threads: int = 1) -> None:
        """out (K, D, H, W) float32 contiguous = 1×1×1 conv (``weight`` (K, C) float32) of x."""
        fn = "head"
        base = _pp(fn, "x", x, self.row_block)
        k = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else -1
        _tensor(fn, "weight", weight, torch.float32, (k, x.C))
        _tensor(fn, "out", out, torch.float32, (k, x.D, x.H, x.W))
        ia, ib, is_ = _norm(fn, norm, x.C)
        self._lib.e2e_head(x.C, x.D, x.H, x.W, x.P, base, x.D * (x.H + 2) * x.P, ia, ib, is_, k,
                           weight.data_ptr(), out.data_ptr(), _threads(fn, threads))

    # -- channels-last kernels ---------------------------------------------------------------
    def cl_to_pp(self, *, x: torch.Tensor, out: PPLike, threads: int = 1) -> None:
        """A folded (D, C, H, W) channels_last float32 or bfloat16 tensor into the float32 PP tensor
        ``out`` (C, D, H, W)."""
        fn = "cl_to_pp"
        src = _channels_last(fn, "x", x, bf16=True)
        d, c, h, w = x.shape
        base = _pp(fn, "out", out, self.row_block, channels=c, dims=(d, h, w))
        self._lib.e2e_cl_to_pp(d, h, w, c, src, int(x.dtype == torch.bfloat16), base, out.P,
                               out.D * (out.H + 2) * out.P, _threads(fn, threads))

    def cl_shift(self, *, x: torch.Tensor, out: torch.Tensor, starts: torch.Tensor, deltas: torch.Tensor,
                 stride: int = 1, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                 slope: float = 1.0, threads: int = 1) -> None:
        """out[d, c] = f(x[stride·d + deltas[r], c]) for c in run r = [starts[r], starts[r+1])
        (zero outside x), f the affine ``scale``/``shift`` + LeakyReLU(``slope``) or identity.
        ``x`` and ``out`` float32 or bfloat16 each (computed in float32, rounded to nearest even)."""
        fn = "cl_shift"
        src = _channels_last(fn, "x", x, bf16=True)
        d_in, c, h, w = x.shape
        d_out = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() == 4 else -1
        dst = _channels_last(fn, "out", out, (d_out, c, h, w), bf16=True)
        runs = deltas.numel() if isinstance(deltas, torch.Tensor) else -1
        _tensor(fn, "deltas", deltas, torch.int32, (runs,))
        _tensor(fn, "starts", starts, torch.int32, (runs + 1,))
        st = starts.numpy()
        if st[0] != 0 or st[-1] != c or (st[1:] < st[:-1]).any():
            raise ValueError(f"{fn}: starts must rise from 0 to the channel count {c}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"{fn}: stride must be a positive int, got {stride!r}")
        if (scale is None) != (shift is None):
            raise ValueError(f"{fn}: scale and shift go together")
        sp = None if scale is None else _tensor(fn, "scale", scale, torch.float32, (c,))
        hp = None if shift is None else _tensor(fn, "shift", shift, torch.float32, (c,))
        self._lib.e2e_cl_shift(d_out, d_in, h * w, c, src, int(x.dtype == torch.bfloat16), dst,
                               int(out.dtype == torch.bfloat16), runs, starts.data_ptr(), deltas.data_ptr(),
                               stride, sp, hp, float(slope), _threads(fn, threads))

    def cl_stats(self, *, x: torch.Tensor, stats: torch.Tensor, threads: int = 1) -> None:
        """stats (2·C,) float64 = per-channel (sum, sum of squares) of a float32 or bfloat16
        channels_last tensor."""
        fn = "cl_stats"
        src = _channels_last(fn, "x", x, bf16=True)
        c = x.shape[1]
        _tensor(fn, "stats", stats, torch.float64, (2 * c,))
        self._lib.e2e_cl_stats(x.numel() // max(c, 1), c, src, int(x.dtype == torch.bfloat16), stats.data_ptr(),
                               _threads(fn, threads))

    def cl_norm_act(self, *, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, slope: float,
                    threads: int = 1) -> None:
        """In place on a channels_last float32 tensor: x = leaky_relu(x · scale[c] + shift[c], slope)."""
        fn = "cl_norm_act"
        src = _channels_last(fn, "x", x)
        c = x.shape[1]
        sp = _tensor(fn, "scale", scale, torch.float32, (c,))
        hp = _tensor(fn, "shift", shift, torch.float32, (c,))
        self._lib.e2e_cl_norm_act(x.numel() // max(c, 1), c, src, sp, hp, float(slope), _threads(fn, threads))

    # -- training kernels (kernels_train.c) ---------------------------------------------------
    def tconv_fwd(self, *, x: TrainData, ptr: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                  group: int, y: TrainData, ishift: torch.Tensor | None = None,
                  oshift: torch.Tensor | None = None, threads: int = 1) -> None:
        """Kernel-sparse (1,3,3) conv of a contiguous (N, I, D, H, W) float32 ``x`` into ``y``
        (N, O, D, H, W), see kernels.h: CSC by input within groups of ``group`` outputs, ``ptr``
        (ceil(O/group)·I + 1,) / ``idx`` (nnz,) int32 (output channels), ``weights`` (nnz, 9)
        float32, depth offsets ``ishift`` (I,) / ``oshift`` (O,) int32 in {-1, 0, 1} or None.
        ``x`` and ``y`` may each be a sequence of contiguous tensors that stand for their
        concatenation along the channels (which is never built)."""
        fn = "tconv_fwd"
        (n, i_count, o_count, d, h, w), xa, ya = _train_dims(fn, x, y)
        nnz = _group_index(fn, ptr, idx, i_count, o_count, group)
        _tensor(fn, "weights", weights, torch.float32, (nnz, 9))
        ish = _train_shift(fn, "ishift", ishift, i_count)
        osh = _train_shift(fn, "oshift", oshift, o_count)
        rc = self._lib.e2e_tconv_fwd(n, i_count, o_count, d, h, w, xa.data_ptr(), ish, group, ptr.data_ptr(),
                                     idx.data_ptr(), weights.data_ptr(), ya.data_ptr(), osh, _threads(fn, threads))
        if rc:
            raise MemoryError(f"{fn}: the kernel could not allocate its scratch planes")

    def tconv_dw(self, *, x: TrainData, dy: TrainData, ptr: torch.Tensor, idx: torch.Tensor, chunk: int,
                 dw: torch.Tensor, ishift: torch.Tensor | None = None, threads: int = 1) -> None:
        """Weight gradient of the active kernels of :meth:`tconv_fwd`'s conv: ``dw`` (nnz, 9)
        float64 (overwritten) from ``x`` (N, I, D, H, W) and ``dy`` (N, O, D, H, W) (either may be
        a sequence of tensors, as in :meth:`tconv_fwd`)."""
        fn = "tconv_dw"
        (n, i_count, o_count, d, h, w), xa, dya = _train_dims(fn, x, dy)
        nnz = _train_index(fn, ptr, idx, i_count, o_count, chunk)
        _tensor(fn, "dw", dw, torch.float64, (nnz, 9))
        ish = _train_shift(fn, "ishift", ishift, i_count)
        rc = self._lib.e2e_tconv_dw(n, i_count, o_count, d, h, w, xa.data_ptr(), ish, dya.data_ptr(), chunk,
                                    ptr.data_ptr(), idx.data_ptr(), dw.data_ptr(), _threads(fn, threads))
        if rc:
            raise MemoryError(f"{fn}: the kernel could not allocate its scratch planes")

    def upconv_fwd(self, *, x: torch.Tensor, kernel: tuple[int, int, int], ptr: torch.Tensor, idx: torch.Tensor,
                   weights: torch.Tensor, y: torch.Tensor, threads: int = 1) -> None:
        """Kernel-sparse ConvTranspose3d with kernel == stride (see kernels.h) of a contiguous
        (N, I, D, H, W) float32 ``x`` into ``y`` (N, O, D·kd, H·kh, W·kw): CSR ``ptr`` (O + 1,) /
        ``idx`` (nnz,) int32 of each output's active inputs, ``weights`` (nnz, kd·kh·kw) float32."""
        fn = "upconv_fwd"
        n, i_count, o_count, d, h, w, kd, kh, kw = _up_dims(fn, x, y, kernel)
        nnz = _sparse_index(fn, "ptr", ptr, "idx", idx, o_count, i_count)
        _tensor(fn, "weights", weights, torch.float32, (nnz, kd * kh * kw))
        rc = self._lib.e2e_upconv_fwd(n, i_count, o_count, d, h, w, kd, kh, kw, x.data_ptr(), ptr.data_ptr(),
                                      idx.data_ptr(), weights.data_ptr(), y.data_ptr(), _threads(fn, threads))
        if rc:
            raise MemoryError(f"{fn}: the kernel could not allocate its scratch rows")

    def upconv_dx(self, *, dy: torch.Tensor, kernel: tuple[int, int, int], ptr_t: torch.Tensor, idx_t: torch.Tensor,
                  weights_t: torch.Tensor, dx: torch.Tensor, threads: int = 1) -> None:
        """Input gradient of :meth:`upconv_fwd`: ``dx`` (N, I, D, H, W) from ``dy`` (N, O, D·kd,
        H·kh, W·kw) with the transposed CSR ``ptr_t`` (I + 1,) / ``idx_t`` (nnz,) and ``weights_t``."""
        fn = "upconv_dx"
        n, i_count, o_count, d, h, w, kd, kh, kw = _up_dims(fn, dx, dy, kernel)
        nnz = _sparse_index(fn, "ptr_t", ptr_t, "idx_t", idx_t, i_count, o_count)
        _tensor(fn, "weights_t", weights_t, torch.float32, (nnz, kd * kh * kw))
        rc = self._lib.e2e_upconv_dx(n, i_count, o_count, d, h, w, kd, kh, kw, dy.data_ptr(), ptr_t.data_ptr(),
                                     idx_t.data_ptr(), weights_t.data_ptr(), dx.data_ptr(), _threads(fn, threads))
        if rc:
            raise MemoryError(f"{fn}: the kernel could not allocate its scratch rows")

    def upconv_dw(self, *, x: torch.Tensor, dy: torch.Tensor, kernel: tuple[int, int, int], ptr: torch.Tensor,
                  idx: torch.Tensor, dw: torch.Tensor, threads: int = 1) -> None:
        """Weight gradient of :meth:`upconv_fwd`'s active kernels: ``dw`` (nnz, kd·kh·kw) float64
        (overwritten), in the order of ``ptr`` / ``idx``."""
        fn = "upconv_dw"
        n, i_count, o_count, d, h, w, kd, kh, kw = _up_dims(fn, x, dy, kernel)
        nnz = _sparse_index(fn, "ptr", ptr, "idx", idx, o_count, i_count)
        _tensor(fn, "dw", dw, torch.float64, (nnz, kd * kh * kw))
        rc = self._lib.e2e_upconv_dw(n, i_count, o_count, d, h, w, kd, kh, kw, x.data_ptr(), dy.data_ptr(),
                                     ptr.data_ptr(), idx.data_ptr(), dw.data_ptr(), _threads(fn, threads))
        if rc:
            raise MemoryError(f"{fn}: the kernel could not allocate its scratch rows")


def _up_dims(fn: str, x: object, y: object, kernel: object) -> tuple[int, int, int, int, int, int, int, int, int]:
    """(N, I, O, D, H, W, kd, kh, kw) of an up-conv kernel's low-res ``x`` and high-res ``y``."""
    if not (isinstance(kernel, tuple) and len(kernel) == 3 and all(isinstance(k, int) and k >= 1 for k in kernel)):
        raise ValueError(f"{fn}: kernel must be a tuple of 3 positive ints, got {kernel!r}")
    kd, kh, kw = kernel
    if kd * kh * kw > 8:
        raise ValueError(f"{fn}: kernel {kernel} has more than 8 taps")
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"{fn}: x must be a 5-D (N, C, D, H, W) tensor")
    _tensor(fn, "x", x, torch.float32)
    n, i_count, d, h, w = (int(v) for v in x.shape)
    o_count = y.shape[1] if isinstance(y, torch.Tensor) and y.dim() == 5 else -1
    _tensor(fn, "output", y, torch.float32, (n, o_count, d * kd, h * kh, w * kw))
    assert isinstance(y, torch.Tensor)  # _tensor refused anything else
    if min(n, i_count, o_count, d, h, w) < 1 or y.numel() > 2**62 or max(n * d, i_count, o_count, w * kw) > 2**20:
        raise ValueError(f"{fn}: unsupported shape x {tuple(x.shape)} -> {tuple(y.shape)}")
    if max(i_count, o_count) * 8 * (w + 8) > 2**31 - 1:
        raise ValueError(f"{fn}: one row of {tuple(x.shape)} is too large for the kernels' scratch index")
    return n, i_count, o_count, d, h, w, kd, kh, kw


def _channel_table(fn: str, name: str, data: object) -> tuple[tuple[int, ...], torch.Tensor]:
    """(N, C, D, H, W) and the (N·C,) int64 channel addresses (kernels.h) of a contiguous 5-D
    float32 tensor, or of the channel concatenation of a sequence of them (same N, D, H, W)."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    parts = [t for t in items if isinstance(t, torch.Tensor) and t.dim() == 5]
    if not parts or len(parts) != len(items):
        raise ValueError(f"{fn}: {name} must be a 5-D (N, C, D, H, W) tensor or a sequence of them")
    n, _, d, h, w = (int(v) for v in parts[0].shape)
    vol = d * h * w
    tables = []
    for t in parts:
        _tensor(fn, name, t, torch.float32, (n, int(t.shape[1]), d, h, w))
        c = int(t.shape[1])
        offsets = (torch.arange(n, dtype=torch.int64)[:, None] * c + torch.arange(c, dtype=torch.int64)) * (4 * vol)
        tables.append(offsets + t.data_ptr())
    return (n, sum(int(t.shape[1]) for t in parts), d, h, w), torch.cat(tables, dim=1).reshape(-1).contiguous()


def _train_dims(fn: str, x: object, y: object) -> tuple[tuple[int, int, int, int, int, int], torch.Tensor, torch.Tensor]:
    """(N, I, O, D, H, W) of a training kernel's float32 5-D input and output (tensors or sequences
    of contiguous tensors, see :func:`_channel_table`) and their channel address tables."""
    (n, i_count, d, h, w), xa = _channel_table(fn, "x", x)
    shape, ya = _channel_table(fn, "output", y)
    o_count = shape[1]
    if (shape[0], *shape[2:]) != (n, d, h, w):
        raise ValueError(f"{fn}: output must have shape {(n, o_count, d, h, w)}, got {shape}")
    if min(n, i_count, o_count, d, h, w) < 1 or max(n * i_count, n * o_count) * d * h * w > 2**62 or max(n * d, i_count, o_count) > 2**20:
        raise ValueError(f"{fn}: unsupported shape x {(n, i_count, d, h, w)} -> {shape}")
    if (i_count + 2) * (h + 6) * (w + 34) > 2**31 - 1:
        raise ValueError(f"{fn}: one slice of {(n, i_count, d, h, w)} is too large for the kernels' scratch index")
    return (n, i_count, o_count, d, h, w), xa, ya


def _grouped_index(fn: str, ptr: torch.Tensor, idx: torch.Tensor, *, rows: int, columns: int, size: int,
                   unit: str, column: str) -> int:
    """Check a grouped sparse structure (kernels.h) and return nnz: ``ptr`` over ceil(columns /
    size) groups × ``rows`` segments, segment (g, r) holding the ``idx`` (columns) of group g only."""
    if not isinstance(size, int) or not 1 <= size <= 2**20:
        raise ValueError(f"{fn}: {unit} must be a positive int, got {size!r}")
    groups = -(-columns // size)
    nnz = _sparse_index(fn, "ptr", ptr, "idx", idx, groups * rows, columns)
    segment = np.repeat(np.arange(groups * rows) // rows, np.diff(ptr.numpy()))
    if nnz and (idx.numpy() // size != segment).any():
        raise ValueError(f"{fn}: idx holds an {column} channel outside its {unit}'s range")
    return nnz


def _train_index(fn: str, ptr: torch.Tensor, idx: torch.Tensor, i_count: int, o_count: int, chunk: int) -> int:
    """Check a chunked CSR structure (by output, inputs in chunks of ``chunk``) and return nnz."""
    return _grouped_index(fn, ptr, idx, rows=o_count, columns=i_count, size=chunk, unit="chunk", column="input")


def _group_index(fn: str, ptr: torch.Tensor, idx: torch.Tensor, i_count: int, o_count: int, group: int) -> int:
    """Check a CSC-by-input structure within groups of ``group`` outputs and return nnz."""
    return _grouped_index(fn, ptr, idx, rows=i_count, columns=o_count, size=group, unit="group", column="output")


def _train_shift(fn: str, name: str, shift: torch.Tensor | None, channels: int) -> int | None:
    if shift is None:
        return None
    _tensor(fn, name, shift, torch.int32, (channels,))
    if np.abs(shift.numpy()).max() > 1:
        raise ValueError(f"{fn}: {name} must be -1, 0 or 1 (the restricted depth shift)")
    return shift.data_ptr()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load(family: str | None = None, *, compiler: str | None = None, cache_dir: Path | None = None,
         warnings_as_errors: bool = False, sanitize: bool = False, source_dir: Path = _build.SOURCE_DIR,
         openmp: bool | None = None) -> KernelLibrary:
    """Build (or take from the cache) and load the kernels of ``family``; ``None``: the fastest
    family this CPU runs whose build succeeds. ``openmp``: see :func:`build.build_library`.
    Raises :class:`KernelBuildError`."""
    families = (family,) if family is not None else _build.cpu_families()
    first: KernelBuildError | None = None
    for fam in families:
        try:
            built = _build.build_library(fam, compiler=compiler, cache_dir=cache_dir,
                                         warnings_as_errors=warnings_as_errors, sanitize=sanitize,
                                         source_dir=source_dir, openmp=openmp)
            return KernelLibrary(built)
        except KernelBuildError as exc:
            if _build.find_compiler(compiler) is None:
                raise
            first = first or exc
    assert first is not None
    raise first


@dataclass(frozen=True)
class _Best:
    library: KernelLibrary | None
    reason: str


_LOCK = threading.Lock()
_BEST: dict[tuple[str, ...], _Best] = {}


def best_library() -> tuple[KernelLibrary | None, str]:
    """The process's kernel library (built once per compiler and cache folder) and a one-line
    reason: how it was built, or why there is none ("no C compiler", "disabled by
    NAPARI_E2ENET_NO_KERNELS=1", "kernel build failed: ..."). Never raises."""
    if os.environ.get("NAPARI_E2ENET_NO_KERNELS", "") not in ("", "0"):
        return None, f"disabled by NAPARI_E2ENET_NO_KERNELS={os.environ['NAPARI_E2ENET_NO_KERNELS']}"
    key = (os.environ.get("CC", ""), str(_build.default_cache_dir()), os.environ.get("PATH", ""))
    with _LOCK:
        if key not in _BEST:
            _BEST[key] = _find_best()
        best = _BEST[key]
    return best.library, best.reason


def _find_best() -> _Best:
    if _build.find_compiler() is None:
        return _Best(None, "no C compiler (set $CC or install gcc or clang)")
    try:
        lib = load()
    except KernelBuildError as exc:
        return _Best(None, f"kernel build failed: {exc}")
    except OSError as exc:  # e.g. a cache folder that cannot be created
        return _Best(None, f"kernel build failed: {exc.strerror or exc}")
    return _Best(lib, lib.describe())
