"""Training: losses, the event-yielding loop, checkpoints, DDP set-up.

The names below are imported on first use (PEP 562): inference needs only ``checkpoint``, and the
loop's dependencies (MONAI's losses pull in ~190 MiB of modules and ~2.5 s of import time) would
otherwise be loaded by every ``predict``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import load_model, load_state, read_metadata, save_model, save_state, sha256_of
    from .loop import Trainer, TrainEvent, TrainSummary, poly_lr
    from .losses import DeepSupervisionLoss, deep_supervision_weights

_WHERE = {
    "load_model": "checkpoint",
    "load_state": "checkpoint",
    "read_metadata": "checkpoint",
    "save_model": "checkpoint",
    "save_state": "checkpoint",
    "sha256_of": "checkpoint",
    "Trainer": "loop",
    "TrainEvent": "loop",
    "TrainSummary": "loop",
    "poly_lr": "loop",
    "DeepSupervisionLoss": "losses",
    "deep_supervision_weights": "losses",
}

__all__ = [
    "DeepSupervisionLoss",
    "TrainEvent",
    "TrainSummary",
    "Trainer",
    "deep_supervision_weights",
    "load_model",
    "load_state",
    "poly_lr",
    "read_metadata",
    "save_model",
    "save_state",
    "sha256_of",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
