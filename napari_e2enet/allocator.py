"""Keep freed memory in the process while training, instead of giving it back to the kernel.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` when the tensor dies,
so each training step touches gigabytes of new pages: a 2 × 48 × 64³ activation is 100 MB, 25 600
page faults. On a virtual machine a fault is expensive. Measured on the development VM (AMD EPYC
Zen 3, 2 threads, Firecracker guest): filling a fresh 100 MB tensor 82–111 ms, the same tensor
reused 16 ms; one training step of the paper network (S = 0.8, 64³, batch 2) took 1.6–2.2 M minor
faults and 6–7 s of system time.

Inside :func:`keep_freed_memory` glibc serves every block from its heap (``M_MMAP_MAX`` = 0) and
never trims it (``M_TRIM_THRESHOLD``), so after the first step the same memory is reused: the
faults fall to ~0.1 M per step and the system time below 1 s. The cost is that the process keeps
its peak: leaving the block restores glibc's defaults and hands the free memory back
(``malloc_trim``). Elsewhere (macOS, Windows, musl) it does nothing.

The settings are the process's (the C library has one heap), so nested or concurrent blocks (a
napari training worker while the CLI-style loop runs in a test) count their depth and the last to
leave restores them.

Main thread only, in effect: a worker thread allocates from its own glibc arena, whose heaps are
released whole whatever these settings say (measured: 100 MB and 40 MB tensors made and freed in a
thread inside the block faulted all their pages in every time). The CLI's train / finetune and
``bench`` run on the main thread; napari's training and fine-tuning jobs run on the main thread of
a child process for this reason (:mod:`napari_e2enet.training.isolated`).
"""

from __future__ import annotations

import ctypes
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["keep_freed_memory"]

# glibc's mallopt parameters (malloc.h) and their defaults (see mallopt(3)).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_NEVER_TRIM = (1 << 31) - 1  # the largest value mallopt's int takes

_lock = threading.Lock()
_depth = [0]  # how many keep_freed_memory blocks are open in this process


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the only one whose mallopt has these parameters), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _set(libc: ctypes.CDLL, keep: bool) -> bool:
    mmap_ok = libc.mallopt(_M_MMAP_MAX, 0 if keep else _DEFAULT_MMAP_MAX) == 1
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM if keep else _DEFAULT_TRIM_THRESHOLD) == 1
    return mmap_ok and trim_ok


@contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Within the block, freed tensors' memory stays in the process for the next allocation.

    Yields True where the C library was switched (glibc), False where the block does nothing.
    On leaving the outermost block glibc's defaults come back and free memory is returned.
    """
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        switched = _depth[0] > 0 or _set(libc, keep=True)
        _depth[0] += 1
    try:
        yield switched
    finally:
        with _lock:
            _depth[0] -= 1
            if _depth[0] == 0:
                _set(libc, keep=False)
                libc.malloc_trim(0)
