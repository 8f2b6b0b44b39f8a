"""Datasets: nnU-Net v2 and MSD folders, explicit pairs, in-memory arrays, validation, path escapes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from napari_e2enet.data import Dataset, load_dataset
from napari_e2enet.errors import InputError

from .conftest import FLIPPED, blob_labels, make_nnunet_folder, save_nifti


def write_json(root: Path, data) -> Path:
    path = root / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def raises_naming(path: Path | str, match: str, fn, *args):
    with pytest.raises(InputError, match=match) as info:
        fn(*args)
    assert str(path) in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    return info.value


# ----------------------------------------------------------------------------- nnU-Net v2


def test_nnunet_v2_folder(nnunet_folder):
    ds = load_dataset(nnunet_folder)
    assert [c.name for c in ds] == ["case_a", "case_b"]
    assert ds.labels == {0: "background", 1: "liver", 2: "spleen"}
    assert ds.channel_names == ("CT",) and ds.modality == "CT"
    assert ds.num_classes == 3 and ds.num_channels == 1
    assert isinstance(ds["case_b"].image, tuple)  # lazy: paths until loaded
    image, label = ds.load("case_b")
    assert image.array.shape == (1, 6, 5, 4) and image.array.dtype == np.float32
    assert label.array.dtype == np.uint8 and set(np.unique(label.array)) == {0, 1, 2}
    assert np.array_equal(image.affine, FLIPPED)
    assert load_dataset(nnunet_folder / "dataset.json").labels == ds.labels


def test_multichannel_mri_folder(tmp_path):
    root = make_nnunet_folder(tmp_path / "mr", channels=("T1", "FLAIR"), ending=".nii")
    ds = load_dataset(root)
    assert ds.modality == "MRI" and ds.num_channels == 2
    image, _ = ds.load(0)
    assert image.array.shape == (2, 6, 5, 4)


def test_v2_explicit_dataset_mapping(nnunet_folder):
    meta = json.loads((nnunet_folder / "dataset.json").read_text())
    meta["dataset"] = {"only": {"images": ["imagesTr/case_a_0000.nii.gz"], "label": "labelsTr/case_a.nii.gz"}}
    write_json(nnunet_folder, meta)
    ds = load_dataset(nnunet_folder)
    assert [c.name for c in ds] == ["only"]


# ----------------------------------------------------------------------------- MSD


def make_msd(root: Path, *, four_d: bool = True) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shape = (5, 4, 3)
    rng = np.random.default_rng(1)
    training = []
    for case in ("BRATS_001", "BRATS_002"):
        data = rng.normal(size=(*shape, 2)).astype(np.float32)
        save_nifti(root / "imagesTr" / f"{case}.nii.gz", data if four_d else data[..., 0])
        save_nifti(root / "labelsTr" / f"{case}.nii.gz", blob_labels(shape, (1, 3)))
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS junk")  # MSD tarballs carry these
    write_json(
        root,
        {
            "name": "BRATS",
            "modality": {"0": "FLAIR", "1": "T1w"} if four_d else {"0": "MRI"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": 2,
            "training": training,
            "test": [],
        },
    )
    return root


def test_msd_folder_with_4d_images(tmp_path):
    ds = load_dataset(make_msd(tmp_path / "Task01"))
    assert ds.name == "BRATS" and ds.modality == "MRI"
    assert ds.labels[3] == "enhancing tumour" and ds.num_classes == 4
    assert ds.channel_names == ("FLAIR", "T1w")
    image, label = ds.load(1)
    assert image.array.shape == (2, 5, 4, 3)
    assert set(np.unique(label.array)) == {0, 1, 3}


def test_nnunet_v1_training_list_with_channel_files(nnunet_folder):
    write_json(
        nnunet_folder,
        {
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver", "2": "spleen"},
            "training": [{"image": "./imagesTr/case_a.nii.gz", "label": "./labelsTr/case_a.nii.gz"}],
        },
    )
    ds = load_dataset(nnunet_folder)
    assert [c.name for c in ds] == ["case_a"]
    assert ds.load(0)[0].array.shape == (1, 6, 5, 4)


# ----------------------------------------------------------------------------- validation


def test_missing_folder_and_json(tmp_path):
    raises_naming(tmp_path / "nope", "not found", load_dataset, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    raises_naming(tmp_path / "empty" / "dataset.json", "no dataset.json", load_dataset, tmp_path / "empty")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"labels": {"background": 0}}), "channel_names"),
        (json.dumps({"channel_names": {"0": "CT"}}), "labels"),
        (json.dumps({"channel_names": {"0": "CT"}, "labels": {"a": "b"}}), "labels"),
        (json.dumps({"channel_names": {"0": "CT"}, "labels": {"bg": 0, "tumour": [1, 2]}}), "region"),
        (json.dumps({"channel_names": {"0": "CT"}, "labels": {"bg": 0, "x": 1, "y": 1}}), "share id"),
        (json.dumps({"channel_names": {"1": "CT"}, "labels": {"bg": 0}}), "channel indices"),
        (
            json.dumps({"channel_names": {"0": "CT"}, "labels": {"bg": 0}, "file_ending": ".mha"}),
            "file_ending",
        ),
    ],
)
def test_malformed_dataset_json(nnunet_folder, text, match):
    (nnunet_folder / "dataset.json").write_text(text)
    raises_naming(nnunet_folder / "dataset.json", match, load_dataset, nnunet_folder)


def test_missing_image_file(nnunet_folder):
    missing = nnunet_folder / "imagesTr" / "case_b_0000.nii.gz"
    missing.unlink()
    raises_naming(missing, "not found", load_dataset, nnunet_folder)


def test_missing_training_list_file(tmp_path):
    root = make_msd(tmp_path / "T")
    (root / "labelsTr" / "BRATS_002.nii.gz").unlink()
    raises_naming(root / "labelsTr" / "BRATS_002.nii.gz", "not found", load_dataset, root)


def test_image_label_shape_mismatch(nnunet_folder):
    bad = nnunet_folder / "labelsTr" / "case_a.nii.gz"
    save_nifti(bad, np.zeros((6, 5, 3), np.uint8))
    raises_naming(bad, "shape", load_dataset, nnunet_folder)


def test_image_label_affine_mismatch(nnunet_folder):
    bad = nnunet_folder / "labelsTr" / "case_a.nii.gz"
    moved = FLIPPED.copy()
    moved[2, 3] += 7.0
    save_nifti(bad, blob_labels((6, 5, 4)), moved)
    raises_naming(bad, "affine", load_dataset, nnunet_folder)


def test_channel_count_mismatch(tmp_path):
    root = make_nnunet_folder(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "PET"}
    write_json(root, meta)
    raises_naming(root / "imagesTr" / "case_a_0001.nii.gz", "not found", load_dataset, root)


def test_label_values_not_in_labels(nnunet_folder):
    bad = nnunet_folder / "labelsTr" / "case_b.nii.gz"
    lab = blob_labels((6, 5, 4))
    lab[0, 0, 0] = 9
    save_nifti(bad, lab)
    ds = load_dataset(nnunet_folder)  # header checks pass; values are checked on load
    raises_naming(bad, "label values 9", ds.load, 1)
    with pytest.raises(InputError):
        ds.validate()


# ----------------------------------------------------------------------------- path escapes


@pytest.mark.parametrize(
    "entry",
    ["../outside.nii.gz", "imagesTr/../../outside.nii.gz", "ABSOLUTE"],
)
def test_training_paths_cannot_escape(tmp_path, entry):
    root = make_msd(tmp_path / "T")
    outside = tmp_path / "outside.nii.gz"
    save_nifti(outside, np.zeros((5, 4, 3), np.float32))
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = str(outside) if entry == "ABSOLUTE" else entry
    write_json(root, meta)
    raises_naming(root / "dataset.json", "absolute|outside", load_dataset, root)


def test_symlinked_label_pointing_outside_is_refused(nnunet_folder, tmp_path):
    outside = save_nifti(tmp_path / "secret.nii.gz", blob_labels((6, 5, 4)))
    link = nnunet_folder / "labelsTr" / "case_c.nii.gz"
    os.symlink(outside, link)
    save_nifti(nnunet_folder / "imagesTr" / "case_c_0000.nii.gz", np.zeros((6, 5, 4), np.float32))
    raises_naming(link, "outside", load_dataset, nnunet_folder)


def test_symlinked_images_folder_pointing_outside_is_refused(tmp_path):
    root = make_nnunet_folder(tmp_path / "ds")
    elsewhere = tmp_path / "elsewhere"
    (root / "imagesTr").rename(elsewhere)
    os.symlink(elsewhere, root / "imagesTr")
    with pytest.raises(InputError, match="outside"):
        load_dataset(root)


def test_symlink_inside_the_folder_is_fine(nnunet_folder):
    (nnunet_folder / "labelsTr" / "case_a.nii.gz").rename(nnunet_folder / "labelsTr" / "real.bin")
    os.symlink("real.bin", nnunet_folder / "labelsTr" / "case_a.nii.gz")
    assert len(load_dataset(nnunet_folder)) == 2


# ----------------------------------------------------------------------------- other constructors


def test_from_pairs(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for name in ("p1", "p2"):
        img = save_nifti(tmp_path / f"{name}.nii.gz", rng.normal(-800, 50, (4, 4, 3)).astype(np.float32))
        lab = save_nifti(tmp_path / f"{name}_seg.nii.gz", blob_labels((4, 4, 3), (1, 4)))
        pairs.append((img, lab))
    ds = Dataset.from_pairs(pairs)
    assert [c.name for c in ds] == ["p1", "p2"]
    assert ds.labels == {0: "background", 1: "label_1", 4: "label_4"}
    assert ds.modality == "CT"  # guessed from intensities
    assert ds.num_classes == 5
    named = Dataset.from_pairs(pairs, {0: "bg", 1: "a", 4: "b"}, modality="MRI")
    assert named.labels[4] == "b" and named.modality == "MRI"
    bad = save_nifti(tmp_path / "bad.nii.gz", np.zeros((4, 4, 4), np.uint8))
    raises_naming(bad, "shape", Dataset.from_pairs, [(pairs[0][0], bad)])
    raises_naming(
        tmp_path / "nope.nii.gz", "not found", Dataset.from_pairs, [(tmp_path / "nope.nii.gz", None)]
    )


def test_from_arrays():
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(5, 4, 3)).astype(np.float32) for _ in range(3)]
    labels = [blob_labels((5, 4, 3)) for _ in range(3)]
    ds = Dataset.from_arrays(images, labels, FLIPPED, {0: "bg", 1: "one", 2: "two"}, modality="MRI")
    assert len(ds) == 3 and ds.labels[2] == "two"
    image, label = ds.load(2)
    assert np.array_equal(image.affine, FLIPPED) and label.array.dtype == np.uint8
    inferred = Dataset.from_arrays(images, labels)
    assert inferred.labels == {0: "background", 1: "label_1", 2: "label_2"}
    assert inferred.modality == "MRI"  # guessed: no HU-like values
    assert Dataset.from_arrays([images[0] * 100 - 1000]).modality == "CT"
    assert np.array_equal(inferred.load(0)[0].affine, np.eye(4))
    with pytest.raises(InputError, match="shape"):
        Dataset.from_arrays(images[:1], [np.zeros((5, 4, 4), np.uint8)])
    with pytest.raises(InputError, match="integers"):
        Dataset.from_arrays(images[:1], [np.full((5, 4, 3), 0.5)])
    with pytest.raises(InputError, match="not in the dataset"):
        Dataset.from_arrays(images[:1], labels[:1], None, {0: "bg", 1: "one"})
    multi = Dataset.from_arrays([rng.normal(size=(2, 5, 4, 3))], [labels[0]], modality="MRI")
    assert multi.num_channels == 2


def test_phantom_source_and_split():
    ds = load_dataset("phantom:3")
    assert len(ds) == 3 and ds.modality == "CT" and ds.labels[6] == "liver"
    train, val = ds.split(validation_fraction=0.34, seed=1)
    assert len(train) == 2 and len(val) == 1
    assert {c.name for c in train} | {c.name for c in val} == {c.name for c in ds}
    assert [c.name for c in ds.split(0.34, seed=1)[1]] == [c.name for c in val]
    for bad in ("phantom:0", "phantom:x", "phantom:"):
        with pytest.raises(InputError):
            load_dataset(bad)
