"""Patch sampling and augmentation: purity in (seed, rank, iteration), foreground share, label safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_e2enet.data import AugmentConfig, PatchSampler
from napari_e2enet.data.augment import extract_patch, intensity_augment, mirror, spatial_matrix

PATCH = (12, 16, 16)


def make_cases(n: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    cases = []
    for k in range(n):
        shape = (20 + k, 28, 24)
        lab = np.zeros(shape, np.uint8)
        lab[3:6, 4:8, 5:9] = 1  # small organ
        lab[10:14, 15:20, 10:18] = 2 + (k % 2)  # class 2 or 3
        img = (rng.normal(size=(2, *shape)) + lab[None] * 2.0).astype(np.float32)
        cases.append((img, lab))
    return cases


@pytest.fixture(scope="module")
def cases():
    return make_cases()


def test_batch_shapes_and_types(cases):
    sampler = PatchSampler(cases, PATCH, 3, seed=1)
    x, y = sampler.batch(0)
    assert x.shape == (3, 2, *PATCH) and x.dtype == torch.float32
    assert y.shape == (3, 1, *PATCH) and y.dtype == torch.int64
    assert sampler(0)[0].shape == x.shape


def test_batch_is_a_pure_function_of_seed_rank_iteration(cases):
    a = PatchSampler(cases, PATCH, 2, seed=3, rank=1)
    b = PatchSampler(cases, PATCH, 2, seed=3, rank=1)
    first = [a.batch(i) for i in (0, 1, 2, 7)]
    # a fresh sampler asked out of order (a resumed run) gives the same batches
    for i, (x, y) in zip((7, 2, 0, 1), [b.batch(i) for i in (7, 2, 0, 1)], strict=True):
        ref = first[(0, 1, 2, 7).index(i)]
        assert torch.equal(ref[0], x) and torch.equal(ref[1], y)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    other_rank = PatchSampler(cases, PATCH, 2, seed=3, rank=0).batch(0)
    other_seed = PatchSampler(cases, PATCH, 2, seed=4, rank=1).batch(0)
    assert not torch.equal(first[0][0], other_rank[0])
    assert not torch.equal(first[0][0], other_seed[0])


def test_foreground_oversampling_fraction(cases):
    sampler = PatchSampler(cases, PATCH, 2, foreground_oversample=0.33, augment=False, seed=0)
    specs = [s for it in range(900) for s in sampler.sample_specs(it)]
    share = np.mean([s.foreground for s in specs])
    assert share == pytest.approx(0.33, abs=0.04)
    labels_used = {s.label for s in specs if s.foreground}
    assert labels_used == {1, 2, 3}  # every present class gets picked
    # a forced sample contains its chosen voxel, with that class
    for it in range(30):
        specs = sampler.sample_specs(it)
        _, y = sampler.batch(it)
        for b, spec in enumerate(specs):
            if spec.foreground:
                local = tuple(v - s for v, s in zip(spec.voxel, spec.start, strict=True))
                assert all(0 <= v < p for v, p in zip(local, PATCH, strict=True))
                assert int(y[b, 0][local]) == spec.label


def test_all_foreground_and_none(cases):
    always = PatchSampler(cases, PATCH, 4, foreground_oversample=1.0, augment=False)
    assert all(s.foreground for it in range(20) for s in always.sample_specs(it))
    for it in range(10):
        assert (always.batch(it)[1].flatten(1) > 0).any(dim=1).all()
    never = PatchSampler(cases, PATCH, 4, foreground_oversample=0.0, augment=False)
    assert not any(s.foreground for it in range(20) for s in never.sample_specs(it))


def test_small_volumes_are_padded():
    lab = np.zeros((5, 6, 7), np.uint8)
    lab[2, 3, 4] = 1
    img = np.ones((1, 5, 6, 7), np.float32)
    sampler = PatchSampler([(img, lab)], PATCH, 2, foreground_oversample=1.0, augment=False)
    x, y = sampler.batch(0)
    assert x.shape == (2, 1, *PATCH)
    assert float(x.sum()) == pytest.approx(2 * img.sum())  # the whole volume, zero padding around it
    assert int(y.sum()) == 2


def test_no_augmentation_is_a_plain_crop(cases):
    sampler = PatchSampler(cases, PATCH, 2, augment=False, seed=9)
    x, y = sampler.batch(5)
    for b, spec in enumerate(sampler.sample_specs(5)):
        img, lab = cases[spec.case]
        sl = tuple(slice(s, s + p) for s, p in zip(spec.start, PATCH, strict=True))
        assert np.array_equal(x[b].numpy(), img[(slice(None), *sl)])
        assert np.array_equal(y[b, 0].numpy(), lab[sl])


def test_augmentation_keeps_label_values(cases):
    cfg = AugmentConfig.everything()
    sampler = PatchSampler(cases, PATCH, 4, foreground_oversample=0.5, seed=2, augment_config=cfg)
    seen = set()
    for it in range(8):
        x, y = sampler.batch(it)
        assert torch.isfinite(x).all()
        seen |= set(torch.unique(y).tolist())
    assert seen <= {0, 1, 2, 3}
    assert seen & {1, 2, 3}


def test_spatial_transform_moves_image_and_labels_together():
    # an image equal to its label map stays equal (up to interpolation) under rotation + scaling
    lab = np.zeros((30, 30, 30), np.uint8)
    lab[8:22, 10:20, 5:25] = 1
    image = torch.from_numpy(lab[None].astype(np.float32))
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(p_rotation=1.0, p_scale=1.0)
    for _ in range(5):
        m = spatial_matrix(rng, cfg)
        assert m is not None
        img, seg = extract_patch(image, lab, (5, 5, 5), (20, 20, 20), m)
        inside = seg == 1
        assert img[0][inside].mean() > 0.8 and img[0][~inside].mean() < 0.2
    anis = AugmentConfig(p_rotation=1.0, p_scale=0.0, anisotropic=True)
    m = spatial_matrix(rng, anis)
    assert m[0, 0] == pytest.approx(1.0) and m[0, 1:] == pytest.approx([0, 0])  # in-plane only


def test_intensity_and_mirror_are_seeded():
    x = np.random.default_rng(0).normal(size=(2, 8, 9, 10)).astype(np.float32)
    cfg = AugmentConfig.everything()
    a = intensity_augment(x, np.random.default_rng(4), cfg)
    b = intensity_augment(x, np.random.default_rng(4), cfg)
    assert np.array_equal(a, b) and a.shape == x.shape and a.dtype == np.float32
    assert not np.array_equal(a, x) and np.isfinite(a).all()
    lab = np.arange(8 * 9 * 10).reshape(8, 9, 10)
    flipped_img, flipped_lab = mirror(x, lab, np.random.default_rng(1), AugmentConfig(p_mirror=1.0))
    assert np.array_equal(flipped_lab, lab[::-1, ::-1, ::-1])
    assert np.array_equal(flipped_img, x[:, ::-1, ::-1, ::-1])


def test_bad_inputs(cases):
    with pytest.raises(ValueError):
        PatchSampler([], PATCH, 2)
    with pytest.raises(ValueError):
        PatchSampler([(cases[0][0], cases[0][1][:-1])], PATCH, 2)
    with pytest.raises(ValueError):
        PatchSampler([(cases[0][0], cases[0][1].astype(np.float32))], PATCH, 2)


def test_mirroring_skips_the_patient_left_right_axis_when_labels_name_a_side():
    from napari_e2enet.data import fingerprint, mirror_axes_for, phantom_dataset, preprocess
    from napari_e2enet.data.augment import is_lateralised, left_right_axis

    assert is_lateralised(["liver", "left kidney"]) and is_lateralised(["kidney_Right"])
    assert not is_lateralised(["liver", "spleen", "bright spot", "leftover"])
    ds = phantom_dataset(1, seed=0, shape=(24, 20, 12), spacing=(1.5, 1.5, 3.0))
    _, inverse = preprocess(ds.cases[0].load()[0], fingerprint(ds))
    lr = left_right_axis(inverse.network_affine)  # source X (patient left-right) ends up as network W
    assert lr == 2
    amos = ["spleen", "right kidney", "left kidney", "liver"]
    assert mirror_axes_for("auto", amos, [inverse.network_affine]) == (0, 1)
    assert mirror_axes_for("auto", ["liver", "tumour"], [inverse.network_affine]) == (0, 1, 2)
    assert mirror_axes_for("all", amos, [inverse.network_affine]) == (0, 1, 2)
    assert mirror_axes_for("none", amos, [inverse.network_affine]) == ()
    rotated = inverse.network_affine[:, [2, 1, 0, 3]]  # a case stored with left-right along D
    assert mirror_axes_for("no-left-right", amos, [inverse.network_affine, rotated]) == (1,)
    with pytest.raises(ValueError, match="mirror must be one of"):
        mirror_axes_for("sideways", amos, [])


def test_a_sampler_without_left_right_mirroring_never_flips_that_axis(cases):
    # class 1 sits at small W in every case; with W excluded it must stay there in every sample
    cfg = AugmentConfig.for_patch((20, 28, 24), p_rotation=0, p_scale=0, mirror_axes=(0, 1), p_mirror=1.0)
    sampler = PatchSampler(cases, patch=(20, 28, 24), batch=4, augment_config=cfg, seed=1)
    for it in range(5):
        _, labels = sampler.batch(it)
        w = np.nonzero((labels[:, 0] == 1).numpy())[3]
        assert w.max() < 12
    flipping = PatchSampler(cases, patch=(20, 28, 24), batch=4, seed=1,
                            augment_config=AugmentConfig.for_patch((20, 28, 24), p_rotation=0, p_scale=0, p_mirror=1.0))
    _, labels = flipping.batch(0)
    assert np.nonzero((labels[:, 0] == 1).numpy())[3].min() >= 12  # the control: W flipped, class 1 moved
