"""E2ENet: backbone + multi-stage fusion decoder + deep-supervision heads, with DSFF hook points."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .backbone import Backbone
from .blocks import init_weights
from .fusion import FusionDecoder, FusionStep, NodeInfo


@dataclass(frozen=True)
class MaskableWeight:
    """A weight whose kernels DSFF may switch off.

    The mask is a bool tensor of shape ``weight.shape[:2]``, one entry per kernel, constant over
    the kernel's spatial taps. For Conv3d that is (out, in); for ConvTranspose3d it is (in, out),
    PyTorch's weight layout, so ``out_axis`` says which axis is the output channel.
    """

    name: str  # parameter name in the model, e.g. "decoder.nodes.x0_1.fuse.0.conv.weight"
    module: nn.Module
    node: NodeInfo
    role: str  # "fuse" (first fusion conv, sees [forward|up|down]), "fuse2" (second unit), "up"
    out_axis: int

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def kernel_shape(self) -> tuple[int, int]:
        rows, cols = self.weight.shape[:2]
        return int(rows), int(cols)


class E2ENet(nn.Module):
    """E2ENet for 3D segmentation.

    Input (N, in_channels, D, H, W) with D, H, W multiples of ``config.divisor()``.
    Training mode returns a list of ``config.head_count`` logit tensors, full resolution first
    (N, num_classes, D/r, H/r, W/r) for the reductions r of levels 0 .. num_heads-1 (deep
    supervision; logits are not up-sampled). Eval mode returns the full-resolution logits only.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.in_channels, config.widths, config.pools, kernel=config.kernel,
                                 units_per_level=config.units_per_level, shift=config.depth_shift)
        self.decoder = FusionDecoder(self.backbone.feature_info, kernel=config.kernel,
                                     shift=config.depth_shift, last_stage_units=config.last_stage_units)
        self.heads = nn.ModuleList(
            nn.Conv3d(config.widths[i], config.num_classes, 1, bias=False) for i in range(config.head_count)
        )
        self.apply(init_weights)
        self._maskable = self._find_maskable()
        for mw in self._maskable:
            mw.module.register_buffer("kernel_mask", None)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        fused = self.decoder(self.backbone(x))
        if not self.training:
            return self.heads[0](fused[0])
        return [head(fused[i]) for i, head in enumerate(self.heads)]

    # -- DSFF hook points -----------------------------------------------------------------------
    def fusion_plan(self) -> tuple[FusionStep, ...]:
        """The fusion decoder's wiring in compute order, read-only: which values each node reads,
        with which up/down sampling, and its modules (so its masks). The decoder's forward and
        the accelerated inference forward both run it."""
        return self.decoder.plan

    def _find_maskable(self) -> tuple[MaskableWeight, ...]:
        out = []
        for step in self.decoder.plan:
            up = self.decoder.get_submodule(step.up)
            out.append(MaskableWeight(f"decoder.{step.up}.weight", up, step.info, "up", 1))
            for u, path in enumerate(step.fuse):
                role = "fuse" if u == 0 else f"fuse{u + 1}"
                unit = self.decoder.get_submodule(path)
                out.append(MaskableWeight(f"decoder.{path}.conv.weight", unit.conv, step.info, role, 0))
        return tuple(out)

    def maskable(self) -> tuple[MaskableWeight, ...]:
        """Every fusion conv weight and every up ConvTranspose weight (the paper's DSFF masks these)."""
        return self._maskable

    def masks(self) -> dict[str, torch.Tensor]:
        """Current masks by parameter name; empty when the model is dense."""
        return {mw.name: mw.module.kernel_mask for mw in self._maskable if mw.module.kernel_mask is not None}

    def set_masks(self, masks: dict[str, torch.Tensor] | None) -> None:
        """Install kernel masks (bool, ``weight.shape[:2]``) and zero the masked-off kernels.

        ``None`` or ``{}`` makes the model dense again. Unknown names or wrong shapes raise ValueError.
        """
        masks = masks or {}
        known = {mw.name: mw for mw in self._maskable}
        unknown = set(masks) - set(known)
        if unknown:
            raise ValueError(f"masks for unknown weights: {sorted(unknown)[:3]}")
        for name, mw in known.items():
            mask = masks.get(name)
            if mask is not None:
                if tuple(mask.shape) != mw.kernel_shape:
                    raise ValueError(f"mask {name}: shape {tuple(mask.shape)} != {mw.kernel_shape}")
                mask = mask.to(device=mw.weight.device, dtype=torch.bool)
            mw.module.kernel_mask = mask
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the weights of inactive kernels (call after every optimizer step)."""
        for mw in self._maskable:
            mask = mw.module.kernel_mask
            if mask is not None:
                mw.weight.mul_(mask[..., None, None, None].to(mw.weight.dtype))

    @property
    def sparsity(self) -> float:
        """Fraction of maskable kernels that are inactive (0 for a dense model)."""
        total = sum(mw.kernel_shape[0] * mw.kernel_shape[1] for mw in self._maskable)
        active = sum(
            int(mw.module.kernel_mask.sum()) if mw.module.kernel_mask is not None else mw.kernel_shape[0] * mw.kernel_shape[1]
            for mw in self._maskable
        )
        return 1.0 - active / total if total else 0.0


def uniform_masks(model: E2ENet, sparsity: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random masks with exactly ``round((1 - sparsity) * kernels)`` active kernels per layer.

    Deterministic for a seed (a private ``torch.Generator``; global RNG untouched). At least one
    kernel stays active per layer so no layer is cut off entirely.
    """
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for mw in model.maskable():
        n = mw.kernel_shape[0] * mw.kernel_shape[1]
        active = max(1, round((1.0 - sparsity) * n))
        order = torch.randperm(n, generator=generator)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[order[:active]] = True
        masks[mw.name] = flat.view(mw.kernel_shape)
    return masks
