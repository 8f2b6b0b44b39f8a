"""The multi-stage fusion decoder (E2ENet paper, Wu et al., NeurIPS 2024).

Fused node x(i, j) (level i, stage j >= 1, i + j <= L-1) sees only stage j-1::

    x(i,j) = F( concat[ x(i,j-1),  ConvT(x(i+1,j-1)),  MaxPool(x(i-1,j-1)) ] )

Stage j holds levels 0 .. L-1-j, so the nodes fill the triangle under the anti-diagonal
k = i + j = L-1; the nodes on that last anti-diagonal (one per level 0 .. L-2) are the decoder's
outputs and use two conv units. Stages are computed in order j = 1 .. L-1.

Channel order of the concatenation (what the DSFF masks and the connectivity plots refer to):
forward ``[0, C_i)``, up ``[C_i, 2 C_i)``, down ``[2 C_i, 2 C_i + C_{i-1})`` (no down at level 0).

:attr:`FusionDecoder.plan` states this wiring once, as data (:class:`FusionStep`): the decoder's
own forward runs it, and so does the accelerated inference forward
(:mod:`napari_e2enet.inference.fastpath`), so the two cannot diverge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FeatureInfo
from .blocks import ConvUnit, Triple

DIRECTIONS = ("forward", "up", "down")

Position = tuple[int, int]
"""(level, stage) of a decoder value; stage 0 is the backbone's feature at that level."""


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


@dataclass(frozen=True)
class FusionStep:
    """One fused node as data: which values it reads, how they are resampled, and which modules
    (and so which DSFF masks: ``<module>.kernel_mask``) it applies. Module paths are relative to
    the :class:`FusionDecoder`."""

    info: NodeInfo  # level, stage, channels and the concat slices of each direction
    forward: Position  # read as is: channels info.inputs["forward"]
    deeper: Position  # up-sampled by ConvTranspose3d(kernel = stride = up_kernel): info.inputs["up"]
    up_kernel: Triple
    shallower: Position | None  # max-pooled by down_pool (kernel = stride): info.inputs["down"]
    down_pool: Triple | None
    up: str  # the ConvTranspose3d, weight (in, out, kd, kh, kw), mask (in, out)
    fuse: tuple[str, ...]  # the ConvUnits in order; the first reads the concatenation, mask (out, in)
    output: bool  # on the last anti-diagonal: a decoder output (head input at its level)

    @property
    def key(self) -> str:
        return self.info.key

    @property
    def position(self) -> Position:
        return (self.info.level, self.info.stage)

    @property
    def sources(self) -> tuple[Position, ...]:
        return (self.forward, self.deeper) + ((self.shallower,) if self.shallower is not None else ())


def last_reads(order: Sequence[FusionStep]) -> dict[str, frozenset[Position]]:
    """For the steps run in ``order``: by step key, the values that step reads for the last time
    (a caller can free them after it). Any order in which each stage follows the one before is
    valid: the nodes of one stage are independent."""
    last: dict[Position, str] = {}
    for step in order:
        for src in step.sources:
            last[src] = step.key
    out: dict[str, set[Position]] = {step.key: set() for step in order}
    for src, key in last.items():
        out[key].add(src)
    return {key: frozenset(srcs) for key, srcs in out.items()}


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
        # the first unit reads the concatenation of the parts (ConvUnit.forward_parts: not built
        # where the sparse training conv reads the parts in place)
        y = self.fuse[0].forward_parts(parts)
        for unit in list(self.fuse)[1:]:
            y = unit(y)
        return y


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
        steps: list[FusionStep] = []
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
                steps.append(FusionStep(
                    info, forward=(i, j - 1), deeper=(i + 1, j - 1), up_kernel=tuple(up_pool),  # type: ignore[arg-type]
                    shallower=(i - 1, j - 1) if i > 0 else None,
                    down_pool=tuple(down_pool) if down_pool is not None else None,  # type: ignore[arg-type]
                    up=f"nodes.{info.key}.up", fuse=tuple(f"nodes.{info.key}.fuse.{u}" for u in range(units)),
                    output=i + j == levels - 1))
        self.node_info: tuple[NodeInfo, ...] = tuple(infos)
        # the wiring, in compute order (stage by stage, shallowest level first)
        self.plan: tuple[FusionStep, ...] = tuple(steps)
        self._last_reads = last_reads(self.plan)

    def forward(self, features: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        values: dict[Position, torch.Tensor] = {(i, 0): f for i, f in enumerate(features)}
        outputs: dict[int, torch.Tensor] = {}
        for step in self.plan:
            node = self.nodes[step.key]
            y = node(values[step.forward], values[step.deeper],
                     values[step.shallower] if step.shallower is not None else None)
            for src in self._last_reads[step.key]:
                del values[src]  # its last reader: not held while later nodes run
            values[step.position] = y
            if step.output:
                outputs[step.info.level] = y
        return outputs
