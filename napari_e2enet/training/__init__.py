"""Training: losses, the event-yielding loop, checkpoints, DDP set-up."""

from .checkpoint import load_model, load_state, read_metadata, save_model, save_state, sha256_of
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
