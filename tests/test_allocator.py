"""keep_freed_memory: fresh tensors inside the block reuse freed memory instead of faulting in new pages.

Measured in a fresh interpreter: glibc's state (free chunks left in its bins, thresholds that
mallopt fixed) depends on everything the process allocated before, e.g. other tests' training runs.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the block switches glibc's malloc only")

_ELEMENTS = 25 * 1024 * 1024  # float32: 100 MiB, far above glibc's mmap threshold
_ROUND = _ELEMENTS * 4 // resource.getpagesize()  # the pages one fresh tensor touches

_PROBE = f"""
import json, resource, torch
from napari_e2enet.allocator import keep_freed_memory

def faults(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        fresh = torch.empty({_ELEMENTS})
        fresh.fill_(1.0)
        del fresh
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))

out = {{"outside": faults(8)}}
with keep_freed_memory() as switched:
    out["switched"] = switched
    faults(2)  # the first ones grow the heap
    out["inside"] = faults(8)
    with keep_freed_memory():
        pass
    out["after_inner_block"] = faults(8)
    held = torch.empty({_ELEMENTS})
    held.fill_(1.0)
    del held
    out["rss_kept"] = rss_kib()
out["rss_returned"] = rss_kib()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_tensors_reuse_freed_memory_inside_the_block_and_not_outside(probe) -> None:
    assert probe["switched"]
    assert probe["outside"] > 6 * _ROUND  # each fresh tensor was faulted in again
    # measured 0, now and then one or two rounds: the host reclaims idle guest pages (DAMON) and
    # those fault in again; without the block every round faults
    assert probe["inside"] < 4 * _ROUND


def test_nested_blocks_keep_the_setting_until_the_outermost_leaves(probe) -> None:
    assert probe["after_inner_block"] < 4 * _ROUND


def test_leaving_the_block_gives_the_memory_back(probe) -> None:
    assert probe["rss_kept"] - probe["rss_returned"] > 50 * 1024  # KiB: most of the 100 MiB
