"""nnU-Net v2 dataset folders in NRRD (``"file_ending": ".nrrd"`` or a detached ``".nhdr"``).

The same two tiny cases written as NIfTI and as NRRD (by the project's own writer, which stores LPS
space directions) load to the same arrays, label table, affine and spacing; header problems are
the same one-line InputErrors naming the file; no path (from dataset.json or an ``.nhdr``'s data
file) leads out of the dataset folder; and a few training iterations run on the NRRD folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_e2enet.data import Volume, load_dataset
from napari_e2enet.data.io import write_volume
from napari_e2enet.errors import InputError

from .conftest import FLIPPED, blob_labels

pytest.importorskip("nrrd")  # the formats extra (pynrrd), as every NRRD test

SHAPE = (16, 14, 12)
CASES = ("case_a", "case_b")


def _write_folder(root: Path, ending: str) -> Path:
    """An nnU-Net v2 folder of CASES; ``.nhdr``: the attached NRRD split into header + data file."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(3)
    for case in CASES:
        image = Volume(rng.normal(0, 100, SHAPE).astype(np.float32), FLIPPED.copy(), None, case)
        label = Volume(blob_labels(SHAPE), FLIPPED.copy(), None, case)
        for vol, path in ((image, root / "imagesTr" / f"{case}_0000"), (label, root / "labelsTr" / case)):
            if ending == ".nhdr":
                _detached(write_volume(vol, path.with_name(path.name + ".nrrd")))
            else:
                write_volume(vol, path.with_name(path.name + ending))
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
            "numTraining": len(CASES), "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _detached(nrrd_path: Path, data_name: str | None = None) -> Path:
    """Turn ``X.nrrd`` into ``X.nhdr`` + ``X.raw.gz`` (header lines end at the first empty line)."""
    blob = nrrd_path.read_bytes()
    head, _, payload = blob.partition(b"\n\n")
    data = nrrd_path.with_name(nrrd_path.name[: -len(".nrrd")] + ".raw.gz")
    data.write_bytes(payload)
    header = nrrd_path.with_name(data.name[: -len(".raw.gz")] + ".nhdr")
    header.write_bytes(head + f"\ndata file: {data_name or data.name}\n".encode())
    nrrd_path.unlink()
    return header


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("nrrd_datasets")
    return {ending: _write_folder(base / ending.strip("."), ending) for ending in (".nii.gz", ".nrrd", ".nhdr")}


@pytest.mark.parametrize("ending", [".nrrd", ".nhdr"])
def test_an_nrrd_folder_loads_as_its_nifti_twin(folders, ending):
    nifti, nrrd = load_dataset(folders[".nii.gz"]), load_dataset(folders[ending])
    assert [c.name for c in nrrd] == list(CASES) == [c.name for c in nifti]
    assert (nrrd.labels, nrrd.channel_names, nrrd.modality) == (nifti.labels, nifti.channel_names, nifti.modality)
    assert all(p.name.endswith(ending) for c in nrrd for p in (*c.image, c.label))  # lazy: the NRRD files
    for case in CASES:
        (image, label), (ref_image, ref_label) = nrrd.load(case), nifti.load(case)
        assert image.array.dtype == np.float32 and image.array.shape == (1, *SHAPE)
        assert np.array_equal(image.array, ref_image.array)
        assert label.array.dtype.kind in "iu" and np.array_equal(label.array, ref_label.array)
        assert set(np.unique(label.array)) == {0, 1, 2}
        np.testing.assert_allclose(image.affine, FLIPPED, rtol=0, atol=1e-12)
        np.testing.assert_allclose(label.affine, ref_label.affine, rtol=0, atol=1e-12)
        assert image.spacing == pytest.approx(ref_image.spacing) == (0.75, 1.25, 3.5)
        assert image.orientation == ref_image.orientation


def _copy(folder: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, dest))


@pytest.mark.parametrize(("change", "match"), [("shape", "label shape .* does not match image shape"),
                                               ("origin", "label affine does not match")])
def test_a_label_that_does_not_fit_its_image_is_a_one_line_error(folders, tmp_path, change, match):
    root = _copy(folders[".nrrd"], tmp_path / "d")
    bad = root / "labelsTr" / "case_b.nrrd"
    moved = FLIPPED.copy()
    moved[2, 3] += 7.0 if change == "origin" else 0.0
    shape = (SHAPE[0], SHAPE[1], SHAPE[2] - 1) if change == "shape" else SHAPE
    write_volume(Volume(blob_labels(shape), moved, None, "case_b"), bad)
    with pytest.raises(InputError, match=match) as info:
        load_dataset(root)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_an_undeclared_ending_and_a_second_channel_are_refused(folders, tmp_path):
    root = _copy(folders[".nrrd"], tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "PET"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="1 of the 2 channel file") as info:
        load_dataset(root)
    assert str(root / "imagesTr" / "case_a_0001.nrrd") in str(info.value)
    meta["channel_names"], meta["file_ending"] = {"0": "CT"}, ".NRRD"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"file_ending '\.NRRD' is not supported \(only .*\.nrrd, \.nhdr\)"):
        load_dataset(root)


def test_no_path_leads_out_of_the_dataset_folder(folders, tmp_path):
    """dataset.json entries are checked as for NIfTI; an .nhdr's data file must lie beside it."""
    root = _copy(folders[".nrrd"], tmp_path / "d")
    outside = write_volume(Volume(blob_labels(SHAPE), FLIPPED.copy(), None, "x"), tmp_path / "outside.nrrd")
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {"a": {"images": ["imagesTr/case_a_0000.nrrd"], "label": "labelsTr/../../outside.nrrd"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="outside the dataset folder") as info:
        load_dataset(root)
    assert str(root / "dataset.json") in str(info.value)

    root = _copy(folders[".nhdr"], tmp_path / "h")
    header = root / "labelsTr" / "case_a.nhdr"
    text = header.read_text().replace("data file: case_a.raw.gz", f"data file: ../../{outside.name}")
    header.write_text(text)
    with pytest.raises(InputError, match="outside the header's folder") as info:
        load_dataset(root)
    assert str(header) in str(info.value) and "\n" not in str(info.value)


def test_ten_training_iterations_on_an_nrrd_folder(folders, tmp_path):
    import torch

    from napari_e2enet.config import DataConfig, SparsityConfig, TrainConfig
    from napari_e2enet.training import Trainer

    config = TrainConfig(
        model="e2enet_small", model_overrides={"widths": (4, 8, 8), "pools": ((2, 2, 2),) * 2},
        sparsity=SparsityConfig(sparsity=0.8, update_every=5),
        data=DataConfig(source=str(folders[".nrrd"]), patch=(8, 8, 8), batch=1, num_validation=1),
        iterations=10, iterations_per_epoch=10, seed=1, device="cpu",
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        events = list(Trainer(config, tmp_path / "run").iter_fit())
    finally:
        torch.set_num_threads(threads)
    assert [e.kind for e in events].count("iteration") == 10 and events[-1].kind == "done"
    assert (tmp_path / "run" / "model.safetensors").is_file()
