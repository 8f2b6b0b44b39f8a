"""Training: losses, the event-yielding loop, checkpoints, fine-tuning, DDP set-up.

Nothing below this package imports it (``inference`` reads model files through
:mod:`napari_e2enet.modelcard`), so ``predict`` never loads the loop's dependencies (MONAI's losses:
~190 MiB of modules, ~2.5 s of import time). The model-file functions are re-exported here because
notebooks and scripts use them as ``napari_e2enet.training.load_model``.
"""

from ..modelcard import load_model, read_metadata, save_model, sha256_of
from .checkpoint import load_state, save_state
from .loop import Trainer, TrainEvent, TrainSummary, poly_lr
from .losses import DeepSupervisionLoss, deep_supervision_weights

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
