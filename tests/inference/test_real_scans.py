"""Scans as users bring them: other storage orders, zero padding, an intensity offset, the wrong kind
of scan for the model. The bundled model on the bundled sample is the reference every time."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import (
    Plan,
    Volume,
    make_phantom,
    preprocess,
    preprocess_case,
    read_labels,
    read_volume,
)
from napari_e2enet.data.intended_input import IntendedInput, input_warnings, scan_statistics
from napari_e2enet.data.preprocess import background_value, canonical_orientation, foreground_mask
from napari_e2enet.inference import InputWarning, Prediction, Predictor
from napari_e2enet.metrics import dice
from napari_e2enet.training import read_metadata, save_model

SAMPLE = "napari_e2enet/resources/sample/mni152_t1_2mm.nii.gz"
TISSUE = "napari_e2enet/resources/sample/mni152_tissue_2mm.nii.gz"


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_bundled(config=InferenceConfig(device="cpu"))


@pytest.fixture(scope="module")
def sample() -> Volume:
    return read_volume(SAMPLE)


@pytest.fixture(scope="module")
def sample_labels(predictor, sample) -> np.ndarray:
    return predictor.predict(sample).array


def restored(volume: Volume, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Volume:
    """The same physical image stored another way: voxel axes permuted and flipped, the affine
    changed with them so every voxel keeps its world position."""
    array = volume.array
    affine = volume.affine.copy()
    for k, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis=k)
            n = array.shape[k]
            affine[:3, 3] += affine[:3, k] * (n - 1)
            affine[:3, k] *= -1
    array = np.ascontiguousarray(array.transpose(perm))
    affine[:, :3] = affine[:, list(perm)]
    return Volume(array, affine, name=volume.name)


def to_original(labels: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    back = labels.transpose(np.argsort(perm))
    for k, flip in enumerate(flips):
        if flip:
            back = np.flip(back, axis=k)
    return back


ALL_48 = [(p, f) for p in itertools.permutations(range(3)) for f in itertools.product((False, True), repeat=3)]


def test_every_one_of_the_48_storage_orders_reaches_the_network_as_the_same_array():
    image, labels = make_phantom(2, shape=(24, 20, 12), spacing=(1.5, 1.5, 3.0))
    plan = Plan((3.0, 1.5, 1.5), "CT", (-1000.0, 400.0), 0.0, 300.0, orientation="RAS")
    reference, ref_labels, _ = preprocess_case(image, labels, plan)
    for perm, flips in ALL_48:
        img, lab = restored(image, perm, flips), restored(labels, perm, flips)
        net, net_labels, inverse = preprocess_case(img, lab, plan)
        np.testing.assert_array_equal(net, reference, err_msg=f"perm {perm} flips {flips}")
        np.testing.assert_array_equal(net_labels, ref_labels, err_msg=f"perm {perm} flips {flips}")
        # and the way back lands on the storage grid exactly
        assert inverse.storage_shape == img.spatial_shape
        np.testing.assert_array_equal(inverse.labels_to_source(net_labels), lab.array)
        probabilities = inverse.array_to_source(net_labels[None].astype(np.float32))
        np.testing.assert_array_equal(probabilities[0], lab.array.astype(np.float32))


def test_a_plan_without_orientation_keeps_the_storage_order_of_older_model_files():
    image, _ = make_phantom(2, shape=(24, 20, 12), spacing=(1.5, 1.5, 3.0))
    plan = Plan((3.0, 1.5, 1.5), "CT", (-1000.0, 400.0), 0.0, 300.0)
    assert plan.orientation is None and Plan.from_dict({"target_spacing": [3, 1.5, 1.5]}).orientation is None
    flipped = restored(image, (0, 1, 2), (True, False, False))
    a, _ = preprocess(image, plan)
    b, _ = preprocess(flipped, plan)
    np.testing.assert_array_equal(b, np.flip(a, axis=3))  # the network sees the flip: storage order
    same, to_storage = canonical_orientation(flipped, None)
    assert same is flipped and to_storage is None


def test_the_sample_stored_in_eight_orientations_gives_identical_labels_in_world_space(predictor, sample,
                                                                                     sample_labels):
    variants = [((0, 1, 2), (True, False, False)), ((0, 1, 2), (True, True, False)), ((1, 0, 2), (False,) * 3),
                ((2, 1, 0), (False, False, True)), ((2, 0, 1), (True, False, True)), ((1, 2, 0), (False, True, False)),
                ((0, 2, 1), (True, True, True)), ((2, 1, 0), (True, True, True))]
    worst = 1.0
    for perm, flips in variants:
        labels = predictor.predict(restored(sample, perm, flips)).array
        worst = min(worst, float(np.mean(to_original(labels, perm, flips) == sample_labels)))
    assert worst == 1.0


def test_a_zero_margin_is_background_and_leaves_the_labels_inside_unchanged(predictor, sample, sample_labels):
    margin = 20  # voxels of 2 mm: 40 mm on every side
    padded_array = np.pad(sample.array, margin)
    affine = sample.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, margin)
    padded = predictor.predict(Volume(padded_array, affine, name="padded")).array
    inside = tuple(slice(margin, margin + n) for n in sample.spatial_shape)
    outside = np.ones(padded.shape, bool)
    outside[inside] = False
    voxel_ml = float(np.prod(sample.spacing)) / 1000
    assert float((padded[outside] > 0).sum()) * voxel_ml < 1.0
    ref = read_labels(TISSUE).array
    for k in (1, 2, 3):
        assert abs(dice(padded[inside], ref, k) - dice(sample_labels, ref, k)) <= 0.005


def test_an_all_zero_volume_gives_no_labels_a_warning_and_runs_no_tile(predictor):
    events = list(predictor.iter_predict(Volume(np.zeros((60, 70, 50), np.float32), np.diag([2.0, 2, 2, 1]))))
    warnings = [e.message for e in events if isinstance(e, InputWarning)]
    prediction = events[-1]
    assert isinstance(prediction, Prediction) and prediction.tiles == 0
    assert not prediction.labels.array.any()
    assert any("nothing to segment" in w for w in warnings)


def test_a_constant_background_offset_segments_like_the_original(tmp_path, predictor):
    """int16 voxels with scl_slope 0.1 and scl_inter 50: background reads as 50, not 0."""
    stored = np.round(read_volume(SAMPLE).array * 10).astype(np.int16)
    plain = nib.Nifti1Image(stored, read_volume(SAMPLE).affine)
    plain.header.set_slope_inter(0.1, 0.0)
    offset = nib.Nifti1Image(stored, read_volume(SAMPLE).affine)
    offset.header.set_slope_inter(0.1, 50.0)
    nib.save(plain, tmp_path / "plain.nii.gz")
    nib.save(offset, tmp_path / "offset.nii.gz")
    a, b = read_volume(tmp_path / "plain.nii.gz"), read_volume(tmp_path / "offset.nii.gz")
    assert float(b.array.min()) == 50.0 and background_value(b.array) == 50.0
    ref = read_labels(TISSUE).array
    la, lb = predictor.predict(a).array, predictor.predict(b).array
    for k in (1, 2, 3):
        assert abs(dice(la, ref, k) - dice(lb, ref, k)) <= 0.005
    np.testing.assert_array_equal(foreground_mask(b.channels()), foreground_mask(a.channels()))


def test_a_noisy_background_is_not_mistaken_for_a_constant_one():
    rng = np.random.default_rng(0)
    noisy = rng.normal(30, 5, (30, 30, 30)).astype(np.float32)
    assert background_value(noisy) == 0.0


def _with_scalp(sample: Volume) -> Volume:
    """The sample with a bright 8 mm shell around the brain, as a T1 shows the scalp."""
    brain = sample.array > 0
    shell = ndi.binary_dilation(brain, iterations=4) & ~brain
    array = sample.array.copy()
    array[shell] = np.percentile(sample.array[brain], 99) * 1.2
    return sample.with_array(array)


def _warnings(predictor: Predictor, volume: Volume) -> list[str]:
    return predictor.check_input(volume)


def test_the_bundled_sample_draws_no_warning(predictor, sample):
    assert _warnings(predictor, sample) == []


def test_a_ct_given_to_the_brain_model_is_named_as_a_ct(predictor):
    ct, _ = make_phantom(0)
    (warning,) = _warnings(predictor, ct)
    assert "looks like a CT" in warning and "skull-stripped T1" in warning


def test_a_head_with_its_scalp_is_told_to_strip_the_skull(predictor, sample):
    (warning,) = _warnings(predictor, _with_scalp(sample))
    assert "strip the skull first" in warning and "SynthStrip" in warning


def test_a_head_in_a_noisy_field_of_view_is_told_to_strip_the_skull(predictor, sample):
    rng = np.random.default_rng(1)
    noisy = sample.array + rng.normal(20, 4, sample.array.shape).clip(1).astype(np.float32)
    (warning,) = _warnings(predictor, sample.with_array(noisy))
    assert "of the volume border holds signal" in warning and "strip the skull first" in warning


def test_a_ct_model_warns_about_an_mri_and_about_thick_slices():
    intended = IntendedInput("CT", intensity="HU", spacing_mm=(0.8, 1.5), body_region="abdomen")
    mri = read_volume(SAMPLE)
    (warning,) = input_warnings(intended, scan_statistics(mri))
    assert "does not look like a CT" in warning
    ct, _ = make_phantom(0, spacing=(0.8, 0.8, 5.0))
    (warning,) = input_warnings(intended, scan_statistics(ct))
    assert "5 mm" in warning and "0.8–1.5 mm" in warning


def test_older_model_files_say_which_convention_they_use(tmp_path, predictor):
    meta = read_metadata(predictor.source)
    assert meta["plan"]["orientation"] == "RAS" and meta["intended_input"]["skull_stripped"] is True
    old_plan = {k: v for k, v in meta["plan"].items() if k != "orientation"}
    path = save_model(predictor.model, tmp_path / "old.safetensors",
                      metadata={"plan": old_plan, "labels": meta["labels"], "train_config": meta["train_config"]})
    old = Predictor.from_checkpoint(path, InferenceConfig(device="cpu"))
    assert old.plan.orientation is None
    assert old.describe()["orientation"].startswith("storage order")
    assert old.intended == IntendedInput.from_plan(old.plan)  # still warns from what its plan says
    assert old.intended.skull_stripped and old.intended.modality == "MR"
    assert predictor.describe()["orientation"] == "RAS"
