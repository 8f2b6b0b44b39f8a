"""The multi-stage fusion decoder (E2ENet paper, Wu et al., NeurIPS 2024).

Fused node x(i, j) (level i, stage j >= 1, i + j <= L-1) sees only stage j-1::

    x(i,j) = F( concat[ x(i,j-1),  ConvT(x(i+1,j-1)),  MaxPool(x(i-1,j-1)) ] )

Stage j holds levels 0 .. L-1-j, so the nodes fill the triangle under the anti-diagonal
k = i + j = L-1; the nodes on that last anti-diagonal (one per level 0 .. L-2) are the decoder's
outputs and use two conv units. Stages are computed in order j = 1 .. L-1.

Channel order of the concatenation (what the DSFF masks and the connectivity plots refer to):
forward ``[0, C_i)``, up ``[C_i, 2 C_i)``, down ``[2 C_i, 2 C_i + C_{i-1})`` (no down at level 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FeatureInfo
from .blocks import ConvUnit, Triple

DIRECTIONS = ("forward", "up", "down")


@dataclass(frozen=True)
class NodeInfo:
    """A fused node: its grid position and the channel slices of its concatenated input."""

    level: int
    stage: int
    channels: int
    inputs: dict[str, tuple[int, int]]  # direction -> [start, stop) in the concatenated input

    @property
    def key(self) -> str:
        return node_key(self.level, self.stage)


def node_key(level: int, stage: int) -> str:
    return f"x{level}_{stage}"


class FusionNode(nn.Module):
    """One fused node: its up-sampling ConvTranspose3d and its fusion conv unit(s)."""

    def __init__(self, info: NodeInfo, up_channels: int, up_pool: Triple, down_pool: Triple | None,
                 units: int, kernel: Triple, shift: bool) -> None:
        super().__init__()
        c = info.channels
        in_channels = info.inputs["down"][1] if "down" in info.inputs else 2 * c
        self.up = nn.ConvTranspose3d(up_channels, c, up_pool, stride=up_pool, bias=False)
        self.down_pool = down_pool
        layers = [ConvUnit(in_channels, c, kernel, shift=shift)]
        layers += [ConvUnit(c, c, kernel, shift=shift) for _ in range(units - 1)]
        self.fuse = nn.Sequential(*layers)

    def forward(self, forward: torch.Tensor, deeper: torch.Tensor, shallower: torch.Tensor | None) -> torch.Tensor:
        parts = [forward, self.up(deeper)]
        if shallower is not None and self.down_pool is not None:
            parts.append(F.max_pool3d(shallower, self.down_pool, stride=self.down_pool))
        return self.fuse(torch.cat(parts, dim=1))


class FusionDecoder(nn.Module):
    """Built from the backbone's feature info; input: the L backbone features; output: dict of
    the last-diagonal nodes ``{level: x(level, L-1-level)}``, each (N, C_level, ...)."""

    def __init__(self, feature_info: tuple[FeatureInfo, ...], *, kernel: Triple = (1, 3, 3),
                 shift: bool = True, last_stage_units: int = 2) -> None:
        super().__init__()
        levels = len(feature_info)
        self.levels = levels
        self.nodes = nn.ModuleDict()
        infos: list[NodeInfo] = []
        for j in range(1, levels):
            for i in range(levels - j):
                c = feature_info[i].channels
                inputs = {"forward": (0, c), "up": (c, 2 * c)}
                down_pool = None
                if i > 0:
                    inputs["down"] = (2 * c, 2 * c + feature_info[i - 1].channels)
                    down_pool = feature_info[i].pool_in
                info = NodeInfo(i, j, c, inputs)
                up_pool = feature_info[i + 1].pool_in
                assert up_pool is not None
                units = last_stage_units if i + j == levels - 1 else 1
                self.nodes[info.key] = FusionNode(info, feature_info[i + 1].channels, up_pool,
                                                  down_pool, units, kernel, shift)
                infos.append(info)
        self.node_info: tuple[NodeInfo, ...] = tuple(infos)

    def forward(self, features: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        prev = dict(enumerate(features))  # stage j-1, by level
        outputs: dict[int, torch.Tensor] = {}
        for j in range(1, self.levels):
            current = {}
            for i in range(self.levels - j):
                node = self.nodes[node_key(i, j)]
                current[i] = node(prev[i], prev[i + 1], prev[i - 1] if i > 0 else None)
            outputs[self.levels - 1 - j] = current[self.levels - 1 - j]  # the last-diagonal node
            prev = current
        return outputs
