"""Tiny E2ENet models and a deterministic training loop for the DSFF tests (2-core CPU)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from napari_e2enet import create_model
from napari_e2enet.config import SparsityConfig
from napari_e2enet.models.e2enet import E2ENet
from napari_e2enet.sparse import DSFFUpdater

TINY = {"widths": (4, 8, 8), "pools": ((2, 2, 2),) * 2, "num_heads": 2, "num_classes": 3}
PATCH = 16


def tiny_model(sparsity: float = 0.8, mask_seed: int = 0, init_seed: int = 0) -> E2ENet:
    """3 levels, 3 fused nodes, 8 masked layers; weights from ``init_seed`` (global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        return create_model("e2enet_small", sparsity=sparsity, seed=mask_seed, **TINY)


def sgd(model: torch.nn.Module) -> torch.optim.SGD:
    """The paper's optimizer (SGD, Nesterov, momentum 0.99, weight decay 3e-5)."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)


def batch(iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic (image, labels) pair per iteration: (1, 1, 16³) and (1, 16³)."""
    g = torch.Generator().manual_seed(1000 + iteration)
    x = torch.randn(1, 1, PATCH, PATCH, PATCH, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 0] > 1.2).long()
    return x, y


def loss_fn(outputs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(())
    for out in outputs:
        target = F.interpolate(y[:, None].float(), size=out.shape[2:], mode="nearest")[:, 0].long()
        total = total + F.cross_entropy(out, target)
    return total


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int) -> float:
    """One iteration: zero grads, forward, backward, one optimizer.step(). Returns the loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    x, y = batch(iteration)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def run(model: torch.nn.Module, optimizer: torch.optim.Optimizer, updater: DSFFUpdater, start: int, stop: int,
        each: Callable[[int, object], None] | None = None) -> list:
    """Iterations start+1 … stop (1-based steps completed); returns the TopologyUpdates."""
    updates = []
    for it in range(start + 1, stop + 1):
        train_step(model, optimizer, it)
        update = updater.after_step(it)
        if update is not None:
            updates.append(update)
        if each is not None:
            each(it, update)
    return updates


@pytest.fixture
def make_run() -> Callable[..., tuple[E2ENet, torch.optim.SGD, DSFFUpdater]]:
    def _make(update_every: int = 2, total: int = 10, seed: int = 0, regrow: str = "random",
              init_seed: int = 0, sparsity: float = 0.8, mask_seed: int | None = None):
        model = tiny_model(sparsity, mask_seed=seed if mask_seed is None else mask_seed, init_seed=init_seed)
        optimizer = sgd(model)
        config = SparsityConfig(sparsity=sparsity, update_every=update_every, regrow=regrow)
        return model, optimizer, DSFFUpdater(model, optimizer, config, total_iterations=total, seed=seed)

    return _make


@pytest.fixture
def helpers() -> SimpleNamespace:
    """The module's helpers, for tests (tests never import conftest directly)."""
    return SimpleNamespace(tiny_model=tiny_model, sgd=sgd, batch=batch, loss_fn=loss_fn,
                           train_step=train_step, run=run)
