"""Kernel-mask helpers for E2ENet's kernel-sparse layers (DSFF masks whole kernels).

DSFF masks whole kernels: a bool ``kernel_mask`` of shape ``weight.shape[:2]`` on every fusion
conv ((out, in), weight (O, I, 1, 3, 3)) and every up ConvTranspose3d ((in, out), weight
(I, O, kd, kh, kw)); masked kernels are stored as zeros. This module answers questions about such
masks: which kernels are really active (:func:`effective_mask`), which channels are used
(:func:`channel_usage`), whether a mask is made of b × b blocks (:func:`block_size`), and draws
block masks (:func:`uniform_block_masks`). The compact inference forms built from the masks
(CSC/CSR convolutions, the padded planar layout, the C kernels' wrapper) live in
:mod:`napari_e2enet.inference.cpu.compact`, above this layer.
"""

from __future__ import annotations

import torch

__all__ = ["block_size", "channel_usage", "effective_mask", "uniform_block_masks"]


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
    option of the DSFF updater would keep invariant (see docs/cpu-fast-path.md).
    """
    generator = torch.Generator().manual_seed(seed)
    masks: dict[str, torch.Tensor] = {}
    for mw in model.maskable():
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
