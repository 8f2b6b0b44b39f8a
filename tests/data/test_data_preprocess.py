"""Preprocessing: axis order, resampling, normalisation, the exact way back to the source grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_e2enet.data import (
    Dataset,
    Plan,
    Volume,
    axis_order,
    fingerprint,
    phantom_dataset,
    preprocess,
    preprocess_case,
    preprocess_labels,
)
from napari_e2enet.errors import InputError

from .conftest import FLIPPED


def ellipsoid_labels(shape, centre_frac=(0.5, 0.45, 0.55), radii_frac=(0.3, 0.25, 0.35)) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    q = sum(
        ((g - c * n) / (r * n)) ** 2 for g, n, c, r in zip(grids, shape, centre_frac, radii_frac, strict=True)
    )
    lab = (q <= 1).astype(np.uint8)
    lab[(q <= 0.6) & (grids[0] < shape[0] / 2)] = 2
    return lab


def test_axis_order_rules():
    assert axis_order((1.0, 1.0, 1.0)) == (2, 1, 0)  # isotropic: (X, Y, Z) -> (Z, Y, X)
    assert axis_order((0.7, 0.7, 5.0)) == (2, 1, 0)
    assert axis_order((5.0, 0.7, 0.7)) == (0, 2, 1)  # X is the slice axis
    assert axis_order((0.7, 4.0, 0.7)) == (1, 2, 0)
    assert axis_order((3.0, 3.0, 1.0)) == (1, 2, 0)  # tie between X and Y -> the later axis
    assert axis_order((3.0, 3.0, 2.9999)) == (2, 1, 0)  # within 0.1 %: a tie, Z wins
    assert axis_order((5.0, 0.7, 0.7), "zyx") == (2, 1, 0)


def test_plan_round_trips_through_json():
    plan = Plan((3.0, 0.8, 0.8), "CT", (-1000.0, 400.0), 50.5, 120.25, label_resampling="nearest")
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert isinstance(again.target_spacing, tuple) and isinstance(again.ct_clip, tuple)
    with pytest.raises(InputError, match="unknown"):
        Plan.from_dict({**plan.to_dict(), "extra": 1})
    with pytest.raises(InputError):
        Plan.from_dict({"target_spacing": [1, 0, 1]})
    with pytest.raises(InputError):
        Plan((1.0, 1.0, 1.0), transpose="sideways")


def test_identity_spacing_skips_resampling():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(7, 6, 5)).astype(np.float32)
    vol = Volume(arr, FLIPPED)  # spacing (0.75, 1.25, 3.5) -> network order (3.5, 1.25, 0.75)
    plan = Plan((3.5, 1.25, 0.75), "MRI")
    out, inv = preprocess(vol, plan)
    assert out.shape == (1, 5, 6, 7) and out.dtype == np.float32
    expected = (arr.transpose(2, 1, 0) - arr.mean()) / arr.std()
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)
    lab = ellipsoid_labels((7, 6, 5))
    net = preprocess_labels(Volume(lab, FLIPPED), plan)
    assert np.array_equal(net, lab.transpose(2, 1, 0))
    assert np.array_equal(inv.labels_to_source(net), lab)  # exact on the identity grid


@pytest.mark.parametrize(
    ("affine", "target"),
    [
        (FLIPPED, (1.5, 1.0, 1.0)),  # anisotropic + x flipped; upsample Z, downsample/upsample in-plane
        (np.diag([-1.0, -1.0, 4.0, 1.0]), (2.0, 1.2, 1.2)),
        (np.diag([5.0, 0.9, -0.9, 1.0]), (5.0, 0.6, 0.6)),  # X is the slice axis
    ],
)
def test_round_trip_to_exact_source_grid(affine, target):
    shape = (26, 22, 18)
    lab = ellipsoid_labels(shape)
    img = Volume(np.where(lab > 0, 60.0, -100.0).astype(np.float32), affine)
    plan = Plan(target, "CT", (-200.0, 200.0), 0.0, 100.0)
    x, y, inv = preprocess_case(img, Volume(lab, affine), plan)
    order = axis_order(img.spacing)
    src_net = [img.spacing[o] * shape[o] for o in order]
    expected = tuple(max(1, round(e / t)) for e, t in zip(src_net, target, strict=True))
    assert x.shape == (1, *expected) and y.shape == expected
    assert inv.network_shape == expected
    assert inv.network_spacing == pytest.approx(tuple(e / n for e, n in zip(src_net, expected, strict=True)))
    back = inv.labels_to_source(y)
    assert back.shape == shape and back.dtype == lab.dtype
    for v in (1, 2):
        a, b = back == v, lab == v
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.85, (v, dice)
    # the network affine places voxels where the source affine does (same physical object)
    centre_src = affine @ np.array([*(np.array(np.nonzero(lab == 1)).mean(axis=1)), 1.0])
    centre_net = inv.network_affine @ np.array([*(np.array(np.nonzero(y == 1)).mean(axis=1)), 1.0])
    assert np.linalg.norm(centre_src[:3] - centre_net[:3]) < max(target) * 0.75


@pytest.mark.parametrize("method", ["linear", "nearest"])
def test_integer_upsampling_round_trip_is_exact(method):
    lab = ellipsoid_labels((12, 10, 8))
    affine = np.diag([-2.0, 2.0, 4.0, 1.0])
    plan = Plan((2.0, 1.0, 1.0), "MRI", label_resampling=method)
    net = preprocess_labels(Volume(lab, affine), plan)
    _, inv = preprocess(Volume(lab.astype(np.float32), affine), plan)
    assert net.shape == inv.network_shape == (16, 20, 24)
    back = inv.labels_to_source(net)
    if method == "nearest":
        assert np.array_equal(back, lab)
    else:  # per-label linear may flip a few voxels where three labels meet
        assert (back == lab).mean() > 0.97


def test_array_to_source_and_shape_checks():
    lab = ellipsoid_labels((10, 8, 6))
    vol = Volume(lab.astype(np.float32), FLIPPED)
    plan = Plan((2.0, 1.0, 1.0), "MRI")
    x, inv = preprocess(vol, plan)
    probs = np.stack([x[0], -x[0]])
    assert inv.array_to_source(probs).shape == (2, 10, 8, 6)
    assert inv.array_to_source(x[0]).shape == (10, 8, 6)
    with pytest.raises(ValueError):
        inv.labels_to_source(np.zeros((3, 3, 3), np.uint8))


def test_nearest_label_resampling_keeps_values():
    lab = ellipsoid_labels((12, 10, 8))
    plan = Plan((1.3, 0.55, 0.55), "MRI", label_resampling="nearest")
    net = preprocess_labels(Volume(lab, FLIPPED), plan)
    assert set(np.unique(net)) == {0, 1, 2}


def test_ct_normalisation_and_channels():
    arr = np.stack([np.linspace(-2000, 2000, 60).reshape(5, 4, 3)] * 2).astype(np.float32)
    vol = Volume(arr, np.eye(4))
    plan = Plan((1.0, 1.0, 1.0), "CT", (-1000.0, 1000.0), 100.0, 50.0)
    out, _ = preprocess(vol, plan)
    assert out.shape == (2, 3, 4, 5)
    assert out.min() == pytest.approx((-1000 - 100) / 50) and out.max() == pytest.approx((1000 - 100) / 50)


def test_labels_must_be_integers():
    with pytest.raises(InputError):
        preprocess_labels(Volume(np.zeros((3, 3, 3), np.float32), np.eye(4)), Plan((1.0, 1.0, 1.0)))


def test_fingerprint_ct_phantom():
    ds = phantom_dataset(2, seed=3, shape=(32, 32, 16), spacing=(1.5, 1.5, 3.0))
    plan = fingerprint(ds, max_voxels_per_case=2000, seed=0)
    assert plan.target_spacing == (3.0, 1.5, 1.5) and plan.modality == "CT"
    lo, hi = plan.ct_clip
    assert -1100 < lo < 50 < hi < 400
    assert -50 < plan.ct_mean < 200 and 10 < plan.ct_std < 400
    assert fingerprint(ds, max_voxels_per_case=2000, seed=0) == plan  # seeded
    json.dumps(plan.to_dict())


def test_fingerprint_median_spacing_and_mri():
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(6, 5, 4)).astype(np.float32) for _ in range(3)]
    affines = [np.diag([1.0, 1.0, 3.0, 1.0]), np.diag([0.8, 0.8, 2.0, 1.0]), np.diag([-0.9, 0.9, 5.0, 1.0])]
    ds = Dataset.from_arrays(images, None, affines, {0: "bg"}, modality="MRI")
    plan = fingerprint(ds)
    assert plan.target_spacing == pytest.approx((3.0, 0.9, 0.9))
    assert plan.modality == "MRI" and plan.ct_clip is None
    out, _ = preprocess(ds.load(0)[0], plan.replace(target_spacing=(3.0, 1.0, 1.0)))  # identity grid
    assert abs(float(out.mean())) < 1e-5 and float(out.std()) == pytest.approx(1.0, abs=1e-4)
