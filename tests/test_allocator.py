"""keep_freed_memory: fresh tensors inside the block reuse freed memory instead of faulting in new pages."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from napari_e2enet.allocator import keep_freed_memory

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the block switches glibc's malloc only")

_MB100 = 25 * 1024 * 1024  # float32 elements: 100 MiB, far above glibc's mmap threshold


def _faults_of_fresh_tensors(rounds: int) -> int:
    """Minor page faults while allocating, touching and freeing a 100 MiB tensor ``rounds`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        fresh = torch.empty(_MB100)
        fresh.fill_(1.0)
        del fresh
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


_ROUND = _MB100 * 4 // resource.getpagesize()  # the pages one fresh tensor touches


@glibc_only
def test_fresh_tensors_reuse_freed_memory_inside_the_block_and_not_outside() -> None:
    outside = _faults_of_fresh_tensors(8)
    with keep_freed_memory() as switched:
        assert switched
        _faults_of_fresh_tensors(2)  # the first ones grow the heap
        inside = _faults_of_fresh_tensors(8)
    assert outside > 6 * _ROUND  # each fresh tensor was faulted in again
    assert inside < 2 * _ROUND  # (measured: 0, at most one round when the heap moved)


@glibc_only
def test_leaving_the_block_gives_the_memory_back_and_restores_the_defaults() -> None:
    with keep_freed_memory():
        held = torch.empty(_MB100)
        held.fill_(1.0)
        del held
        kept = _rss_kib()
    returned = _rss_kib()
    assert kept - returned > 50 * 1024  # most of the 100 MiB went back on leaving


@glibc_only
def test_nested_blocks_keep_the_setting_until_the_outermost_leaves() -> None:
    with keep_freed_memory():
        with keep_freed_memory() as inner:
            assert inner
        _faults_of_fresh_tensors(2)
        assert _faults_of_fresh_tensors(8) < 2 * _ROUND
