"""Shared test fixtures. Torch uses at most 2 threads: the CI machine has 2 cores."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def tiny_config():
    """A 3-level E2ENet small enough for gradient checks in milliseconds."""
    from napari_e2enet.models import model_config

    return model_config("e2enet_small", in_channels=1, num_classes=3, widths=(4, 8, 8), pools=((2, 2, 2),) * 2)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-screenshots", action="store_true", default=False,
                     help="copy screenshots made by the napari GUI tests to docs/screenshots/")
