"""The DSFF topology updater: re-mask after every step, prune + regrow every ΔT iterations.

DSFF of the E2ENet paper (Wu et al., NeurIPS 2024; README "Paper fidelity"). The trainer owns the optimizer and calls ``optimizer.step()`` exactly once per
iteration; right after it, it calls :meth:`DSFFUpdater.after_step` with the number of steps
completed so far (1 … T)::

    updater = DSFFUpdater(model, optimizer, config.sparsity, total_iterations=T, seed=config.seed)
    for iteration in range(start + 1, T + 1):
        optimizer.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        clip_grad_norm_(model.parameters(), 12)
        optimizer.step()
        update = updater.after_step(iteration)   # never steps the optimizer
        if update is not None:
            record.record(model, "update", iteration=iteration, epoch=epoch, update=update)

``after_step`` always re-applies the masks to the weights and their optimizer state (the step just
moved the inactive weights away from zero: momentum and weight decay act on them too). At update
iterations (:func:`~.schedule.is_update_step`) each masked layer independently:

1. prunes the ``min(⌈r(t) · active⌉, inactive)`` active kernels with the smallest L1 norm
   (Σ |w| over the kernel's taps; ties go to the lower flat index);
2. regrows exactly as many kernels chosen among those that were inactive *before* this update
   (never the ones just pruned): uniformly at random (paper), from a ``torch.Generator`` seeded by
   ``(seed, update index)`` — identical on every DDP rank, global RNG untouched — or, with
   ``regrow="gradient"`` (RigL), the ones with the largest gradient L1 norm (Σ |∂L/∂w| over taps);
3. zeroes the regrown kernels' weights and optimizer state; the layer's density is unchanged.

When gradients are read (``regrow="gradient"`` only): inside ``after_step`` at update iterations,
from ``param.grad`` as the backward before that step left it. Masked weights are stored as zeros,
not parametrized, so these gradients are dense. Do not clear ``.grad`` between ``optimizer.step()``
and ``after_step``. Under AMP the gradients may still be loss-scaled; the ranking within a layer
does not depend on the scale. Non-finite gradients count as zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import SparsityConfig
from .masks import MaskSet, _layers, kernel_l1, unwrap_model
from .schedule import is_update_step, prune_fraction

_STATE_VERSION = 1
_RNG_DOMAIN = 0x64736666  # "dsff": keeps these streams apart from other users of the same seed


@dataclass(frozen=True)
class TopologyUpdate:
    """What one topology update did. Per-layer dicts are keyed by parameter name.

    ``survived`` counts, per layer, the kernels regrown at the previous update that are still
    active after this one (i.e. were not pruned now); ``None`` at the first update.
    """

    iteration: int  # optimizer steps completed when the update ran
    update_index: int  # 1 for the first update of the run, 2 for the next, …
    prune_fraction: float  # r(t)
    regrow: str  # "random" | "gradient"
    pruned: dict[str, int]
    regrown: dict[str, int]
    total_pruned: int
    total_regrown: int
    active: int  # active kernels over all masked layers, after the update
    kernels: int  # all kernels of the masked layers
    survived: dict[str, int] | None = None
    previous_regrown: int | None = None  # kernels regrown at the previous update
    total_survived: int | None = None

    @property
    def density(self) -> float:
        return self.active / self.kernels if self.kernels else 1.0

    @property
    def survival_rate(self) -> float | None:
        """Share of the previous update's regrown kernels that survived this one."""
        if self.total_survived is None or not self.previous_regrown:
            return None
        return self.total_survived / self.previous_regrown

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TopologyUpdate:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _seed_for(seed: int, update_index: int) -> int:
    """A 63-bit seed derived from (seed, update index) only: the same on every rank and on resume."""
    state = np.random.SeedSequence([_RNG_DOMAIN, int(seed) & 0xFFFFFFFFFFFFFFFF, int(update_index)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class DSFFUpdater:
    """Keeps a model's DSFF masks enforced and evolves them (the paper's DSFF).

    ``model``: an E2ENet (or a DDP / compile wrapper of one). Its installed masks are the initial
    topology; a dense model with ``config.sparsity > 0`` gets uniform random masks seeded by
    ``seed``. ``config.sparsity == 0`` with a dense model makes the updater a no-op.
    ``optimizer``: the one stepping the model (may be None: then only weights are masked).
    ``total_iterations``: T, the run's number of optimizer steps (for r(t) and the last-step rule).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, config: SparsityConfig,
                 total_iterations: int, seed: int = 0) -> None:
        if total_iterations <= 0:
            raise ValueError(f"DSFFUpdater: total_iterations must be positive, got {total_iterations}")
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.total_iterations = int(total_iterations)
        self.seed = int(seed)
        self.update_every = config.resolved_update_every(self.total_iterations)
        net = unwrap_model(model)
        self.masks = MaskSet.from_model(net)
        if not self.masks and config.sparsity > 0:
            self.masks = MaskSet.uniform(net, config.sparsity, seed)
        self._check_density(net)
        self.update_count = 0
        self.last_iteration = 0
        self._regrown: dict[str, torch.Tensor] | None = None  # flat kernel indices, last update
        self.masks.apply(model, optimizer)

    def _check_density(self, net: nn.Module) -> None:
        if not self.masks:
            return
        if self.config.sparsity == 0:
            raise ValueError("DSFFUpdater: the model has kernel masks but config.sparsity is 0")
        expected = sum(max(1, round((1.0 - self.config.sparsity) * n)) for _, n in self.masks.counts().values())
        if self.masks.active() != expected:
            raise ValueError(
                f"DSFFUpdater: the model's masks have {self.masks.active()} active kernels "
                f"(sparsity {self.masks.sparsity:.4f}); config.sparsity={self.config.sparsity} needs {expected}"
            )

    # -- schedule -------------------------------------------------------------------------------
    def is_update_step(self, iteration: int) -> bool:
        """Whether ``after_step(iteration)`` will change the topology."""
        return bool(self.masks) and is_update_step(
            iteration, self.update_every, self.total_iterations, self.config.stop_updates_at)

    def needs_dense_grads(self, iteration: int) -> bool:
        """Whether ``after_step(iteration)`` reads every kernel's gradient, the pruned ones' too
        (gradient regrowth at an update iteration); other steps need the active kernels' only."""
        return self.config.regrow == "gradient" and self.is_update_step(iteration)

    def prune_fraction(self, iteration: int) -> float:
        """r(t) at iteration ``t`` (cosine decay from ``config.prune_fraction`` to ``prune_fraction_min``)."""
        return prune_fraction(iteration, self.total_iterations, self.config.prune_fraction,
                              self.config.prune_fraction_min)

    # -- the per-iteration hook -----------------------------------------------------------------
    def after_step(self, iteration: int) -> TopologyUpdate | None:
        """Call once right after each ``optimizer.step()``; ``iteration`` = steps completed (1 … T).

        Always re-applies the masks to weights and optimizer state; at update iterations also
        prunes and regrows, and returns what it did (else None). Never calls ``optimizer.step()``.
        Raises ValueError when ``iteration`` does not increase (a second call for the same step).
        """
        if iteration <= self.last_iteration:
            raise ValueError(
                f"DSFFUpdater.after_step: iteration {iteration} after {self.last_iteration}; "
                "call it exactly once per optimizer step with the number of steps completed")
        self.last_iteration = int(iteration)
        self.masks.apply(self.model, self.optimizer)
        if not self.is_update_step(iteration):
            return None
        return self._update(iteration)

    def apply(self) -> None:
        """Re-apply the masks now (e.g. after loading weights from elsewhere)."""
        self.masks.apply(self.model, self.optimizer)

    @torch.no_grad()
    def _update(self, iteration: int) -> TopologyUpdate:
        self.update_count += 1
        r = self.prune_fraction(iteration)
        gradient = self.config.regrow == "gradient"
        generator = None if gradient else torch.Generator().manual_seed(_seed_for(self.seed, self.update_count))
        layers = _layers(self.model)
        pruned: dict[str, int] = {}
        regrown: dict[str, int] = {}
        regrown_idx: dict[str, torch.Tensor] = {}
        survived: dict[str, int] | None = {} if self._regrown is not None else None
        for name in list(self.masks):  # fixed order: the model's maskable() order
            mask = self.masks[name]
            weight = layers[name].weight
            flat = mask.reshape(-1).cpu()
            active_idx = torch.nonzero(flat).view(-1)
            inactive_idx = torch.nonzero(~flat).view(-1)
            n_active = active_idx.numel()
            # round() first: r·active like 20.000000004 must prune 20, not 21.
            n = min(math.ceil(round(r * n_active, 9)), inactive_idx.numel(), n_active)
            if n > 0:
                l1 = kernel_l1(weight).reshape(-1).cpu()[active_idx]
                order = torch.sort(l1, stable=True).indices  # ascending, ties by index
                drop = active_idx[order[:n]]
                if gradient:
                    grow = inactive_idx[self._grad_order(name, weight, inactive_idx)[:n]]
                else:
                    grow = inactive_idx[torch.randperm(inactive_idx.numel(), generator=generator)[:n]]
                new = flat.clone()
                new[drop] = False
                new[grow] = True
                self.masks.set(name, new.view(mask.shape).to(mask.device))
            else:
                drop = grow = torch.zeros(0, dtype=torch.long)
            pruned[name] = int(drop.numel())
            regrown[name] = int(grow.numel())
            regrown_idx[name] = grow
            if survived is not None and self._regrown is not None:
                prev = self._regrown.get(name, torch.zeros(0, dtype=torch.long))
                survived[name] = int(self.masks[name].reshape(-1).cpu()[prev].sum()) if prev.numel() else 0
        self.masks.apply(self.model, self.optimizer)  # zero the pruned kernels (+ their state)
        for name, grow in regrown_idx.items():  # regrown kernels start from zero, state included
            if grow.numel():
                self.masks.zero_kernels(self.model, name, grow, self.optimizer)
        previous = None if self._regrown is None else sum(int(v.numel()) for v in self._regrown.values())
        self._regrown = regrown_idx
        return TopologyUpdate(
            iteration=int(iteration), update_index=self.update_count, prune_fraction=r,
            regrow=self.config.regrow, pruned=pruned, regrown=regrown,
            total_pruned=sum(pruned.values()), total_regrown=sum(regrown.values()),
            active=self.masks.active(), kernels=self.masks.total(), survived=survived,
            previous_regrown=previous, total_survived=None if survived is None else sum(survived.values()),
        )

    def _grad_order(self, name: str, weight: torch.Tensor, inactive_idx: torch.Tensor) -> torch.Tensor:
        """Positions in ``inactive_idx``, largest gradient L1 first (ties by index)."""
        if weight.grad is None:
            raise RuntimeError(
                f"DSFFUpdater: regrow='gradient' needs {name}.grad at update iterations; "
                "call after_step before clearing the gradients")
        score = kernel_l1(torch.nan_to_num(weight.grad, nan=0.0, posinf=0.0, neginf=0.0))
        score = score.reshape(-1).cpu()[inactive_idx]
        return torch.sort(score, descending=True, stable=True).indices

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: masks, schedule position, survival bookkeeping.

        Plain Python values and CPU tensors (``torch.save``-able). Random regrowth needs no RNG
        state: its generator is derived from (seed, update index).
        """
        return {
            "version": _STATE_VERSION,
            "masks": self.masks.state_dict(),
            "update_count": self.update_count,
            "last_iteration": self.last_iteration,
            "regrown": None if self._regrown is None
            else {name: idx.detach().to("cpu", copy=True) for name, idx in self._regrown.items()},
            "seed": self.seed,
            "total_iterations": self.total_iterations,
            "update_every": self.update_every,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` output, install the masks and re-apply them.

        Load the model weights and the optimizer state first (this zeroes their inactive entries).
        With ``strict`` a different seed, T, ΔT or regrow mode raises ValueError, since the
        continued run would no longer match the interrupted one.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"DSFFUpdater: unsupported state version {state.get('version')!r}")
        if strict:
            mine = {"seed": self.seed, "total_iterations": self.total_iterations,
                    "update_every": self.update_every, "regrow": self.config.regrow}
            theirs = {"seed": state["seed"], "total_iterations": state["total_iterations"],
                      "update_every": state["update_every"], "regrow": state["config"]["regrow"]}
            diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
            if diff:
                raise ValueError(f"DSFFUpdater: saved state differs from this run (saved, now): {diff}")
        self.masks.load_state_dict(state["masks"])
        self.update_count = int(state["update_count"])
        self.last_iteration = int(state["last_iteration"])
        regrown = state["regrown"]
        self._regrown = None if regrown is None else {k: v.to(torch.long).clone() for k, v in regrown.items()}
        self.masks.apply(self.model, self.optimizer)

    # -- statistics -----------------------------------------------------------------------------
    @property
    def density(self) -> float:
        return self.masks.density()

    def __repr__(self) -> str:
        return (f"DSFFUpdater(density={self.density:.4f}, update_every={self.update_every}, "
                f"updates={self.update_count}, regrow={self.config.regrow!r})")
