"""Memory of whole-volume inference (issue 18: 300×512×512 within 2.5 GB), checked on small shapes.

The fast path's arena is bounded by the full-resolution feature maps live at once, in units of one
level-0 feature map in the kernels' padded planar layout (``PP0`` = C0 · D · (H+2) · P floats):
the encoder's level-0 conv output while it is converted to PP and read for the level-1 input
(PP0 + ~0.8 PP0 + ~0.4 PP0), and in the decoder the level-0 nodes, which lay their output on
their forward input's memory one depth piece lower (a copy of the input's top planes instead of a
second full-resolution buffer). Measured 2.35-2.55 PP0 here and 2.30 PP0 for the paper network
at 128³ (1021 MiB); with a second full-resolution buffer, as before, 2.96-3.25 PP0 (1307 MiB).
"""

from __future__ import annotations

import pytest
import torch

from napari_e2enet.inference import fastpath
from napari_e2enet.inference.cpu import find_compiler
from napari_e2enet.inference.cpu.compact import kernel_status
from napari_e2enet.inference.sliding_window import CellAccumulator, TileGrid
from napari_e2enet.models import create_model

KERNELS, KERNEL_REASON = kernel_status()
needs_kernels = pytest.mark.skipif(find_compiler() is None, reason=f"no C compiler here ({KERNEL_REASON})")

ARENA_PER_PP0 = 2.7  # the bound, in level-0 PP feature maps (see the module docstring)
REDUCED = dict(widths=(8, 16, 24, 32, 32, 32), pools=((2, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2), (1, 2, 2)))


def _pp0_bytes(model: torch.nn.Module, shape: tuple[int, int, int]) -> int:
    d, h, w = shape
    return 4 * model.config.widths[0] * d * (h + 2) * ((w + 1 + 15) // 16 * 16)


def _without_inplace(fast: fastpath.AcceleratedE2ENet) -> fastpath.AcceleratedE2ENet:
    """The same module with every large output in a buffer of its own (the layout before)."""
    fast._level0_nodes = 0  # no headroom: the level-0 nodes cannot lay their output lower
    for unit in fast._encoder_units():
        unit.conv_in_place = lambda xin: False  # type: ignore[method-assign]
    return fast


@needs_kernels
@pytest.mark.parametrize("arch,kwargs,shape", [("e2enet_small", {}, (32, 32, 32)),
                                               ("e2enet", REDUCED, (32, 64, 64))])
def test_fast_path_arena_holds_few_full_resolution_maps(monkeypatch, arch, kwargs, shape):
    """Same logits as with separate buffers (also with garbage left in the arena), an arena
    within ARENA_PER_PP0 level-0 feature maps, and the in-place level-0 outputs really taken."""
    # depth pieces of 4 slices at these sizes, as 16 at 128³ (where the up-sampled input is 440 MiB)
    monkeypatch.setattr(fastpath, "_UP_PIECE_BYTES", 0)
    monkeypatch.setattr(fastpath, "_UP_PIECE_DEPTH", 4)
    taken = []
    original = fastpath._inplace_output

    def counting(*args, **kw):
        found = original(*args, **kw)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(fastpath, "_inplace_output", counting)
    torch.manual_seed(0)
    model = create_model(arch, sparsity=0.9, seed=7, **kwargs)
    x = torch.randn(1, 1, *shape)
    fast = fastpath.accelerate(model, backend="sparse")
    separate = _without_inplace(fastpath.accelerate(model, backend="sparse"))
    fast(x)
    first = fast(x)  # the planned arena
    assert any(taken)
    assert torch.equal(first, separate(x))
    fast._pool._arena.fill_(float("nan"))  # every byte the kernels read must have been written
    assert torch.equal(fast(x), first)
    separate(x)
    pp0 = _pp0_bytes(model, shape)
    assert fast._pool.nbytes <= ARENA_PER_PP0 * pp0 < separate._pool.nbytes, (
        f"arena {fast._pool.nbytes / pp0:.2f} PP0 (separate buffers {separate._pool.nbytes / pp0:.2f} PP0)")


def test_float32_tiles_are_rounded_to_the_cells_dtype_before_they_are_added():
    """The sliding window hands float32 weighted logits to float16 cells (no tile-sized float16
    copy); the sums must equal adding the float16-rounded tile, not float32 sums rounded once."""
    grid = TileGrid.plan((8, 8, 12), (8, 8, 8), (0.5, 0.5, 0.5), "nnunet", (0, 1, 2))
    batches = [[start] for start in grid.tiles()]
    gen = torch.Generator().manual_seed(3)
    # values whose float16 rounding differs from the float32 sums' rounding
    tiles = [1000 + torch.rand((2, 8, 8, 8), generator=gen) for _ in batches]
    results = []
    for rounded_first in (True, False):
        acc = CellAccumulator(grid, batches, 2, torch.float16)
        for bi, (batch, tile) in enumerate(zip(batches, tiles, strict=True)):
            acc.add(tile.half() if rounded_first else tile, batch[0])
            sums = [acc.cells[k].clone() for k in sorted(acc.cells)]
            acc.close(bi)
            results.append(sums)
    half = len(results) // 2
    assert all(torch.equal(a, b) for x, y in zip(results[:half], results[half:], strict=True)
               for a, b in zip(x, y, strict=True))
    # why it matters: a mixed-dtype += adds in float32, then rounds once (2000.74 -> 2001), where
    # rounding the tile first gives 1000.5 + 1000 = 2000.5 -> 2000 (ties to even)
    mixed = torch.full((4,), 1000.5, dtype=torch.float16)
    mixed += torch.full((4,), 1000.24)
    rounded = torch.full((4,), 1000.5, dtype=torch.float16) + torch.full((4,), 1000.24).half()
    assert mixed.tolist() == [2001.0] * 4 and rounded.tolist() == [2000.0] * 4


@needs_kernels
def test_borrowed_logits_live_in_the_arena_until_the_next_call():
    """With ``borrow_outputs`` a one-sample call returns its logits in the arena (no tile-sized
    allocation next to it), the same values; a batch still gets its own tensor."""
    model = create_model("e2enet_small", sparsity=0.9, seed=7)
    x = torch.randn(2, 1, 16, 32, 32)
    fast = fastpath.accelerate(model, backend="sparse")
    expected = fast(x)
    fastpath.borrow_outputs(fast)
    assert fast.borrow_output
    for _ in range(3):  # the first call departs from the plan, the second records the new one
        one = fast(x[:1])
    arena = fast._pool._arena
    assert arena.data_ptr() <= one.data_ptr() < arena.data_ptr() + arena.nbytes
    assert torch.equal(one, expected[:1])
    both = fast(x)
    assert not arena.data_ptr() <= both.data_ptr() < arena.data_ptr() + arena.nbytes
    assert torch.equal(both, expected)
