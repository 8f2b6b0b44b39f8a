"""``accelerate(model)``: the fastest equivalent inference module for a (sparse) E2ENet on CPU.

The returned module maps (N, in_channels, D, H, W) → full-resolution logits
(N, num_classes, D, H, W) float32, like ``model.eval()(x)``; fp32 agrees with it to ≤ 1e-4 max abs
logit difference. It is built once from the weights and masks (later changes to ``model`` are not
seen) and runs under ``torch.no_grad``.

Why a second forward: the model's own 3-D convolutions, InstanceNorm, depth shift and ``cat``
run at a fraction of oneDNN's speed on CPU, and they cannot skip pruned kernels. Here every
(1, kh, kw) conv is a 2-D oneDNN conv on folded (D, C, H, W) channels_last features with the
shift, norm and concat folded into the copies around it (backend ``dense``), and at a masked
density below 0.5 the fusion decoder runs in the C kernels of :mod:`napari_e2enet.inference.cpu`
(backend ``sparse-avx512`` / ``sparse-avx2`` / ``sparse-generic``, by CPU). The module says which
backend it runs and why (:func:`backend_info`). Measurements, the memory plan and the rejected
alternatives are in ``docs/cpu-fast-path.md``.

Unsupported configurations (kernel depth ≠ 1, e.g. ``e2enet_k333``; non-InstanceNorm or
non-LeakyReLU units) fall back to an evaluated copy of the model itself.

The fusion decoder's wiring is not re-derived here: both backends run the model's own
``E2ENet.fusion_plan()`` (which node reads which values, with which up/down sampling and which
masked modules), the same plan the model's forward runs.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..models.fusion import FusionStep, last_reads
from ..sparse.compact import effective_mask
from .cpu.bindings import PAD_FLOATS
from .cpu.build import cpu_flags
from .cpu.compact import (
    BufferPool,
    ComputedUp,
    CSCConv,
    CSRConvT,
    Kernels,
    LazyNorm,
    PaddedPlanar,
    conv_csc,
    convt_csr,
    depth_offsets,
    kernel_status,
)

__all__ = ["AcceleratedE2ENet", "BackendUnavailable", "MeasuredE2ENet", "accelerate", "accelerate_measured", "backend_info", "bf16_native", "borrow_outputs",
           "offered_precisions", "precision_passed"]

Triple = tuple[int, int, int]
_CL = torch.channels_last
_STREAM_BYTES = 16 << 20  # outputs larger than this are written with streaming stores
# pooled dense conv outputs are computed this many bytes at a time (one level-0 slice at 48 × 128²):
# with 32 MiB pieces the C heap kept ~58 MiB more between calls (1521 vs 1463 MiB resident at
# 128³, S = 0.9, 1 thread), in the same time within the noise (8.37 vs 8.38 s)
_CONV_PIECE_BYTES = 4 << 20
SPARSE_DENSITY_THRESHOLD = 0.5  # mean masked-layer density below which "auto" picks the kernels


def bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16 on x86, or an Arm CPU
    with BF16 dot products). Elsewhere oneDNN emulates bf16 and it is usually not faster."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & (cpu_flags() or set()))


# --------------------------------------------------------------------------------------------
# Copy helpers on folded (D, C, H, W) channels_last tensors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """Buffer channels [b0, b1) take source channels [s0, s0 + b1 - b0) of ``part`` read at depth
    d + delta (zero outside)."""

    b0: int
    b1: int
    part: str
    s0: int
    delta: int


def _runs(active: list[int], part_of: Callable[[int], tuple[str, int]], deltas: torch.Tensor) -> list[_Run]:
    """Group the active concat channels into maximal runs of one part, one delta, consecutive
    source indices."""
    runs: list[_Run] = []
    for b, c in enumerate(active):
        part, s = part_of(c)
        delta = int(deltas[c])
        last = runs[-1] if runs else None
        if last and last.part == part and last.delta == delta and last.b1 == b and last.s0 + (b - last.b0) == s:
            runs[-1] = _Run(last.b0, b + 1, part, last.s0, delta)
        else:
            runs.append(_Run(b, b + 1, part, s, delta))
    return runs


def _depth_range(d_out: int, d_in: int, delta: int, stride: int = 1) -> tuple[int, int]:
    """Output depths [lo, hi) whose source depth stride·d + delta lies in [0, d_in)."""
    lo = max(0, -(delta // stride))
    hi = min(d_out, (d_in - 1 - delta) // stride + 1)
    return lo, max(lo, hi)


def _copy_shifted(dst: torch.Tensor, src: torch.Tensor, run: _Run, stride: int = 1) -> None:
    """dst[d, b0:b1] = src[stride·d + delta, s0:s0+n] (zero outside); (D, C, H, W) tensors."""
    n = run.b1 - run.b0
    d_out, d_in = dst.shape[0], src.shape[0]
    lo, hi = _depth_range(d_out, d_in, run.delta, stride)
    target = dst[:, run.b0:run.b1]
    if hi > lo:
        first = stride * lo + run.delta
        last = stride * (hi - 1) + run.delta
        target[lo:hi].copy_(src[first:last + 1:stride, run.s0:run.s0 + n])
    if lo > 0:
        target[:lo].zero_()
    if hi < d_out:
        target[hi:].zero_()


def _to_folded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C, D, H, W) → (D, C, H, W) channels_last."""
    return x.permute(1, 0, 2, 3).to(dtype).contiguous(memory_format=_CL)


# --------------------------------------------------------------------------------------------
# Dense (oneDNN) pieces
# --------------------------------------------------------------------------------------------


@dataclass
class _DenseUnit:
    """Depth shift (runs) → conv2d (no bias) → instance norm → LeakyReLU, on folded tensors."""

    weight: torch.Tensor  # (O, I_active, kh, kw) channels_last, compute dtype
    stride: Triple
    padding: tuple[int, int]
    gamma: torch.Tensor  # (O,) float32
    beta: torch.Tensor
    eps: float
    slope: float
    runs: list[_Run]  # input gather: part "x"
    identity_input: bool  # the input can be used as is (no shift, nothing dropped, depth stride 1)
    in_channels: int  # channels of the unit's input before compaction
    kernels: Kernels | None = None

    def __post_init__(self) -> None:
        # the C shift kernel copies channel c to channel c: usable when nothing was compacted away
        full = sum(r.b1 - r.b0 for r in self.runs) == self.weight.shape[1] == self.in_channels
        self.same_channels = full and all(r.s0 == r.b0 for r in self.runs)
        self.run_table = torch.tensor([[r.b0, r.b1, r.delta] for r in self.runs], dtype=torch.int32)

    def _fast(self, x: torch.Tensor) -> bool:
        """Whether the C kernels build this unit's input from x (float32 or bfloat16 either side)."""
        return self.kernels is not None and self.same_channels and x.dtype in (torch.float32, torch.bfloat16)

    def pooled_input(self, x: torch.Tensor, pool: BufferPool | None) -> bool:
        """Whether :meth:`input` (or :meth:`input_from_raw`) of x builds its result in ``pool``
        (the caller then gives it back once the conv has read it)."""
        return pool is not None and not self.identity_input and self._fast(x)

    def input(self, x: torch.Tensor, pool: BufferPool | None = None) -> torch.Tensor:
        """The conv's input: x depth-shifted (and depth-strided, channel-compacted); built in
        ``pool`` where :meth:`pooled_input` says so."""
        if self.identity_input:
            return x
        sd = self.stride[0]
        d_out = (x.shape[0] - 1) // sd + 1
        if self._fast(x):
            dtype = self.weight.dtype  # what the conv reads: a bf16 unit's input is rounded here
            out = _pooled_cl(pool, (d_out, x.shape[1], x.shape[2], x.shape[3]), dtype) if pool is not None else None
            return self.kernels.cl_shift(x, self.run_table, d_out, sd, out=out, dtype=dtype)  # type: ignore[union-attr]
        with torch.profiler.record_function("e2e_shift_copy"):
            buf = torch.empty((d_out, self.weight.shape[1], x.shape[2], x.shape[3]), dtype=x.dtype,
                              memory_format=_CL)
            for run in self.runs:
                _copy_shifted(buf, x, run, sd)
            return buf

    def input_from_raw(self, raw: _Raw, pool: BufferPool | None = None) -> torch.Tensor:
        """The conv's input built from a raw predecessor: its norm + activation fused into the
        shift copy (C kernel; requires :meth:`_fast`), in ``pool`` if given."""
        sd = self.stride[0]
        d, c, h, w = raw.y.shape
        d_out = (d - 1) // sd + 1
        dtype = self.weight.dtype
        out = _pooled_cl(pool, (d_out, c, h, w), dtype) if pool is not None else None
        return self.kernels.cl_shift(raw.y, self.run_table, d_out, sd, raw.scale, raw.shift,  # type: ignore[union-attr]
                                     raw.slope, out=out, dtype=dtype)

    def pools_output(self, xin: torch.Tensor, pool: BufferPool | None) -> bool:
        """Whether :meth:`conv` of xin writes its output into ``pool`` (float32 only)."""
        return pool is not None and xin.dtype == torch.float32 and self.weight.dtype == torch.float32

    def output_shape(self, xin: torch.Tensor) -> tuple[int, int, int, int]:
        """(D, O, H', W') of :meth:`conv` of xin."""
        d, _, h, w = xin.shape
        (kh, kw), (sh, sw), (ph, pw) = self.weight.shape[2:], self.stride[1:], self.padding
        return d, self.weight.shape[0], (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def conv_in_place(self, xin: torch.Tensor) -> bool:
        """Whether :meth:`conv` may write its output over xin (pass ``into=xin``): same shape and
        layout, and output slice d reads input slice d only (the depth shift is in xin already),
        so a piece is computed before it is written over its own input."""
        return (xin.dtype == torch.float32 and xin.is_contiguous(memory_format=_CL)
                and self.output_shape(xin) == tuple(xin.shape))

    def conv(self, xin: torch.Tensor, pool: BufferPool | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """The raw conv output (D, O, H', W') channels_last. With ``pool`` (float32) it is written
        into a buffer of the pool a few slices at a time (the caller gives it back): oneDNN has no
        output argument, and the whole output allocated by PyTorch at full resolution (384 MiB
        at 48 × 128³) would sit next to the arena at the encoder's peak. ``into=xin`` (see
        :meth:`conv_in_place`) writes it over its own input instead: at level 0 of the paper
        network that is one 384 MiB buffer less at the encoder's peak, where the arena's planner
        placed three side by side (1152 → 1021 MiB at 128³)."""
        if pool is None or not self.pools_output(xin, pool):  # pools_output is False for None too
            y = F.conv2d(xin, self.weight, None, self.stride[1:], self.padding)
            return y if y.is_contiguous(memory_format=_CL) else y.contiguous(memory_format=_CL)
        d, o, ho, wo = self.output_shape(xin)
        out = into if into is not None else _pooled_cl(pool, (d, o, ho, wo))
        step = max(1, _CONV_PIECE_BYTES // max(1, 4 * self.weight.shape[0] * ho * wo))
        for d0 in range(0, d, step):
            out[d0:d0 + step].copy_(F.conv2d(xin[d0:d0 + step], self.weight, None, self.stride[1:], self.padding))
        return out

    def norm_act(self, y: torch.Tensor) -> torch.Tensor:
        return _instance_norm_act(y, self.gamma, self.beta, self.eps, self.slope, self.kernels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_act(self.conv(self.input(x)))


@dataclass
class _Raw:
    """A conv output whose InstanceNorm + LeakyReLU has not been applied yet (folded, float32 or
    bfloat16: the C kernels read both)."""

    y: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    slope: float
    pooled: bool = False  # y is a buffer of the fast path's pool: give it back once read


def _run_units(units: list[_DenseUnit], xin: torch.Tensor, *, lazy_last: bool = False,
               pool: BufferPool | None = None, xin_pooled: bool = False) -> torch.Tensor | _Raw:
    """Apply a chain of conv units to the first unit's (already shifted) input ``xin``. Where
    the C kernels allow, a unit's norm + activation is fused into the copy that builds the next
    unit's shifted input (one pass instead of two); with ``lazy_last`` the last unit's output is
    returned raw with its affine (:class:`_Raw`) for the consumer to fuse as well. With ``pool``
    the shifted inputs are built in the pool's arena and given back after their conv
    (``xin_pooled``: the first one came from it too)."""
    for idx, unit in enumerate(units):
        nxt = units[idx + 1] if idx + 1 < len(units) else None
        # conv outputs go to the pool only where they are read back through the kernels (the
        # next unit's shifted copy, or a raw result the caller converts and gives back)
        raw_path = unit.kernels is not None and (nxt is not None or lazy_last)
        conv_in = xin.to(unit.weight.dtype)
        y_pooled = raw_path and unit.pools_output(conv_in, pool)
        # a pooled input read by this conv only can take its output (the buffer passes to y)
        in_place = y_pooled and xin_pooled and conv_in is xin and unit.conv_in_place(xin)
        y = unit.conv(conv_in, pool if y_pooled else None, into=xin if in_place else None)
        del conv_in
        if xin_pooled and not in_place:
            pool.give(xin)  # type: ignore[union-attr]
        if nxt is None and lazy_last and unit.kernels is not None:  # float32 or bf16 (the kernels read both)
            scale, shift = _affine(y, unit.gamma, unit.beta, unit.eps, unit.kernels)
            return _Raw(y, scale, shift, unit.slope, pooled=y_pooled)
        if nxt is not None and nxt._fast(y) and unit.kernels is not None:
            scale, shift = _affine(y, unit.gamma, unit.beta, unit.eps, unit.kernels)
            xin_pooled = pool is not None
            xin = nxt.input_from_raw(_Raw(y, scale, shift, unit.slope), pool)
        else:
            y = unit.norm_act(y)  # in place for a float32 channels_last y with kernels
            if nxt is None:  # not pooled: a pooled last output was returned raw above
                return y
            xin_pooled = nxt.pooled_input(y, pool)
            xin = nxt.input(y, pool if xin_pooled else None)
        # drop this unit's output before the next conv allocates its own: at 48 × 128³ that
        # is 384 MiB less at the encoder's peak
        if y_pooled:
            pool.give(y)  # type: ignore[union-attr]
        del y
    raise ValueError("_run_units needs at least one unit")


def _stage_input(first: _DenseUnit, h: torch.Tensor | _Raw,
                 pool: BufferPool | None = None) -> tuple[torch.Tensor, bool]:
    """The shifted input of a stage's first unit from the previous stage's output, and whether
    it was built in ``pool``."""
    if isinstance(h, _Raw):
        if first._fast(h.y):
            return first.input_from_raw(h, pool), pool is not None
        h = _apply_raw(h)
    h = h.to(first.weight.dtype)
    pooled = first.pooled_input(h, pool)
    return first.input(h, pool if pooled else None), pooled


def _pooled_cl(pool: BufferPool, shape: tuple[int, int, int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (D, C, H, W) float32 or bfloat16 channels_last tensor on a buffer of ``pool`` (give it
    back with ``pool.give``; its data pointer is the buffer's)."""
    d, c, h, w = shape
    n = d * c * h * w
    if dtype == torch.bfloat16:  # half as many floats, viewed as bf16 pairs
        return pool.take((n + 1) // 2).view(torch.bfloat16)[:n].view(d, h, w, c).permute(0, 3, 1, 2)
    return pool.take(n).view(d, h, w, c).permute(0, 3, 1, 2)


def _apply_raw(raw: _Raw) -> torch.Tensor:
    """The normalised, activated tensor of a :class:`_Raw` (PyTorch ops)."""
    c = raw.y.shape[1]
    return F.leaky_relu(raw.y * raw.scale.view(1, c, 1, 1) + raw.shift.view(1, c, 1, 1), raw.slope)


def _affine(y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
            kernels: Kernels) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance-norm (scale, shift) per channel of a float32 folded tensor, statistics in double."""
    c = y.shape[1]
    n = y.numel() // c
    stats = kernels.cl_stats(y)
    mean = stats[:c] / n
    var = (stats[c:] / n - mean * mean).clamp_min_(0.0)
    scale = gamma.double() / torch.sqrt(var + eps)
    return scale.float(), (beta.double() - mean * scale).float()


def _instance_norm_act(y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, slope: float,
                       kernels: Kernels | None) -> torch.Tensor:
    """InstanceNorm (affine) + LeakyReLU of one sample's folded (D, C, H, W) channels_last tensor,
    statistics over all D·H·W voxels. ``batch_norm(training=True)`` would do it in one fused op
    but its single-pass float statistics are off by ~1e-3 at 128³; here: per-channel sums in double
    (C kernel) or cascade-summed float (PyTorch), then one affine + activation pass."""
    if not y.is_contiguous(memory_format=_CL):
        y = y.contiguous(memory_format=_CL)
    c = y.shape[1]
    n = y.numel() // c
    if kernels is not None and y.dtype == torch.float32:
        scale, shift = _affine(y, gamma, beta, eps, kernels)
        kernels.cl_norm_act(y, scale, shift, slope)
        return y
    if y.dtype == torch.float32:
        rows = y.permute(0, 2, 3, 1).reshape(n, c)
        mean = rows.sum(0, dtype=torch.float64) / n
        var = ((rows * rows).sum(0, dtype=torch.float64) / n - mean * mean).clamp_min_(0.0)
        y = F.batch_norm(y, mean.float(), var.float(), gamma, beta, False, 0.0, eps)
    else:  # bf16: the fused op (its statistics are accumulated in float)
        y = F.batch_norm(y, None, None, gamma, beta, True, 0.0, eps)
    return F.leaky_relu_(y, slope)


def _norm_act_params(unit: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float, float] | None:
    norm, act = getattr(unit, "norm", None), getattr(unit, "act", None)
    if not isinstance(norm, nn.InstanceNorm3d) or not isinstance(act, nn.LeakyReLU):
        return None
    if norm.track_running_stats:
        return None
    c = unit.conv.out_channels
    gamma = norm.weight.detach().float().clone() if norm.affine else torch.ones(c)
    beta = norm.bias.detach().float().clone() if norm.affine else torch.zeros(c)
    return gamma, beta, float(norm.eps), float(act.negative_slope)


def _shift_enabled(unit: nn.Module) -> bool:
    return not isinstance(unit.shift, nn.Identity)


def _dense_unit(unit: nn.Module, dtype: torch.dtype, *, compact: bool) -> _DenseUnit:
    conv: nn.Conv3d = unit.conv
    weight = conv.weight.detach().float()[:, :, 0]  # (O, I, kh, kw)
    in_ch = weight.shape[1]
    mask = getattr(conv, "kernel_mask", None)
    active_in = list(range(in_ch))
    if compact:
        used = effective_mask(weight, mask).any(0)
        if bool(used.any()) and not bool(used.all()):
            active_in = used.nonzero().flatten().tolist()
    deltas = depth_offsets(in_ch, _shift_enabled(unit))
    runs = _runs(active_in, lambda c: ("x", c), deltas)
    stride = tuple(int(s) for s in conv.stride)
    identity = (len(active_in) == in_ch and not bool(deltas.any()) and stride[0] == 1)
    gamma, beta, eps, slope = _norm_act_params(unit)  # type: ignore[misc]
    return _DenseUnit(
        weight=weight[:, active_in].to(dtype).contiguous(memory_format=_CL).clone(),  # own copy
        stride=stride,  # type: ignore[arg-type]
        padding=(int(conv.padding[1]), int(conv.padding[2])),
        gamma=gamma, beta=beta, eps=eps, slope=slope, runs=runs, identity_input=identity, in_channels=in_ch,
    )


@dataclass
class _DenseNode:
    """A fusion node on oneDNN: input = shifted [forward | ConvT(up) | MaxPool(down)] (active
    channels only), then its conv units."""

    level: int
    up_weight: torch.Tensor  # (C_up_in, K · n_up) for the ConvT matmul, compute dtype
    n_up: int  # active up channels
    up_kernel: Triple
    down_pool: Triple | None
    runs: list[_Run]
    in_active: int
    first: _DenseUnit  # its runs are unused (the node builds the input)
    rest: list[_DenseUnit] = field(default_factory=list)

    def build_input(self, fwd: torch.Tensor, deeper: torch.Tensor, shallower: torch.Tensor | None) -> torch.Tensor:
        d, _, h, w = fwd.shape
        buf = torch.empty((d, self.in_active, h, w), dtype=fwd.dtype, memory_format=_CL)
        up7 = None
        if self.n_up:
            kd, kh, kw = self.up_kernel
            dl, cu, hl, wl = deeper.shape
            y = deeper.permute(0, 2, 3, 1).reshape(dl * hl * wl, cu) @ self.up_weight
            up7 = y.view(dl, hl, wl, kd, kh, kw, self.n_up)
        pooled = None
        if shallower is not None and self.down_pool is not None and any(r.part == "down" for r in self.runs):
            _, ph, pw = self.down_pool
            pooled = F.max_pool2d(shallower, (ph, pw), (ph, pw)) if (ph, pw) != (1, 1) else shallower
        for run in self.runs:
            if run.part == "forward":
                _copy_shifted(buf, fwd, run)
            elif run.part == "up":
                self._write_up(buf, up7, run)
            else:
                self._write_down(buf, pooled, run)
        return buf

    def _write_up(self, buf: torch.Tensor, up7: torch.Tensor, run: _Run) -> None:
        kd, kh, kw = self.up_kernel
        dl, hl, wl = up7.shape[:3]
        n = run.b1 - run.b0
        # buf (D, C, H, W) channels_last is (D, H, W, C) in memory; split D, H, W by the kernel
        target7 = buf.permute(0, 2, 3, 1).view(dl, kd, hl, kh, wl, kw, buf.shape[1])[..., run.b0:run.b1]
        for t in range(kd):
            src_phase, q = (t + run.delta) % kd, (t + run.delta) // kd
            target = target7[:, t]  # (Dl, Hl, kh, Wl, kw, n)
            source = up7[:, :, :, src_phase, :, :, run.s0:run.s0 + n].permute(0, 1, 3, 2, 4, 5)
            lo, hi = max(0, -q), min(dl, dl - q)
            if hi > lo:
                target[lo:hi].copy_(source[lo + q:hi + q])
            if lo > 0:
                target[:lo].zero_()
            if hi < dl:
                target[max(hi, lo):].zero_()

    def _write_down(self, buf: torch.Tensor, pooled: torch.Tensor, run: _Run) -> None:
        kd = self.down_pool[0]  # type: ignore[index]
        n = run.b1 - run.b0
        d_out = buf.shape[0]
        lo, hi = _depth_range(d_out, pooled.shape[0] // kd, run.delta)
        target = buf[:, run.b0:run.b1]
        if hi > lo:
            src = pooled[:, run.s0:run.s0 + n]
            first = kd * (lo + run.delta)
            if kd == 1:
                target[lo:hi].copy_(src[first:first + (hi - lo)])
            else:
                stop = first + kd * (hi - lo)
                torch.maximum(src[first:stop:kd], src[first + 1:stop:kd], out=target[lo:hi])
                for a in range(2, kd):
                    torch.maximum(target[lo:hi], src[first + a:stop:kd], out=target[lo:hi])
        if lo > 0:
            target[:lo].zero_()
        if hi < d_out:
            target[hi:].zero_()

    def __call__(self, fwd: torch.Tensor, deeper: torch.Tensor, shallower: torch.Tensor | None) -> torch.Tensor:
        return _run_units([self.first, *self.rest], self.build_input(fwd, deeper, shallower))


def _concat_parts(step: FusionStep) -> Callable[[int], tuple[str, int]]:
    """Concat channel → (direction, channel within it), from the model's own slices."""
    slices = sorted((lo, hi, part) for part, (lo, hi) in step.info.inputs.items())

    def part_of(ch: int) -> tuple[str, int]:
        for lo, hi, part in slices:
            if lo <= ch < hi:
                return part, ch - lo
        raise ValueError(f"fusion node {step.key}: concat channel {ch} is in no input slice")

    return part_of


def _check_step(step: FusionStep, decoder: nn.Module) -> None:
    """What this forward relies on beyond the plan: the concatenation is [forward | up | down]
    back to back (the kernels' channel pointer table is laid out so), up-sampling is a
    ConvTranspose3d with stride = kernel, and the modules agree with the plan."""
    order = [part for part in ("forward", "up", "down") if part in step.info.inputs]
    if list(step.info.inputs) != order or (step.shallower is not None) != ("down" in step.info.inputs):
        raise NotImplementedError(f"fusion node {step.key}: inputs {step.info.inputs} are not [forward | up | down]")
    stops = [0] + [step.info.inputs[part][1] for part in order]
    if any(step.info.inputs[part][0] != stops[n] for n, part in enumerate(order)):
        raise NotImplementedError(f"fusion node {step.key}: input slices {step.info.inputs} are not contiguous")
    up: nn.ConvTranspose3d = decoder.get_submodule(step.up)
    if tuple(int(s) for s in up.stride) != tuple(int(k) for k in up.kernel_size) or \
            tuple(int(k) for k in up.kernel_size) != tuple(step.up_kernel):
        raise NotImplementedError(f"fusion node {step.key}: ConvTranspose3d with stride != kernel")


def _dense_node(decoder: nn.Module, step: FusionStep, dtype: torch.dtype) -> _DenseNode:
    _check_step(step, decoder)
    first_unit = decoder.get_submodule(step.fuse[0])
    w = first_unit.conv.weight.detach().float()[:, :, 0]
    in_ch = w.shape[1]
    used = effective_mask(w, getattr(first_unit.conv, "kernel_mask", None)).any(0)
    if not bool(used.any()):
        used[:1] = True  # keep one (all-zero) channel so the conv has an input
    active = used.nonzero().flatten().tolist()
    deltas = depth_offsets(in_ch, _shift_enabled(first_unit))
    up_lo, up_hi = step.info.inputs["up"]
    up_idx = [ch - up_lo for ch in active if up_lo <= ch < up_hi]
    # the up part's compact source index is its position among the active up channels
    pos = {u: k for k, u in enumerate(up_idx)}
    base = _concat_parts(step)

    def part_of(ch: int) -> tuple[str, int]:
        part, s = base(ch)
        return (part, pos[s]) if part == "up" else (part, s)

    runs = _runs(active, part_of, deltas)
    first = _dense_unit(first_unit, dtype, compact=False)
    first.weight = w[:, active].to(dtype).contiguous(memory_format=_CL).clone()
    up: nn.ConvTranspose3d = decoder.get_submodule(step.up)
    wt = up.weight.detach().float()  # (Cu, C, kd, kh, kw)
    up_mask = getattr(up, "kernel_mask", None)
    if up_mask is not None:
        wt = wt * up_mask[..., None, None, None].to(wt.dtype)
    kernel = tuple(step.up_kernel)
    wsel = wt[:, up_idx]  # (Cu, n_up, kd, kh, kw)
    up_weight = wsel.permute(0, 2, 3, 4, 1).reshape(wt.shape[0], -1).to(dtype).contiguous().clone()
    rest = [_dense_unit(decoder.get_submodule(path), dtype, compact=True) for path in step.fuse[1:]]
    return _DenseNode(level=step.info.level, up_weight=up_weight, n_up=len(up_idx), up_kernel=kernel,  # type: ignore[arg-type]
                      down_pool=step.down_pool,
                      runs=runs, in_active=len(active), first=first, rest=rest)


# --------------------------------------------------------------------------------------------
# Sparse (C kernel) pieces
# --------------------------------------------------------------------------------------------


@dataclass
class _Act:
    """A decoder activation in PP layout: raw values plus how to read them (None: as stored)."""

    t: PaddedPlanar
    norm: LazyNorm | None

    def release(self) -> None:
        self.t.release()


@dataclass
class _SparseUnit:
    conv: CSCConv
    dshift: torch.Tensor  # (I,) int32
    gamma: torch.Tensor
    beta: torch.Tensor
    eps: float
    slope: float

    def run(self, k: Kernels, channel_ptrs: torch.Tensor | Iterator[tuple[int, int, torch.Tensor]],
            norm: LazyNorm | None, like: PaddedPlanar, pool: BufferPool,
            out: PaddedPlanar | None = None, up: ComputedUp | None = None) -> _Act:
        """Raw conv output + the lazy InstanceNorm/LeakyReLU its consumers apply on load.
        ``channel_ptrs``: the input channels' addresses, or depth pieces (d0, d1, addresses) that
        together cover all output slices (an input computed piece by piece, see _SparseNode).
        ``out``: where to write (default: a new tensor shaped like ``like``, from ``pool``).
        ``up``: input channels the kernel computes from a deeper tensor (see _SparseNode)."""
        o = self.conv.out_channels
        out = out if out is not None else PaddedPlanar(o, like.D, like.H, like.W, pool=pool)
        stats = torch.zeros(2 * o, dtype=torch.float64)
        pieces = [(0, like.D, channel_ptrs)] if isinstance(channel_ptrs, torch.Tensor) else channel_ptrs
        for d0, d1, ptrs in pieces:
            k.sconv133(self.conv, ptrs, self.dshift, out, stats, norm=norm,
                       streaming=out.cstride * o * 4 > _STREAM_BYTES, depth_range=(d0, d1), up=up)
        n = like.D * like.H * like.W
        mean = stats[:o] / n
        var = (stats[o:] / n - mean * mean).clamp_min_(0.0)
        scale = self.gamma.double() / torch.sqrt(var + self.eps)
        shift = self.beta.double() - mean * scale
        return _Act(out, LazyNorm(scale.float(), shift.float(), torch.full((o,), self.slope)))


def _sparse_unit(unit: nn.Module, bf16: bool) -> _SparseUnit:
    gamma, beta, eps, slope = _norm_act_params(unit)  # type: ignore[misc]
    if not 0.0 <= slope <= 1.0:
        raise NotImplementedError("LeakyReLU slope outside [0, 1]")
    conv = unit.conv
    csc = conv_csc(conv.weight, getattr(conv, "kernel_mask", None))
    return _SparseUnit(csc.in_bf16() if bf16 else csc,
                       depth_offsets(conv.in_channels, _shift_enabled(unit)), gamma, beta, eps, slope)


class _Headroom:
    """A front for the pool whose buffers keep ``extra`` floats of headroom before them, so a
    fusion node can lay its output on its forward input's memory ``L`` planes lower (see
    :func:`_inplace_output`). PaddedPlanar takes and gives through it like through the pool."""

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.extra = 0  # floats of headroom for the next take
        self._owner: dict[int, tuple[torch.Tensor, int]] = {}  # view address -> (pool buffer, offset)

    def take(self, n: int) -> torch.Tensor:
        owner = self.pool.take(n + self.extra)
        view = owner[self.extra:]
        self._owner[view.data_ptr()] = (owner, self.extra)
        return view

    def give(self, view: torch.Tensor) -> None:
        owner, _ = self._owner.pop(view.data_ptr())
        self.pool.give(owner)

    def forget(self) -> None:
        self._owner.clear()

    def room(self, pp: PaddedPlanar) -> int:
        """Floats of headroom before ``pp``'s buffer (0 for a buffer not taken here)."""
        mine = cast(object, pp.pool) is self and pp.buffer is not None
        found = self._owner.get(pp.buffer.data_ptr()) if mine else None
        return found[1] if found is not None else 0

    def lower(self, pp: PaddedPlanar, floats: int) -> PaddedPlanar:
        """A PP tensor shaped like ``pp`` on the same pool buffer, ``floats`` lower (≤ its room),
        with zeroed pad floats before it; it owns the buffer from then on (``pp`` must not be
        released: see :meth:`disown`)."""
        owner, offset = self._owner[pp.buffer.data_ptr()]
        view = owner[offset - floats:]
        view[:PAD_FLOATS].zero_()
        out = PaddedPlanar.__new__(PaddedPlanar)  # no allocation: a second view of the buffer
        out.C, out.D, out.H, out.W, out.P = pp.C, pp.D, pp.H, pp.W, pp.P
        out.buffer, out.pool = view, cast(BufferPool, self)
        self._owner[view.data_ptr()] = (owner, offset - floats)
        return out

    def disown(self, pp: PaddedPlanar) -> None:
        """``pp`` gave its buffer to a tensor made by :meth:`lower`: releasing it is a no-op now."""
        self._owner.pop(pp.buffer.data_ptr(), None)
        pp.pool, pp.buffer = None, None


def _read_norm(act: _Act) -> LazyNorm:
    return act.norm if act.norm is not None else LazyNorm.identity(act.t.C)


@dataclass
class _SparseNode:
    level: int
    channels: int
    up: CSRConvT  # only the up channels the fusion conv reads
    up_map: torch.Tensor  # (C,) int64: up channel → index in the computed up tensor, -1 unused
    down_pool: Triple | None
    units: list[_SparseUnit]

    def __call__(self, k: Kernels, fwd: _Act, deeper: _Act, shallower: _Act | None, pool: BufferPool, *,
                 last_reader_of_deeper: bool = False, last_reader_of_fwd: bool = False) -> _Act:
        """The node's output. The caller says which inputs this node reads last: ``deeper`` is
        then released once up-sampled and ``fwd`` after the first unit, so fewer
        full-resolution buffers are live at once."""
        if self._computes_up(deeper.t):
            return self._fused(k, fwd, deeper, shallower, pool, last_reader_of_deeper=last_reader_of_deeper,
                               last_reader_of_fwd=last_reader_of_fwd)
        kd, kh, kw = self.up.kernel
        d = deeper.t
        depth = d.D * kd
        # The up-sampled input is computed in depth pieces just before the conv reads them, so
        # only a piece of it is held (at level 0 of the paper network: 20 of 128 slices, 70 MiB
        # instead of 440 MiB at 48 × 128³). A piece of output slices [d0, d1) reads up slices
        # d0 - 1 .. d1 (depth shift), i.e. low-resolution slices (d0 - 1) // kd .. d1 // kd:
        # those at the pieces' borders are computed twice (20 up slices per 16 output slices: the
        # ConvT, ~1/10 of the node's work at S = 0.9, does 25 % more).
        step = _up_piece_depth(self.up.out_channels, depth, d.H * kh, d.W * kw, kd)
        bounds = [(d0, min(depth, d0 + step)) for d0 in range(0, depth, step)]

        def needed(d0: int, d1: int) -> tuple[int, int]:
            return max(0, (d0 - 1) // kd), min(d.D, d1 // kd + 1)

        span = max(hi - lo for lo, hi in (needed(*b) for b in bounds))

        def low_range(d0: int, d1: int) -> tuple[int, int]:
            # every piece fills all planes of the buffer: the kernel reads the left neighbour of a
            # channel's first voxel from the previous channel's last plane (a zero halo value)
            lo = min(needed(d0, d1)[0], d.D - span)
            return lo, lo + span

        planes = kd * span
        up = PaddedPlanar(max(1, self.up.out_channels), planes, d.H * kh, d.W * kw, pool=pool)
        up_offsets = torch.where(self.up_map >= 0, self.up_map.clamp_min(0) * (4 * up.cstride),
                                 torch.zeros((), dtype=torch.int64))
        plane_bytes = 4 * (up.H + 2) * up.P
        # the up channels' addresses are a placeholder, replaced per piece below
        channel_ptrs, norm, down, up_at = self._inputs(k, fwd, up_offsets, shallower, pool)
        # where the forward input is read last, the output is laid on its memory (level 0: one
        # full-resolution buffer less at the arena's peak); see _inplace_output
        inplace = _inplace_output(fwd, self.units[0], bounds, pool) if last_reader_of_fwd else None

        def pieces() -> Iterator[tuple[int, int, torch.Tensor]]:
            for d0, d1 in bounds:
                if inplace is not None and d0 == inplace.staged_from:  # read the copy from here on
                    channel_ptrs[:up_at] = inplace.staged_ptrs
                lo, hi = low_range(d0, d1)
                if self.up.out_channels:
                    k.convt(self.up, d, up, norm=deeper.norm, depth_range=(lo, hi),
                            streaming=up.cstride * up.C * 4 > _STREAM_BYTES)
                # the piece's plane 0 is full-resolution slice kd·lo: point "slice 0" before it
                base = up.base - kd * lo * plane_bytes
                channel_ptrs[up_at:up_at + self.channels] = torch.where(
                    self.up_map >= 0, base + up_offsets, torch.zeros((), dtype=torch.int64))
                yield d0, d1, channel_ptrs

        y = self.units[0].run(k, pieces(), norm, fwd.t, pool, out=inplace.out if inplace is not None else None)
        if inplace is not None:
            inplace.finish(fwd)
        up.release()
        return self._finish(k, y, fwd, deeper, down, pool, last_reader_of_deeper=last_reader_of_deeper,
                            last_reader_of_fwd=last_reader_of_fwd)

    def _inputs(self, k: Kernels, fwd: _Act, up_ptrs: torch.Tensor, shallower: _Act | None,
                pool: BufferPool) -> tuple[torch.Tensor, LazyNorm | None, PaddedPlanar | None, int]:
        """The first fusion conv's inputs in concatenation order (forward, up, pooled shallower):
        their addresses, their lazy norm, the pooled input (to release) and the first up channel."""
        ptrs = [fwd.t.channel_ptrs(), up_ptrs]
        norms = [_read_norm(fwd), LazyNorm.identity(self.channels)]
        down = self._down_input(k, shallower, pool)
        if down is not None:
            ptrs.append(down.channel_ptrs())
            norms.append(LazyNorm.identity(down.C))
        norm = LazyNorm.cat(norms) if fwd.norm is not None else None
        return torch.cat(ptrs), norm, down, len(ptrs[0])

    def _computes_up(self, deep: PaddedPlanar) -> bool:
        """Whether the first fusion conv computes the up-sampled channels itself (e2e_sconv133_up):
        a (2, 2, 2) ConvT, fp32 weights, a width the kernel's rows take, and an up-sampled input
        large enough to cost a trip through memory."""
        return (self.up.kernel == (2, 2, 2) and self.up.out_channels > 0 and self.units[0].conv.weight_pairs is None
                and (2 * deep.W) % 16 == 0
                and 4 * self.up.out_channels * 8 * deep.D * deep.H * deep.W >= _COMPUTED_UP_BYTES)

    def _fused(self, k: Kernels, fwd: _Act, deeper: _Act, shallower: _Act | None, pool: BufferPool, *,
               last_reader_of_deeper: bool, last_reader_of_fwd: bool) -> _Act:
        """__call__ with the up-sampled channels computed inside the first fusion conv, row block by
        row block, from ``deeper`` (never stored: at level 0 of the paper network the ConvT wrote
        ~2.9 GB a forward that the conv read back)."""
        channel_ptrs, norm, down, up_at = self._inputs(k, fwd, torch.zeros(self.channels, dtype=torch.int64),
                                                       shallower, pool)
        up = ComputedUp(up_at, self.up_map.to(torch.int32), self.up, deeper.t, deeper.norm)
        depth = fwd.t.D
        step = _up_piece_depth(self.up.out_channels, depth, fwd.t.H, fwd.t.W, 2)
        bounds = [(d0, min(depth, d0 + step)) for d0 in range(0, depth, step)]
        inplace = _inplace_output(fwd, self.units[0], bounds, pool) if last_reader_of_fwd else None

        def pieces() -> Iterator[tuple[int, int, torch.Tensor]]:
            for d0, d1 in bounds:
                if inplace is not None and d0 == inplace.staged_from:  # read the copy from here on
                    channel_ptrs[:up_at] = inplace.staged_ptrs
                yield d0, d1, channel_ptrs

        y = self.units[0].run(k, pieces(), norm, fwd.t, pool, out=inplace.out if inplace is not None else None,
                              up=up)
        if inplace is not None:
            inplace.finish(fwd)
        return self._finish(k, y, fwd, deeper, down, pool, last_reader_of_deeper=last_reader_of_deeper,
                            last_reader_of_fwd=last_reader_of_fwd)

    def _finish(self, k: Kernels, y: _Act, fwd: _Act, deeper: _Act, down: PaddedPlanar | None, pool: BufferPool, *,
                last_reader_of_deeper: bool, last_reader_of_fwd: bool) -> _Act:
        """Release the inputs this node read last, then run the node's other units."""
        if last_reader_of_deeper:
            deeper.release()
        if down is not None:
            down.release()
        if last_reader_of_fwd:
            fwd.release()
        for unit in self.units[1:]:
            nxt = unit.run(k, y.t.channel_ptrs(), y.norm, y.t, pool)
            y.release()
            y = nxt
        return y


    def _down_input(self, k: Kernels, shallower: _Act | None, pool: BufferPool) -> PaddedPlanar | None:
        """The max-pooled shallower input (None where the node has none)."""
        if shallower is None or self.down_pool is None:
            return None
        pd, ph, pw = self.down_pool
        sh = shallower.t
        down = PaddedPlanar(sh.C, sh.D // pd, sh.H // ph, sh.W // pw, pool=pool)
        k.maxpool(sh, self.down_pool, down, norm=shallower.norm)
        return down


@dataclass
class _InPlace:
    """A node output laid on its forward input's memory (see :func:`_inplace_output`)."""

    out: PaddedPlanar  # the output, ``lift`` planes below the input
    staging: PaddedPlanar  # a copy of the input's top planes, from slice ``first``
    staged_from: int  # the first depth piece that reads the copy
    staged_ptrs: torch.Tensor  # (C,) its channel addresses, "slice 0" placed before it
    room: _Headroom

    def finish(self, fwd: _Act) -> None:
        """After the last piece: drop the copy, and the input's claim on the memory."""
        self.staging.release()
        self.room.disown(fwd.t)


def _inplace_output(fwd: _Act, unit: _SparseUnit, bounds: list[tuple[int, int]],
                    pool: BufferPool) -> _InPlace | None:
    """Lay the first unit's output on its (last-read) forward input's memory, ``lift`` = piece + 1
    planes lower: output (c, d) lands on input (c, d - lift), which no later piece reads (a
    piece [d0, d1) reads input slices d0 - 1 .. d1), so pieces run in the usual order (the same
    sums, the same statistics) and write straight into place. Outputs d < lift land on the top
    ``lift`` planes of channel c - 1 (for c = 0 on the buffer's headroom, see :class:`_Headroom`),
    which the last pieces still read: those read a copy of the input's top planes taken first
    (33 of 128 slices at 128³). At 48 × 128³ that is 113 MiB instead of a second 439 MiB buffer.
    None where it does not apply (no headroom, other channel counts, too few pieces)."""
    t = fwd.t
    room = t.pool
    if not isinstance(room, _Headroom) or unit.conv.out_channels != t.C or len(bounds) < 3:
        return None
    lift = max(d1 - d0 for d0, d1 in bounds) + 1
    plane = (t.H + 2) * t.P
    if room.room(t) < lift * plane:
        return None
    staged_from = min(d0 for d0, d1 in bounds if d1 >= t.D - lift)
    first = max(0, staged_from - 1)
    if 2 * (t.D - first) > t.D or staged_from < lift:
        return None
    staging = PaddedPlanar(t.C, t.D - first, t.H, t.W, pool=pool)
    staging.planes.copy_(t.planes[:, first:])
    staged_ptrs = staging.channel_ptrs() - 4 * first * plane
    return _InPlace(room.lower(t, lift * plane), staging, staged_from, staged_ptrs, room)


_UP_PIECE_BYTES = 96 << 20  # up-sampled inputs larger than this are computed in depth pieces
_COMPUTED_UP_BYTES = 128 << 20  # up-sampled inputs at least this large are computed inside the fusion conv


def _pp_pitch(width: int) -> int:
    """The PP row pitch of ``width`` (PaddedPlanar.P: W + 1 rounded up to 16); sizes headroom only:
    _inplace_output checks the room against the tensor's own P."""
    return (width + 1 + 15) // 16 * 16
_UP_PIECE_DEPTH = 16  # output slices per piece


def _up_piece_depth(channels: int, depth: int, height: int, width: int, kd: int) -> int:
    """Output slices per piece of a node's up-sampled input (``depth``: all of them at once)."""
    if 4 * channels * depth * height * width <= _UP_PIECE_BYTES:
        return depth
    return max(kd, _UP_PIECE_DEPTH // kd * kd)


def _sparse_node(decoder: nn.Module, step: FusionStep, bf16: bool) -> _SparseNode:
    """``bf16``: the (1,3,3) convs with bf16 products (AVX512-BF16); the up convs stay fp32."""
    _check_step(step, decoder)
    units = [_sparse_unit(decoder.get_submodule(path), bf16) for path in step.fuse]
    first_conv = units[0].conv
    # up channels the first fusion conv reads: CSC columns of the up slice with entries
    up_lo, up_hi = step.info.inputs["up"]
    counts = (first_conv.colptr[1:] - first_conv.colptr[:-1])[up_lo:up_hi]
    used = (counts > 0).nonzero().flatten()
    up_map = torch.full((up_hi - up_lo,), -1, dtype=torch.int64)
    up_map[used] = torch.arange(used.numel())
    up: nn.ConvTranspose3d = decoder.get_submodule(step.up)
    w = up.weight.detach().float()[:, used]
    mask = getattr(up, "kernel_mask", None)
    csr = convt_csr(w, mask[:, used] if mask is not None else None)
    return _SparseNode(step.info.level, up_hi - up_lo, csr, up_map, step.down_pool, units)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


class AcceleratedE2ENet(nn.Module):
    """Inference-only E2ENet; see the module docstring. ``backend`` is "sparse" or "dense",
    ``precision`` "fp32" or "bf16" (the dense oneDNN convs, and with AVX512-BF16 the sparse
    (1,3,3) fusion convs: bf16 products, fp32 sums; the up convs, head and norms stay fp32).

    ``borrow_output`` (default False; see :func:`borrow_outputs`): the sparse backend returns the
    logits of a one-sample call in its buffer arena, which the next call overwrites, instead of a
    fresh tensor (128 MiB at 16 × 128³ less at the whole-volume peak, where a sliding window
    blends them into its cells before the next tile). For callers that are done with the logits
    before they call again; the values are the same."""

    def __init__(self, model: nn.Module, precision: str, backend: str, kernels: Kernels | None,
                 reason: str = "") -> None:
        super().__init__()
        cfg = model.config
        self.config = cfg
        self.precision = precision
        self.backend = backend
        # what the Predictor, `predict --json` and napari report: sparse-<family> or dense, and why
        self.backend_name = f"sparse-{kernels.family}" if backend == "sparse" and kernels is not None else "dense"
        self._kernels = kernels
        self._dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        # bf16 where the CPU has its dot products: the fusion convs too (e2e_sconv133_bf16)
        self.sparse_bf16 = precision == "bf16" and kernels is not None and kernels.bf16
        self.backend_reason = reason
        if backend == "sparse" and precision == "bf16":
            self.backend_reason += ("; bf16 fusion convs (AVX512-BF16)" if self.sparse_bf16
                                    else "; fp32 fusion convs (no AVX512-BF16 kernels)")
        self._divisor = cfg.divisor()
        self._encoder = [[_dense_unit(u, self._dtype, compact=False) for u in stage]
                         for stage in model.backbone.stages]
        # bf16: the first conv (raw intensities in, cheap) and the head (logits out) stay fp32
        first = _dense_unit(model.backbone.stages[0][0], torch.float32, compact=False)
        # oneDNN returns a contiguous (not channels_last) output for a 1-channel input, which then
        # costs a full copy; a zero second input channel keeps everything channels_last
        self._pad_input = first.weight.shape[1] == 1 and first.identity_input
        if self._pad_input:
            first.weight = torch.cat([first.weight, torch.zeros_like(first.weight)], 1).contiguous(memory_format=_CL)
        self._encoder[0][0] = first
        # the fusion wiring is the model's own (E2ENet.fusion_plan), not re-derived here
        self._plan: tuple[FusionStep, ...] = tuple(model.fusion_plan())
        # Sparse: stage by stage, deepest node first. Node i is then the last reader of its
        # deeper input (nodes i + 1 and i + 2 read it as forward and down input before), and
        # node 0 of its forward input, so each input is released as soon as it is consumed (one
        # full-resolution buffer less at the peak: 440 MiB at 48 × 128³). Nodes of one stage are
        # independent: same result as the model's order.
        self._sparse_order = tuple(sorted(self._plan, key=lambda s: (s.info.stage, -s.info.level)))
        self._last_reads = {"dense": last_reads(self._plan), "sparse": last_reads(self._sparse_order)}
        heads_at = [s.position for s in self._plan if s.output and s.info.level == 0]
        if len(heads_at) != 1:
            raise NotImplementedError("the fusion plan has no single level-0 output for the head")
        self._final: tuple[int, int] = heads_at[0]
        self._dense_nodes: dict[str, _DenseNode] = {}
        self._sparse_nodes: dict[str, _SparseNode] = {}
        for step in self._plan:
            if backend == "sparse":
                self._sparse_nodes[step.key] = _sparse_node(model.decoder, step, self.sparse_bf16)
            else:
                self._dense_nodes[step.key] = _dense_node(model.decoder, step, self._dtype)
        for unit in self._dense_units():
            unit.kernels = kernels
        head = model.heads[0].weight.detach().float()  # (K, C0, 1, 1, 1)
        self._head = head.reshape(head.shape[0], head.shape[1]).clone()
        self._head_folded = head[:, :, 0].contiguous(memory_format=_CL).clone()
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._compiled_encoder: Callable[[torch.Tensor], Any] | None = None
        self._pool = BufferPool()
        self._room = _Headroom(self._pool)
        self.borrow_output = False  # see the class docstring
        # the full-resolution nodes that can each lay their output one depth piece lower
        self._level0_nodes = sum(1 for s in self._plan if s.info.level == 0)
        self._last_shape: tuple[int, ...] = ()

    def _encoder_units(self) -> list[_DenseUnit]:
        return [u for stage in self._encoder for u in stage]

    def _dense_units(self) -> list[_DenseUnit]:
        units = self._encoder_units()
        for node in self._dense_nodes.values():
            units += [node.first, *node.rest]
        return units

    def release_memory(self) -> None:
        """Free the buffers kept between calls (they are reused while the patch shape repeats)."""
        self._pool.clear()
        self._last_shape = ()

    def extra_repr(self) -> str:
        return f"backend={self.backend_name!r}, precision={self.precision!r}"

    # -- pieces -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, lazy: bool = False,
               finish: Callable[[torch.Tensor | _Raw], Any] | None = None) -> list[Any]:
        """One sample (C, D, H, W) → the L backbone features, folded (D_i, C_i, H_i, W_i)
        channels_last; with ``lazy`` (fp32 with kernels) as :class:`_Raw` (norm not yet applied).
        ``finish`` (the sparse decoder's conversion) is applied to each feature as soon as the
        next stage has read it, and the shifted stage inputs are then built in the arena."""
        h: torch.Tensor | _Raw | None = _to_folded(x, torch.float32)
        if self._pad_input:
            d, _, hh, ww = h.shape  # type: ignore[union-attr]
            padded = torch.zeros((d, hh, ww, 2)).permute(0, 3, 1, 2)  # channels_last
            padded[:, :1] = h
            h = padded
        pool = self._pool if finish is not None else None
        feats: list[Any] = []
        for stage in self._encoder:
            if finish is None:
                # the stage input is passed without a reference here, so _run_units frees it
                # after its first conv (at level 1: 384 MiB at 48 × 128³)
                h = _run_units(stage, _stage_input(stage[0], h)[0], lazy_last=lazy)
            else:
                # the shifted input is built in the arena, then the previous output (also
                # feats[-1]) is converted and dropped before this stage's convs allocate theirs:
                # the level-0 output (384 MiB at 48 × 128³) is never held next to them
                xin, pooled = _stage_input(stage[0], h, pool)
                h = None
                if feats:
                    feats[-1] = finish(feats[-1])
                h = _run_units(stage, xin, lazy_last=lazy, pool=pool, xin_pooled=pooled)
                del xin
            feats.append(h)
        h = None
        if finish is not None:
            feats[-1] = finish(feats[-1])
        return feats

    def _encode_eager(self, x: torch.Tensor) -> list[torch.Tensor | _Raw]:
        return self.encode(x)

    def _decode_dense(self, feats: list[torch.Tensor]) -> torch.Tensor:
        values: dict[tuple[int, int], torch.Tensor] = {(i, 0): f for i, f in enumerate(feats)}
        drops = self._last_reads["dense"]
        for step in self._plan:
            y = self._dense_nodes[step.key](values[step.forward], values[step.deeper],
                                            values[step.shallower] if step.shallower is not None else None)
            for src in drops[step.key]:
                del values[src]
            values[step.position] = y
        x0 = values.pop(self._final)  # (D, C0, H, W)
        logits = F.conv2d(x0.float(), self._head_folded)  # (D, K, H, W) channels_last
        return logits.permute(1, 0, 2, 3).float().contiguous()

    def _decode_sparse(self, feats: list[torch.Tensor]) -> torch.Tensor:
        k, pool = self._kernels, self._pool
        assert k is not None
        values: dict[tuple[int, int], _Act] = {}
        for i in range(len(feats)):
            values[(i, 0)] = self._to_act(feats[i])
            feats[i] = None  # free the folded copy early
        drops = self._last_reads["sparse"]
        for step in self._sparse_order:
            done = drops[step.key]
            # the node releases its last-read forward input after its first unit and its
            # last-read deeper input once up-sampled; the rest is released after it (idempotent)
            y = self._sparse_nodes[step.key](
                k, values[step.forward], values[step.deeper],
                values[step.shallower] if step.shallower is not None else None, pool,
                last_reader_of_deeper=step.deeper in done, last_reader_of_fwd=step.forward in done)
            for src in done:
                values.pop(src).release()
            values[step.position] = y
        for act in values.values():
            if act is not values.get(self._final):
                act.release()  # none left in an E2ENet plan: every value is read
        x0 = values.pop(self._final)
        shape = (self._head.shape[0], x0.t.D, x0.t.H, x0.t.W)
        if self.borrow_output:  # in the arena, never given back: valid until the next call
            out = pool.take(shape[0] * shape[1] * shape[2] * shape[3]).view(shape)
        else:
            out = torch.empty(shape, dtype=torch.float32)
        k.head(x0.t, self._head, out, norm=x0.norm)
        x0.release()
        return out

    def _to_act(self, f: torch.Tensor | _Raw | _Act) -> _Act:
        """A backbone feature in the sparse decoder's PP layout (in the arena)."""
        if isinstance(f, _Act):
            return f
        k = self._kernels
        assert k is not None
        y = f.y if isinstance(f, _Raw) else f
        d, _, h, w = y.shape
        pool = self._pool
        if (d, h, w) == self._last_shape:  # full resolution: headroom for the level-0 nodes' lift
            pool = cast(BufferPool, self._room)
            self._room.extra = self._level0_nodes * (_UP_PIECE_DEPTH + 1) * (h + 2) * _pp_pitch(w)
        if isinstance(f, _Raw):  # raw conv output: the decoder applies its norm on load
            norm = LazyNorm(f.scale, f.shift, torch.full((f.y.shape[1],), f.slope))
            act = _Act(k.cl_to_pp(f.y, pool), norm)
            if f.pooled:
                self._pool.give(f.y)
            return act
        return _Act(k.cl_to_pp(f.contiguous(memory_format=_CL), pool), None)  # float32 or bf16

    def forward_one(self, x: torch.Tensor) -> torch.Tensor:
        """One sample (C_in, D, H, W) → logits (K, D, H, W) float32."""
        if self.backend == "sparse":
            if self._compiled_encoder is not None:
                return self._decode_sparse(self._compiled_encoder(x))
            return self._decode_sparse(self.encode(x, lazy=True, finish=self._to_act))
        return self._decode_dense(self.encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected (N, {self.config.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % d for s, d in zip(x.shape[2:], self._divisor, strict=True)):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not a multiple of {self._divisor}")
        if tuple(x.shape[2:]) != self._last_shape:  # keep buffers for one patch shape only
            self._pool.clear()
            self._last_shape = tuple(x.shape[2:])
        fn = self._compiled or self.forward_one
        with torch.no_grad():
            x = x.float() if x.dtype != torch.float32 else x
            outs = []
            for n in range(x.shape[0]):
                out = self._call_planned(fn, x[n])
                # borrowed logits are copied before the next sample's call overwrites them
                outs.append(out.clone() if self.borrow_output and n + 1 < x.shape[0] else out)
        return torch.stack(outs) if len(outs) > 1 else outs[0].unsqueeze(0)

    def _call_planned(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """One sample through ``fn`` with the buffer pool's call boundaries (see BufferPool)."""
        self._pool.begin()
        self._room.forget()  # views left by a call that raised
        try:
            out = fn(x)
        except BaseException:
            self._pool.end(completed=False)
            raise
        self._pool.end()
        return out


class _Fallback(nn.Module):
    """An evaluated copy of a model this module cannot accelerate."""

    def __init__(self, model: nn.Module, reason: str) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.backend = "fallback"
        self.reason = reason
        self.backend_name = "dense"
        self.backend_reason = f"the PyTorch model as is ({reason})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


def borrow_outputs(net: nn.Module, on: bool = True) -> None:
    """Let ``net`` (an :class:`AcceleratedE2ENet`, or each candidate of a :class:`MeasuredE2ENet`)
    return one-sample logits in its arena, valid until its next call (see AcceleratedE2ENet); other
    modules are left as they are."""
    for module in net.candidates if isinstance(net, MeasuredE2ENet) else [net]:
        if isinstance(module, AcceleratedE2ENet):
            module.borrow_output = on


def _unsupported(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "backbone") or not hasattr(model, "decoder") or \
            not hasattr(model, "fusion_plan"):
        return "not an E2ENet"
    if cfg.kernel[0] != 1:
        return f"kernel {cfg.kernel} has depth > 1"
    plan = model.fusion_plan()
    try:
        for step in plan:
            _check_step(step, model.decoder)
    except NotImplementedError as exc:
        return str(exc)
    if sum(1 for step in plan if step.output and step.info.level == 0) != 1:
        return "the fusion plan has no single level-0 output for the head"
    units = [u for stage in model.backbone.stages for u in stage]
    units += [u for node in model.decoder.nodes.values() for u in node.fuse]
    if any(_norm_act_params(u) is None for u in units):
        return "units other than InstanceNorm3d (no running stats) + LeakyReLU"
    return None


def _sparse_unsupported(model: nn.Module) -> str | None:
    """Why the C kernels cannot run this model (None if they can)."""
    cfg = model.config
    if tuple(cfg.kernel) != (1, 3, 3):
        return f"the kernels implement (1,3,3) convolutions, not {tuple(cfg.kernel)}"
    if any(p not in (1, 2) for pool in cfg.pools for p in pool):
        return f"the kernels implement pools with factors 1 or 2, not {cfg.pools}"
    slopes = [float(u.act.negative_slope) for node in model.decoder.nodes.values() for u in node.fuse]
    if any(not 0.0 <= s <= 1.0 for s in slopes):
        return "LeakyReLU slopes outside [0, 1]"
    return None


def _masked_density(model: nn.Module) -> float:
    total = active = 0
    for mw in model.maskable():
        m = effective_mask(mw.weight, mw.module.kernel_mask)
        total += m.numel()
        active += int(m.sum())
    return active / total if total else 1.0


class BackendUnavailable(InputError, RuntimeError):
    """A backend asked for by name cannot run here (no kernels, an unsupported model): one line,
    which the CLI reports with exit code 2 and napari as a notification, not a traceback."""


def accelerate(model: nn.Module, precision: str = "fp32", *, compile: bool = False,
               backend: str = "auto") -> nn.Module:
    """The fastest equivalent inference module for an E2ENet (see the module docstring).

    ``model``: an ``E2ENet`` (its weights and ``kernel_mask`` buffers are read once; masked
    kernels are skipped). ``precision``: "fp32" (≤ 1e-4 max abs logit difference to
    ``model.eval()``), "bf16" (oneDNN convs in bfloat16) or "auto" (bf16 only where native).
    ``backend``: "auto" (the sparse kernels when they build and the mean density of the masked
    layers is below 0.5, else dense oneDNN), "sparse" or "dense". ``compile``: wrap the per-sample
    forward in ``torch.compile`` (dense backend; optional, needs a C++ compiler).

    Returns an ``nn.Module`` in eval mode: (N, C_in, D, H, W) → (N, K, D, H, W) float32.
    """
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    if backend not in ("auto", "sparse", "dense"):
        raise ValueError(f"backend must be 'auto', 'sparse' or 'dense', got {backend!r}")
    if precision == "auto":
        precision = "bf16" if bf16_native() else "fp32"
    reason = _unsupported(model)
    if reason is not None:
        warnings.warn(f"accelerate: {reason}; using the model as is", RuntimeWarning, stacklevel=2)
        return _Fallback(model, reason)
    kernels, kernel_reason = kernel_status()
    if kernels is None and backend == "sparse":
        raise BackendUnavailable(f"accelerate(backend='sparse'): the sparse CPU kernels cannot be used: {kernel_reason}")
    why_not = _sparse_unsupported(model)
    if backend == "sparse" and why_not:
        raise BackendUnavailable(f"accelerate(backend='sparse'): {why_not}")
    backend, reason = _choose_backend(model, backend, kernels, kernel_reason, why_not)
    fast = AcceleratedE2ENet(model, precision, backend, kernels, reason).eval()
    if compile:
        # Dynamo cannot trace the ctypes kernels: compile the pure-PyTorch pieces only (the whole
        # network on the dense backend, the encoder on the sparse one), with inductor freezing.
        for unit in fast._encoder_units() if backend == "sparse" else fast._dense_units():
            unit.kernels = None
        if backend == "sparse":
            fast._compiled_encoder = _compile(fast._encode_eager)
        else:
            fast._compiled = _compile(fast.forward_one)
    return fast


def _choose_backend(model: nn.Module, requested: str, kernels: Kernels | None, kernel_reason: str,
                    why_not: str | None) -> tuple[str, str]:
    """("sparse" or "dense", why) for ``accelerate``'s ``backend`` argument."""
    if requested == "dense":
        return "dense", "backend='dense' requested"
    density = _masked_density(model)
    if requested == "sparse":
        return "sparse", f"backend='sparse' requested (model density {density:.2f}); {kernel_reason}"
    if kernels is None:
        return "dense", kernel_reason
    if why_not:
        return "dense", why_not
    if density >= SPARSE_DENSITY_THRESHOLD:
        return "dense", f"model density {density:.2f} ≥ {SPARSE_DENSITY_THRESHOLD} (dense oneDNN is faster there)"
    return "sparse", f"model density {density:.2f} < {SPARSE_DENSITY_THRESHOLD}; {kernel_reason}"


def backend_info(net: nn.Module, default_reason: str = "the PyTorch model as is") -> dict[str, str]:
    """``{"backend": ..., "backend_reason": ...}`` of a module that runs inference: what
    ``accelerate`` chose (``sparse-avx512``, ``sparse-avx2``, ``sparse-generic`` or ``dense``) and
    why; a module ``accelerate`` did not make is ``dense`` with ``default_reason``."""
    name = getattr(net, "backend_name", None)
    if isinstance(name, str):
        return {"backend": name, "backend_reason": str(getattr(net, "backend_reason", ""))}
    return {"backend": "dense", "backend_reason": default_reason}


def _compile(fn: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    compiled = torch.compile(fn, dynamic=False)

    def run(x: torch.Tensor) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return compiled(x)

    return run


# --------------------------------------------------------------------------------------------
# Choosing backend and precision by measurement
# --------------------------------------------------------------------------------------------

# The accuracy gate (issue 18 step 1): a precision other than fp32 is offered only where the bundled
# models' mean Dice stays within PRECISION_DICE_TOLERANCE of fp32. Measured with
# `benchmarks/precision_gate.py` (each bundled model on its sample: the MNI152 T1 with
# its tissue map, make_phantom(0) with its labels; Predictor, overlap 0.5, no TTA): Dice(bf16) −
# Dice(fp32), per backend that runs bf16. Native bf16 on an AMD EPYC Zen 4 (AVX512-BF16),
# 2026-12-07, where the sparse backend runs its fusion convs in bf16 too (e2e_sconv133_bf16); the
# emulated-bf16 run on an AVX2 EPYC the same day (encoder only) gave -0.00022 / -0.00039 / +0.00003
# / +0.00002. tests/inference/test_backend_choice.py recomputes it on a crop of each and fails past
# the tolerance.
PRECISION_DICE_TOLERANCE = 0.005
PRECISION_DICE_DELTA: dict[str, dict[str, float]] = {
    "bf16": {
        "phantom-abdomen-ct/dense": +0.00059,  # 0.92960 → 0.93020, 99.994 % of voxels agree
        "phantom-abdomen-ct/sparse": -0.00018,  # 0.92960 → 0.92942, 99.996 %
        "mni152-tissue/dense": -0.00005,  # 0.91632 → 0.91627, 99.976 %
        "mni152-tissue/sparse": +0.00007,  # 0.91632 → 0.91639, 99.982 %
    },
}


def precision_passed(precision: str) -> tuple[bool, str]:
    """(offered, why) of the accuracy gate for ``precision``: fp32 always passes; another precision
    passes when every recorded bundled-model Dice delta is within the tolerance."""
    if precision == "fp32":
        return True, "fp32 is the reference"
    deltas = PRECISION_DICE_DELTA.get(precision, {})
    if not deltas:
        return False, f"{precision}: no Dice measurement of the bundled models"
    worst_key = max(deltas, key=lambda k: abs(deltas[k]))
    worst = deltas[worst_key]
    ok = abs(worst) <= PRECISION_DICE_TOLERANCE
    return ok, (f"{precision}: bundled-model Dice within {worst:+.4f} of fp32 ({worst_key}) "
                f"{'≤' if ok else '>'} {PRECISION_DICE_TOLERANCE}")


def offered_precisions(precision: str) -> tuple[list[str], str]:
    """The precisions ``precision`` ("fp32", "bf16" or "auto") lets run, and why. "auto" offers
    fp32 and, where the CPU computes bf16 natively and bf16 passed the accuracy gate, bf16 (an
    emulated bf16 was 6x slower than fp32 here: never a candidate)."""
    if precision != "auto":
        return [precision], f"precision={precision!r} requested"
    if not bf16_native():
        return ["fp32"], "no native bf16 on this CPU: fp32"
    ok, why = precision_passed("bf16")
    return (["bf16", "fp32"], why) if ok else (["fp32"], why + ": fp32 only")


class MeasuredE2ENet(nn.Module):
    """Several equivalent inference modules (backend × precision candidates); the first input of
    each shape is run with every candidate, interleaved (each once untimed to warm up its oneDNN
    primitives and buffers, then ``rounds`` timed rounds), and the fastest (least of its timed
    runs) runs from then on for that shape. The chosen candidate's own output is returned, so a
    prediction equals one made with that candidate alone.

    Why: which backend wins is a property of the CPU and the model, not of the density alone: on an
    AVX2 EPYC the sparse kernels ran the bundled MNI model slower than dense oneDNN (1.43 vs
    1.20 s per tile) though its density is 0.2. ``probe`` False runs the first candidate without
    measuring (the caller knows the job is too small to repay the probe); the choice is kept per
    shape, so a Predictor pays the probe once per tile shape.

    A candidate whose warm-up took more than ``skip_factor`` times the quickest warm-up is not
    timed, and when that leaves one candidate its warm-up output is the tile's output: the probe
    then costs one run of each loser instead of two plus a second run of the winner. (On the AVX2
    EPYC the bundled models' dense candidate ran 2.4x slower than the sparse one, and the full
    probe doubled an 8- to 27-tile demo.)"""

    skip_factor = 2.0

    def __init__(self, candidates: list[tuple[str, nn.Module]], rounds: int = 1, default_reason: str = "") -> None:
        super().__init__()
        self.default_reason = default_reason  # why candidate 0 runs until measured
        if not candidates:
            raise ValueError("MeasuredE2ENet needs at least one candidate")
        self.names = [name for name, _ in candidates]
        self.candidates = nn.ModuleList([m for _, m in candidates])
        self.rounds = max(1, rounds)
        self.probe = True
        self.choices: dict[tuple[int, ...], int] = {}
        self.timings: dict[tuple[int, ...], dict[str, float]] = {}
        self.untimed: dict[tuple[int, ...], set[str]] = {}  # candidates judged on their warm-up alone
        self._last = 0

    def _chosen(self) -> nn.Module:
        return self.candidates[self._last]

    @property
    def precision(self) -> str:
        return str(getattr(self._chosen(), "precision", "fp32"))

    @property
    def backend_name(self) -> str:
        return str(getattr(self._chosen(), "backend_name", "dense"))

    @property
    def backend_reason(self) -> str:
        shape = next(reversed(self.choices), None) if self.choices else None
        if shape is None:
            return (f"not measured yet (candidates {', '.join(self.names)}); runs {self.names[0]} until a "
                    f"volume with enough tiles is timed ({self.default_reason})")
        return self.describe_choice(shape)

    def describe_choice(self, shape: tuple[int, ...]) -> str:
        """"sparse-avx2 fp32 1.43 s vs dense fp32 1.20 s per tile (1x1x32x32x64): dense fp32"; a time
        from a warm-up alone (not timed again) says "(first run)"."""
        times, untimed = self.timings[shape], self.untimed.get(shape, set())
        ranked = " vs ".join(f"{n} {times[n]:.3g} s" + (" (first run)" if n in untimed else "")
                             for n in self.names if n in times)
        return f"{ranked} per tile ({'x'.join(map(str, shape))}): {self.names[self.choices[shape]]}"

    def release_memory(self) -> None:
        for m in self.candidates:
            if hasattr(m, "release_memory"):
                m.release_memory()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(int(s) for s in x.shape)
        chosen = self.choices.get(shape)
        if chosen is None and (not self.probe or len(self.candidates) == 1):
            chosen = 0
        if chosen is not None:
            self._last = chosen
            return self.candidates[chosen](x)
        outs: dict[int, torch.Tensor] = {}
        warm: dict[int, float] = {}
        for i, m in enumerate(self.candidates):  # warm-up: primitives, buffer plans, first-touch pages
            t0 = time.perf_counter()
            outs[i] = m(x)
            warm[i] = time.perf_counter() - t0
        quickest = min(warm.values())
        live = [i for i in warm if warm[i] <= self.skip_factor * quickest]
        best = dict(warm)
        if len(live) > 1:
            best = {}
            for _ in range(self.rounds):
                for i in live:
                    t0 = time.perf_counter()
                    outs[i] = self.candidates[i](x)
                    seconds = time.perf_counter() - t0
                    best[i] = min(best.get(i, seconds), seconds)
        chosen = min(best, key=best.__getitem__)
        self.timings[shape] = {self.names[i]: best.get(i, warm[i]) for i in warm}
        self.untimed[shape] = {self.names[i] for i in warm if len(live) == 1 or i not in live}
        self.choices[shape] = chosen
        for i, m in enumerate(self.candidates):  # the losers' arenas are not needed for this shape
            if i != chosen and hasattr(m, "release_memory"):
                m.release_memory()
        self._last = chosen
        return outs[chosen]


def accelerate_measured(model: nn.Module, precision: str = "auto", *, backend: str = "auto",
                        rounds: int = 1) -> nn.Module:
    """``accelerate`` with ``backend="auto"`` / ``precision="auto"`` decided by timing: the
    candidates offered (the sparse kernels where they build and the model is masked and supported;
    dense oneDNN; bf16 only where native and past the accuracy gate, see :func:`offered_precisions`)
    are wrapped in a :class:`MeasuredE2ENet`; a single candidate is returned as ``accelerate``
    builds it. Explicit ``backend``/``precision`` values are honoured as given."""
    if backend not in ("auto", "sparse", "dense"):
        raise ValueError(f"backend must be 'auto', 'sparse' or 'dense', got {backend!r}")
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    precisions, precision_reason = offered_precisions(precision)
    if _unsupported(model) is not None:
        return accelerate(model, precisions[0], backend=backend)
    backends = [backend]
    default_reason = f"backend={backend!r} requested"
    if backend == "auto":
        kernels, kernel_reason = kernel_status()
        why_not = _sparse_unsupported(model)
        pick, default_reason = _choose_backend(model, "auto", kernels, kernel_reason, why_not)
        if kernels is not None and not why_not and _masked_density(model) < 1.0:
            # the density rule's pick goes first: it runs where a job is too small to time
            backends = [pick, "dense" if pick == "sparse" else "sparse"]
    candidates: list[tuple[str, nn.Module]] = []
    for prec in precisions:
        for b in backends:  # "auto" where only one backend is offered: the density rule decides
            m = accelerate(model, prec, backend=b)
            candidates.append((f"{backend_info(m)['backend']} {prec}", m))
    if len(candidates) == 1:
        only = candidates[0][1]
        if precision == "auto":
            only.backend_reason = f"{getattr(only, 'backend_reason', '')}; {precision_reason}"
        return only
    return MeasuredE2ENet(candidates, rounds, f"{default_reason}; {precision_reason}")
