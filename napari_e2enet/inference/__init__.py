"""Inference: the sliding window, the Predictor and the fast sparse path."""

from .predictor import InputWarning, Prediction, PredictionCancelled, Predictor, PredictProgress
from .sliding_window import SlidingWindowResult, TileProgress, iter_sliding_window, sliding_window_argmax


def accelerate(model, precision: str = "fp32", **kwargs):
    """The fastest equivalent inference module for a (sparse) E2ENet (see ``inference.accelerate``)."""
    from .accelerate import accelerate as _accelerate

    return _accelerate(model, precision=precision, **kwargs)


__all__ = [
    "InputWarning",
    "PredictProgress",
    "Prediction",
    "PredictionCancelled",
    "Predictor",
    "SlidingWindowResult",
    "TileProgress",
    "accelerate",
    "iter_sliding_window",
    "sliding_window_argmax",
]
