"""Training that uses its sparsity: the DSFF-masked fusion convs skip pruned kernels in forward and backward.

A DSFF-masked fusion :class:`~napari_e2enet.models.blocks.ConvUnit` (its ``conv.kernel_mask``
(out, in) switches whole 3 × 3 kernels off) computes, in a plain PyTorch step, all of its
kernels: the masked ones are stored zeros and oneDNN multiplies them like any other. On the CPU
this module replaces the unit's depth shift + conv by one autograd function over the C training
kernels (``inference/cpu/kernels_train.c``) whose work is proportional to the active kernels:

- forward: the kernel-sparse conv, the depth shift folded in (no shifted copy of the input);
- dX: the same kernel on the transposed mask with flipped taps, shifted back on the way out;
- dW: only the active kernels' 9 taps; the pruned kernels' gradient is zero (not stale), so
  optimisers, clipping and exact resume see what a masked step gives them. Where the DSFF
  updater scores pruned kernels by their gradient (``regrow="gradient"``, RigL), the trainer
  asks for dense weight gradients on those iterations only (:meth:`SparseTraining.dense_weight_grads`).

Measured with the first, output-stationary kernel (AMD EPYC, AVX2, one thread, interleaved, a
shared machine at load ~2.5; the paper network's level-0 fusion conv 96 → 48 over 64 × 64 planes,
random masks at density 0.2, time relative to oneDNN's dense forward): oneDNN fwd / dX / dW 1.00 / 0.90 / 1.97, these kernels
0.67 / 0.66 / 0.41 with chunks of 16 inputs (fwd 0.43–0.51 with chunks of 64, the default); level
1, 240 → 96 on 32²: oneDNN 1.00 / 1.10 / 1.31, these kernels 0.42 / 0.54 / 0.38.
Whole step (``bench --parts train``, 64³ batch 2, 2 threads, same AVX2 EPYC, one process,
interleaved, load 4.1 → 2.4): paper network S = 0.8 26.9 → 15.4 s/it (2.98× → 1.70× PlainConvUNet's
9.0 s), E2ENet-small S = 0.8 2.54 → 1.42 s/it (0.28× → 0.16×). Profile of one S = 0.8 step: the
fusion convs' forward + backward 4.7 s (about 10.5 s dense), ``copy_`` 1.9 s in 651 calls (3.1 s
in 782 dense: the folded depth shift).

The masked up ConvTranspose3d of each fused node (kernel == stride, (in, out) mask) has the same
treatment (:func:`sparse_up_conv` over ``e2e_upconv_*``: per low-res voxel a small matrix product
over the active kernels). Level 0, 2 × 96 × 32³ → 48 × 64³ at density 0.2 (same EPYC, one thread,
interleaved, load ~1.8): torch fwd / dX / dW 488 / 198 / 217 ms, these kernels 100 / 91 / 55 ms.
Whole step, one process, the 15 ups switched dense / sparse alternately (64³ batch 2, 2 threads,
load 1.7–2.5): paper network S = 0.8 14.70 → 12.34 s/it (median of 3).

A fused node's first unit takes its forward, up and down inputs as separate tensors
(``ConvUnit.forward_parts``): the kernels read and write channels through address tables, so the
concatenation is never built and each part's gradient is a contiguous tensor of its own (the up
conv's backward no longer copies its slice of the concatenation's gradient). Whole step, paper
network S = 0.8, 64³ batch 2, 2 threads, AMD EPYC (AVX2), old and new code in alternating
processes, median of 3 steps each: 13.03 / 14.52 → 11.07 / 10.48 s/it (0.77×). The dense units
with one input channel (the backbone's first conv) use the same kernels (``SparseTraining.stems``).
docs/cpu-fast-path.md, "Sparse training kernels, third pass", has the profile and the numbers.

The forward / dX kernel is now input-stationary (see kernels_train.c): 96 → 48 on 64³ × 2 at
density 0.2, 2 threads, same EPYC, interleaved with the previous library: forward 126–148 →
74 ms, dX 134–146 → 73–80 ms (30–35 → 55–65 GMAC/s); 240 → 96 on 32³: 78–85 → 41–42 ms. Whole
step, paper network S = 0.8, the parts change alone against both (alternating processes,
median of 3): 11.64 / 11.64 → 9.53 / 9.73 s/it (0.83×); PlainConvUNet 9.37 s/it in the same run.

Used where it pays: CPU float32 tensors, or bfloat16 ones inside a CPU autocast region (training
with ``precision="bf16"``: the kernels then compute in float32, the rest of the network in bf16;
paper network S = 0.8, 64³ batch 2, Zen 4: 9.19 s per step with the kernels stepping aside, 6.08 s
with them, fp32 6.90 s, PlainConvUNet 4.44 / 2.35 s fp32 / bf16), the unit's mask density below
:data:`MAX_DENSITY`, and the kernels built (no compiler, ``NAPARI_E2ENET_NO_KERNELS=1`` or a failed
build: the dense PyTorch path, as before). Anything else (CUDA, eval mode, dense models) runs the
unit's own modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..inference.cpu.compact import Kernels, depth_offsets, load_kernels
from ..models.blocks import ConvUnit, DepthShift

__all__ = ["MAX_DENSITY", "SparseConvPlan", "SparseTraining", "SparseUpPlan", "install_sparse_training",
           "sparse_conv133", "sparse_up_conv"]

# Above this kernel density a unit stays on oneDNN. The sum fwd + dX + dW of the sparse kernels is
# 0.45x oneDNN's at density 0.2 on the level-0 and level-1 shapes (AVX2, one thread), i.e. the
# break-even lies near 0.4; 0.35 keeps a margin for the per-call overhead of small layers.
MAX_DENSITY = 0.35
# Below this many multiply-adds a call runs on one thread: waking the OpenMP team costs more
# (a 2 x 24 -> 8 x 16^3 call at density 0.2: 1.2 ms on one thread, 3-8 ms on two, machine busy).
_SMALL_MACS = 1 << 23
# Outputs per group of the forward / dX order (CSC by input within groups of outputs): a tile's
# accumulators, GROUP x 4 x 16 floats (16 KiB), stay in L1 beside the input rows being read.
GROUP = 64


def _chunked_csr(mask: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked CSR of an (A, B) bool mask by row a, columns grouped in chunks of ``chunk``:
    ``ptr`` (ceil(B/chunk)·A + 1,) int32, ``idx`` (nnz,) int32 column b, ``flat`` (nnz,) int64 a·B + b."""
    a_count, b_count = mask.shape
    nz = mask.nonzero()  # sorted by a, then b
    segment = (nz[:, 1] // chunk) * a_count + nz[:, 0]
    order = torch.argsort(segment, stable=True)
    nz, segment = nz[order], segment[order]
    chunks = -(-b_count // chunk)
    counts = torch.bincount(segment, minlength=chunks * a_count)
    ptr = torch.zeros(chunks * a_count + 1, dtype=torch.int32)
    ptr[1:] = counts.cumsum(0).to(torch.int32)
    return ptr, nz[:, 1].to(torch.int32).contiguous(), (nz[:, 0] * b_count + nz[:, 1]).contiguous()


@dataclass(frozen=True)
class SparseConvPlan:
    """The index structures of one (O, I) kernel mask: forward (CSC by input within groups of
    ``group`` outputs), dX (the same over the transposed mask: by output, within groups of
    inputs), dW (CSR by output), each with ``flat``: its kernels' indices among the weight's
    (O·I) kernels; and the unit's per-input-channel depth offsets."""

    in_channels: int
    out_channels: int
    ptr: torch.Tensor
    idx: torch.Tensor
    flat: torch.Tensor
    ptr_t: torch.Tensor
    idx_t: torch.Tensor
    flat_t: torch.Tensor  # index into the (O·I) kernels of the flipped weight, ordered for dX
    ptr_w: torch.Tensor
    idx_w: torch.Tensor
    flat_w: torch.Tensor
    ishift: torch.Tensor | None
    group: int = GROUP

    @classmethod
    def from_mask(cls, mask: torch.Tensor, *, shift: bool, group: int = GROUP) -> SparseConvPlan:
        mask = mask.detach().to(device="cpu", dtype=torch.bool)
        o_count, i_count = mask.shape
        ptr, idx, flat_io = _chunked_csr(mask.t(), group)
        # flat_io indexes (I, O); the weight is (O, I): kernel (i, o) is o·I + i
        flat = (flat_io % o_count) * i_count + flat_io // o_count
        ptr_t, idx_t, flat_t = _chunked_csr(mask, group)
        ptr_w, idx_w, flat_w = _chunked_csr(mask, max(1, i_count))
        ishift = depth_offsets(i_count) if shift and i_count >= 3 else None
        return cls(i_count, o_count, ptr, idx, flat, ptr_t, idx_t, flat_t, ptr_w, idx_w, flat_w, ishift, group)

    @property
    def nnz(self) -> int:
        return int(self.idx.numel())


def _threads(plan: SparseConvPlan, y: torch.Tensor) -> int:
    macs = 9 * plan.nnz * y.numel() // max(1, plan.out_channels)
    return 1 if macs < _SMALL_MACS else max(1, torch.get_num_threads())


def _finish_forward(ctx: Any, y: torch.Tensor, saved: tuple[torch.Tensor, ...], bias: torch.Tensor | None,
                    state: tuple[Any, Kernels, bool]) -> torch.Tensor:
    """Add the bias and keep what either backward needs: (plan, kernels, dense_dw) and the
    ``saved`` tensors (the input(s), the weight last)."""
    if bias is not None:
        y += bias.detach().view(1, -1, 1, 1, 1)
    ctx.save_for_backward(*saved)
    ctx.plan, ctx.kernels, ctx.dense_dw = state
    ctx.has_bias = bias is not None
    return y


def _scatter_active(dw: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The (nnz, taps) float64 gradients of the active kernels as a gradient shaped like ``weight``,
    zero for the pruned kernels (``flat``: each active kernel's index among weight's kernels)."""
    full = torch.zeros(weight.shape[0] * weight.shape[1], dw.shape[1], dtype=weight.dtype)
    full[flat] = dw.to(weight.dtype)
    return full.view_as(weight)


def _bias_grad(ctx: Any, gy: torch.Tensor, index: int = 2) -> torch.Tensor | None:
    return gy.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and ctx.needs_input_grad[index] else None


class _SparseConv133(torch.autograd.Function):
    """y = conv3d(shift(cat(parts, 1)), weight ⊙ mask, bias) with (1,3,3) kernels, "same" padding,
    stride 1. The concatenation of the parts (a fused node's forward, up and down inputs) is never
    built: the kernels read the parts' channels where they lie, and dX writes each part's gradient
    into a tensor of its own (measured: the cat and the up conv's copy of its gradient slice took
    ~0.7 s of a 13 s paper-network step, 64³ batch 2, AVX2 EPYC)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, bias: torch.Tensor | None, plan: SparseConvPlan,
                kernels: Kernels, dense_dw: bool, *parts: torch.Tensor) -> torch.Tensor:
        parts = tuple(p.contiguous() for p in parts)
        n, _, d, h, w = parts[0].shape
        taps = weight.detach().reshape(-1, 9)
        y = torch.empty(n, plan.out_channels, d, h, w, dtype=parts[0].dtype)
        kernels.library.tconv_fwd(x=parts, ptr=plan.ptr, idx=plan.idx, weights=taps[plan.flat].contiguous(),
                                  group=plan.group, y=y, ishift=plan.ishift, threads=_threads(plan, y))
        return _finish_forward(ctx, y, (*parts, weight), bias, (plan, kernels, dense_dw))

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        *parts, weight = ctx.saved_tensors
        plan: SparseConvPlan = ctx.plan
        lib = ctx.kernels.library
        threads = _threads(plan, gy)
        gy = gy.contiguous()
        gparts: list[torch.Tensor | None] = [None] * len(parts)
        gw = None
        if any(ctx.needs_input_grad[5:]):
            # every part's gradient is computed (the kernel writes all input channels); autograd
            # drops those not asked for
            gparts = [torch.empty_like(p) for p in parts]
            flipped = weight.detach().flip(-1, -2).reshape(-1, 9)
            lib.tconv_fwd(x=gy, ptr=plan.ptr_t, idx=plan.idx_t, weights=flipped[plan.flat_t].contiguous(),
                          group=plan.group, y=gparts, oshift=plan.ishift, threads=threads)
        if ctx.needs_input_grad[0]:
            if ctx.dense_dw:
                # Every kernel's gradient (the pruned ones' too): what gradient-based regrowth scores.
                x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
                xs = x if plan.ishift is None else DepthShift()(x)
                gw = torch.ops.aten.convolution_backward(
                    gy, xs, weight, None, (1, 1, 1), (0, 1, 1), (1, 1, 1), False, (0, 0, 0), 1,
                    (False, True, False))[1]
            else:
                dw = torch.empty(plan.nnz, 9, dtype=torch.float64)
                lib.tconv_dw(x=parts, dy=gy, ptr=plan.ptr_w, idx=plan.idx_w, chunk=max(1, plan.in_channels), dw=dw,
                             ishift=plan.ishift, threads=threads)
                gw = _scatter_active(dw, plan.flat_w, weight)
        return gw, _bias_grad(ctx, gy, 1), None, None, None, *gparts


def sparse_conv133(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                   plan: SparseConvPlan, kernels: Kernels, *, dense_weight_grad: bool = False) -> torch.Tensor:
    """conv3d(shift(x), weight, bias) over the active kernels of ``plan`` only (x (N, I, D, H, W)
    float32 on the CPU, or a sequence of such tensors standing for their concatenation along the
    channels; weight (O, I, 1, 3, 3) with its pruned kernels stored as zeros). The weight gradient
    is zero for pruned kernels unless ``dense_weight_grad``."""
    parts = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    return _SparseConv133.apply(weight, bias, plan, kernels, dense_weight_grad, *parts)


@dataclass(frozen=True)
class SparseUpPlan:
    """The index structures of an up ConvTranspose3d's (I, O) kernel mask: forward / dW (CSR by
    output over inputs, ``flat`` = i·O + o into the weight's (I·O) kernels) and dX (CSR by input
    over outputs; ``flat_t`` the same index in that order)."""

    in_channels: int
    out_channels: int
    ptr: torch.Tensor
    idx: torch.Tensor
    flat: torch.Tensor
    ptr_t: torch.Tensor
    idx_t: torch.Tensor
    flat_t: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> SparseUpPlan:
        mask = mask.detach().to(device="cpu", dtype=torch.bool)
        i_count, o_count = mask.shape
        # one chunk holding every column: plain CSR
        ptr, idx, flat_oi = _chunked_csr(mask.t(), max(1, i_count))
        ptr_t, idx_t, flat_t = _chunked_csr(mask, max(1, o_count))
        o_of, i_of = flat_oi // i_count, flat_oi % i_count
        return cls(i_count, o_count, ptr, idx, i_of * o_count + o_of, ptr_t, idx_t, flat_t)

    @property
    def nnz(self) -> int:
        return int(self.idx.numel())


def _up_threads(plan: SparseUpPlan, x: torch.Tensor, taps: int) -> int:
    macs = taps * plan.nnz * x.numel() // max(1, plan.in_channels)
    return 1 if macs < _SMALL_MACS else max(1, torch.get_num_threads())


class _SparseUpConv(torch.autograd.Function):
    """y = conv_transpose3d(x, weight ⊙ mask, bias, stride = kernel) over the active kernels."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                plan: SparseUpPlan, kernels: Kernels, dense_dw: bool) -> torch.Tensor:
        x = x.contiguous()
        n, _, d, h, w = x.shape
        kd, kh, kw = (int(k) for k in weight.shape[2:])
        taps = weight.detach().reshape(-1, kd * kh * kw)
        y = torch.empty(n, plan.out_channels, d * kd, h * kh, w * kw, dtype=x.dtype)
        kernels.library.upconv_fwd(x=x, kernel=(kd, kh, kw), ptr=plan.ptr, idx=plan.idx,
                                   weights=taps[plan.flat].contiguous(), y=y,
                                   threads=_up_threads(plan, x, kd * kh * kw))
        return _finish_forward(ctx, y, (x, weight), bias, (plan, kernels, dense_dw))

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        plan: SparseUpPlan = ctx.plan
        lib = ctx.kernels.library
        kernel = tuple(int(k) for k in weight.shape[2:])
        taps = kernel[0] * kernel[1] * kernel[2]
        threads = _up_threads(plan, x, taps)
        gy = gy.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(x)
            lib.upconv_dx(dy=gy, kernel=kernel, ptr_t=plan.ptr_t, idx_t=plan.idx_t,
                          weights_t=weight.detach().reshape(-1, taps)[plan.flat_t].contiguous(), dx=gx,
                          threads=threads)
        if ctx.needs_input_grad[1]:
            if ctx.dense_dw:
                # Every kernel's gradient (the pruned ones' too): what gradient-based regrowth scores.
                gw = torch.ops.aten.convolution_backward(
                    gy, x, weight, None, kernel, (0, 0, 0), (1, 1, 1), True, (0, 0, 0), 1,
                    (False, True, False))[1]
            else:
                dw = torch.empty(plan.nnz, taps, dtype=torch.float64)
                lib.upconv_dw(x=x, dy=gy, kernel=kernel, ptr=plan.ptr, idx=plan.idx, dw=dw, threads=threads)
                gw = _scatter_active(dw, plan.flat, weight)
        return gx, gw, _bias_grad(ctx, gy), None, None, None


def sparse_up_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: SparseUpPlan,
                   kernels: Kernels, *, dense_weight_grad: bool = False) -> torch.Tensor:
    """conv_transpose3d(x, weight, bias, stride = kernel size) over the active kernels of ``plan``
    only (x (N, I, D, H, W) float32 on the CPU, weight (I, O, kd, kh, kw), at most 8 taps, its
    pruned kernels stored as zeros). The weight gradient is zero for pruned kernels unless
    ``dense_weight_grad``."""
    return _SparseUpConv.apply(x, weight, bias, plan, kernels, dense_weight_grad)


def _eligible_up(conv: nn.Module) -> bool:
    """A ConvTranspose3d with kernel == stride (each input voxel owns its output block), <= 8 taps."""
    if type(conv) is not nn.ConvTranspose3d:
        return False
    k = tuple(conv.kernel_size)
    return (tuple(conv.stride) == k and k[0] * k[1] * k[2] <= 8 and tuple(conv.padding) == (0, 0, 0)
            and tuple(conv.output_padding) == (0, 0, 0) and tuple(conv.dilation) == (1, 1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


class _SparseHook:
    """What both replacements share: the owner's switches, a call count, the index structures of
    the module's mask (rebuilt when the mask changes), and when the sparse kernels apply."""

    def __init__(self, conv: nn.Module, kernels: Kernels, owner: SparseTraining) -> None:
        self.conv = conv
        self.kernels = kernels
        self.owner = owner
        self.calls = 0  # sparse calls made (tests and benchmarks read it)
        self._plan: tuple[torch.Tensor, int, Any] | None = None

    def _build_plan(self, mask: torch.Tensor) -> Any:
        raise NotImplementedError

    def plan(self, mask: torch.Tensor) -> Any:
        # Masks change in place or are replaced at topology updates: key on the tensor itself (held
        # here, so its id cannot be reused by a new mask) and its in-place version counter.
        cached = self._plan
        if cached is None or cached[0] is not mask or cached[1] != mask._version:
            cached = self._plan = (mask, mask._version, self._build_plan(mask))
        return cached[2]

    def applies(self, x: torch.Tensor) -> bool:
        conv = self.conv
        mask = getattr(conv, "kernel_mask", None)
        return (self.owner.enabled and mask is not None and x.device.type == "cpu" and _kernel_dtype(x)
                and conv.weight.dtype == torch.float32 and x.dim() == 5
                and float(mask.float().mean()) < self.owner.max_density)


def _kernel_dtype(x: torch.Tensor) -> bool:
    """float32 input, or bfloat16 from a CPU autocast region (the kernels then run in float32: x is
    cast on the way in, its gradient back to bfloat16 on the way out, the output stays float32)."""
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu"))


def _fp32() -> Any:
    """The kernels' region: no autocast inside (they and their torch glue compute in float32)."""
    return torch.autocast("cpu", enabled=False)


class _UpConv(_SparseHook):
    """The replacement of one masked up ConvTranspose3d's forward (an instance attribute that
    shadows the class's ``forward``; ``SparseTraining.remove`` deletes it). Falls back to the
    module's own forward wherever the sparse kernels do not apply: eval mode, CUDA, other dtypes
    (bf16 only from a CPU autocast region), a density at or above the owner's threshold."""

    def _build_plan(self, mask: torch.Tensor) -> SparseUpPlan:
        return SparseUpPlan.from_mask(mask)

    def applies(self, x: torch.Tensor) -> bool:
        return self.conv.training and super().applies(x)

    def __call__(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        conv = self.conv
        if output_size is not None or not self.applies(x):
            return type(conv).forward(conv, x, output_size)
        self.calls += 1
        with _fp32():
            return sparse_up_conv(x.float(), conv.weight, conv.bias, self.plan(conv.kernel_mask), self.kernels,
                                  dense_weight_grad=self.owner.dense_grads)


def _eligible(unit: ConvUnit) -> bool:
    """A (1,3,3) stride-1 "same" conv with a (possibly no-op) restricted depth shift in front."""
    conv = unit.conv
    return (isinstance(conv, nn.Conv3d) and type(conv) is nn.Conv3d and conv.kernel_size == (1, 3, 3)
            and conv.stride == (1, 1, 1) and conv.padding == (0, 1, 1) and conv.dilation == (1, 1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(unit.shift, (DepthShift, nn.Identity)))


class _UnitConv(_SparseHook):
    """The replacement of one unit's shift + conv (``ConvUnit.fused_conv``); falls back to the
    unit's own modules wherever the sparse kernels do not apply or would not pay."""

    def __init__(self, unit: ConvUnit, kernels: Kernels, owner: SparseTraining) -> None:
        super().__init__(unit.conv, kernels, owner)
        self.unit = unit

    def _build_plan(self, mask: torch.Tensor) -> SparseConvPlan:
        return SparseConvPlan.from_mask(mask, shift=isinstance(self.unit.shift, DepthShift))

    def mask(self) -> torch.Tensor:
        """The (out, in) kernel mask the kernels follow: the unit's DSFF mask."""
        return self.unit.conv.kernel_mask

    def __call__(self, *parts: torch.Tensor) -> torch.Tensor:
        """shift + conv of the channel concatenation of ``parts`` (one tensor: the unit's input)."""
        unit = self.unit
        if not self.applies(parts[0]):
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            return unit.conv(unit.shift(x))
        self.calls += 1
        with _fp32():
            return sparse_conv133(tuple(p.float() for p in parts), unit.conv.weight, unit.conv.bias,
                                  self.plan(self.mask()), self.kernels, dense_weight_grad=self.owner.dense_grads)


class _StemConv(_UnitConv):
    """The replacement of a dense unit's conv with very few input channels (the backbone's first
    conv, 1 → 48 at full resolution): the same kernels with every kernel active. oneDNN's
    forward / weight gradient of that conv took 111 / 98 ms against these kernels' 15 / 8 ms at
    2 × 1 × 64³ → 48 (2 threads, AMD EPYC AVX2): its vectors run over the input channels."""

    def __init__(self, unit: ConvUnit, kernels: Kernels, owner: SparseTraining) -> None:
        super().__init__(unit, kernels, owner)
        self._all = torch.ones(unit.conv.weight.shape[:2], dtype=torch.bool)

    def mask(self) -> torch.Tensor:
        return self._all

    def applies(self, x: torch.Tensor) -> bool:
        conv = self.conv
        return (self.owner.enabled and x.device.type == "cpu" and _kernel_dtype(x) and x.dim() == 5
                and conv.weight.dtype == torch.float32)


# Dense units with at most this many input channels take the kernels (measured for 1: see _StemConv).
STEM_MAX_CHANNELS = 1


class SparseTraining:
    """The sparse training path installed on a model's masked fusion units and masked up convs (see
    the module doc), and on its dense units with at most ``STEM_MAX_CHANNELS`` inputs (``stems``).

    ``dense_weight_grads(True)`` before a backward whose weight gradients the DSFF updater scores
    (``DSFFUpdater.needs_dense_grads``); ``remove()`` restores the plain modules.
    """

    def __init__(self, model: nn.Module, kernels: Kernels, *, max_density: float = MAX_DENSITY) -> None:
        self.kernels = kernels
        self.max_density = float(max_density)
        self.enabled = True
        self.dense_grads = False
        self.units: dict[str, _UnitConv] = {}
        self.ups: dict[str, _UpConv] = {}  # the masked up ConvTranspose3d of the fused nodes
        self.stems: dict[str, _StemConv] = {}  # dense units with very few inputs (the first conv)
        for name, module in model.named_modules():
            if isinstance(module, ConvUnit) and _eligible(module) and hasattr(module.conv, "kernel_mask"):
                hook = _UnitConv(module, kernels, self)
                module.fused_conv = hook
                self.units[name] = hook
            elif isinstance(module, ConvUnit) and _eligible(module) and module.conv.in_channels <= STEM_MAX_CHANNELS:
                stem = _StemConv(module, kernels, self)
                module.fused_conv = stem
                self.stems[name] = stem
            elif isinstance(module, nn.ConvTranspose3d) and hasattr(module, "kernel_mask") and _eligible_up(module):
                up = _UpConv(module, kernels, self)
                module.forward = up  # shadows the class forward until remove()
                self.ups[name] = up

    def dense_weight_grads(self, on: bool) -> None:
        """Whether the next backward computes every kernel's weight gradient (pruned ones too)."""
        self.dense_grads = bool(on)

    @property
    def calls(self) -> int:
        """Sparse conv calls made so far over all units."""
        return sum(u.calls for u in self.units.values())

    @property
    def up_calls(self) -> int:
        """Sparse up ConvTranspose3d calls made so far."""
        return sum(u.calls for u in self.ups.values())

    def remove(self) -> None:
        for hook in (*self.units.values(), *self.stems.values()):
            if hook.unit.fused_conv is hook:
                hook.unit.fused_conv = None
        for up in self.ups.values():
            if up.conv.__dict__.get("forward") is up:
                del up.conv.__dict__["forward"]
        self.units.clear()
        self.ups.clear()
        self.stems.clear()


def install_sparse_training(model: nn.Module, device: torch.device | str = "cpu") -> SparseTraining | None:
    """Install the sparse path on ``model``'s masked fusion units when training on the CPU with the
    kernels available; None otherwise (CUDA, no compiler, no masked unit)."""
    if torch.device(device).type != "cpu":
        return None
    kernels = load_kernels()
    if kernels is None:
        return None
    sparse = SparseTraining(model, kernels)
    if sparse.units or sparse.ups:
        return sparse
    sparse.remove()  # no masked layer: not even the first conv is hooked (nobody could unhook it)
    return None
