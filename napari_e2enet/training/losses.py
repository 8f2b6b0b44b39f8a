"""Dice + cross-entropy with deep supervision (the E2ENet paper's nnU-Net recipe)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def deep_supervision_weights(heads: int) -> list[float]:
    """8:4:2:1 for four heads, normalised: [0.533, 0.267, 0.133, 0.067] (halving per level)."""
    raw = [2.0 ** (heads - 1 - i) for i in range(heads)]
    total = sum(raw)
    return [w / total for w in raw]


def downsample_target(target: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer target (B, 1, D, H, W) to a head's grid (nnU-Net style)."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    return F.interpolate(target.float(), size=size, mode="nearest").long()


class DeepSupervisionLoss(nn.Module):
    """Σ_h w_h · (soft Dice without background + CE)(logits_h, target on head h's grid).

    logits: list of (B, K, D_h, H_h, W_h) tensors (full resolution first) or one tensor;
    target: (B, 1, D, H, W) integer labels. MONAI's DiceCELoss with nnU-Net's settings
    (softmax, background excluded, smooth 1e-5, batch Dice, weights 1:1).
    """

    def __init__(self) -> None:
        from monai.losses import DiceCELoss  # here, not at import: fine-tuning and inference never load MONAI

        super().__init__()
        self.loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                               smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=1.0, lambda_ce=1.0)

    def forward(self, logits: list[torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, torch.Tensor):
            logits = [logits]
        weights = deep_supervision_weights(len(logits))
        total = logits[0].new_zeros(())
        for w, out in zip(weights, logits):
            total = total + w * self.loss(out.float(), downsample_target(target, tuple(out.shape[2:])))
        return total
