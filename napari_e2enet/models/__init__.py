"""E2ENet networks, the variant registry and cost accounting."""

from .blocks import ConvUnit, depth_shift
from .e2enet import E2ENet, MaskableWeight, uniform_masks
from .registry import create_model, list_models, model_config, register_model

__all__ = [
    "ConvUnit",
    "E2ENet",
    "MaskableWeight",
    "create_model",
    "depth_shift",
    "list_models",
    "model_config",
    "register_model",
    "uniform_masks",
]
