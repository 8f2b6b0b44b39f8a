"""The encoder: L levels of conv units, strided conv units between levels (no max-pool)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import ConvUnit, Triple


@dataclass(frozen=True)
class FeatureInfo:
    """What the decoder needs to know about one backbone level."""

    level: int
    channels: int
    reduction: Triple  # cumulative down-sampling factor relative to the input, per axis
    pool_in: Triple | None  # pool of the transition from level-1 into this level (None at 0)


class Backbone(nn.Module):
    """Input (N, in_channels, D, H, W) → list of L features x(i, 0), (N, C_i, D/r_i, H/r_i, W/r_i)."""

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, ...],
        pools: tuple[Triple, ...],
        *,
        kernel: Triple = (1, 3, 3),
        units_per_level: int = 2,
        shift: bool = True,
    ) -> None:
        super().__init__()
        if units_per_level < 1:
            raise ValueError("units_per_level must be >= 1")
        self.stages = nn.ModuleList()
        info: list[FeatureInfo] = []
        reduction = (1, 1, 1)
        prev = in_channels
        for level, width in enumerate(widths):
            stride = (1, 1, 1) if level == 0 else pools[level - 1]
            if level:
                reduction = tuple(r * s for r, s in zip(reduction, stride))  # type: ignore[assignment]
            units = [ConvUnit(prev, width, kernel, stride, shift=shift)]
            units += [ConvUnit(width, width, kernel, shift=shift) for _ in range(units_per_level - 1)]
            self.stages.append(nn.Sequential(*units))
            info.append(FeatureInfo(level, width, reduction, None if level == 0 else stride))
            prev = width
        self.feature_info: tuple[FeatureInfo, ...] = tuple(info)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
