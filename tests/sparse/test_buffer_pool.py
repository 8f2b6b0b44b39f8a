"""The fast path's buffer pool: best-fit reuse keeps the pool near the live peak."""

import torch

from napari_e2enet.sparse.compact import BufferPool


def test_best_fit_reuses_a_larger_free_buffer_and_returns_it_whole():
    pool = BufferPool(max_waste=4.0)
    big = pool.take(1000)
    ptr = big.data_ptr()
    pool.give(big)
    part = pool.take(600)  # fits in the free 1000-float buffer: no new allocation
    assert part.numel() == 600 and part.data_ptr() == ptr
    assert pool.nbytes == 0
    pool.give(part)  # the whole buffer goes back, not the 600-float view
    assert pool.nbytes == 4 * 1000
    again = pool.take(1000)
    assert again.numel() == 1000 and again.data_ptr() == ptr


def test_small_requests_do_not_take_buffers_far_too_large():
    pool = BufferPool(max_waste=4.0)
    pool.give(pool.take(1000))
    small = pool.take(100)  # 1000 > 4 × 100: a fresh buffer, the big one stays for big requests
    assert small.numel() == 100 and pool.nbytes == 4 * 1000


def test_smallest_fitting_buffer_wins_and_disabled_pool_keeps_nothing():
    pool = BufferPool()
    a, b = pool.take(400), pool.take(250)
    pool.give(a)
    pool.give(b)
    assert pool.take(200).data_ptr() == b.data_ptr()
    off = BufferPool()
    off.enabled = False
    off.give(torch.empty(10))
    assert off.nbytes == 0
