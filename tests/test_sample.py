"""The shipped real sample (resources/sample/): MNI ICBM152 T1 + 4-class tissue map."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import napari_e2enet
from napari_e2enet.labels import BRAIN_TISSUE, LabelTable

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(napari_e2enet.__file__).resolve().parent / "resources" / "sample"
T1 = SAMPLE / "mni152_t1_2mm.nii.gz"
TISSUE = SAMPLE / "mni152_tissue_2mm.nii.gz"
FILES = [T1.name, TISSUE.name, "labels.json", "LICENSE-MNI152.txt", "README.md"]


@pytest.fixture(scope="module")
def sample():
    t1, tissue = nib.load(T1), nib.load(TISSUE)
    return t1, tissue, t1.get_fdata(dtype=np.float32), np.asarray(tissue.dataobj)


def test_files_exist_and_are_small() -> None:
    for name in FILES:
        assert (SAMPLE / name).is_file(), name
    assert T1.stat().st_size + TISSUE.stat().st_size < 3_000_000


def test_image_and_labels_share_the_grid(sample) -> None:
    t1_img, lab_img, t1, labels = sample
    assert t1.shape == labels.shape and t1.ndim == 3
    assert np.array_equal(t1_img.affine, lab_img.affine)
    for img in (t1_img, lab_img):
        sform, scode = img.header.get_sform(coded=True)
        qform, qcode = img.header.get_qform(coded=True)
        assert scode > 0 and qcode > 0
        assert np.allclose(sform, t1_img.affine) and np.allclose(qform, t1_img.affine)


def test_spacing_is_2mm_isotropic(sample) -> None:
    t1_img, lab_img, _, _ = sample
    for img in (t1_img, lab_img):
        assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), 2.0)
        assert np.allclose(img.header.get_zooms(), 2.0)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")


def test_four_tissue_classes_with_plausible_fractions(sample) -> None:
    _, lab_img, t1, labels = sample
    assert lab_img.get_data_dtype() == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    counts = np.bincount(labels.ravel(), minlength=4)
    brain = counts[1:].sum()
    assert 0.1 < brain / labels.size < 0.4
    brain_ml = brain * 8 / 1000  # MNI152 is a large, smooth average brain
    assert 1300 < brain_ml < 2300
    csf, gm, wm = counts[1:] / brain
    assert 0.03 < csf < 0.25 and 0.40 < gm < 0.70 and 0.25 < wm < 0.50
    # T1 contrast agrees with the labels: WM brighter than GM brighter than CSF; outside is dark.
    means = [float(t1[labels == k].mean()) for k in range(4)]
    assert means[0] < means[1] < means[2] < means[3]
    assert means[0] < 0.05 * means[3]


def test_brain_is_centred_in_mni_space(sample) -> None:
    """World coordinates are MNI: the brain's centre of mass lies near the MNI origin."""
    _, lab_img, _, labels = sample
    ijk = np.argwhere(labels > 0).mean(axis=0)
    xyz = lab_img.affine[:3, :3] @ ijk + lab_img.affine[:3, 3]
    assert abs(xyz[0]) < 3  # symmetric template: centred left-right
    assert np.all(np.abs(xyz) < 30)


def test_labels_json_and_licence_beside_the_volumes() -> None:
    table = LabelTable.from_dict(json.loads((SAMPLE / "labels.json").read_text()))
    assert table == BRAIN_TISSUE
    assert table.names == {0: "background", 1: "CSF/other", 2: "grey matter", 3: "white matter"}
    notice = (SAMPLE / "LICENSE-MNI152.txt").read_text()
    assert "McConnell Brain Imaging Centre" in notice
    assert "Permission to use, copy, modify, and distribute" in notice
    readme = (SAMPLE / "README.md").read_text()
    assert "scripts/prepare_sample.py" in readme and "99 × 117 × 95" in readme


# ---- against the source ----------------------------------------------------------------------


def _nilearn_data():
    pytest.importorskip("nilearn")
    from importlib.resources import files

    return Path(str(files("nilearn") / "datasets" / "data"))


def test_world_coordinates_match_the_1mm_source(sample) -> None:
    """Map 2 mm voxel centres through both affines into the 1 mm template: the 2 mm T1 equals the
    trilinear value of the source at the same world point (the 2×2×2 block mean)."""
    from scipy import ndimage as ndi

    src = nib.load(_nilearn_data() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    src_data = np.asarray(src.dataobj, dtype=np.float64)
    t1_img, _, t1, labels = sample
    rng = np.random.default_rng(0)
    ijk = np.argwhere(labels > 0)[rng.choice(int((labels > 0).sum()), 500, replace=False)]
    world = t1_img.affine @ np.c_[ijk, np.ones(len(ijk))].T
    src_ijk = (np.linalg.inv(src.affine) @ world)[:3]
    expected = ndi.map_coordinates(src_data, src_ijk, order=1)
    got = t1[tuple(ijk.T)]
    assert np.allclose(got, expected, atol=1 / 16)


def test_prepare_sample_reproduces_the_shipped_files(tmp_path) -> None:
    _nilearn_data()
    from importlib.metadata import version

    shipped_with = re.search(r"`nilearn` (\S+) wheel", (SAMPLE / "README.md").read_text())
    if shipped_with is None or shipped_with.group(1) != version("nilearn"):
        pytest.skip("the sample was made with another nilearn version")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_sample.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
