"""Kernel masks of the DSFF layers: which kernels are active, their counts, and enforcement.

DSFF of the E2ENet paper (Wu et al., NeurIPS 2024). One bool entry per kernel, i.e. per pair of the first two weight axes
(Conv3d (out, in); ConvTranspose3d (in, out)), constant over the kernel's spatial taps. Masked-off
weights are stored as zeros in the ordinary parameters (no parametrization), so the backward pass
still produces dense gradients for them — RigL-style gradient regrowth reads those.

Enforcement (:meth:`MaskSet.apply`) multiplies every masked weight and its optimizer state by the
mask: SGD ``momentum_buffer``, Adam ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq`` — in
general every tensor in the parameter's optimizer state that has the parameter's shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..models.e2enet import E2ENet, MaskableWeight, uniform_masks


def unwrap_model(model: nn.Module) -> E2ENet:
    """The E2ENet inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    seen = 0
    while not isinstance(model, E2ENet) and seen < 8:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
        seen += 1
    if not isinstance(model, E2ENet):
        raise TypeError(f"expected an E2ENet (or a wrapper of one), got {type(model).__name__}")
    return model


def kernel_view(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The (A, B) kernel mask reshaped to broadcast over a weight (A, B, kd, kh, kw)."""
    return mask.view(tuple(mask.shape) + (1,) * (weight.dim() - mask.dim()))


def kernel_l1(tensor: torch.Tensor) -> torch.Tensor:
    """Per-kernel L1 norm: Σ |x| over the spatial taps; (A, B, ...) → (A, B), float32."""
    dims = tuple(range(2, tensor.dim()))
    return tensor.detach().abs().float().sum(dim=dims) if dims else tensor.detach().abs().float()


class MaskSet(Mapping[str, torch.Tensor]):
    """Bool kernel masks by parameter name (the names of ``model.maskable()``).

    A layer without an entry is dense and never touched. The set is plain data: it is bound to a
    model only when :meth:`apply` installs it (the model's ``kernel_mask`` buffers then point at
    the set's tensors, so ``model.state_dict()`` carries the masks too).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        self._masks: dict[str, torch.Tensor] = {}
        for name, mask in (masks or {}).items():
            self.set(name, mask)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> MaskSet:
        """The masks currently installed in ``model`` (dense layers absent). Shares the tensors."""
        return cls(unwrap_model(model).masks())

    @classmethod
    def uniform(cls, model: nn.Module, sparsity: float, seed: int = 0) -> MaskSet:
        """Uniform random masks, exactly ``round((1 − S) · kernels)`` active per layer (≥ 1)."""
        return cls(uniform_masks(unwrap_model(model), sparsity, seed))

    def copy(self) -> MaskSet:
        return MaskSet({name: mask.clone() for name, mask in self._masks.items()})

    # -- mapping ---------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def set(self, name: str, mask: torch.Tensor) -> None:
        """Replace one layer's mask (bool, 2-D ``weight.shape[:2]``; takes ownership, no copy)."""
        if mask.dim() != 2:
            raise ValueError(f"mask {name}: expected a 2-D (kernel) mask, got shape {tuple(mask.shape)}")
        self._masks[name] = mask if mask.dtype == torch.bool else mask.to(torch.bool)

    # -- statistics ------------------------------------------------------------------------------
    def active(self, name: str | None = None) -> int:
        """Active kernels of one layer, or of all masked layers."""
        names = [name] if name is not None else list(self._masks)
        return sum(int(self._masks[n].sum()) for n in names)

    def total(self, name: str | None = None) -> int:
        """Kernels (active or not) of one layer, or of all masked layers."""
        names = [name] if name is not None else list(self._masks)
        return sum(self._masks[n].numel() for n in names)

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{name: (active, total)}`` kernel counts per layer."""
        return {name: (int(mask.sum()), mask.numel()) for name, mask in self._masks.items()}

    def density(self, name: str | None = None) -> float:
        """Active / total kernels of one layer, or over all masked layers (1.0 for an empty set)."""
        total = self.total(name)
        return self.active(name) / total if total else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density()

    # -- enforcement -----------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install the masks in ``model`` and zero the inactive kernels' weights and optimizer state.

        Call after every ``optimizer.step()`` (the DSFF updater does). Moves a mask to its
        weight's device once. Raises ValueError for names the model has no maskable weight for.
        """
        layers = _layers(model)
        unknown = set(self._masks) - set(layers)
        if unknown:
            raise ValueError(f"masks for unknown weights: {sorted(unknown)[:3]}")
        state = optimizer.state if optimizer is not None else {}
        for name, mask in self._masks.items():
            mw = layers[name]
            weight = mw.weight
            if tuple(mask.shape) != mw.kernel_shape:
                raise ValueError(f"mask {name}: shape {tuple(mask.shape)} != {mw.kernel_shape}")
            if mask.device != weight.device:
                mask = mask.to(weight.device)
                self._masks[name] = mask
            if mw.module.kernel_mask is not mask:
                mw.module.kernel_mask = mask
            keep = kernel_view(mask, weight).to(weight.dtype)
            weight.mul_(keep)
            for value in state.get(weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    value.mul_(keep.to(value.dtype))

    @torch.no_grad()
    def zero_kernels(self, model: nn.Module, name: str, kernels: torch.Tensor,
                     optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the weights and optimizer state of the kernels at flat indices ``kernels`` of a layer."""
        mw = _layers(model)[name]
        weight = mw.weight
        flat = torch.ones(mw.kernel_shape[0] * mw.kernel_shape[1], dtype=weight.dtype, device=weight.device)
        flat[kernels.to(weight.device)] = 0
        keep = kernel_view(flat.view(mw.kernel_shape), weight)
        weight.mul_(keep)
        if optimizer is not None:
            for value in optimizer.state.get(weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    value.mul_(keep.to(value.dtype))

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: bool CPU tensor}``: plain tensors, safe for ``torch.save`` and safetensors."""
        return {name: mask.detach().to("cpu", copy=True) for name, mask in self._masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace every mask by ``state``'s (same layer names and shapes as now, unless empty)."""
        if self._masks:
            if set(state) != set(self._masks):
                missing = sorted(set(self._masks) - set(state))
                extra = sorted(set(state) - set(self._masks))
                raise ValueError(f"mask state does not match: missing {missing[:3]}, unexpected {extra[:3]}")
            for name, mask in state.items():
                if tuple(mask.shape) != tuple(self._masks[name].shape):
                    raise ValueError(f"mask {name}: shape {tuple(mask.shape)} != {tuple(self._masks[name].shape)}")
        device = {name: mask.device for name, mask in self._masks.items()}
        self._masks = {}
        for name, mask in state.items():
            self.set(name, mask.detach().to(device.get(name, mask.device), dtype=torch.bool, copy=True))

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} layers, density={self.density():.4f})"


def _layers(model: nn.Module) -> dict[str, MaskableWeight]:
    return {mw.name: mw for mw in unwrap_model(model).maskable()}
