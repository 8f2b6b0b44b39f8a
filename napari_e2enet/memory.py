"""Memory bounds: estimate what a volume or a training batch will need before allocating it.

A model file's plan decides the grid the network sees, so a tampered (or simply unsuited) plan can
ask for any amount of memory: a voxel size of 0.001 mm turns a 32³ phantom into 10¹⁵ voxels. Instead
of a ``MemoryError`` deep inside scipy (or the kernel's OOM killer), the work is refused up front with
one line that says how much it would need and how much there is.

The estimates count the large arrays only (see each function) and err low, so a refusal is certain
to be right; work that passes may still run out of memory in what is not counted (the catch-all in
the CLI then reports it in one line).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    from .data.preprocess import Plan
    from .data.volume import Volume

GIB = float(1 << 30)


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 ``memory.max``, v1 ``limit_in_bytes``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        if hierarchy == "0" and controllers == "":  # cgroup v2
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            limit_file, usage_file = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            limit_file, usage_file = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        try:
            limit_text = limit_file.read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int(usage_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if limit >= 1 << 60:  # v1 "no limit"
            return None
        return max(0, limit - usage)
    return None


def available_memory() -> tuple[int, str]:
    """(bytes this process can still allocate, what sets that bound): the least of the system's
    available memory plus free swap, the address-space limit (``ulimit -v``) less what the process
    already maps, and the cgroup (container) limit less its usage."""
    import psutil

    vm = psutil.virtual_memory()
    candidates = [(int(vm.available + psutil.swap_memory().free), "available memory")]
    try:
        import resource
    except ImportError:  # Windows: no rlimits
        resource = None  # type: ignore[assignment]
    soft = resource.getrlimit(resource.RLIMIT_AS)[0] if resource is not None else -1
    if resource is not None and soft != resource.RLIM_INFINITY:
        used = psutil.Process(os.getpid()).memory_info().vms
        candidates.append((max(0, soft - used), "the address-space limit (ulimit -v)"))
    room = _cgroup_room()
    if room is not None:
        candidates.append((room, "the container's memory limit"))
    return min(candidates)


def gib(n: float) -> str:
    """``n`` bytes in GiB, short: 0.02, 3.4, 141000."""
    value = n / GIB
    return f"{value:.2g}" if value < 10 else f"{value:,.0f}"


def check_memory(need: float, what: str, path: str | Path | None) -> None:
    """Raise InputError (one line naming ``path``) when ``need`` bytes exceed what is available.

    ``what`` completes "… needs about N GiB": e.g. "segmenting case_01 (600x600x600 voxels)".
    """
    have, bound = available_memory()
    if not math.isfinite(need) or need > have:
        raise InputError(f"{what} needs about {gib(need)} GiB of memory, but only {gib(have)} GiB is "
                         f"available ({bound})", path)


def network_grid(volume: Volume, plan: Plan) -> tuple[int, int, int]:
    """(D, H, W) of ``volume`` on the network grid ``plan`` resamples it to (no voxel is touched)."""
    from .data.preprocess import _network_view, _target_shape, canonical_orientation

    oriented, _ = canonical_orientation(volume, plan.orientation)  # views only
    arr, _, spacing = _network_view(oriented, plan)
    return _target_shape(arr.shape[1:], spacing, plan.target_spacing)


def prediction_bytes(source_shape: tuple[int, ...], channels: int, grid: tuple[int, int, int], classes: int,
                     patch: tuple[int, int, int]) -> float:
    """Bytes a sliding-window prediction holds at its peak, counting the large arrays only.

    ``source_shape`` (X, Y, Z) of the image, ``grid`` (D, H, W) on the network grid. Counted: the
    normalised float32 copy of the source, the resampled float32 input and one resampling
    intermediate (C × grid × 4 bytes each), the labels on the grid (1 byte a voxel), the logits of one
    slab of the sliding window (float16 × classes × patch depth × H × W) and the labels back on the
    source grid (2 bytes a voxel).
    """
    src = math.prod(int(n) for n in source_shape)
    d, h, w = (int(n) for n in grid)
    net = float(d) * h * w
    return channels * src * 4.0 + 2 * channels * net * 4.0 + net + classes * min(d, patch[0]) * h * w * 2.0 + src * 2.0


def training_case_bytes(grid: tuple[int, int, int], channels: int) -> float:
    """Bytes one preprocessed training case keeps in memory: float32 image channels and int labels
    (2 bytes) on the network grid, plus one resampling intermediate while it is made."""
    net = float(math.prod(int(n) for n in grid))
    return net * (channels * 4.0 * 2 + 2.0)
