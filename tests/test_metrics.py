"""Metrics against MONAI's reference implementations, edge cases and aggregation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_e2enet import metrics
from napari_e2enet.errors import InputError

monai_metrics = pytest.importorskip("monai.metrics")


def blobs(shape, seed, sigma=2.5):
    """Three labels of smooth random blobs; label 2 is forced to touch the first face."""
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    f /= f.std()
    lab = np.zeros(shape, np.uint8)
    lab[f > 0.6] = 1
    lab[f > 1.4] = 2
    lab[f < -1.2] = 3
    lab[:2, :5] = 2
    return lab


def onehot(a, num_classes):
    return torch.from_numpy(np.stack([a == k for k in range(num_classes)])[None].astype(np.float32))


def monai_nsd(pred, ref, labels, spacing, tol):
    k = max(labels) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = monai_metrics.compute_surface_dice(
            onehot(pred, k), onehot(ref, k), [tol] * (k - 1), spacing=spacing, use_subvoxels=True
        )[0]
    return [float(out[c - 1]) for c in labels]


def monai_hd95(pred, ref, labels, spacing):
    k = max(labels) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = monai_metrics.compute_hausdorff_distance(
            onehot(pred, k), onehot(ref, k), percentile=95, spacing=spacing
        )[0]
    return [float(out[c - 1]) for c in labels]


SHAPE = (22, 26, 18)
PRED, REF = blobs(SHAPE, 1), blobs(SHAPE, 2)


def test_embedded_surfel_table_is_monais():
    from monai.metrics.utils import _get_neighbour_code_to_normals_table, get_code_to_measure_table

    np.testing.assert_array_equal(metrics._normals_table(), _get_neighbour_code_to_normals_table().numpy())
    for sp in [(1.0, 1.0, 1.0), (0.7, 1.3, 2.5), (0.5, 0.8)]:
        np.testing.assert_array_equal(metrics._code_to_measure(sp), get_code_to_measure_table(sp)[0].numpy())


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.7, 2.5), (2.0, 0.5, 1.3)])
@pytest.mark.parametrize("tol", [1.0, 2.0, 4.0])  # 4 mm: the k-d tree path at fine spacing
def test_surface_dice_matches_monai_subvoxel(spacing, tol):
    ours = [metrics.surface_dice(PRED, REF, c, spacing, tol) for c in (1, 2, 3)]
    ref = monai_nsd(PRED, REF, [1, 2, 3], spacing, tol)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    assert all(0 < v < 1 for v in ours)


def test_surface_dice_both_search_paths_agree():
    sp, tol = (0.5, 0.5, 0.5), 4.0  # ball of ~2100 offsets: k-d tree
    kd = metrics.surface_dice(PRED, REF, 1, sp, tol)
    old = metrics._MAX_BALL
    metrics._MAX_BALL = 10**6
    try:
        dense = metrics.surface_dice(PRED, REF, 1, sp, tol)
    finally:
        metrics._MAX_BALL = old
    assert kd == pytest.approx(dense, abs=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.7, 2.5)])
def test_hd95_matches_monai(spacing):
    ours = [metrics.hd95(PRED, REF, c, spacing) for c in (1, 2, 3)]
    np.testing.assert_allclose(ours, monai_hd95(PRED, REF, [1, 2, 3], spacing), rtol=1e-5, atol=1e-5)


def test_dice_matches_monai():
    out = monai_metrics.compute_dice(onehot(PRED, 4), onehot(REF, 4), include_background=False)[0]
    np.testing.assert_allclose([metrics.dice(PRED, REF, c) for c in (1, 2, 3)], out.numpy(), rtol=1e-6)


def test_2d_matches_monai():
    pred, ref = PRED[:, :, 9], REF[:, :, 9]
    sp = (0.6, 1.7)
    ours = [metrics.surface_dice(pred, ref, c, sp, 1.5) for c in (1, 2)]
    np.testing.assert_allclose(ours, monai_nsd(pred, ref, [1, 2], sp, 1.5), atol=1e-6)
    ours = [metrics.hd95(pred, ref, c, sp) for c in (1, 2)]
    np.testing.assert_allclose(ours, monai_hd95(pred, ref, [1, 2], sp), rtol=1e-5)


def test_identical_masks_are_perfect_and_inputs_may_be_tensors():
    sp = (0.8, 0.8, 3.0)
    t = torch.from_numpy(REF.astype(np.int64))
    assert metrics.dice(t, REF, 1) == 1.0
    assert metrics.surface_dice(t, REF, 1, sp, 0.0) == pytest.approx(1.0)
    assert metrics.hd95(t, REF, 1, sp) == 0.0


def test_shifted_mask_known_distances():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    pred = np.roll(ref, 2, axis=2)  # 2 voxels along the last axis
    sp = (1.0, 1.0, 0.5)  # -> a 1 mm shift
    assert metrics.surface_dice(pred, ref, 1, sp, 1.0) == pytest.approx(1.0)
    assert metrics.surface_dice(pred, ref, 1, sp, 0.4) < 1.0
    assert metrics.hd95(pred, ref, 1, sp) == pytest.approx(1.0)
    assert metrics.dice(pred, ref, 1) == pytest.approx(0.8)


@pytest.mark.parametrize("which", ["pred", "ref"])
def test_one_side_empty(which):
    empty = np.zeros_like(REF)
    pred, ref = (empty, REF) if which == "pred" else (PRED, empty)
    sp = (1.0, 1.0, 2.0)
    assert metrics.dice(pred, ref, 1) == 0.0
    assert metrics.surface_dice(pred, ref, 1, sp) == 0.0
    assert metrics.hd95(pred, ref, 1, sp) == math.inf
    # MONAI: NSD 0 as well; its plain Hausdorff distance is inf too (its 95th percentile of an
    # all-inf vector interpolates to NaN, which we do not copy: a missed organ must not vanish
    # from a NaN-skipping mean)
    assert monai_nsd(pred, ref, [1], sp, 1.0) == [0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = monai_metrics.compute_hausdorff_distance(onehot(pred, 2), onehot(ref, 2), spacing=sp)
    assert float(hd[0, 0]) == math.inf


def test_both_empty_is_nan_like_monai():
    empty = np.zeros(SHAPE, np.uint8)
    sp = (1.0, 1.0, 1.0)
    assert math.isnan(metrics.dice(empty, empty, 1))
    assert math.isnan(metrics.surface_dice(empty, empty, 1, sp))
    assert math.isnan(metrics.hd95(empty, empty, 1, sp))
    assert math.isnan(monai_nsd(empty, empty, [1], sp, 1.0)[0])
    assert math.isnan(monai_hd95(empty, empty, [1], sp)[0])


def test_evaluate_per_class_and_mean_over_present_classes():
    pred, ref = PRED.copy(), REF.copy()
    pred[pred == 3] = 0
    ref[ref == 3] = 0  # class 3 absent everywhere; class 5 never occurs
    sp = (0.8, 0.7, 2.5)
    res = metrics.evaluate(pred, ref, {1: "liver", 2: "spleen", 3: "kidney", 5: "gone"}, sp, tolerance=2.0)
    assert res["labels"] == {"liver": 1, "spleen": 2, "kidney": 3, "gone": 5}
    assert res["present"]["liver"] == [True, True] and res["present"]["gone"] == [False, False]
    for name, c in (("liver", 1), ("spleen", 2)):
        assert res["dice"]["per_class"][name] == pytest.approx(metrics.dice(pred, ref, c))
        assert res["nsd"]["per_class"][name] == pytest.approx(metrics.surface_dice(pred, ref, c, sp, 2.0))
        assert res["hd95"]["per_class"][name] == pytest.approx(metrics.hd95(pred, ref, c, sp))
    assert math.isnan(res["dice"]["per_class"]["kidney"]) and math.isnan(res["hd95"]["per_class"]["gone"])
    for m in ("dice", "nsd", "hd95"):
        vals = [res[m]["per_class"][n] for n in ("liver", "spleen")]
        assert res[m]["mean"] == pytest.approx(sum(vals) / 2)
    # a list of ids names the classes by their id
    res2 = metrics.evaluate(pred, ref, [1, 2], sp)
    assert set(res2["dice"]["per_class"]) == {"1", "2"}
    # a class missing from the prediction: Dice 0 counts in the mean, HD95 mean becomes inf
    res3 = metrics.evaluate(np.where(pred == 2, 0, pred), ref, [1, 2], sp)
    assert res3["dice"]["per_class"]["2"] == 0.0 and res3["hd95"]["mean"] == math.inf


def test_evaluate_nothing_present_gives_nan_mean():
    empty = np.zeros((6, 6, 6), np.int16)
    res = metrics.evaluate(empty, empty, [1, 2], None)
    assert all(math.isnan(res[m]["mean"]) for m in ("dice", "nsd", "hd95"))


def test_accumulator_means_skip_absent_cases():
    acc = metrics.MetricAccumulator({1: "a", 2: "b"}, tolerance=1.0)
    sp = (1.0, 1.0, 1.0)
    r1 = acc.update(PRED, REF, sp, case="one")
    no_b_pred, no_b_ref = np.where(PRED == 2, 0, PRED), np.where(REF == 2, 0, REF)
    r2 = acc.update(no_b_pred, no_b_ref, sp)
    assert len(acc) == 2 and acc.cases[0]["case"] == "one" and acc.cases[1]["case"] == "1"
    agg = acc.aggregate()
    assert agg["num_cases"] == 2
    assert agg["dice"]["per_class"]["a"] == pytest.approx(
        (r1["dice"]["per_class"]["a"] + r2["dice"]["per_class"]["a"]) / 2
    )
    assert agg["dice"]["per_class"]["b"] == pytest.approx(r1["dice"]["per_class"]["b"])  # case 2 has no "b"
    assert agg["dice"]["num_cases"] == {"a": 2, "b": 1}
    assert agg["nsd"]["mean"] == pytest.approx(
        (agg["nsd"]["per_class"]["a"] + agg["nsd"]["per_class"]["b"]) / 2
    )
    with pytest.raises(InputError):
        acc.add(metrics.evaluate(PRED, REF, [1], sp))
    acc.reset()
    assert len(acc) == 0 and math.isnan(acc.aggregate()["dice"]["mean"])


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="shapes"):
        metrics.dice(PRED, REF[:-1], 1)
    with pytest.raises(InputError, match="integer"):
        metrics.dice(PRED + 0.5, REF, 1)
    with pytest.raises(InputError, match="spacing"):
        metrics.hd95(PRED, REF, 1, (1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="tolerance"):
        metrics.surface_dice(PRED, REF, 1, None, -1.0)
