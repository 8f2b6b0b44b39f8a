"""Parameter, MAC and paper-convention FLOP counts (the E2ENet paper's table; README "Paper fidelity").

Counted from the modules and masks actually built: a forward pass on the ``meta`` device (no memory,
no arithmetic) records every convolution's output shape through hooks; masks give the active
kernels. Conventions:

- ``params_dense``: every parameter. ``params_effective``: dense parameters minus the weights of
  inactive kernels (biases, norms, heads and the backbone count dense).
- ``macs_dense``: true multiply-accumulates of one forward pass of one patch (eval mode: one head).
  A ConvTranspose3d costs Cin × in_voxels × Cout × k (every input voxel scatters a kernel).
  ``macs_effective``: the same with masked layers counting only active kernels.
- ``flops_paper``: 2 × effective MACs with ConvTranspose3d counted per *output* voxel
  (Cout × out_voxels × Cin × k, the hook-counter convention of the paper's table; it
  overstates a 2×2×2 transposed conv 8×).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .e2enet import E2ENet
from .registry import create_model


@dataclass(frozen=True)
class ModelCost:
    params_dense: int
    params_effective: int
    macs_dense: int
    macs_effective: int
    flops_paper: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _active_fraction(module: nn.Module) -> float:
    mask = getattr(module, "kernel_mask", None)
    if mask is None:
        return 1.0
    return float(mask.sum()) / mask.numel()


def model_cost(model_or_config: E2ENet | ModelConfig, patch: tuple[int, int, int],
               *, sparsity: float | None = None, seed: int = 0) -> ModelCost:
    """Cost of one forward pass of a (1, C, *patch) input in eval mode.

    ``model_or_config``: a built model (its masks are used) or a ModelConfig (a model is built with
    uniform masks at ``sparsity``, default 0 = dense).
    """
    if isinstance(model_or_config, ModelConfig):
        model = create_model(model_or_config, sparsity=sparsity or 0.0, seed=seed)
    else:
        model = model_or_config
    divisor = model.config.divisor()
    if any(p % d for p, d in zip(patch, divisor)):
        raise ValueError(f"patch {tuple(patch)} is not a multiple of {divisor}")

    params_dense = sum(p.numel() for p in model.parameters())
    params_effective = params_dense
    for mw in model.maskable():
        params_effective -= round((1.0 - _active_fraction(mw.module)) * mw.weight.numel())

    density = {name: _active_fraction(m) for name, m in model.named_modules()}
    # Run a meta-device twin: shapes propagate, nothing is allocated or computed.
    twin = copy.deepcopy(model).to("meta").eval()
    macs_dense = macs_effective = 0
    flops_paper = 0.0

    def make_hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            nonlocal macs_dense, macs_effective, flops_paper
            w = module.weight
            taps = math.prod(w.shape[2:])
            if isinstance(module, nn.ConvTranspose3d):
                true = inputs[0].numel() * w.shape[1] * taps  # each input voxel scatters Cout kernels
                paper = output.numel() * w.shape[0] * taps  # counted per output voxel
            else:
                true = paper = output.numel() * w.shape[1] * taps
            macs_dense += true
            macs_effective += round(true * density[name])
            flops_paper += 2 * paper * density[name]

        return hook

    for name, module in twin.named_modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            module.register_forward_hook(make_hook(name))
    with torch.no_grad():
        twin(torch.empty((1, model.config.in_channels, *patch), device="meta"))
    return ModelCost(params_dense, params_effective, macs_dense, macs_effective, round(flops_paper))
