"""The sliding window's parts on their own: ``TileGrid`` (tile placement, padding) and
``CellAccumulator`` (open cells, closed and arg-maxed after their last batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_e2enet.inference.sliding_window import CellAccumulator, TileGrid, argmax_into


@pytest.mark.parametrize("shape", [(10, 12, 9), (5, 12, 7)])
def test_cut_tile_is_the_padded_volumes_window(shape):
    patch = (6, 8, 8)
    grid = TileGrid.plan(shape, patch, (0.5, 0.5, 0.5), "nnunet", "auto")
    image = torch.randn(2, *shape)
    pads = []
    for a in (2, 1, 0):
        extra = max(patch[a] - shape[a], 0)
        pads += [grid.pad_before[a], extra - grid.pad_before[a]]
    padded = F.pad(image, pads)
    for d, h, w in grid.tiles():
        want = padded[:, d : d + patch[0], h : h + patch[1], w : w + patch[2]]
        assert torch.equal(grid.cut_tile(image, (d, h, w)), want)


@pytest.mark.parametrize("sweep", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_accumulator_equals_dense_sum_and_frees_every_cell(sweep):
    shape, patch, k = (11, 9, 10), (4, 5, 6), 3
    grid = TileGrid.plan(shape, patch, (0.5, 0.4, 0.3), "nnunet", sweep)
    tiles = grid.tiles()
    batches = [tiles[i : i + 2] for i in range(0, len(tiles), 2)]
    acc = CellAccumulator(grid, batches, k, torch.float64)
    dense = torch.zeros(k, *shape, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    largest_open = 0
    for bi, batch in enumerate(batches):
        for start in batch:
            logits = torch.randn(k, *patch, generator=gen, dtype=torch.float64)
            acc.add(logits, start)
            region = tuple(slice(*grid.image_range(a, start[a])) for a in range(3))
            dense[(slice(None), *region)] += logits  # no padding in this geometry
        largest_open = max(largest_open, sum(c.numel() for c in acc.cells.values()))
        acc.close(bi)
    assert not acc.cells and acc.open_bytes == 0
    assert acc.peak_open_bytes == largest_open * 8
    assert largest_open < dense.numel()  # never the whole volume at once
    np.testing.assert_array_equal(acc.labels, dense.argmax(0).numpy())


def test_promote_keeps_the_sums_and_counts_the_bytes():
    grid = TileGrid.plan((8, 8, 8), (8, 8, 8), (0.5,) * 3, "nnunet", "auto")
    acc = CellAccumulator(grid, [grid.tiles()], 2, torch.float16)
    acc.add(torch.ones(2, 8, 8, 8, dtype=torch.float16), (0, 0, 0))
    before = acc.open_bytes
    acc.promote_to_float32()
    assert acc.dtype == torch.float32 and acc.open_bytes == 2 * before == acc.peak_open_bytes
    assert all(c.dtype == torch.float32 and float(c.sum()) == c.numel() for c in acc.cells.values())


def test_argmax_into_keeps_the_first_maximal_class():
    view = torch.tensor([[1.0, 2.0, 3.0], [1.0, 5.0, 0.0], [0.5, 5.0, 3.0]])
    dst = torch.full((3,), 9, dtype=torch.uint8)
    argmax_into(view, dst)
    assert dst.tolist() == [0, 1, 0]
