"""``napari-e2enet predict`` on every input format gives exactly the labels of the NIfTI run, on the
source geometry; outputs by extension (.nii.gz, .nrrd, .seg.nrrd, .mha, .dcm) re-read.

Two volumes: a crop of the MNI sample (quantised to integers so that DICOM's int16 holds it exactly;
its slice axis reversed, so the DICOM reader, which sorts slices along the normal, returns it on a
different voxel grid) and a small CT phantom (LPS storage, like scanners). Each is written as NIfTI,
NRRD, MHA and a DICOM series (shuffled file names), and segmented with the bundled model through
``napari_e2enet.cli.main`` in-process. Labels are compared voxel by voxel at the same millimetre
positions (``on_grid``), so a different storage order cannot hide or fake a difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_e2enet.cli import main
from napari_e2enet.data.io import read_labels, read_volume, write_volume
from napari_e2enet.data.metaimage import write_metaimage
from napari_e2enet.data.nrrd import read_seg_nrrd, write_nrrd
from napari_e2enet.data.phantom import make_phantom
from napari_e2enet.data.volume import Volume
from napari_e2enet.labels import BRAIN_TISSUE

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
pytest.importorskip("nrrd")

from tests.dicom_util import write_dicom_series  # after the importorskips: it needs pydicom

SAMPLE = Path(__file__).resolve().parents[1] / "napari_e2enet" / "resources" / "sample" / "mni152_t1_2mm.nii.gz"
FORMATS = ("nrrd", "mha", "dicom")


def _mni() -> Volume:
    vol = read_volume(SAMPLE)
    crop = np.round(np.asarray(vol.array[29:69, 34:82, 30:62], np.float64) * 4.0)[:, :, ::-1]
    affine = vol.affine.copy()
    affine[:3, 3] = (vol.affine @ [29, 34, 61, 1])[:3]
    affine[:3, 2] *= -1  # slices run inferior: the DICOM reader gives them back ascending
    return Volume(crop.astype(np.float32), affine, name="mni")


def _ct() -> Volume:
    image, _ = make_phantom(0, shape=(40, 36, 16))
    return image.with_array(np.round(image.array).astype(np.float32))


def on_grid(labels: Volume, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``labels`` moved onto the grid (affine, shape) voxel for voxel: same millimetre positions.

    Both grids must hold the same voxel centres (a permutation / flip of axes); anything else fails.
    """
    to_ref = np.linalg.inv(affine) @ labels.affine
    index = np.indices(labels.spatial_shape).reshape(3, -1).astype(np.float64)
    ref = to_ref[:3, :3] @ index + to_ref[:3, 3:]
    assert np.allclose(ref, np.rint(ref), atol=1e-4), "voxel centres differ"
    ref = np.rint(ref).astype(int)
    assert all((ref[a] >= 0).all() and (ref[a] < shape[a]).all() for a in range(3))
    out = np.full(shape, -1, np.int64)
    out[tuple(ref)] = labels.array.reshape(-1)
    assert (out >= 0).all(), "the grids do not cover the same voxels"
    return out


def _predict(*argv: str | Path) -> int:
    return main(["predict", *(str(a) for a in argv), "--device", "cpu"])


@pytest.fixture(scope="module", params=["mni", "ct"])
def case(request, tmp_path_factory):
    """Inputs in every format, the NIfTI run's labels, and the DICOM read of the series."""
    volume = _mni() if request.param == "mni" else _ct()
    root = tmp_path_factory.mktemp(request.param)
    inputs = {
        "nifti": write_volume(volume, root / "vol.nii.gz"),
        "nrrd": write_nrrd(volume, root / "vol.nrrd"),
        "mha": write_metaimage(volume, root / "vol.mha"),
        "dicom": root / "dicom",
    }
    write_dicom_series(volume, inputs["dicom"], modality="MR" if request.param == "mni" else "CT")
    assert _predict("-i", inputs["nifti"], "-o", root / "ref.nii.gz") == 0
    return {"name": request.param, "root": root, "volume": volume, "inputs": inputs,
            "ref": read_labels(root / "ref.nii.gz")}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_input_format_gives_the_nifti_labels_on_its_own_geometry(case, fmt):
    root, ref = case["root"], case["ref"]
    out = root / f"from_{fmt}.nii.gz"
    assert _predict("-i", case["inputs"][fmt], "-o", out, "--overwrite") == 0
    got = read_labels(out)
    source = read_volume(case["inputs"][fmt])
    np.testing.assert_allclose(got.affine, source.affine, rtol=0, atol=1e-9)  # the source geometry
    assert got.spatial_shape == source.spatial_shape
    assert np.array_equal(on_grid(got, ref.affine, ref.spatial_shape), ref.array)
    assert np.unique(ref.array).size > 1  # the comparison is not between two empty maps
    if fmt == "dicom" and case["name"] == "mni":
        assert not np.allclose(source.affine, case["volume"].affine)  # really a different voxel grid


@pytest.mark.parametrize("case", ["ct"], indirect=True)
@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd", ".seg.nrrd"])
def test_output_extension_picks_the_writer_and_keeps_the_geometry(case, suffix):
    root, ref = case["root"], case["ref"]
    out = root / f"out{suffix}"
    assert _predict("-i", case["inputs"]["nifti"], "-o", out, "--overwrite") == 0
    if suffix == ".seg.nrrd":
        got, table = read_seg_nrrd(out)
        assert table.names == BRAIN_TISSUE.names  # the bundled model's label names
    else:
        got = read_labels(out)
    np.testing.assert_allclose(got.affine, ref.affine, rtol=0, atol=1e-9)
    assert np.array_equal(got.array, ref.array)


def test_dicom_input_to_seg_nrrd_and_dicom_seg(case):
    hd = pytest.importorskip("highdicom")
    root, ref, folder = case["root"], case["ref"], case["inputs"]["dicom"]
    source = read_volume(folder)
    expected = on_grid(ref, source.affine, source.spatial_shape)  # the NIfTI run, on the DICOM grid
    seg_nrrd = root / "labels.seg.nrrd"
    assert _predict("-i", folder, "-o", seg_nrrd, "--overwrite") == 0
    got, table = read_seg_nrrd(seg_nrrd)
    assert np.array_equal(got.array, expected)
    np.testing.assert_allclose(got.affine, source.affine, rtol=0, atol=1e-9)
    assert table.names == BRAIN_TISSUE.names

    dcm = root / "labels.dcm"
    assert _predict("-i", folder, "-o", dcm, "--overwrite") == 0
    seg = hd.seg.segread(dcm)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.meta["series_uid"]
    present = [int(v) for v in np.unique(expected) if v]
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [
        BRAIN_TISSUE.name_of(v) for v in present]
    planes = seg.get_pixels_by_source_instance(source_sop_instance_uids=source.meta["sop_instance_uids"],
                                               combine_segments=True, skip_overlap_checks=True)
    labels = np.asarray([0, *present])[np.transpose(planes, (2, 1, 0))]  # (slices, rows, cols) → (X, Y, Z)
    assert np.array_equal(labels, expected)


@pytest.mark.parametrize("case", ["ct"], indirect=True)
def test_folder_of_mixed_formats_and_output_format(case):
    root = case["root"]
    folder = root / "mixed"
    folder.mkdir(exist_ok=True)
    write_nrrd(case["volume"], folder / "a.nrrd")
    write_metaimage(case["volume"], folder / "b.MHA")  # suffixes in any case
    out = root / "mixed_out"
    assert _predict("-i", folder, "-o", out, "--output-format", "seg.nrrd", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd", "b.seg.nrrd"]
    for path in out.iterdir():
        assert np.array_equal(read_seg_nrrd(path)[0].array, case["ref"].array)


@pytest.mark.parametrize("case", ["ct"], indirect=True)
def test_evaluate_reads_the_new_formats(case, capsys):
    root = case["root"]
    write_nrrd(case["ref"], root / "eval_pred.nrrd")
    assert main(["evaluate", "--pred", str(root / "eval_pred.nrrd"), "--ref", str(root / "ref.nii.gz"),
                 "--json"]) == 0
    assert '"mean": 1.0' in capsys.readouterr().out


def _one_error_line(capfd) -> str:
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("case", ["ct"], indirect=True)
def test_two_series_need_series_uid(case, tmp_path, capfd):
    volume = case["volume"]
    folder = tmp_path / "two"
    write_dicom_series(volume, folder / "a", series_uid="1.2.826.0.1.3680043.8.498.1", description="first")
    write_dicom_series(volume.with_array(volume.array + 10), folder / "b",
                       series_uid="1.2.826.0.1.3680043.8.498.2", description="second")
    capfd.readouterr()
    assert _predict("-i", folder, "-o", tmp_path / "seg.nii.gz") == 2
    line = _one_error_line(capfd)
    assert line.startswith("napari-e2enet predict: error: ") and "1.2.826.0.1.3680043.8.498.2" in line
    assert not (tmp_path / "seg.nii.gz").exists()
    assert _predict("-i", folder, "-o", tmp_path / "seg.nii.gz", "--series", "1.2.826.0.1.3680043.8.498.1") == 0
    ref = case["ref"]
    assert np.array_equal(on_grid(read_labels(tmp_path / "seg.nii.gz"), ref.affine, ref.spatial_shape), ref.array)


def test_series_and_dicom_seg_need_dicom_input(tmp_path, capfd):
    image = write_volume(_ct(), tmp_path / "ct.nii.gz")
    capfd.readouterr()
    assert _predict("-i", image, "-o", tmp_path / "seg.nii.gz", "--series", "1.2.3") == 2
    assert "--series only applies to DICOM input" in _one_error_line(capfd)
    assert _predict("-i", image, "-o", tmp_path / "seg.dcm") == 2
    assert "DICOM-SEG output (.dcm) needs DICOM input" in _one_error_line(capfd)
    assert _predict("-i", image, "-o", tmp_path / "seg.nrrd", "--output-format", "mha") == 2
    assert "contradicts the output name" in _one_error_line(capfd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
