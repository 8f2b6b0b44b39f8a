"""When DSFF updates the topology and how much it prunes: pure functions of the step.

DSFF of the E2ENet paper (Wu et al., NeurIPS 2024). Iterations are counted as **optimizer steps completed**, 1 … ``total``:
iteration ``t`` is the number passed to :meth:`DSFFUpdater.after_step` right after the t-th
``optimizer.step()``. Nothing here keeps state, so a resumed run needs only the iteration number.
"""

from __future__ import annotations

import math


def prune_fraction(t: float, total: int, r0: float = 0.5, r_min: float = 0.001) -> float:
    """Cosine-decayed prune fraction r(t) = r_min + ½ (r0 − r_min) (1 + cos(π t / T)).

    ``t`` is the iteration (clipped to [0, T]), ``total`` = T the number of training iterations.
    r(0) = r0, r(T/2) = (r0 + r_min) / 2, r(T) = r_min. Paper: r0 = 0.5, r_min = 0.001.
    """
    if total <= 0:
        raise ValueError(f"prune_fraction: total must be positive, got {total}")
    if not 0.0 <= r_min <= r0 <= 1.0:
        raise ValueError(f"prune_fraction: need 0 <= r_min <= r0 <= 1, got r0={r0}, r_min={r_min}")
    x = min(max(float(t), 0.0), float(total)) / total
    return r_min + 0.5 * (r0 - r_min) * (1.0 + math.cos(math.pi * x))


def is_update_step(iteration: int, update_every: int, total: int, stop_at: float = 1.0) -> bool:
    """Whether the topology is updated right after optimizer step number ``iteration`` (1-based).

    True at positive multiples of ΔT = ``update_every``, except at the last iteration ``total``
    (a kernel regrown there could never train) and after ``stop_at · total`` (the topology is
    frozen for the rest of the run). ``update_every <= 0`` means never.
    """
    if update_every <= 0 or iteration <= 0 or iteration >= total:
        return False
    if iteration > stop_at * total:
        return False
    return iteration % update_every == 0


def update_iterations(update_every: int, total: int, stop_at: float = 1.0) -> list[int]:
    """Every iteration at which :func:`is_update_step` is true, in order (for plots and tests)."""
    if update_every <= 0:
        return []
    return [t for t in range(update_every, total, update_every) if is_update_step(t, update_every, total, stop_at)]
