"""The procedural abdominal CT phantom: determinism, organs, HU, orientation."""

from __future__ import annotations

import numpy as np
import pytest

from napari_e2enet.data import AMOS_LABELS, load_dataset, make_phantom, phantom_dataset, write_volume
from napari_e2enet.data.io import read_labels

SMALL = (64, 64, 40)


@pytest.fixture(scope="module")
def default_case():
    return make_phantom(0)


def test_deterministic_and_distinct_per_seed():
    a_img, a_lab = make_phantom(5, SMALL)
    b_img, b_lab = make_phantom(5, SMALL)
    assert np.array_equal(a_img.array, b_img.array) and np.array_equal(a_lab.array, b_lab.array)
    c_img, c_lab = make_phantom(6, SMALL)
    assert not np.array_equal(a_lab.array, c_lab.array)
    assert np.abs(a_img.array - c_img.array).mean() > 5


def test_all_organs_and_types(default_case):
    img, lab = default_case
    assert img.array.shape == lab.array.shape == (96, 96, 64)
    assert img.array.dtype == np.float32 and lab.array.dtype == np.uint8
    assert img.spacing == (1.5, 1.5, 3.0)
    present = set(np.unique(lab.array).tolist())
    assert present <= set(AMOS_LABELS)
    assert present == set(range(16))  # every AMOS organ is rendered at the default size
    counts = np.bincount(lab.array.ravel(), minlength=16)
    assert counts[6] == counts[1:].max()  # the liver is the largest organ


def test_organ_presence_across_seeds():
    for seed in range(3):
        _, lab = make_phantom(seed, SMALL)
        present = set(np.unique(lab.array).tolist())
        assert {1, 2, 3, 6, 7, 8, 9, 10, 14} <= present, (seed, present)


def test_hu_ranges(default_case):
    img, lab = default_case
    hu, lb = img.array, lab.array

    def median(label):
        return float(np.median(hu[lb == label]))

    assert 60 < median(6) < 150  # liver
    assert 70 < median(1) < 160  # spleen
    assert median(8) > 120  # contrast-filled aorta
    assert median(2) > 90 and median(3) > 90  # kidneys
    assert -30 < median(14) < 50  # bladder: urine
    assert -30 < median(4) < 50  # gallbladder: bile
    assert np.percentile(hu[lb == 7], 5) < -500  # stomach holds air
    assert hu.min() >= -1024 and hu.max() <= 3071
    outside = hu[0, 0, :]  # a corner of the field of view is air
    assert np.median(outside) < -900
    body_bg = hu[(lb == 0) & (hu > -500)]
    assert (body_bg < -50).mean() > 0.2  # fat
    assert (body_bg > 300).any()  # bone (unlabelled)


def test_orientation_is_consistent_ras(default_case):
    img, lab = default_case
    assert img.orientation == ("L", "P", "S")  # radiological LPS voxel order, RAS+ affine

    def world_centroid(label):
        ijk = np.array(np.nonzero(lab.array == label)).mean(axis=1)
        return (img.affine @ np.array([*ijk, 1.0]))[:3]

    assert world_centroid(6)[0] > 0 and world_centroid(2)[0] > 0  # liver, right kidney: patient right (+x)
    assert world_centroid(1)[0] < 0 and world_centroid(3)[0] < 0  # spleen, left kidney: patient left
    assert world_centroid(14)[2] < world_centroid(6)[2]  # bladder below liver
    assert world_centroid(8)[1] < world_centroid(10)[1]  # aorta posterior to pancreas


def test_custom_geometry_and_round_trip(tmp_path):
    img, lab = make_phantom(1, (40, 36, 20), (2.0, 2.0, 5.0))
    assert img.spacing == (2.0, 2.0, 5.0) and img.array.shape == (40, 36, 20)
    out = write_volume(lab, tmp_path / "seg.nii.gz", like=img)
    back = read_labels(out)
    assert np.array_equal(back.array, lab.array) and np.array_equal(back.affine, img.affine)


def test_phantom_dataset():
    ds = phantom_dataset(2, seed=7, shape=SMALL)
    assert [c.name for c in ds] == ["phantom_000", "phantom_001"]
    assert ds.modality == "CT" and ds.labels == AMOS_LABELS and ds.num_classes == 16
    a = ds.load(0)
    again = phantom_dataset(2, seed=7, shape=SMALL, lazy=True)
    b = again.load(0)
    assert np.array_equal(a[0].array, b[0].array) and np.array_equal(a[1].array, b[1].array)
    assert not np.array_equal(ds.load(1)[1].array, a[1].array)
    assert len(load_dataset("phantom:2:7")) == 2
