"""Connectivity and training plots on plain matplotlib Figures/Axes (no Qt, no pyplot).

Shared by the napari widgets (which draw these onto a Qt canvas) and the notebooks (which call
:func:`connectivity_figure` and save or display it). Nothing here imports a GUI backend: a
``matplotlib.figure.Figure`` saves to PNG through Agg.

Inputs are :class:`napari_e2enet.sparse.ConnectivityRecord` objects (schema in
``napari_e2enet/sparse/connectivity.py``) and per-epoch training history rows.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .errors import InputError

DIRECTIONS = ("forward", "up", "down")
DIRECTION_COLORS = {"forward": "#4C72B0", "up": "#DD8452", "down": "#55A868"}
MEASURES = {"active": "active_share", "l1": "l1_share"}
MEASURE_TITLES = {"active": "active-kernel share", "l1": "L1-mass share"}
SNAPSHOT_KINDS = ("init", "epoch")

__all__ = [
    "DIRECTIONS",
    "DIRECTION_COLORS",
    "connectivity_figure",
    "connectivity_rows",
    "direction_shares",
    "entry_label",
    "node_order",
    "plot_direction_shares",
    "plot_fusion_graph",
    "plot_loss",
    "plot_topology_updates",
    "plot_validation_dice",
    "snapshots",
    "write_connectivity_csv",
]


def _measure_key(measure: str) -> str:
    if measure in MEASURES:
        return MEASURES[measure]
    if measure in MEASURES.values():
        return measure
    raise ValueError(f"measure must be one of {sorted(MEASURES)}, got {measure!r}")


def snapshots(record: Any) -> list[dict[str, Any]]:
    """The entries a per-epoch slider walks through: initial + epoch-end entries (else all)."""
    chosen = [e for e in record.entries if e.get("kind") in SNAPSHOT_KINDS]
    return chosen or list(record.entries)


def entry_label(entry: Mapping[str, Any]) -> str:
    kind = entry.get("kind", "")
    if kind == "init":
        return "initial (it 0)"
    epoch = entry.get("epoch")
    where = f"it {entry.get('iteration', 0)}"
    return f"epoch {epoch} ({where})" if epoch is not None else f"{kind} at {where}"


def node_order(record: Any) -> list[dict[str, Any]]:
    """Fused nodes ordered by stage, then level (the order the decoder computes them)."""
    return sorted(record.nodes, key=lambda n: (int(n["stage"]), int(n["level"])))


def direction_shares(entry: Mapping[str, Any], measure: str = "active") -> dict[str, dict[str, float]]:
    """``{node key: {direction: share}}`` for one entry; directions a node lacks are absent."""
    key = _measure_key(measure)
    out: dict[str, dict[str, float]] = {}
    for node, values in entry.get("nodes", {}).items():
        dirs = values.get("directions", {})
        out[node] = {d: float(dirs[d].get(key, 0.0)) for d in DIRECTIONS if d in dirs}
    return out


def plot_direction_shares(ax: Axes, record: Any, index: int = -1, measure: str = "active") -> None:
    """(a) Stacked bars: per fused node, the forward / up / down share in snapshot ``index``."""
    ax.clear()
    entries = snapshots(record)
    if not entries:
        ax.text(0.5, 0.5, "no connectivity recorded yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    entry = entries[index]
    shares = direction_shares(entry, measure)
    nodes = [n["key"] for n in node_order(record) if n["key"] in shares]
    x = np.arange(len(nodes))
    bottom = np.zeros(len(nodes))
    for direction in DIRECTIONS:
        values = np.array([shares[n].get(direction, 0.0) for n in nodes])
        ax.bar(x, values, bottom=bottom, color=DIRECTION_COLORS[direction], label=direction, width=0.75)
        bottom += values
    ax.set_xticks(x, nodes, rotation=60 if len(nodes) > 8 else 0, fontsize=8)
    ax.set_ylim(0, 1.22)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel(MEASURE_TITLES["l1" if _measure_key(measure) == "l1_share" else "active"])
    ax.set_title(f"(a) direction shares per fused node · {entry_label(entry)}", fontsize=9)
    ax.legend(loc="upper center", fontsize=7, ncols=3, frameon=False)


def plot_fusion_graph(ax: Axes, record: Any, index: int = -1, measure: str = "active",
                      max_width: float = 9.0) -> None:
    """(b) The fusion graph, levels (rows, 0 on top) × stages (columns, 0 = backbone), with each
    edge's width proportional to the share its direction has in the receiving node."""
    ax.clear()
    entries = snapshots(record)
    levels = int(record.levels)
    shares = direction_shares(entries[index], measure) if entries else {}
    keys = {n["key"]: (int(n["level"]), int(n["stage"])) for n in record.nodes}
    # stage-0 nodes are the backbone features x(i, 0)
    positions = {(i, 0): (0.0, -float(i)) for i in range(levels)}
    for level, stage in keys.values():
        positions[(level, stage)] = (float(stage), -float(level))
    sources = {"forward": (0, -1), "up": (1, -1), "down": (-1, -1)}
    for key, (level, stage) in keys.items():
        for direction, (dl, ds) in sources.items():
            src = (level + dl, stage + ds)
            if src not in positions or (direction == "down" and level == 0):
                continue
            share = shares.get(key, {}).get(direction)
            if share is None:
                continue
            (x0, y0), (x1, y1) = positions[src], positions[(level, stage)]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops={"arrowstyle": "-|>", "color": DIRECTION_COLORS[direction],
                                    "lw": 0.4 + max_width * share, "alpha": 0.85,
                                    "shrinkA": 9, "shrinkB": 9, "mutation_scale": 8})
    for (level, stage), (x, y) in positions.items():
        fused = stage > 0
        ax.scatter([x], [y], s=260, zorder=3, color="#f5f5f5" if fused else "#cfd8e3", edgecolors="#333333")
        ax.text(x, y, f"{level},{stage}", ha="center", va="center", fontsize=6, zorder=4)
    ax.set_xlim(-0.6, max(levels - 1, 1) + 0.6)
    ax.set_ylim(-(levels - 1) - 0.6, 0.6)
    ax.set_xticks(range(levels), [f"stage {j}" for j in range(levels)], fontsize=7)
    ax.set_yticks([-i for i in range(levels)], [f"level {i}" for i in range(levels)], fontsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    title = MEASURE_TITLES["l1" if _measure_key(measure) == "l1_share" else "active"]
    label = entry_label(entries[index]) if entries else "no snapshot"
    ax.set_title(f"(b) fusion graph, edge width ∝ {title} · {label}", fontsize=9)
    handles = [ax.plot([], [], color=c, lw=3, label=d)[0] for d, c in DIRECTION_COLORS.items()]
    ax.legend(handles=handles, loc="lower right", fontsize=7, frameon=False)


def plot_topology_updates(ax: Axes, record: Any) -> None:
    """(c) Topology updates over training: kernels pruned and regrown per update, and the loss."""
    ax.clear()
    updates = [e for e in record.entries if e.get("kind") == "update" and e.get("update")]
    if not updates:
        ax.text(0.5, 0.5, "no topology updates recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("(c) topology updates", fontsize=9)
        return
    its = np.array([e["iteration"] for e in updates], dtype=float)
    pruned = np.array([e["update"].get("total_pruned", 0) for e in updates], dtype=float)
    regrown = np.array([e["update"].get("total_regrown", 0) for e in updates], dtype=float)
    width = max(0.35 * float(np.min(np.diff(its))) if len(its) > 1 else 0.4, 0.2)
    ax.bar(its - width / 2, pruned, width=width, color="#C44E52", label="pruned")
    ax.bar(its + width / 2, regrown, width=width, color="#8172B3", label="regrown")
    ax.set_xlabel("iteration")
    ax.set_ylabel("kernels")
    with_loss = [e for e in record.entries if e.get("loss") is not None]
    epochs = [e for e in with_loss if e.get("kind") == "epoch"]
    losses = [(e["iteration"], e["loss"]) for e in (epochs or with_loss)]  # epoch means when recorded
    if losses:
        twin = ax.twinx()
        twin.plot([i for i, _ in losses], [v for _, v in losses], color="#333333", lw=1.2, marker=".",
                  label="loss")
        twin.set_ylabel("loss")
        lines, labels = ax.get_legend_handles_labels()
        l2, lab2 = twin.get_legend_handles_labels()
        ax.legend(lines + l2, labels + lab2, fontsize=7, loc="upper right", frameon=False)
    else:
        ax.legend(fontsize=7, loc="upper right", frameon=False)
    ax.set_title("(c) topology updates: kernels pruned / regrown; loss", fontsize=9)


def connectivity_figure(record: Any, index: int = -1, measure: str = "active", *,
                        figure: Figure | None = None) -> Figure:
    """All three panels on one Figure (a new one unless ``figure`` is given, which is cleared)."""
    fig = figure if figure is not None else Figure(figsize=(9.0, 9.5), layout="constrained")
    fig.clear()
    grid = fig.add_gridspec(3, 1, height_ratios=[1.0, 1.25, 0.9])
    plot_direction_shares(fig.add_subplot(grid[0]), record, index, measure)
    plot_fusion_graph(fig.add_subplot(grid[1]), record, index, measure)
    plot_topology_updates(fig.add_subplot(grid[2]), record)
    return fig


CSV_COLUMNS = ("kind", "iteration", "epoch", "loss", "node", "level", "stage", "direction", "kernels", "active",
               "density", "active_share", "l1", "l1_share")


def connectivity_rows(record: Any) -> list[dict[str, Any]]:
    """One row per (entry, node, direction) — the long table a spreadsheet or pandas wants."""
    rows = []
    for entry in record.entries:
        for node, values in entry.get("nodes", {}).items():
            for direction in DIRECTIONS:
                d = values.get("directions", {}).get(direction)
                if d is None:
                    continue
                rows.append({"kind": entry.get("kind"), "iteration": entry.get("iteration"),
                             "epoch": entry.get("epoch"), "loss": entry.get("loss"), "node": node,
                             "level": values.get("level"), "stage": values.get("stage"), "direction": direction,
                             **{k: d.get(k) for k in ("kernels", "active", "density", "active_share", "l1",
                                                      "l1_share")}})
    return rows


def write_connectivity_csv(record: Any, path: str | Path) -> Path:
    """Write :func:`connectivity_rows` as CSV, atomically (temporary file, then rename)."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in connectivity_rows(record):
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return _atomic_write(path, buf.getvalue().encode())


def save_figure_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return _atomic_write(Path(path), buf.getvalue())


def _atomic_write(path: Path, payload: bytes) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {folder} does not exist", path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"cannot write ({exc.strerror or exc})", path) from None
    return path


# -- training curves -----------------------------------------------------------------------------


def plot_loss(ax: Axes, iterations: Sequence[float], losses: Sequence[float],
              epoch_iterations: Sequence[float] = (), epoch_losses: Sequence[float] = ()) -> None:
    """Training loss per iteration (thin) and per-epoch mean (markers)."""
    ax.clear()
    if len(iterations):
        ax.plot(iterations, losses, color="#4C72B0", lw=0.8, alpha=0.6, label="iteration")
    if len(epoch_iterations):
        ax.plot(epoch_iterations, epoch_losses, color="#4C72B0", marker="o", ms=3, lw=1.5, label="epoch mean")
    ax.set_xlabel("iteration", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.set_title("Training loss", fontsize=9)
    ax.tick_params(labelsize=7)
    if len(iterations) or len(epoch_iterations):
        ax.legend(fontsize=7, frameon=False, loc="upper right")


def plot_validation_dice(ax: Axes, iterations: Sequence[float], dice: Sequence[Mapping[str, float]]) -> None:
    """Validation Dice per class and its mean, against the iteration of each validation."""
    ax.clear()
    names = sorted({name for row in dice for name in row})
    for name in names:
        xs = [i for i, row in zip(iterations, dice, strict=False) if name in row]
        ys = [row[name] for row in dice if name in row]
        ax.plot(xs, ys, lw=1.0, marker=".", ms=3, label=name, alpha=0.8)
    means = [(i, float(np.mean(list(row.values())))) for i, row in zip(iterations, dice, strict=False) if row]
    if means:
        ax.plot([i for i, _ in means], [m for _, m in means], color="black", lw=2.0, marker="o", ms=3, label="mean")
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration", fontsize=8)
    ax.set_ylabel("Dice", fontsize=8)
    ax.set_title("Validation Dice", fontsize=9)
    ax.tick_params(labelsize=7)
    if names:
        ax.legend(fontsize=6, frameon=False, loc="lower right", ncols=2 if len(names) > 6 else 1)
