"""Schedule: cosine prune fraction and update iterations as pure functions of the step."""

from __future__ import annotations

import itertools
import math

import pytest

from napari_e2enet.config import SparsityConfig
from napari_e2enet.sparse import is_update_step, prune_fraction, update_iterations


def test_prune_fraction_at_start_middle_end() -> None:
    assert prune_fraction(0, 1000) == pytest.approx(0.5)
    assert prune_fraction(500, 1000) == pytest.approx((0.5 + 0.001) / 2)
    assert prune_fraction(1000, 1000) == pytest.approx(0.001)


def test_prune_fraction_formula_and_clipping() -> None:
    r0, rmin, total = 0.3, 0.01, 250
    for t in (0, 17, 125, 200, 250):
        expected = rmin + 0.5 * (r0 - rmin) * (1 + math.cos(math.pi * t / total))
        assert prune_fraction(t, total, r0, rmin) == pytest.approx(expected)
    assert prune_fraction(-5, total, r0, rmin) == pytest.approx(r0)
    assert prune_fraction(total + 9, total, r0, rmin) == pytest.approx(rmin)
    values = [prune_fraction(t, 100) for t in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_prune_fraction_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        prune_fraction(1, 0)
    with pytest.raises(ValueError):
        prune_fraction(1, 10, r0=0.1, r_min=0.2)


def test_update_steps_are_positive_multiples_but_not_the_last() -> None:
    assert update_iterations(3, 10) == [3, 6, 9]
    assert update_iterations(3, 9) == [3, 6]  # 9 is the last iteration
    assert [t for t in range(0, 13) if is_update_step(t, 3, 12)] == [3, 6, 9]
    assert not is_update_step(0, 3, 12)


def test_update_steps_stop_at_fraction_and_never_when_disabled() -> None:
    assert update_iterations(3, 12, stop_at=0.5) == [3, 6]
    assert update_iterations(3, 12, stop_at=0.0) == []
    assert update_iterations(0, 12) == []
    assert not is_update_step(6, 0, 12)


def test_auto_update_every_follows_config() -> None:
    assert SparsityConfig().resolved_update_every(250_000) == 1200
    assert SparsityConfig(update_every=7).resolved_update_every(100) == 7
    assert 1 <= SparsityConfig().resolved_update_every(100) <= 10
