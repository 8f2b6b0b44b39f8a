"""DICOM series in, DICOM-SEG out (napari_e2enet.data.dicom). Small synthetic series: seconds on 2 cores."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import zipfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGLosslessSV1, RLELossless, SegmentationStorage, generate_uid

from napari_e2enet.data import dicom as dicom_mod
from napari_e2enet.data.dicom import (
    FORMATS_HINT,
    DicomSeries,
    is_dicom_source,
    list_dicom_series,
    read_dicom_series,
    write_dicom_seg,
)
from napari_e2enet.data.io import read_volume, write_volume
from napari_e2enet.data.phantom import make_phantom
from napari_e2enet.data.volume import Volume
from napari_e2enet.errors import InputError
from napari_e2enet.labels import AMOS, BRAIN_TISSUE, LabelTable
from tests.dicom_util import lps_geometry, write_dicom_series

SAMPLE = Path(__file__).resolve().parents[2] / "napari_e2enet" / "resources" / "sample"
ATOL_MM = 1e-4


def _ras(lps: np.ndarray) -> np.ndarray:
    out = np.asarray(lps, np.float64).copy()
    out[:2] *= -1
    return out


def _affine_from_lps(directions: np.ndarray, spacing: tuple[float, float, float], origin_ras) -> np.ndarray:
    """RAS affine whose voxel axes point along the LPS unit ``directions`` (columns) with ``spacing``."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(directions, np.float64) * np.asarray(spacing)
    affine = _ras(lps)
    affine[:3, 3] = origin_ras
    return affine


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# Three geometries that are right-handed in LPS (so the slice order of the file equals the order along
# the normal and the volume comes back unchanged), all with anisotropic spacing.
GEOMETRIES = {
    # radiological LPS voxel order, like the phantom and most CT
    "axis_aligned": _affine_from_lps(np.eye(3), (0.8, 0.9, 2.5), (30.5, 12.25, -40.0)),
    # coronal stack: i → anterior, j → superior, k → patient right (flipped and permuted axes)
    "flipped_permuted": _affine_from_lps(
        np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], float), (0.7, 1.1, 2.0), (-5.0, 60.0, 10.0)
    ),
    # oblique: rotated about all three axes
    "oblique": _affine_from_lps(_rotation(0.35, -0.6, 0.2), (0.75, 0.9, 2.2), (12.3, -45.6, 78.9)),
}


@pytest.fixture(scope="module")
def mni_crop() -> np.ndarray:
    """A quantised (integer-valued) 30×32×12 crop of the MNI152 T1 sample."""
    vol = read_volume(SAMPLE / "mni152_t1_2mm.nii.gz")
    return np.round(np.asarray(vol.array[35:65, 40:72, 40:52], np.float64) * 4.0)


@pytest.fixture(scope="module")
def phantom() -> tuple[Volume, Volume]:
    """A small CT phantom, HU quantised to integers, and its AMOS labels."""
    image, labels = make_phantom(0, shape=(40, 36, 16))
    return image.with_array(np.round(image.array)), labels


def _data(name: str, mni_crop: np.ndarray, phantom: tuple[Volume, Volume]) -> np.ndarray:
    return mni_crop if name == "mni" else np.asarray(phantom[0].array, np.float64)


def _one_line(err: pytest.ExceptionInfo, *needles: str | Path) -> str:
    text = str(err.value)
    assert "\n" not in text
    for needle in needles:
        assert str(needle) in text, (needle, text)
    return text


def _rewrite(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


# ---- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("data", ["mni", "phantom"])
def test_round_trip_identical_voxels_and_affine(tmp_path, mni_crop, phantom, data, geometry):
    array = _data(data, mni_crop, phantom)
    vol = Volume(array, GEOMETRIES[geometry], name="src")
    paths = write_dicom_series(vol, tmp_path / "series", modality="MR" if data == "mni" else "CT")
    assert all(not p.suffix for p in paths)  # random names: only positions can order them
    back = read_dicom_series(tmp_path / "series")
    assert back.array.dtype == np.float32
    assert back.array.shape == array.shape
    np.testing.assert_array_equal(back.array, array.astype(np.float32))
    np.testing.assert_allclose(back.affine, vol.affine, rtol=0, atol=ATOL_MM)
    assert back.name == "synthetic series"
    meta = back.meta
    assert meta["format"] == "dicom" and meta["path"] == str(tmp_path / "series")
    assert meta["modality"] == ("MR" if data == "mni" else "CT")
    expected_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    assert meta["sop_instance_uids"] == expected_uids
    assert meta["frame_numbers"] == [1] * len(paths)
    assert meta["series_uid"] == str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def test_phantom_own_geometry_and_rescale(tmp_path, phantom):
    image = phantom[0]
    write_dicom_series(image, tmp_path / "ct", rescale=(0.5, -1024.0))
    assert float(pydicom.dcmread(next((tmp_path / "ct").iterdir())).RescaleSlope) == 0.5
    back = read_dicom_series(tmp_path / "ct")
    np.testing.assert_array_equal(back.array, image.array.astype(np.float32))
    np.testing.assert_allclose(back.affine, image.affine, atol=ATOL_MM)
    assert back.orientation == ("L", "P", "S")


def test_left_handed_volume_comes_back_ascending_along_the_normal(tmp_path, mni_crop):
    # LAS (FSL/dcm2niix style): its k axis points against row × column in LPS, so the reader, which
    # sorts ascending along the normal, returns the slices reversed, at the same mm positions.
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (40.0, -20.0, 5.0)
    vol = Volume(mni_crop, affine)
    write_dicom_series(vol, tmp_path / "las", modality="MR")
    back = read_dicom_series(tmp_path / "las")
    np.testing.assert_array_equal(back.array, mni_crop[:, :, ::-1].astype(np.float32))
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, mni_crop.shape[2] - 1
    np.testing.assert_allclose(back.affine, affine @ flip, atol=ATOL_MM)
    assert np.linalg.det(_ras(back.affine)[:3, :3]) > 0


def test_slices_along_another_axis(tmp_path, phantom):
    vol = Volume(np.asarray(phantom[0].array, np.float64), GEOMETRIES["oblique"])
    write_dicom_series(vol, tmp_path / "sag", axis=0)
    back = read_dicom_series(tmp_path / "sag")
    # columns = old Y, rows = old Z, slices = old X (right-handed in LPS, so not reversed)
    expected = vol.affine[:, [1, 2, 0, 3]]
    assert np.linalg.det(_ras(expected)[:3, :3]) > 0
    np.testing.assert_array_equal(back.array, np.transpose(vol.array, (1, 2, 0)).astype(np.float32))
    np.testing.assert_allclose(back.affine, expected, atol=ATOL_MM)
    row_cos, col_cos, spacing, _ = lps_geometry(vol.affine, axis=0)
    ds = pydicom.dcmread(next((tmp_path / "sag").iterdir()), stop_before_pixels=True)
    np.testing.assert_allclose(
        [float(v) for v in ds.ImageOrientationPatient], [*row_cos, *col_cos], atol=1e-12
    )
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], spacing, atol=1e-12)


def test_zip_reads_identically(tmp_path, phantom):
    write_dicom_series(phantom[0], tmp_path / "study" / "series")
    (tmp_path / "study" / "README.txt").write_text("not dicom")
    folder_vol = read_dicom_series(tmp_path / "study")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "study").rglob("*")):
            zf.write(path, path.relative_to(tmp_path))
        zf.writestr("__MACOSX/._junk", b"\0" * 200)
    assert is_dicom_source(archive)
    zip_vol = read_dicom_series(archive)
    np.testing.assert_array_equal(zip_vol.array, folder_vol.array)
    np.testing.assert_array_equal(zip_vol.affine, folder_vol.affine)
    assert zip_vol.meta["sop_instance_uids"] == folder_vol.meta["sop_instance_uids"]
    assert zip_vol.meta["path"] == str(archive)
    assert [s.uid for s in list_dicom_series(archive)] == [folder_vol.meta["series_uid"]]


@pytest.mark.parametrize("bad_name", ["../evil.dcm", "/abs/evil.dcm", "a/../../evil.dcm"])
def test_zip_with_escaping_member_names_is_refused(tmp_path, phantom, bad_name):
    paths = write_dicom_series(phantom[0], tmp_path / "s")
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in paths:
            zf.write(path, f"s/{path.name}")
        zf.writestr(bad_name, paths[0].read_bytes())
    with pytest.raises(InputError) as err:
        read_dicom_series(archive)
    _one_line(err, archive, "unsafe path")
    assert is_dicom_source(archive)  # it is DICOM; reading it is what refuses


def _two_series(tmp_path: Path, phantom) -> tuple[Path, str, str]:
    folder = tmp_path / "two"
    study = generate_uid()
    first, second = generate_uid(), generate_uid()
    write_dicom_series(phantom[0], folder / "a", series_uid=first, study_uid=study, description="venous")
    small = Volume(np.asarray(phantom[0].array[:, :, :6]), phantom[0].affine)
    write_dicom_series(
        small, folder / "b", series_uid=second, study_uid=study, description="arterial", seed=1
    )
    return folder, first, second


def test_two_series_need_a_choice(tmp_path, phantom):
    folder, first, second = _two_series(tmp_path, phantom)
    with pytest.raises(InputError) as err:
        read_dicom_series(folder)
    _one_line(err, folder, first, second, "'venous' (16 slices)", "'arterial' (6 slices)", "--series UID")
    assert read_dicom_series(folder, series_uid=second).spatial_shape == (40, 36, 6)
    picked = read_dicom_series(folder, series_uid=first)
    np.testing.assert_array_equal(picked.array, phantom[0].array.astype(np.float32))
    listed = list_dicom_series(folder)
    assert all(isinstance(s, DicomSeries) for s in listed)
    assert {(s.uid, s.description, s.num_slices, s.rows, s.columns, s.modality) for s in listed} == {
        (first, "venous", 16, 36, 40, "CT"),
        (second, "arterial", 6, 36, 40, "CT"),
    }
    with pytest.raises(InputError) as err:
        read_dicom_series(folder, series_uid="1.2.3.4")
    _one_line(err, folder, "1.2.3.4", first, second)


def test_is_dicom_source(tmp_path, phantom):
    write_dicom_series(phantom[0], tmp_path / "dcm" / "nested" / "deeper")
    (tmp_path / "dcm" / ".hidden").write_bytes(b"x" * 300)
    assert is_dicom_source(tmp_path / "dcm")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    write_volume(Volume(np.zeros((4, 4, 4), np.float32), np.eye(4)), plain / "image.nii.gz")
    assert not is_dicom_source(plain)
    assert not is_dicom_source(plain / "image.nii.gz")
    assert not is_dicom_source(tmp_path / "missing")
    archive = tmp_path / "plain.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(plain / "notes.txt", "notes.txt")
    assert not is_dicom_source(archive)
    hidden_only = tmp_path / "hidden_only"
    hidden_only.mkdir()
    shutil.copy(next((tmp_path / "dcm" / "nested" / "deeper").iterdir()), hidden_only / ".slice")
    assert not is_dicom_source(hidden_only)


def test_rle_compressed_series_reads(tmp_path, phantom):
    paths = write_dicom_series(phantom[0], tmp_path / "rle")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path, enforce_file_format=True)
    back = read_dicom_series(tmp_path / "rle")
    np.testing.assert_array_equal(back.array, phantom[0].array.astype(np.float32))


def test_enhanced_multiframe_reads_and_segments(tmp_path, phantom):
    image, labels = phantom
    vol = Volume(np.asarray(image.array), GEOMETRIES["oblique"])
    paths = write_dicom_series(vol, tmp_path / "classic")
    datasets = [pydicom.dcmread(p) for p in paths]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(datasets, generate_uid(), 7, generate_uid(), 1)
    (tmp_path / "mf").mkdir()
    enhanced.save_as(tmp_path / "mf" / "enhanced", enforce_file_format=True)
    assert [s.num_slices for s in list_dicom_series(tmp_path / "mf")] == [16]
    back = read_dicom_series(tmp_path / "mf")
    np.testing.assert_array_equal(back.array, vol.array.astype(np.float32))
    np.testing.assert_allclose(back.affine, vol.affine, atol=ATOL_MM)
    assert back.meta["sop_instance_uids"] == [str(enhanced.SOPInstanceUID)] * 16
    assert sorted(back.meta["frame_numbers"]) == list(range(1, 17))
    out = write_dicom_seg(back.with_array(labels.array), tmp_path / "seg.dcm", source=back, label_table=AMOS)
    seg = hd.seg.segread(out)
    ipp = {
        n + 1: [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for n, item in enumerate(enhanced.PerFrameFunctionalGroupsSequence)
    }
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(source.ReferencedFrameNumber)
        got = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(got, ipp[frame], atol=1e-6)


# ---- refusals ------------------------------------------------------------------------------------


def test_gantry_tilt_is_refused(tmp_path, phantom):
    sheared = GEOMETRIES["axis_aligned"].copy()
    sheared[:3, 2] = (0.0, 0.6, 2.5)  # slice step leans along y: a 13.5° tilt
    write_dicom_series(Volume(np.asarray(phantom[0].array), sheared), tmp_path / "tilt")
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "tilt")
    _one_line(err, tmp_path / "tilt", "gantry tilt", "13.50°")


def test_uneven_spacing_is_refused(tmp_path, phantom):
    paths = write_dicom_series(phantom[0], tmp_path / "gap")
    paths[len(paths) // 2].unlink()
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "gap")
    _one_line(err, tmp_path / "gap", "non-uniform slice spacing", "missing slice")


def test_spacing_within_tolerance_is_accepted(tmp_path, phantom):
    paths = write_dicom_series(phantom[0], tmp_path / "jitter", shuffle_names=False)
    ds = pydicom.dcmread(paths[5])
    ipp = [float(v) for v in ds.ImagePositionPatient]
    _rewrite(paths[5], ImagePositionPatient=[ipp[0], ipp[1], ipp[2] + 0.009])  # < 0.01 mm
    back = read_dicom_series(tmp_path / "jitter")
    np.testing.assert_allclose(back.affine, phantom[0].affine, atol=0.001)


def test_single_slice_is_refused(tmp_path, phantom):
    paths = write_dicom_series(phantom[0], tmp_path / "one")
    for path in paths[1:]:
        path.unlink()
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "one")
    _one_line(err, tmp_path / "one", "single slice")


def test_non_dicom_folder_is_refused(tmp_path):
    folder = tmp_path / "nifti"
    folder.mkdir()
    write_volume(Volume(np.zeros((4, 4, 4), np.float32), np.eye(4)), folder / "image.nii.gz")
    (folder / "notes.txt").write_text("x" * 200)
    with pytest.raises(InputError) as err:
        read_dicom_series(folder)
    _one_line(err, folder, "no DICOM files")
    with pytest.raises(InputError) as err:
        list_dicom_series(folder)
    _one_line(err, folder, "no DICOM files")


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.1, 0.0])
def test_truncated_file_is_refused(tmp_path, phantom, keep):
    paths = write_dicom_series(phantom[0], tmp_path / "trunc")
    victim = paths[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: max(140, int(len(data) * keep))])
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "trunc")
    _one_line(err, victim)


def test_truncated_zip_member_is_refused(tmp_path, phantom):
    paths = write_dicom_series(phantom[0], tmp_path / "s")
    archive = tmp_path / "trunc.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in paths:
            data = path.read_bytes()
            zf.writestr(f"s/{path.name}", data if path != paths[2] else data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        read_dicom_series(archive)
    _one_line(err, archive, f"member s/{paths[2].name}")


def test_duplicate_positions_are_refused(tmp_path, phantom):
    paths = write_dicom_series(phantom[0], tmp_path / "dup")
    shutil.copy(paths[4], tmp_path / "dup" / "copy_of_a_slice")
    _rewrite(tmp_path / "dup" / "copy_of_a_slice", SOPInstanceUID=generate_uid())
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "dup")
    _one_line(err, tmp_path / "dup", "duplicate slice positions")


def test_mixed_orientation_and_size_are_refused(tmp_path, phantom):
    paths = write_dicom_series(phantom[0], tmp_path / "orient")
    _rewrite(paths[2], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "orient")
    _one_line(err, tmp_path / "orient", "mixed slice orientations")

    paths = write_dicom_series(phantom[0], tmp_path / "size")
    ds = pydicom.dcmread(paths[2])
    ds.Rows, ds.Columns = 8, 8
    ds.PixelData = np.zeros((8, 8), np.int16).tobytes()
    ds.save_as(paths[2], enforce_file_format=True)
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "size")
    _one_line(err, tmp_path / "size", "mixed image sizes", "8x8 in 1 file")


@pytest.mark.parametrize("tag", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_is_refused(tmp_path, phantom, tag):
    paths = write_dicom_series(phantom[0], tmp_path / "geo")
    _rewrite(paths[1], **{tag: None})
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "geo")
    _one_line(err, paths[1], f"missing {tag}")


def test_undecodable_transfer_syntax_is_refused(tmp_path, phantom):
    from pydicom.pixels import get_decoder
    from pydicom.uid import HTJ2KLossless

    # the formats extra brings a JPEG Lossless decoder (pylibjpeg), the usual compressed CT syntax
    assert get_decoder(JPEGLosslessSV1).is_available
    assert not get_decoder(HTJ2KLossless).is_available  # no plugin for HTJ2K here: refused in one line
    paths = write_dicom_series(phantom[0], tmp_path / "htj2k")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = HTJ2KLossless
        ds.PixelData = encapsulate([b"\xff\x4f not really htj2k \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "htj2k")
    _one_line(err, tmp_path / "htj2k", HTJ2KLossless, "cannot be decoded")


def test_bad_paths_are_refused(tmp_path, phantom):
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "missing")
    _one_line(err, tmp_path / "missing", "not found")
    paths = write_dicom_series(phantom[0], tmp_path / "s")
    with pytest.raises(InputError) as err:
        read_dicom_series(paths[0])
    _one_line(err, paths[0], "single DICOM file")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 nope")
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "broken.zip")
    _one_line(err, tmp_path / "broken.zip", "zip")


# ---- DICOM-SEG -----------------------------------------------------------------------------------


def _check_seg(seg_path: Path, source: Volume, label_map: np.ndarray, table: LabelTable) -> pydicom.Dataset:
    present = [int(v) for v in np.unique(label_map) if v]
    seg = hd.seg.segread(seg_path)
    assert list(seg.segment_numbers) == list(range(1, len(present) + 1))
    for number, label_id in enumerate(present, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == table.name_of(label_id)
    # Every frame: its plane position is that of the source slice it references, and its pixels are
    # exactly that slice's mask of its segment.
    src_ipp = {}
    src_files = [p for p in Path(source.meta["path"]).rglob("*") if p.is_file()]
    for path in src_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID != SegmentationStorage:
            src_ipp[str(ds.SOPInstanceUID)] = [float(v) for v in ds.ImagePositionPatient]
    slice_of = {uid: k for k, uid in enumerate(source.meta["sop_instance_uids"])}
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    seen = set()
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        got = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(got, src_ipp[uid], atol=1e-6)
        k = slice_of[uid]
        mask = label_map[:, :, k].T == present[number - 1]
        np.testing.assert_array_equal(frames[f].astype(bool), mask)
        seen.add((k, number))
    expected = {
        (k, n)
        for n, label_id in enumerate(present, start=1)
        for k in range(label_map.shape[2])
        if np.any(label_map[:, :, k] == label_id)
    }
    assert seen == expected  # frames only where a segment is present, and all of them
    plain = pydicom.dcmread(seg_path)
    assert plain.SOPClassUID == SegmentationStorage
    assert plain.ReferencedSeriesSequence[0].SeriesInstanceUID == source.meta["series_uid"]
    assert plain.SegmentationType == "BINARY"
    return plain


@pytest.mark.parametrize("geometry", ["axis_aligned", "oblique"])
def test_dicom_seg_round_trip(tmp_path, phantom, geometry):
    image, labels = phantom
    vol = Volume(np.asarray(image.array), GEOMETRIES[geometry])
    write_dicom_series(vol, tmp_path / "ct")
    source = read_dicom_series(tmp_path / "ct")
    label_vol = source.with_array(labels.array)
    out = write_dicom_seg(label_vol, tmp_path / "ct" / "seg.dcm", source=source, label_table=AMOS)
    assert out == tmp_path / "ct" / "seg.dcm"
    assert not list((tmp_path / "ct").glob(".seg.dcm.*"))  # no temporary left behind
    plain = _check_seg(out, source, np.asarray(labels.array), AMOS)
    # the SEG sits in the source folder: still one image series there, read as before
    assert len(list_dicom_series(tmp_path / "ct")) == 1
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "ct").array, source.array)
    by_label = {item.SegmentLabel: item for item in plain.SegmentSequence}
    spleen = by_label["spleen"]
    assert spleen.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Spleen.value
    assert spleen.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.SCT.AnatomicalStructure.value
    kidney = by_label["right kidney"]
    assert kidney.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Kidney.value
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == codes.SCT.Right.value
    assert by_label["left adrenal gland"].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == (
        codes.SCT.Left.value
    )
    ivc = by_label["postcava"]  # AMOS's name, coded through the labels.py alias
    assert ivc.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.InferiorVenaCava.value
    lab = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in spleen.RecommendedDisplayCIELabValue))
    assert np.allclose(lab.to_rgb(), np.array(AMOS.color_of(1)[:3]) * 255, atol=2)
    assert plain.SeriesDescription == "E2ENet segmentation"
    assert spleen.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "napari-e2enet"


def test_dicom_seg_brain_tissue_with_unknown_label(tmp_path, mni_crop):
    tissue = read_volume(SAMPLE / "mni152_tissue_2mm.nii.gz").array[35:65, 40:72, 40:52].astype(np.uint8)
    tissue[:3, :3, :2] = 7  # an id the table does not know
    vol = Volume(mni_crop, read_volume(SAMPLE / "mni152_t1_2mm.nii.gz").affine)
    write_dicom_series(vol, tmp_path / "mr", modality="MR")
    source = read_dicom_series(tmp_path / "mr")
    out = write_dicom_seg(
        source.with_array(tissue),
        tmp_path / "tissue_seg.dcm",
        source=source,
        label_table=BRAIN_TISSUE,
        series_description="tissue",
        algorithm_version="9.9",
    )
    plain = _check_seg(out, source, tissue, BRAIN_TISSUE)
    by_label = {item.SegmentLabel: item for item in plain.SegmentSequence}
    assert (
        by_label["grey matter"].SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.GrayMatter.value
    )
    assert by_label["CSF/other"].SegmentedPropertyTypeCodeSequence[0].CodeValue == (
        codes.SCT.CerebrospinalFluid.value
    )
    unknown = by_label["label 7"]
    assert unknown.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Tissue.value
    assert unknown.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.SCT.Tissue.value
    assert plain.SeriesDescription == "tissue"
    assert plain.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "9.9"


def test_segment_concepts_for_presets():
    for table in (AMOS, BRAIN_TISSUE):
        for label_id in table.ids[1:]:
            category, prop, _ = dicom_mod.segment_concepts(table.name_of(label_id))
            assert prop.value != codes.SCT.Tissue.value or category.value == codes.SCT.Tissue.value
    assert dicom_mod.segment_concepts("prostate")[1].value == codes.SCT.Prostate.value
    assert dicom_mod.segment_concepts("Enhancing tumor")[0].value == (
        codes.SCT.MorphologicallyAbnormalStructure.value
    )
    assert dicom_mod.segment_concepts("edema")[1].value == codes.SCT.Edema.value
    assert dicom_mod.segment_concepts("something else")[1].value == codes.SCT.Tissue.value


def test_dicom_seg_refusals(tmp_path, phantom):
    image, labels = phantom
    nifti_source = Volume(np.asarray(image.array), image.affine)
    with pytest.raises(InputError) as err:
        write_dicom_seg(labels, tmp_path / "seg.dcm", source=nifti_source, label_table=AMOS)
    _one_line(err, tmp_path / "seg.dcm", "DICOM-SEG needs a DICOM source image")

    write_dicom_series(image, tmp_path / "ct")
    source = read_dicom_series(tmp_path / "ct")
    small = Volume(np.ones((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(InputError) as err:
        write_dicom_seg(small, tmp_path / "seg.dcm", source=source, label_table=AMOS)
    _one_line(err, "source grid")
    with pytest.raises(InputError) as err:
        write_dicom_seg(
            source.with_array(np.zeros(source.spatial_shape, np.uint8)),
            tmp_path / "seg.dcm",
            source=source,
            label_table=AMOS,
        )
    _one_line(err, "empty")
    with pytest.raises(InputError) as err:
        write_dicom_seg(
            source.with_array(labels.array), tmp_path / "nowhere" / "seg.dcm", source=source, label_table=AMOS
        )
    _one_line(err, "does not exist")
    assert not (tmp_path / "seg.dcm").exists()


# ---- the formats extra ---------------------------------------------------------------------------


def test_missing_extra_is_one_line(tmp_path, phantom, monkeypatch):
    write_dicom_series(phantom[0], tmp_path / "ct")
    source = read_dicom_series(tmp_path / "ct")
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(InputError) as err:
        write_dicom_seg(
            source.with_array(phantom[1].array), tmp_path / "seg.dcm", source=source, label_table=AMOS
        )
    assert str(err.value) == f"{tmp_path / 'seg.dcm'}: {FORMATS_HINT}"
    monkeypatch.setitem(sys.modules, "pydicom", None)
    for call in (lambda: read_dicom_series(tmp_path / "ct"), lambda: list_dicom_series(tmp_path / "ct")):
        with pytest.raises(InputError) as err:
            call()
        assert str(err.value) == f"{tmp_path / 'ct'}: {FORMATS_HINT}"
    assert is_dicom_source(tmp_path / "ct")  # sniffing needs no pydicom


def test_module_imports_without_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    monkeypatch.setitem(sys.modules, "highdicom", None)
    spec = importlib.util.spec_from_file_location("napari_e2enet.data._dicom_probe", dicom_mod.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert callable(module.read_dicom_series)
