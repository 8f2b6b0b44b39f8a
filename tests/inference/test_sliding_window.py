"""Sliding-window inference: tiling, blending, bounded memory, cancellation, MONAI agreement."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from napari_e2enet.inference.sliding_window import (
    SlidingWindowCancelled,
    SlidingWindowResult,
    TileProgress,
    gaussian_importance_map,
    iter_sliding_window,
    sliding_window_argmax,
    tile_starts,
)


def run(image, predictor, **kw):
    events = list(iter_sliding_window(image, predictor, **kw))
    assert isinstance(events[-1], SlidingWindowResult)
    assert all(isinstance(e, TileProgress) for e in events[:-1])
    return events[:-1], events[-1]


def smooth_image(shape, seed=0, channels=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *shape, generator=g)
    return torch.nn.functional.avg_pool3d(x, 3, 1, 1)[0] * 3


def random_conv(in_ch, k, layers=1, seed=0, kernel=3):
    torch.manual_seed(seed)
    if layers == 1:
        return torch.nn.Conv3d(in_ch, k, kernel, padding=kernel // 2).eval()
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_ch, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(8, k, 3, padding=1)
    ).eval()


def full_argmax(net, image):
    with torch.no_grad():
        return net(image[None])[0].argmax(0).numpy()


@pytest.mark.parametrize("placement", ["nnunet", "monai"])
@pytest.mark.parametrize(
    "size,patch,overlap",
    [(10, 10, 0.5), (11, 4, 0.5), (100, 32, 0.5), (97, 30, 0.25), (64, 16, 0.0), (50, 7, 0.9)],
)
def test_tile_starts_cover_axis_with_overlap(size, patch, overlap, placement):
    starts = tile_starts(size, patch, overlap, placement)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert starts == sorted(set(starts))
    step = patch * (1 - overlap)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()
    gaps = np.diff(starts)
    if len(gaps):  # neighbours share about overlap·patch (nnU-Net rounds evenly spread starts)
        assert gaps.max() <= (math.ceil(step) if placement == "nnunet" else max(int(step), 1))
    if placement == "nnunet" and step >= 1:
        assert len(starts) == (math.ceil((size - patch) / step) + 1 if size > patch else 1)


def test_gaussian_importance_map_is_monais():
    from monai.data.utils import compute_importance_map

    for patch in [(8, 9, 10), (16, 16, 16)]:
        torch.testing.assert_close(
            gaussian_importance_map(patch), compute_importance_map(patch, mode="gaussian", sigma_scale=0.125)
        )
    w = gaussian_importance_map((20, 20, 20))
    assert float(w.min()) >= 1e-3 and float(w.max()) <= 1.0


class Ones:
    """Class 1 logit = 1, class 0 = 0: a voxel no tile reached would stay 0 (its buffer is 0)."""

    def __init__(self):
        self.calls = 0
        self.batches = []

    def __call__(self, x):
        self.calls += 1
        self.batches.append(x.shape[0])
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        out[:, 1] = 1
        return out


@pytest.mark.parametrize(
    "shape,patch,tiles_per_batch",
    [
        ((37, 29, 23), (16, 12, 10), 1),
        ((37, 29, 23), (16, 12, 10), 5),
        ((5, 40, 9), (8, 16, 16), 2),
        ((3, 4, 5), (8, 8, 8), 1),
        ((16, 12, 10), (16, 12, 10), 1),
    ],
)
def test_every_voxel_covered_shapes_and_progress(shape, patch, tiles_per_batch):
    pred = Ones()
    progress, result = run(
        torch.zeros(2, *shape), pred, patch=patch, num_classes=2, tiles_per_batch=tiles_per_batch
    )
    assert result.labels.shape == shape and result.labels.dtype == np.uint8
    assert (result.labels == 1).all()
    padded = [max(s, p) for s, p in zip(shape, patch, strict=True)]
    total = math.prod(len(tile_starts(s, p, 0.5)) for s, p in zip(padded, patch, strict=True))
    assert result.num_tiles == total
    assert [e.done for e in progress] == [min(total, (i + 1) * tiles_per_batch) for i in range(len(progress))]
    assert all(e.total == total for e in progress)
    assert pred.calls == len(progress) == math.ceil(total / tiles_per_batch)
    assert max(pred.batches) == min(tiles_per_batch, total)


@pytest.mark.parametrize("patch", [(12, 14, 10), (16, 16, 16)])  # == volume, and > volume (padded)
def test_single_tile_equals_full_volume_forward(patch):
    image = smooth_image((12, 14, 10), channels=2)
    net = random_conv(2, 5)
    labels = sliding_window_argmax(image, net, patch=patch, num_classes=5, accumulate_dtype=torch.float32)
    np.testing.assert_array_equal(labels, full_argmax(net, image))


def test_pointwise_predictor_equals_full_forward_with_many_tiles():
    image = smooth_image((30, 27, 33), channels=2)
    net = random_conv(2, 6, kernel=1)  # translation equivariant, no border effects
    labels = sliding_window_argmax(
        image, net, patch=(10, 12, 8), num_classes=6, tiles_per_batch=4, accumulate_dtype=torch.float32
    )
    np.testing.assert_array_equal(labels, full_argmax(net, image))
    half = sliding_window_argmax(image, net, patch=(10, 12, 8), num_classes=6)
    assert (half == labels).mean() > 0.999


def dense_reference(image, net, patch, k, placement, overlap=0.5):
    """Naive full-volume (K, D, H, W) float64 blending with the same tiles, for cross-checking."""
    shape = image.shape[1:]
    acc = np.zeros((k, *shape))
    w = gaussian_importance_map(patch).double().numpy()
    starts = [tile_starts(s, p, overlap, placement) for s, p in zip(shape, patch, strict=True)]
    with torch.no_grad():
        for d in starts[0]:
            for h in starts[1]:
                for x in starts[2]:
                    sl = (slice(d, d + patch[0]), slice(h, h + patch[1]), slice(x, x + patch[2]))
                    acc[(slice(None), *sl)] += net(image[(slice(None), *sl)][None])[0].double().numpy() * w
    return acc.argmax(0)


@pytest.mark.parametrize("tiles_per_batch", [1, 3])
def test_streaming_equals_dense_blending_and_memory_is_a_slab(tiles_per_batch):
    image = smooth_image((46, 20, 18))
    net = random_conv(1, 4, layers=2)  # not translation equivariant at tile borders
    patch = (12, 12, 12)
    _, result = run(
        image,
        net,
        patch=patch,
        num_classes=4,
        tiles_per_batch=tiles_per_batch,
        accumulate_dtype=torch.float32,
    )
    ref = dense_reference(image, net, patch, 4, "nnunet")
    assert (result.labels == ref).mean() > 0.9999
    # the buffer holds a slab of the patch depth (plus what one batch spans) along the sweep's
    # outer axis, never the volume
    k, rows, middle, inner = result.buffer_shape
    outer_axis, middle_axis, inner_axis = result.sweep_axes
    assert (k, middle, inner) == (4, image.shape[1 + middle_axis], image.shape[1 + inner_axis])
    assert rows <= patch[outer_axis] + (6 if tiles_per_batch > 1 else 0) < image.shape[1 + outer_axis]


def test_every_sweep_order_gives_the_same_labels_and_auto_holds_least():
    """The sweep order changes only what is open when, not the labels; on a volume long in H
    (like a 300×512×512 CT) "auto" sweeps H first and holds fewer open bytes than D-major."""
    image = smooth_image((20, 64, 40))
    net = random_conv(1, 3, layers=2)
    patch = (12, 12, 12)
    ref = dense_reference(image, net, patch, 3, "nnunet")
    peaks = {}
    for order in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0), "auto"]:
        _, result = run(image, net, patch=patch, num_classes=3, accumulate_dtype=torch.float32, sweep=order)
        assert (result.labels == ref).mean() > 0.9999, order
        peaks[order] = result.peak_open_bytes
        if order != "auto":
            assert result.sweep_axes == order
    assert peaks["auto"] == min(peaks.values()) < peaks[(0, 1, 2)]
    with pytest.raises(ValueError, match="sweep"):
        next(iter_sliding_window(image, net, patch=patch, num_classes=3, sweep=(0, 0, 1)))


def test_open_cells_hold_less_than_a_patch_deep_slab():
    """Cells are finalised band by band along H: with many tiles across H the accumulation holds
    about (pd - stride) × (H + ph) × W voxels, not pd × H × W, and the labels do not change."""
    image = smooth_image((40, 72, 20))
    net = random_conv(1, 3, layers=2)
    patch = (12, 12, 12)
    _, result = run(image, net, patch=patch, num_classes=3, accumulate_dtype=torch.float32)
    assert (result.labels == dense_reference(image, net, patch, 3, "nnunet")).mean() > 0.9999
    slab = 3 * patch[0] * 72 * 20 * 4  # K × pd × H × W float32: a ring one patch deep
    assert 0 < result.peak_open_bytes < 0.75 * slab
    assert result.buffer_shape[1] <= patch[result.sweep_axes[0]]


def test_agrees_with_monai_sliding_window_inference():
    from monai.inferers import sliding_window_inference

    image = smooth_image((30, 36, 33))
    net = random_conv(1, 6, layers=2)
    patch = (16, 16, 16)
    with torch.no_grad():
        ref = (
            sliding_window_inference(
                image[None], patch, 2, net, overlap=0.5, mode="gaussian", sigma_scale=0.125
            )[0]
            .argmax(0)
            .numpy()
        )
    fp32 = sliding_window_argmax(
        image,
        net,
        patch=patch,
        num_classes=6,
        tiles_per_batch=2,
        accumulate_dtype=torch.float32,
        placement="monai",
    )
    fp16 = sliding_window_argmax(image, net, patch=patch, num_classes=6, placement="monai")
    assert (fp32 == ref).mean() >= 0.99999  # same tiles and weights: equal up to float rounding
    assert (fp16 == ref).mean() >= 0.999  # float16 sums flip only near-ties
    # nnU-Net placement differs in where tile borders fall; still close
    nn = sliding_window_argmax(image, net, patch=patch, num_classes=6)
    assert (nn == ref).mean() > 0.9


def test_stop_event_cancels_within_one_batch():
    stop = threading.Event()
    calls = []

    def predictor(x):
        calls.append(x.shape[0])
        if len(calls) == 2:
            stop.set()  # e.g. the user pressed cancel while tile batch 2 was running
        return torch.zeros(x.shape[0], 3, *x.shape[2:])

    image = torch.zeros(1, 40, 40, 40)  # 4x4x4 = 64 tiles of 16³
    events = list(
        iter_sliding_window(image, predictor, patch=16, num_classes=3, tiles_per_batch=2, stop=stop)
    )
    # the batch that was running completes and is reported, then the generator ends without a result
    assert events == [TileProgress(2, 64), TileProgress(4, 64)]
    assert len(calls) == 2
    stop.clear()
    stop.set()
    with pytest.raises(SlidingWindowCancelled):
        sliding_window_argmax(image, predictor, patch=16, num_classes=3, stop=stop)
    assert len(calls) == 2  # already set: not a single forward


def test_consumer_can_stop_iterating_and_no_inference_mode_leaks():
    gen = iter_sliding_window(torch.zeros(1, 20, 20, 20), Ones(), patch=8, num_classes=2)
    first = next(gen)
    assert isinstance(first, TileProgress) and first.done == 1
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    gen.close()


def test_large_logits_promote_float16_buffer():
    def predictor(x):
        out = torch.zeros(x.shape[0], 3, *x.shape[2:])
        out[:, 2] = 1e5  # float16 sums would overflow to inf
        out[:, 1] = 1e5 - 200
        return out

    _, result = run(torch.zeros(1, 20, 20, 20), predictor, patch=8, num_classes=3)
    assert result.accumulate_dtype == torch.float32
    assert (result.labels == 2).all()


def test_many_classes_use_int16_labels():
    def predictor(x):
        out = torch.zeros(x.shape[0], 300, *x.shape[2:])
        out[:, 299] = 1
        return out

    labels = sliding_window_argmax(torch.zeros(1, 4, 5, 6), predictor, patch=4, num_classes=300)
    assert labels.dtype == np.int16 and (labels == 299).all()


def test_bad_arguments():
    image = torch.zeros(1, 8, 8, 8)
    with pytest.raises(ValueError, match="predictor returned"):
        sliding_window_argmax(image, lambda x: x, patch=4, num_classes=2)
    with pytest.raises(ValueError, match="C, D, H, W"):
        sliding_window_argmax(image[0], Ones(), patch=4, num_classes=2)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_argmax(image, Ones(), patch=4, num_classes=2, overlap=1.0)
    with pytest.raises(ValueError, match="patch"):
        sliding_window_argmax(image, Ones(), patch=(4, 4), num_classes=2)
