"""NIfTI read/write: exact geometry round trips and one-line InputErrors for every bad file."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_e2enet.data import Volume, read_geometry, read_image, read_labels, read_volume, write_volume
from napari_e2enet.errors import InputError

from .conftest import FLIPPED, blob_labels, save_nifti

OBLIQUE = np.array(
    [
        [0.0, -0.9, 0.1, 10.0],
        [1.1, 0.0, 0.0, -5.0],
        [0.0, 0.05, 2.5, 7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def assert_input_error(path: Path, match: str, fn=read_volume, **kwargs) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        fn(path, **kwargs)
    text = str(info.value)
    assert str(path) in text, text
    assert "\n" not in text
    return info.value


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
@pytest.mark.parametrize(("sform", "qform"), [(1, 1), (4, 1), (2, 0), (0, 1)])
def test_labels_round_trip_keeps_geometry_and_codes(tmp_path, ending, sform, qform):
    src = save_nifti(tmp_path / f"src{ending}", np.random.default_rng(0).normal(size=(7, 6, 5)).astype(np.float32),
                     FLIPPED, sform_code=sform, qform_code=qform)  # fmt: skip
    image = read_volume(src)
    labels = image.with_array(blob_labels(image.spatial_shape).astype(np.int64))
    out = write_volume(labels, tmp_path / f"seg{ending}", like=image)
    ref, got = nib.load(str(src)), nib.load(str(out))
    assert np.array_equal(got.affine, ref.affine)
    assert np.array_equal(got.affine, image.affine)
    assert got.shape == ref.shape == (7, 6, 5)
    assert int(got.header["sform_code"]) == sform
    assert int(got.header["qform_code"]) == qform
    assert got.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(got.dataobj), labels.array)
    assert sorted(os.listdir(tmp_path)) == sorted([src.name, out.name])  # no temp files left


def test_oblique_affine_and_image_round_trip(tmp_path):
    data = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    src = save_nifti(tmp_path / "obl.nii.gz", data, OBLIQUE, sform_code=1, qform_code=0)
    vol = read_volume(src)
    out = write_volume(vol, tmp_path / "copy.nii.gz")
    got = nib.load(str(out))
    assert np.array_equal(got.affine, nib.load(str(src)).affine)
    assert got.get_data_dtype() == np.float32
    assert np.array_equal(got.get_fdata(dtype=np.float32), data)
    assert vol.spacing == pytest.approx(tuple(np.linalg.norm(OBLIQUE[:3, :3], axis=0)))


def test_label_dtype_fits_values(tmp_path):
    vol = Volume(np.zeros((4, 4, 3), np.int64), FLIPPED)
    vol.array[0, 0, 0] = 300
    got = nib.load(str(write_volume(vol, tmp_path / "big.nii.gz")))
    assert got.get_data_dtype() == np.int16
    assert int(np.asanyarray(got.dataobj).max()) == 300
    vol.array[0, 0, 0] = 70000
    assert nib.load(str(write_volume(vol, tmp_path / "huge.nii"))).get_data_dtype() == np.int32


def test_write_without_header_is_scanner_coordinates_and_exact(tmp_path):
    vol = Volume(np.ones((3, 4, 5), np.float32), FLIPPED)
    got = nib.load(str(write_volume(vol, tmp_path / "x.nii.gz")))
    assert np.array_equal(got.affine, FLIPPED)
    assert int(got.header["sform_code"]) == 1 and int(got.header["qform_code"]) == 1


def test_multichannel_write_and_read(tmp_path):
    arr = np.random.default_rng(2).normal(size=(3, 4, 5, 6)).astype(np.float32)
    out = write_volume(Volume(arr, FLIPPED), tmp_path / "mc.nii.gz")
    assert nib.load(str(out)).shape == (4, 5, 6, 3)
    back = read_volume(out, allow_channels=True)
    assert back.array.shape == (3, 4, 5, 6) and back.num_channels == 3
    assert np.array_equal(back.array, arr)


def test_overwrite_is_atomic_and_keeps_mode(tmp_path):
    target = tmp_path / "seg.nii.gz"
    vol = Volume(np.zeros((3, 3, 3), np.uint8), FLIPPED)
    write_volume(vol, target)
    os.chmod(target, 0o640)
    vol.array[1, 1, 1] = 5
    write_volume(vol, target)
    assert np.asanyarray(nib.load(str(target)).dataobj)[1, 1, 1] == 5
    assert target.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["seg.nii.gz"]


def test_write_errors(tmp_path):
    vol = Volume(np.zeros((3, 3, 3), np.uint8), FLIPPED)
    missing = tmp_path / "nope" / "seg.nii.gz"
    with pytest.raises(InputError, match="does not exist") as info:
        write_volume(vol, missing)
    assert str(missing) in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError):
        write_volume(vol, tmp_path / "file" / "seg.nii.gz")
    with pytest.raises(InputError, match=r"\.nii"):
        write_volume(vol, tmp_path / "seg.png")
    other = Volume(np.zeros((4, 3, 3), np.float32), FLIPPED)
    with pytest.raises(InputError, match="does not match"):
        write_volume(vol, tmp_path / "seg.nii.gz", like=other)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_write_to_unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot write"):
            write_volume(Volume(np.zeros((3, 3, 3), np.uint8), FLIPPED), folder / "seg.nii.gz")
    finally:
        folder.chmod(0o700)


def test_failed_write_leaves_target_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "seg.nii.gz"
    vol = Volume(np.zeros((3, 3, 3), np.uint8), FLIPPED)
    write_volume(vol, target)
    before = target.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", disk_full)
    vol.array[0, 0, 0] = 3
    with pytest.raises(InputError, match="No space left") as info:
        write_volume(vol, target)
    assert str(target) in str(info.value)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["seg.nii.gz"]


# ----------------------------------------------------------------------------- bad inputs


def test_missing_and_folder(tmp_path):
    assert_input_error(tmp_path / "missing.nii.gz", "not found")
    d = tmp_path / "dir.nii.gz"
    d.mkdir()
    assert_input_error(d, "folder")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.nii.gz"
    p.write_bytes(b"")
    assert_input_error(p, "empty")


def test_wrong_suffix(tmp_path):
    p = save_nifti(tmp_path / "a.nii.gz", np.zeros((3, 3, 3), np.float32))
    q = tmp_path / "a.png"
    q.write_bytes(p.read_bytes())
    assert_input_error(q, "NIfTI")


def test_non_nifti_bytes(tmp_path):
    p = tmp_path / "junk.nii"
    p.write_bytes(b"this is not a nifti file at all" * 20)
    assert_input_error(p, "not a readable NIfTI")
    q = tmp_path / "junk.nii.gz"
    q.write_bytes(b"not gzip either" * 30)
    assert_input_error(q, "not a readable NIfTI")


def test_truncated_gz(tmp_path):
    p = save_nifti(
        tmp_path / "t.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    )
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    assert_input_error(p, "truncated|corrupt|readable")


def test_header_lies_about_size(tmp_path):
    p = save_nifti(tmp_path / "lie.nii", np.zeros((4, 4, 4), np.float32))
    raw = bytearray(p.read_bytes())
    p.write_bytes(bytes(raw[: len(raw) - 100]))  # data shorter than the header's dims promise
    assert_input_error(p, "header declares")
    img = nib.load(str(save_nifti(tmp_path / "ok.nii.gz", np.zeros((4, 4, 4), np.float32))))
    img.header.set_data_shape((4000, 4000, 4000))  # a 256 GB promise in a tiny .nii.gz
    hdr_bytes = img.header.binaryblock + b"\x00" * 4 + np.zeros(64, np.float32).tobytes()
    q = tmp_path / "lie.nii.gz"
    q.write_bytes(gzip.compress(hdr_bytes))
    assert_input_error(q, "header declares")


def test_2d_image(tmp_path):
    p = save_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32))
    assert_input_error(p, "2D")
    q = save_nifti(tmp_path / "slice.nii.gz", np.zeros((8, 8, 1), np.float32))
    assert_input_error(q, "2D")


def test_4d_needs_permission_for_channels(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 5, 6, 2)).astype(np.float32)
    p = save_nifti(tmp_path / "series.nii.gz", data)
    assert_input_error(p, "4D image with 2 volumes")
    vol = read_volume(p, allow_channels=True)
    assert vol.array.shape == (2, 4, 5, 6)
    assert np.array_equal(vol.array[1], data[..., 1])
    one = save_nifti(tmp_path / "one.nii.gz", data[..., :1])
    assert read_volume(one).array.shape == (4, 5, 6)  # a single-volume 4D file is 3D


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf(tmp_path, bad):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = bad
    p = save_nifti(tmp_path / "nan.nii.gz", data)
    assert_input_error(p, "NaN or Inf")


def test_geometry_without_reading_voxels(tmp_path):
    p = save_nifti(tmp_path / "g.nii.gz", np.zeros((4, 5, 6), np.int16))
    shape, affine, channels = read_geometry(p)
    assert shape == (4, 5, 6) and channels == 1 and np.array_equal(affine, FLIPPED)


# ----------------------------------------------------------------------------- labels and images


def test_read_labels_rejects_fractions(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, 0] = 1.5
    p = save_nifti(tmp_path / "frac.nii.gz", data)
    err = assert_input_error(p, "integers", fn=read_labels)
    assert "1.5" in str(err)


def test_read_labels_negative_and_float_integers(tmp_path):
    neg = save_nifti(tmp_path / "neg.nii.gz", np.full((3, 3, 3), -1, np.int16))
    assert_input_error(neg, "negative", fn=read_labels)
    whole = np.zeros((3, 3, 3), np.float32)
    whole[1, 1, 1] = 7.0
    vol = read_labels(save_nifti(tmp_path / "float.nii.gz", whole))
    assert vol.array.dtype == np.uint8 and vol.array[1, 1, 1] == 7


def test_read_labels_rejects_4d(tmp_path):
    p = save_nifti(tmp_path / "l4.nii.gz", np.zeros((3, 3, 3, 2), np.uint8))
    assert_input_error(p, "4D", fn=read_labels)


def test_read_image_stacks_channels(tmp_path):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    pa = save_nifti(tmp_path / "case_0000.nii.gz", a)
    pb = save_nifti(tmp_path / "case_0001.nii.gz", b)
    vol = read_image([pa, pb])
    assert vol.array.shape == (2, 4, 5, 6) and vol.array.dtype == np.float32
    assert vol.name == "case" and vol.num_channels == 2
    assert np.array_equal(vol.array[1], b) and np.array_equal(vol.affine, FLIPPED)
    single = read_image(pa)
    assert single.array.shape == (1, 4, 5, 6)


def test_read_image_channel_mismatch(tmp_path):
    pa = save_nifti(tmp_path / "c_0000.nii.gz", np.zeros((4, 5, 6), np.float32))
    pb = save_nifti(tmp_path / "c_0001.nii.gz", np.zeros((4, 5, 7), np.float32))
    with pytest.raises(InputError, match="shape") as info:
        read_image([pa, pb])
    assert str(pb) in str(info.value)
    shifted = FLIPPED.copy()
    shifted[0, 3] += 5
    pc = save_nifti(tmp_path / "c_0002.nii.gz", np.zeros((4, 5, 6), np.float32), shifted)
    with pytest.raises(InputError, match="affine") as info:
        read_image([pa, pc])
    assert str(pc) in str(info.value)


def test_scaled_data_is_applied(tmp_path):
    img = nib.Nifti1Image(np.arange(27, dtype=np.int16).reshape(3, 3, 3), FLIPPED)
    img.header.set_slope_inter(2.0, -1024.0)
    p = tmp_path / "ct.nii.gz"
    nib.save(img, str(p))
    vol = read_volume(p)
    assert vol.array[0, 0, 1] == pytest.approx(2.0 - 1024.0)


def test_volume_properties():
    vol = Volume(np.zeros((2, 4, 5, 6), np.float32), FLIPPED, name="v")
    assert vol.spacing == (0.75, 1.25, 3.5)
    assert vol.spatial_shape == (4, 5, 6)
    assert vol.num_channels == 2
    assert vol.orientation == ("L", "A", "S")
    assert Volume(np.zeros((4, 5, 6)), np.eye(4)).num_channels == 1
    with pytest.raises(InputError):
        Volume(np.zeros((4, 5)), np.eye(4))
    with pytest.raises(InputError):
        Volume(np.zeros((4, 5, 6)), np.zeros((4, 4)))
