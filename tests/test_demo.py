"""``napari-e2enet demo``: the MRI sample with the tissue model (default) and ``--sample ct``: the CT
phantom with the organ model, labels on the phantom's grid, overlay and a per-organ Dice report."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_e2enet.cli import main
from napari_e2enet.data import make_phantom
from napari_e2enet.labels import AMOS

CT_MODEL = "phantom-abdomen-ct"
# measured: mean organ Dice 0.930 on make_phantom(0) (the model card's sample_dice); margin 0.03
CT_DEMO_MIN_DICE = 0.90


def _demo(tmp_path, capsys, *args: str) -> dict:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--json", *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    assert (out / "overlay.png").stat().st_size > 10_000
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    return report


def test_demo_sample_ct_segments_the_phantom_with_organs(tmp_path, capsys):
    report = _demo(tmp_path, capsys, "--sample", "ct")
    out = tmp_path / "demo"
    assert report["model"] == CT_MODEL and report["warnings"] == []
    assert "synthetic" in report["model_expects"]
    image_file, labels_file = out / "phantom_ct.nii.gz", out / report["labels"]
    assert labels_file.name == "phantom_ct_labels.nii.gz"
    image, labels = nib.load(image_file), nib.load(labels_file)
    phantom, reference = make_phantom(0)
    assert labels.shape == image.shape == phantom.spatial_shape
    assert np.allclose(labels.affine, phantom.affine) and np.allclose(image.affine, phantom.affine)
    np.testing.assert_allclose(np.asarray(image.dataobj), phantom.array, atol=0.5)
    values = set(map(int, np.unique(np.asarray(labels.dataobj))))
    assert values <= set(AMOS.names) and len(values) >= 12  # most organs found
    organs = {k: v for k, v in report["dice"].items() if k != "mean"}
    present = {AMOS.names[k] for k in np.unique(reference.array) if k}
    assert set(organs) == present  # Dice per organ of the phantom, by AMOS name
    assert report["dice"]["mean"] > CT_DEMO_MIN_DICE, report["dice"]
    assert report["dice"]["mean"] == pytest.approx(np.mean(list(organs.values())))
    assert "volumes_ml" in report and report["volumes_ml"]["liver"] > 100


def test_demo_default_is_still_the_mri_sample_with_the_tissue_model(tmp_path, capsys):
    report = _demo(tmp_path, capsys)
    assert report["model"] == "mni152-tissue" and report["sample"] == "mni152_t1_2mm.nii.gz"
    assert report["labels"] == "mni152_t1_2mm_labels.nii.gz"
    assert set(report["dice"]) == {"mean", "CSF/other", "grey matter", "white matter"}
    assert report["dice_heldout_region"]["mean"] > 0.85
