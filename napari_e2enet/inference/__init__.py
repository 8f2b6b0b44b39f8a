"""Inference: the sliding window, the Predictor and the fast sparse path.

``accelerate`` is the function (:func:`napari_e2enet.inference.fastpath.accelerate`); its module is
``inference.fastpath``, so the name never changes meaning when a submodule is first imported
(it did while the module was also called ``accelerate``).
"""

from .fastpath import accelerate
from .predictor import InputWarning, Prediction, PredictionCancelled, Predictor, PredictProgress
from .sliding_window import SlidingWindowResult, TileProgress, iter_sliding_window, sliding_window_argmax

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
