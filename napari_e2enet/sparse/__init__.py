"""Dynamic sparse feature fusion (DSFF): kernel masks, schedule, updater, connectivity records.

DSFF of the E2ENet paper (Wu et al., NeurIPS 2024; README "Paper fidelity"). Typical use in a training loop (one ``optimizer.step()`` per iteration)::

    updater = DSFFUpdater(model, optimizer, SparsityConfig(), total_iterations=T, seed=0)
    record = ConnectivityRecord.for_model(model)
    ...
    optimizer.step()
    update = updater.after_step(iteration)      # iteration = steps completed, 1 … T
    if update is not None:
        record.record(model, "update", iteration, epoch=epoch, update=update)
"""

from ..config import SparsityConfig
from .connectivity import ConnectivityRecord, snapshot
from .masks import MaskSet, kernel_l1, unwrap_model
from .schedule import is_update_step, prune_fraction, update_iterations
from .updater import DSFFUpdater, TopologyUpdate

__all__ = [
    "ConnectivityRecord",
    "DSFFUpdater",
    "MaskSet",
    "SparsityConfig",
    "TopologyUpdate",
    "is_update_step",
    "kernel_l1",
    "prune_fraction",
    "snapshot",
    "unwrap_model",
    "update_iterations",
]
