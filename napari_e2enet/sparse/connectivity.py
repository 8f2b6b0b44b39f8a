"""Learned connectivity of the fusion decoder → plain records (no plotting here).

DSFF of the E2ENet paper; the file format: docs/connectivity.md. For every fused node x(i, j) the first fusion conv
(role ``"fuse"``, weight (C_i, C_in, kd, kh, kw)) reads the concatenation [forward | up | down];
its input-channel slices (``NodeInfo.inputs``) tell which kernels listen to which source.
:func:`snapshot` measures, per node and per direction, the active kernels and their L1 mass;
:class:`ConnectivityRecord` collects snapshots at every topology update and every epoch end and
writes ``connectivity.json`` — what the napari plots and the notebooks read.

connectivity.json, schema version 1
-----------------------------------
::

    {
      "format": "napari-e2enet/connectivity",
      "version": 1,
      "levels": 5,                          # L, backbone levels of the model
      "model": {"name": "e2enet_small", "widths": [16, ...], "pools": [[2, 2, 2], ...],
                "sparsity": 0.8},           # sparsity of the masked layers when recording began
      "directions": ["forward", "up", "down"],
      "nodes": [                            # every fused node, in computation order
        {"key": "x0_1", "level": 0, "stage": 1, "channels": 16,
         "inputs": {"forward": [0, 16], "up": [16, 32]}},       # [start, stop) input channels
        {"key": "x1_1", "level": 1, "stage": 1, "channels": 32,
         "inputs": {"forward": [0, 32], "up": [32, 64], "down": [64, 80]}},
        ...
      ],
      "meta": {...},                        # free-form run information (seed, config, ...)
      "entries": [                          # in the order recorded
        {
          "kind": "update" | "epoch",       # after a topology update / at an epoch end
          "iteration": 1200,                # optimizer steps completed
          "epoch": 4 | null,
          "loss": 0.83 | null,              # training loss if the trainer passed one
          "update": null | {                # TopologyUpdate fields (kind "update")
            "iteration", "update_index", "prune_fraction", "regrow",
            "pruned": {param: n}, "regrown": {param: n}, "total_pruned", "total_regrown",
            "active", "kernels",
            "survived": {param: n} | null, "previous_regrown": n | null, "total_survived": n | null
          },
          "nodes": {                        # the snapshot(): one item per fused node
            "x1_1": {
              "level": 1, "stage": 1,
              "active": 512, "kernels": 2560, "density": 0.2,   # first fusion conv, all directions
              "l1": 93.1,                                      # its total kernel L1 mass
              "up_density": 0.2,                               # the node's up ConvTranspose3d
              "directions": {                                  # only the node's own directions
                "forward": {"kernels": 1024, "active": 260, "density": 0.254,
                            "active_share": 0.508, "l1": 51.2, "l1_share": 0.55},
                "up":      {...},
                "down":    {...}                               # absent at level 0
              }
            }, ...
          }
        }, ...
      ]
    }

``active_share`` = the direction's active kernels / the node's active kernels; ``l1_share`` = the
direction's Σ |w| / the node's Σ |w| (masked weights count as zero). Each sums to 1 over a node's
directions (l1_share is 0 everywhere if all weights are zero). ``density`` = active / kernels of
the slice; ``kernels`` = C_i × (slice width). Readers must ignore keys they do not know; a change
that breaks readers bumps ``version``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..fileio import atomic_write_text
from ..models.fusion import DIRECTIONS
from .masks import kernel_l1, unwrap_model
from .updater import TopologyUpdate

FORMAT = "napari-e2enet/connectivity"
VERSION = 1
KINDS = ("update", "epoch")


@torch.no_grad()
def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per fused node (key ``"x{level}_{stage}"``) and per input direction: active kernels and
    L1 mass of the node's first fusion conv, with their shares; plus the up ConvT's density.

    Dense (unmasked) layers count every kernel as active. See the module docstring for the keys.
    """
    net = unwrap_model(model)
    out: dict[str, dict[str, Any]] = {}
    by_node: dict[str, dict[str, Any]] = {}
    for mw in net.maskable():
        by_node.setdefault(mw.node.key, {})[mw.role] = mw
    for info in net.decoder.node_info:
        layers = by_node[info.key]
        fuse = layers["fuse"]
        weight = fuse.weight
        mask = fuse.module.kernel_mask
        mask = torch.ones(fuse.kernel_shape, dtype=torch.bool) if mask is None else mask.detach().cpu()
        l1 = kernel_l1(weight).cpu() * mask  # (C_out, C_in); masked-off kernels count as zero
        node_active = int(mask.sum())
        node_l1 = float(l1.sum())
        directions: dict[str, dict[str, Any]] = {}
        for direction in DIRECTIONS:
            if direction not in info.inputs:
                continue
            start, stop = info.inputs[direction]
            kernels = mask.shape[0] * (stop - start)
            active = int(mask[:, start:stop].sum())
            mass = float(l1[:, start:stop].sum())
            directions[direction] = {
                "kernels": kernels,
                "active": active,
                "density": active / kernels if kernels else 0.0,
                "active_share": active / node_active if node_active else 0.0,
                "l1": mass,
                "l1_share": mass / node_l1 if node_l1 > 0 else 0.0,
            }
        up = layers.get("up")
        up_mask = None if up is None else up.module.kernel_mask
        out[info.key] = {
            "level": info.level,
            "stage": info.stage,
            "active": node_active,
            "kernels": mask.numel(),
            "density": node_active / mask.numel(),
            "l1": node_l1,
            "up_density": 1.0 if up_mask is None else float(up_mask.float().mean()),
            "directions": directions,
        }
    return out


def _clean_float(value: float | None) -> float | None:
    """JSON has no NaN/inf: non-finite values become null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class ConnectivityRecord:
    """Connectivity snapshots over a run; JSON round trip (schema in the module docstring).

    Build it with :meth:`for_model`, call :meth:`record` after every topology update
    (``kind="update"``, with the :class:`TopologyUpdate`) and at every epoch end
    (``kind="epoch"``), and :meth:`to_json` whenever the file should be current.
    """

    def __init__(self, levels: int, nodes: list[dict[str, Any]], model: Mapping[str, Any] | None = None,
                 meta: Mapping[str, Any] | None = None, entries: list[dict[str, Any]] | None = None) -> None:
        self.levels = int(levels)
        self.nodes = [dict(node) for node in nodes]
        self.model = dict(model or {})
        self.meta = dict(meta or {})
        self.entries: list[dict[str, Any]] = list(entries or [])

    @classmethod
    def for_model(cls, model: nn.Module, **meta: Any) -> ConnectivityRecord:
        """An empty record describing ``model``'s levels and fused nodes; ``meta`` is stored as is."""
        net = unwrap_model(model)
        nodes = [
            {"key": info.key, "level": info.level, "stage": info.stage, "channels": info.channels,
             "inputs": {d: list(info.inputs[d]) for d in DIRECTIONS if d in info.inputs}}
            for info in net.decoder.node_info
        ]
        config = net.config
        description = {"name": config.name, "widths": list(config.widths),
                       "pools": [list(p) for p in config.pools], "sparsity": float(net.sparsity)}
        return cls(config.levels, nodes, description, meta)

    # -- recording ------------------------------------------------------------------------------
    def record(self, model: nn.Module, kind: str, iteration: int, epoch: int | None = None,
               update: TopologyUpdate | Mapping[str, Any] | None = None, loss: float | None = None) -> dict[str, Any]:
        """Take a :func:`snapshot` of ``model`` now and append it; returns the new entry."""
        return self.append(kind, iteration, snapshot(model), epoch=epoch, update=update, loss=loss)

    def append(self, kind: str, iteration: int, nodes: Mapping[str, Any], epoch: int | None = None,
               update: TopologyUpdate | Mapping[str, Any] | None = None, loss: float | None = None) -> dict[str, Any]:
        """Append an entry built from an existing snapshot (e.g. taken on another rank)."""
        if kind not in KINDS:
            raise ValueError(f"ConnectivityRecord: kind must be one of {KINDS}, got {kind!r}")
        if isinstance(update, TopologyUpdate):
            update = update.to_dict()
        entry = {
            "kind": kind,
            "iteration": int(iteration),
            "epoch": None if epoch is None else int(epoch),
            "loss": _clean_float(loss),
            "update": None if update is None else dict(update),
            "nodes": dict(nodes),
        }
        self.entries.append(entry)
        return entry

    # -- reading --------------------------------------------------------------------------------
    def select(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Entries of one kind (or all)."""
        return [e for e in self.entries if kind is None or e["kind"] == kind]

    def series(self, node: str, direction: str, measure: str = "active_share",
               kind: str | None = "epoch") -> tuple[list[int], list[float]]:
        """(iterations, values) of one node/direction measure over the run, for plotting."""
        xs, ys = [], []
        for entry in self.select(kind):
            values = entry["nodes"].get(node, {}).get("directions", {}).get(direction)
            if values is not None:
                xs.append(entry["iteration"])
                ys.append(values[measure])
        return xs, ys

    def updates(self) -> list[TopologyUpdate]:
        """The topology updates recorded, as :class:`TopologyUpdate` objects."""
        return [TopologyUpdate.from_dict(e["update"]) for e in self.entries if e.get("update")]

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "levels": self.levels,
            "model": self.model,
            "directions": list(DIRECTIONS),
            "nodes": self.nodes,
            "meta": self.meta,
            "entries": self.entries,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConnectivityRecord:
        """Inverse of :meth:`to_dict`; ValueError on another format or a newer version."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a connectivity record (format {data.get('format')!r})")
        version = data.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise ValueError(f"unsupported connectivity record version {version!r} (this reader: {VERSION})")
        try:
            return cls(data["levels"], data["nodes"], data.get("model"), data.get("meta"), data["entries"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed connectivity record ({exc})") from None

    def to_json(self, path: str | Path) -> Path:
        """Write the record to ``path`` atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        return atomic_write_text(path, text)

    @classmethod
    def from_json(cls, path: str | Path) -> ConnectivityRecord:
        """Read a connectivity.json; a missing or bad file raises InputError ``"<path>: <problem>"``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"cannot read connectivity record ({exc.strerror or exc})", path) from None
        except ValueError as exc:
            raise InputError(f"not valid JSON ({exc})", path) from None
        if not isinstance(data, dict):
            raise InputError("not a connectivity record (expected a JSON object)", path)
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise InputError(str(exc), path) from None

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"ConnectivityRecord({len(self.nodes)} nodes, {len(self.entries)} entries)"
