"""Recent training runs shared by the Segment, Train and Connectivity widgets of one viewer.

Each widget gets the :class:`RunRegistry` explicitly (``registry=`` argument) or, when napari builds
it from the manifest with only the viewer, through :func:`registry_for`. napari's ``Viewer`` is a
pydantic model that refuses new attributes, and npe2 builds each widget separately, so the viewer
itself is the only handle the three widgets share: :func:`registry_for` keeps one registry per
viewer in a ``WeakKeyDictionary`` (a per-viewer mapping, not a process-wide singleton; an entry
disappears with its viewer).

A run is a folder holding ``model.safetensors`` (Trainer run folders, fine-tuned runs, bundled
model folders). The registry lists the runs added in this session (newest first) and the run
folders it finds under ``runs_root`` (so runs from earlier sessions show up too).
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psygnal import Signal

from ..modelcard import MODEL_FILE, holds_model

ENV_RUNS = "NAPARI_E2ENET_RUNS"


def default_runs_root() -> Path:
    """``$NAPARI_E2ENET_RUNS`` if set, else ``~/napari-e2enet/runs``."""
    env = os.environ.get(ENV_RUNS)
    return Path(env).expanduser() if env else Path.home() / "napari-e2enet" / "runs"


@dataclass(frozen=True)
class RunInfo:
    path: Path
    label: str
    kind: str = "run"  # "train", "finetune", or "found" (scanned from runs_root)

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE


class RunRegistry:
    """Runs known to one viewer's widgets; emits ``changed`` and relays live training events."""

    changed = Signal()
    #: (run folder, TrainEvent) while the Train widget runs; the Connectivity widget follows it
    training_event = Signal(object, object)

    def __init__(self, runs_root: str | Path | None = None) -> None:
        self._root = Path(runs_root) if runs_root is not None else default_runs_root()
        self._added: list[RunInfo] = []

    @property
    def runs_root(self) -> Path:
        return self._root

    @runs_root.setter
    def runs_root(self, value: str | Path) -> None:
        self._root = Path(value).expanduser()
        self.changed.emit()

    def add(self, path: str | Path, label: str | None = None, kind: str = "run") -> RunInfo:
        path = Path(path).resolve()
        self._added = [r for r in self._added if r.path != path]
        info = RunInfo(path, label or path.name, kind)
        self._added.insert(0, info)
        self.changed.emit()
        return info

    def runs(self) -> list[RunInfo]:
        """Session runs (newest first), then run folders found under ``runs_root`` (newest first)."""
        out = [r for r in self._added if holds_model(r.path)]
        seen = {r.path for r in out}
        found: list[tuple[float, RunInfo]] = []
        if self._root.is_dir():
            try:
                children = list(self._root.iterdir())
            except OSError:
                children = []
            for child in children:
                model = child / MODEL_FILE
                if child.resolve() not in seen and model.is_file():
                    found.append((model.stat().st_mtime, RunInfo(child.resolve(), child.name, "found")))
        out += [info for _, info in sorted(found, key=lambda t: -t[0])]
        return out

    def new_run_dir(self, prefix: str) -> Path:
        """A fresh, not yet existing folder name under ``runs_root``: ``<prefix>-YYYYmmdd-HHMMSS[-n]``."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in prefix).strip("._") or "run"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        candidate = self._root / f"{safe}-{stamp}"
        n = 1
        while candidate.exists():
            n += 1
            candidate = self._root / f"{safe}-{stamp}-{n}"
        return candidate


_BY_VIEWER: weakref.WeakKeyDictionary[Any, RunRegistry] = weakref.WeakKeyDictionary()


def registry_for(viewer: Any) -> RunRegistry:
    """The registry of ``viewer`` (created on first use); see the module docstring for why."""
    if viewer is None:
        return RunRegistry()
    viewer = getattr(viewer, "__wrapped__", viewer)  # napari hands plugins a PublicOnlyProxy per widget
    registry = _BY_VIEWER.get(viewer)
    if registry is None:
        registry = RunRegistry()
        _BY_VIEWER[viewer] = registry
    return registry
