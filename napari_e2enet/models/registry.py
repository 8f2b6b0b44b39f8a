"""``create_model(name, ...)``: a registered variant (timm style) built as a network.

The variants themselves are ModelConfig factories and live with ModelConfig in
:mod:`napari_e2enet.config` (TrainConfig checks its ``model`` name against them, and config sits
below the models); they are re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig, list_models, model_config, register_model
from .e2enet import E2ENet, uniform_masks

__all__ = ["create_model", "list_models", "model_config", "register_model"]


def create_model(
    name: str | ModelConfig = "e2enet",
    *,
    in_channels: int = 1,
    num_classes: int = 16,
    sparsity: float = 0.8,
    seed: int = 0,
    **overrides: Any,
) -> E2ENet:
    """Build a registered variant (or a ModelConfig) with uniform random masks at density 1 − S.

    ``seed`` fixes both the weight initialisation and the masks (the global RNG is left as it was).
    ``sparsity=0`` gives the dense-fusion model (no masks). Overrides are ModelConfig fields.
    """
    if isinstance(name, ModelConfig):
        config = name.replace(**overrides) if overrides else name
    else:
        config = model_config(name, in_channels=in_channels, num_classes=num_classes, **overrides)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = E2ENet(config)
    if sparsity > 0:
        model.set_masks(uniform_masks(model, sparsity, seed))
    return model
