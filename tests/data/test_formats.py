"""NRRD (.nrrd, .nhdr, .seg.nrrd) and MetaImage (.mha, .mhd): exact geometry round trips, agreement
with the field's reference readers (SimpleITK, pynrrd), 3D Slicer segmentation fields, refusals.

Geometries: anisotropic, axis-flipped (``FLIPPED``: negative x step) and oblique (a rotation about
two axes, with a flipped axis). Every volume is a few voxels (the CI box has 2 cores).
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from napari_e2enet.data.metaimage import read_metaimage, read_metaimage_geometry, write_metaimage
from napari_e2enet.data.nrrd import read_nrrd, read_nrrd_geometry, read_seg_nrrd, write_nrrd, write_seg_nrrd
from napari_e2enet.data.volume import Volume
from napari_e2enet.errors import InputError
from napari_e2enet.labels import BRAIN_TISSUE, LabelTable

from .conftest import FLIPPED, blob_labels

SHAPE = (6, 5, 4)
ANISOTROPIC = np.array([[0.8, 0, 0, -31.5], [0, 1.1, 0, 12.0], [0, 0, 3.0, 7.25], [0, 0, 0, 1.0]])


def _rotated() -> np.ndarray:
    a, b = math.radians(25.0), math.radians(-40.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.7, -1.3, 2.9])
    affine[:3, 3] = [12.5, -7.125, 3.0 / 7.0]
    return affine


OBLIQUE = _rotated()
GEOMETRIES = {"anisotropic": ANISOTROPIC, "flipped": FLIPPED, "oblique": OBLIQUE}
SUFFIXES = (".nrrd", ".mha", ".mhd")
READ = {".nrrd": read_nrrd, ".mha": read_metaimage, ".mhd": read_metaimage}
WRITE = {".nrrd": write_nrrd, ".mha": write_metaimage, ".mhd": write_metaimage}
CORNERS = [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (5, 4, 3), (2, 3, 1)]


def image_array(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, shape).astype(np.float32)


def lps_point(affine: np.ndarray, index) -> np.ndarray:
    return (affine @ [*index, 1.0])[:3] * [-1.0, -1.0, 1.0]


def assert_one_line(info, path: Path) -> str:
    text = str(info.value)
    assert str(path) in text, text
    assert "\n" not in text
    return text


def write_raw_nrrd(path: Path, fields: list[str], payload: bytes, *, magic: str = "NRRD0004") -> Path:
    path.write_bytes(("\n".join([magic, *fields]) + "\n\n").encode() + payload)
    return path


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("kind", ["image", "labels"])
def test_round_trip_keeps_geometry_and_voxels(tmp_path, suffix, geometry, kind):
    affine = GEOMETRIES[geometry]
    array = image_array() if kind == "image" else blob_labels(SHAPE, (1, 2, 7)).astype(np.int64)
    out = WRITE[suffix](Volume(array, affine), tmp_path / f"vol{suffix}")
    got = READ[suffix](out)
    assert got.spatial_shape == SHAPE
    if suffix == ".nrrd":
        assert np.array_equal(got.affine, affine)  # space directions are the affine's columns, bit for bit
    else:  # MetaImage stores spacing and unit directions apart: re-formed within an ulp
        np.testing.assert_allclose(got.affine, affine, rtol=0, atol=1e-12)
    assert got.array.dtype == (np.float32 if kind == "image" else np.uint8)
    assert np.array_equal(got.array, array)
    assert got.orientation == Volume(array, affine).orientation
    expected = {"vol" + suffix} | ({"vol.raw"} if suffix == ".mhd" else set())
    assert set(os.listdir(tmp_path)) == expected  # no temporary files left behind


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_like_supplies_the_grid_and_label_dtype_fits(tmp_path, suffix):
    source = Volume(image_array(), OBLIQUE)
    labels = np.zeros(SHAPE, np.int64)
    labels[1, 2, 3] = 300
    out = WRITE[suffix](Volume(labels, np.eye(4)), tmp_path / f"lab{suffix}", like=source)
    got = READ[suffix](out)
    np.testing.assert_allclose(got.affine, OBLIQUE, rtol=0, atol=1e-12)
    assert got.array.dtype == np.int16 and int(got.array[1, 2, 3]) == 300
    with pytest.raises(InputError, match="does not match the reference grid"):
        WRITE[suffix](Volume(labels[:-1], np.eye(4)), tmp_path / f"bad{suffix}", like=source)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_channels_round_trip_and_are_refused_where_one_volume_is_expected(tmp_path, suffix):
    array = np.stack([image_array(seed=s) for s in range(3)])  # (C, X, Y, Z)
    out = WRITE[suffix](Volume(array, FLIPPED), tmp_path / f"multi{suffix}")
    got = READ[suffix](out, allow_channels=True)
    assert got.array.shape == (3, *SHAPE)
    assert np.array_equal(got.array, array)
    with pytest.raises(InputError, match=r"3 (volumes|channels)") as info:
        READ[suffix](out)
    assert_one_line(info, out)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_header_only_geometry_matches_the_full_read(tmp_path, suffix):
    out = WRITE[suffix](Volume(image_array(), OBLIQUE), tmp_path / f"g{suffix}")
    geometry = read_nrrd_geometry if suffix == ".nrrd" else read_metaimage_geometry
    shape, affine, channels = geometry(out)
    assert shape == SHAPE and channels == 1
    assert np.array_equal(affine, READ[suffix](out).affine)


# ----------------------------------------------------------------------------- reference readers


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("geometry", ["flipped", "oblique"])
def test_simpleitk_reads_our_files_at_the_same_physical_points(tmp_path, suffix, geometry):
    sitk = pytest.importorskip("SimpleITK")
    affine = GEOMETRIES[geometry]
    array = image_array()
    out = WRITE[suffix](Volume(array, affine), tmp_path / f"ours{suffix}")
    img = sitk.ReadImage(str(out))
    assert np.array_equal(sitk.GetArrayFromImage(img).T, array)  # SimpleITK arrays are (Z, Y, X)
    for index in CORNERS:
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(index), lps_point(affine, index),
                                   rtol=0, atol=1e-9)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("compress", [True, False])
def test_we_read_simpleitk_files_at_its_physical_points(tmp_path, suffix, compress):
    sitk = pytest.importorskip("SimpleITK")
    zyx = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE[::-1])
    img = sitk.GetImageFromArray(zyx)
    lps = np.diag([-1.0, -1.0, 1.0]) @ OBLIQUE[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    img.SetSpacing(tuple(spacing))
    img.SetDirection(tuple((lps / spacing).ravel()))
    img.SetOrigin(tuple(lps_point(OBLIQUE, (0, 0, 0))))
    path = tmp_path / f"itk{suffix}"
    sitk.WriteImage(img, str(path), compress)
    got = READ[suffix](path)
    assert np.array_equal(got.array, zyx.T)
    for index in CORNERS:
        np.testing.assert_allclose(lps_point(got.affine, index), img.TransformIndexToPhysicalPoint(index),
                                   rtol=0, atol=1e-9)


def test_simpleitk_vector_image_reads_as_channels(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    zyxc = np.random.default_rng(3).random((*SHAPE[::-1], 2)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(zyxc, isVector=True), str(tmp_path / "vec.mha"), True)
    got = read_metaimage(tmp_path / "vec.mha", allow_channels=True)
    assert np.array_equal(got.array, np.moveaxis(zyxc, -1, 0).transpose(0, 3, 2, 1))


def test_pynrrd_reads_our_nrrd_with_lps_fields(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    out = write_nrrd(Volume(image_array(), OBLIQUE), tmp_path / "a.nrrd")
    data, header = nrrd.read(str(out))
    assert header["space"] == "left-posterior-superior" and header["encoding"] == "gzip"
    assert np.array_equal(data, image_array())
    np.testing.assert_array_equal(header["space directions"], (np.diag([-1.0, -1, 1]) @ OBLIQUE[:3, :3]).T + 0.0)
    np.testing.assert_array_equal(header["space origin"], lps_point(OBLIQUE, (0, 0, 0)))


@pytest.mark.parametrize(("space", "sign"), [
    ("right-anterior-superior", (1, 1, 1)), ("RAS", (1, 1, 1)), ("left-anterior-superior", (-1, 1, 1)),
    ("LAS", (-1, 1, 1)), ("left-posterior-superior", (-1, -1, 1)), ("LPS", (-1, -1, 1)),
])
def test_nrrd_spaces_become_the_same_ras_affine(tmp_path, space, sign):
    cols = OBLIQUE[:3, :3] * np.array(sign, float)[:, None]
    origin = OBLIQUE[:3, 3] * sign
    vec = " ".join("(" + ",".join(repr(float(v)) for v in cols[:, a]) + ")" for a in range(3))
    path = write_raw_nrrd(tmp_path / "s.nrrd", [
        "type: int16", "dimension: 3", f"space: {space}", "sizes: 6 5 4", f"space directions: {vec}",
        "kinds: domain domain domain", "endian: little", "encoding: raw",
        "space origin: (" + ",".join(repr(float(v)) for v in origin) + ")"],
        np.arange(120, dtype="<i2").tobytes())
    got = read_nrrd(path)
    np.testing.assert_allclose(got.affine, OBLIQUE, rtol=0, atol=1e-15)
    assert np.array_equal(got.array, np.arange(120, dtype=np.int16).reshape(4, 5, 6).T)


def test_nrrd_without_space_fields_is_placed_like_itk(tmp_path):
    path = write_raw_nrrd(tmp_path / "plain.nrrd", ["type: uchar", "dimension: 3", "sizes: 6 5 4",
                                                    "spacings: 0.5 2 3", "encoding: raw"], bytes(120))
    got = read_nrrd(path)
    np.testing.assert_array_equal(got.affine, np.diag([-0.5, -2.0, 3.0, 1.0]))


def test_big_endian_bzip2_ascii_and_byte_skip_payloads(tmp_path):
    values = np.arange(120, dtype=np.int32).reshape(4, 5, 6)  # (Z, Y, X) → file order
    common = ["dimension: 3", "space: LPS", "sizes: 6 5 4", "space directions: (1,0,0) (0,1,0) (0,0,1)"]
    big = write_raw_nrrd(tmp_path / "big.nrrd", ["type: int32", *common, "endian: big", "encoding: raw"],
                         values.astype(">i4").tobytes())
    bz = write_raw_nrrd(tmp_path / "bz.nrrd", ["type: int32", *common, "endian: little", "encoding: bzip2"],
                        bz2.compress(values.astype("<i4").tobytes()))
    txt = write_raw_nrrd(tmp_path / "txt.nrrd", ["type: int32", *common, "encoding: ascii"],
                         " ".join(map(str, values.ravel())).encode())
    skip = write_raw_nrrd(tmp_path / "skip.nrrd", ["type: int32", *common, "endian: little", "encoding: gzip",
                                                   "byte skip: 16"],
                          gzip.compress(bytes(16) + values.astype("<i4").tobytes()))
    for path in (big, bz, txt, skip):
        got = read_nrrd(path)
        assert np.array_equal(got.array, values.T), path.name
        assert got.array.dtype == np.int32 and got.array.dtype.isnative


def test_big_endian_and_mhd_header_size(tmp_path):
    values = np.arange(120, dtype=np.int16).reshape(4, 5, 6)
    (tmp_path / "d.raw").write_bytes(b"PREAMBLE" + values.astype(">i2").tobytes())
    (tmp_path / "d.mhd").write_text("NDims = 3\nDimSize = 6 5 4\nElementType = MET_SHORT\nHeaderSize = 8\n"
                                    "BinaryDataByteOrderMSB = True\nElementSpacing = 1 2 3\n"
                                    "ElementDataFile = d.raw\n")
    got = read_metaimage(tmp_path / "d.mhd")
    assert np.array_equal(got.array, values.T)
    np.testing.assert_array_equal(got.affine, np.diag([-1.0, -2.0, 3.0, 1.0]))


def test_detached_nhdr_written_by_pynrrd_reads_back_exactly(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    array = image_array()
    lps = (np.diag([-1.0, -1, 1]) @ FLIPPED[:3, :3]).T
    header = {"space": "left-posterior-superior", "space directions": lps, "kinds": ["domain"] * 3,
              "space origin": lps_point(FLIPPED, (0, 0, 0)), "encoding": "gzip"}
    nrrd.write(str(tmp_path / "det.nhdr"), array, header)
    assert (tmp_path / "det.raw.gz").is_file()
    got = read_nrrd(tmp_path / "det.nhdr")
    assert np.array_equal(got.affine, FLIPPED)
    assert np.array_equal(got.array, array)
    assert got.name == "det"


# ----------------------------------------------------------------------------- 3D Slicer segmentations


def test_seg_nrrd_round_trips_labels_names_and_colours(tmp_path):
    labels = blob_labels(SHAPE, (1, 2, 3)).astype(np.int64)
    out = write_seg_nrrd(Volume(labels, OBLIQUE), tmp_path / "tissue.seg.nrrd", label_table=BRAIN_TISSUE)
    volume, table = read_seg_nrrd(out)
    assert np.array_equal(volume.array, labels)
    assert np.array_equal(volume.affine, OBLIQUE)
    assert table.names == BRAIN_TISSUE.names
    assert {i: c[:3] for i, c in table.colors.items()} == {i: c[:3] for i, c in BRAIN_TISSUE.colors.items()}
    assert volume.name == "tissue"
    assert np.array_equal(read_nrrd(out).array, labels)  # the plain reader gives the same label map


def test_seg_nrrd_carries_the_fields_slicer_reads(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 1:3, 1:3] = 2
    labels[4, 4, 3] = 9  # an id the table does not know
    out = write_seg_nrrd(Volume(labels, FLIPPED), tmp_path / "s.seg.nrrd", label_table=BRAIN_TISSUE)
    header = nrrd.read_header(str(out))
    assert header["space"] == "left-posterior-superior" and header["kinds"] == ["domain"] * 3
    assert header["type"] in ("uint8", "unsigned char", "uchar")
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    segments = [(header[f"Segment{i}_Name"], header[f"Segment{i}_LabelValue"], header[f"Segment{i}_Layer"])
                for i in range(4)]
    assert segments == [("CSF/other", "1", "0"), ("grey matter", "2", "0"), ("white matter", "3", "0"),
                        ("label 9", "9", "0")]
    assert "Segment4_ID" not in header
    assert header["Segment1_ID"] == "Segment_2"
    assert header["Segment1_Extent"] == "0 5 0 4 0 3"
    rgb = [float(v) for v in header["Segment1_Color"].split()]
    assert rgb == list(BRAIN_TISSUE.colors[2][:3])


def test_seg_nrrd_keeps_non_ascii_names(tmp_path):
    table = LabelTable({1: "Leber – liver", 2: "肝臓"})
    labels = blob_labels(SHAPE, (1, 2))
    out = write_seg_nrrd(Volume(labels, ANISOTROPIC), tmp_path / "u.seg.nrrd", label_table=table)
    assert read_seg_nrrd(out)[1].names == table.names


def _slicer_layers(tmp_path: Path, layers: np.ndarray, segments: list[dict], name="slicer.seg.nrrd") -> Path:
    """A multi-layer segmentation as Slicer writes it: 4D, list axis first, LPS."""
    fields = ["type: unsigned char", "dimension: 4", "space: left-posterior-superior",
              f"sizes: {layers.shape[0]} 6 5 4", "space directions: none (-0.8,0,0) (0,-1.1,0) (0,0,3)",
              "kinds: list domain domain domain", "encoding: gzip", "space origin: (31.5,-12,7.25)",
              "Segmentation_MasterRepresentation:=Binary labelmap",
              "Segmentation_ReferenceImageExtentOffset:=0 0 0"]
    for i, seg in enumerate(segments):
        fields += [f"Segment{i}_ID:=Segment_{i}", f"Segment{i}_Name:={seg['name']}",
                   f"Segment{i}_Color:={seg.get('color', '0.5 0.25 1')}",
                   f"Segment{i}_LabelValue:={seg['value']}", f"Segment{i}_Layer:={seg['layer']}",
                   f"Segment{i}_Extent:={seg.get('extent', '0 5 0 4 0 3')}"]
    payload = gzip.compress(layers.tobytes(order="F"))  # file order: layer fastest, then x, y, z
    return write_raw_nrrd(tmp_path / name, fields, payload)


def test_multi_layer_segmentation_merges_and_renumbers_reused_values(tmp_path):
    layers = np.zeros((2, *SHAPE), np.uint8)
    layers[0, 0:2] = 1  # "liver" = value 1 in layer 0
    layers[1, 3:5] = 1  # "spleen" = value 1 in layer 1 (Slicer reuses values across layers)
    layers[1, 5] = 2
    path = _slicer_layers(tmp_path, layers, [
        {"name": "liver", "value": 1, "layer": 0, "color": "0.1 0.2 0.3"},
        {"name": "spleen", "value": 1, "layer": 1},
        {"name": "kidney", "value": 2, "layer": 1}])
    volume, table = read_seg_nrrd(path)
    assert table.names == {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
    assert table.colors[1] == (0.1, 0.2, 0.3, 1.0)
    expected = np.zeros(SHAPE, np.uint8)
    expected[0:2], expected[3:5], expected[5] = 1, 2, 3
    assert np.array_equal(volume.array, expected)
    np.testing.assert_array_equal(volume.affine, ANISOTROPIC)


def test_distinct_label_values_are_kept_and_extents_clip(tmp_path):
    layers = np.zeros((2, *SHAPE), np.uint8)
    layers[0, :, :, :] = 4
    layers[1, 5, 4, 3] = 7
    path = _slicer_layers(tmp_path, layers, [
        {"name": "box", "value": 4, "layer": 0, "extent": "1 2 0 4 0 3"},  # only x in 1..2 belongs to it
        {"name": "dot", "value": 7, "layer": 1}])
    volume, table = read_seg_nrrd(path)
    assert table.names == {0: "background", 4: "box", 7: "dot"}
    expected = np.zeros(SHAPE, np.uint8)
    expected[1:3] = 4
    expected[5, 4, 3] = 7
    assert np.array_equal(volume.array, expected)


def test_overlapping_layers_are_one_line(tmp_path):
    layers = np.zeros((2, *SHAPE), np.uint8)
    layers[0, 0:3] = 1
    layers[1, 2:4] = 1
    path = _slicer_layers(tmp_path, layers, [{"name": "liver", "value": 1, "layer": 0},
                                             {"name": "tumour", "value": 1, "layer": 1}])
    with pytest.raises(InputError, match="'liver' and 'tumour' overlap in 20 voxels") as info:
        read_seg_nrrd(path)
    assert_one_line(info, path)


def test_seg_nrrd_without_segment_fields_names_the_ids(tmp_path):
    out = write_nrrd(Volume(blob_labels(SHAPE, (2, 5)), FLIPPED), tmp_path / "plain.seg.nrrd")
    volume, table = read_seg_nrrd(out)
    assert table.names == {0: "background", 2: "label 2", 5: "label 5"}
    assert np.array_equal(volume.array, blob_labels(SHAPE, (2, 5)))


# ----------------------------------------------------------------------------- refusals


def _nrrd_fields(**over) -> list[str]:
    fields = {"type": "int16", "dimension": "3", "space": "left-posterior-superior", "sizes": "6 5 4",
              "space directions": "(1,0,0) (0,1,0) (0,0,1)", "endian": "little", "encoding": "raw"}
    fields.update({k.replace("_", " "): v for k, v in over.items()})
    return [f"{k}: {v}" for k, v in fields.items() if v is not None]


NRRD_BAD = {
    "unknown space": (dict(space="scanner-xyz"), 240, "has no patient orientation"),
    "time space": (dict(space="right-anterior-superior-time"), 240, "has no patient orientation"),
    "units": ({"space units": '"m" "m" "m"'}, 240, "only mm"),
    "2D": (dict(dimension="2", sizes="6 5", space_directions="(1,0,0) (0,1,0)"), 60, "2D image"),
    "single slice": (dict(sizes="6 5 1"), 60, "2D image"),
    "degenerate": (dict(space_directions="(1,0,0) (2,0,0) (0,0,1)"), 240, "degenerate"),
    "no endian": (dict(endian=None), 240, "endian"),
    "block": (dict(type="block"), 240, "block"),
    "hex": (dict(encoding="hex"), 240, "unsupported NRRD encoding"),
    "truncated raw": ({}, 100, "truncated voxel data"),
    "bad sizes": (dict(sizes="6 5"), 240, "'sizes' has 2 values"),
    "5D": (dict(dimension="5", sizes="2 2 6 5 4", space_directions="none none (1,0,0) (0,1,0) (0,0,1)"),
           960, "not supported"),
}


@pytest.mark.parametrize("case", list(NRRD_BAD))
def test_bad_nrrd_is_one_line(tmp_path, case):
    over, nbytes, problem = NRRD_BAD[case]
    path = write_raw_nrrd(tmp_path / "bad.nrrd", _nrrd_fields(**over), bytes(nbytes))
    with pytest.raises(InputError, match=problem) as info:
        read_nrrd(path)
    assert_one_line(info, path)


def test_bad_files_of_every_kind_are_one_line(tmp_path):
    good_nrrd = write_nrrd(Volume(image_array(), FLIPPED), tmp_path / "good.nrrd")
    good_mha = write_metaimage(Volume(image_array(), FLIPPED), tmp_path / "good.mha")
    cases = []
    for suffix, good in ((".nrrd", good_nrrd), (".mha", good_mha)):
        data = good.read_bytes()
        (tmp_path / f"trunc{suffix}").write_bytes(data[: len(data) - 200])
        (tmp_path / f"empty{suffix}").write_bytes(b"")
        (tmp_path / f"junk{suffix}").write_bytes(os.urandom(300))
        cases += [(tmp_path / f"trunc{suffix}", "truncated"), (tmp_path / f"empty{suffix}", "empty file"),
                  (tmp_path / f"junk{suffix}", "not an? (NRRD|MetaImage) file"),
                  (tmp_path / f"missing{suffix}", "file not found")]
    nan = image_array()
    nan[1, 1, 1] = np.nan
    for suffix in (".nrrd", ".mha"):
        path = tmp_path / f"nan{suffix}"
        if suffix == ".nrrd":
            write_raw_nrrd(path, _nrrd_fields(type="float"), nan.tobytes(order="F"))
        else:
            path.write_bytes(b"NDims = 3\nDimSize = 6 5 4\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
                             + nan.tobytes(order="F"))
        cases.append((path, "1 voxels are NaN or Inf"))
    for path, problem in cases:
        with pytest.raises(InputError, match=problem) as info:
            (read_nrrd if path.suffix == ".nrrd" else read_metaimage)(path)
        assert_one_line(info, path)


MHA_BAD = {
    "2D": ("NDims = 2\nDimSize = 6 5\nElementType = MET_SHORT\n", "2D image"),
    "flat": ("NDims = 3\nDimSize = 6 5 1\nElementType = MET_SHORT\n", "2D image"),
    "type": ("NDims = 3\nDimSize = 6 5 4\nElementType = MET_STRING\n", "unsupported MetaImage ElementType"),
    "dims": ("NDims = 3\nDimSize = 6 5\nElementType = MET_SHORT\n", "does not match NDims"),
    "singular": ("NDims = 3\nDimSize = 6 5 4\nElementType = MET_SHORT\nTransformMatrix = 1 0 0 1 0 0 0 0 1\n",
                 "degenerate"),
    "zero spacing": ("NDims = 3\nDimSize = 6 5 4\nElementType = MET_SHORT\nElementSpacing = 1 0 1\n", "zero"),
    "nan offset": ("NDims = 3\nDimSize = 6 5 4\nElementType = MET_SHORT\nOffset = 0 nan 0\n", "finite"),
    "not image": ("ObjectType = Tube\nNDims = 3\nDimSize = 6 5 4\nElementType = MET_SHORT\n", "not an image"),
    "list": ("NDims = 3\nDimSize = 6 5 4\nElementType = MET_SHORT\n", "multi-file"),
}


@pytest.mark.parametrize("case", list(MHA_BAD))
def test_bad_metaimage_is_one_line(tmp_path, case):
    head, problem = MHA_BAD[case]
    path = tmp_path / "bad.mha"
    data_file = "LIST" if case == "list" else "LOCAL"
    path.write_bytes((head + f"ElementDataFile = {data_file}\n").encode() + bytes(240))
    with pytest.raises(InputError, match=problem) as info:
        read_metaimage(path)
    assert_one_line(info, path)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink", "missing"])
def test_data_files_outside_the_header_folder_are_refused(tmp_path, where):
    inner = tmp_path / "inner"
    inner.mkdir()
    outside = tmp_path / "secret.raw"
    outside.write_bytes(bytes(240))
    name = {"parent": "../secret.raw", "absolute": str(outside), "symlink": "link.raw", "missing": "nope.raw"}[where]
    if where == "symlink":
        (inner / "link.raw").symlink_to(outside)
    problem = "not found" if where == "missing" else "outside the header's folder"
    mhd = inner / "x.mhd"
    mhd.write_text(f"NDims = 3\nDimSize = 6 5 4\nElementType = MET_SHORT\nElementDataFile = {name}\n")
    nhdr = write_raw_nrrd(inner / "x.nhdr", [*_nrrd_fields(), f"data file: {name}"], b"")
    for path, read in ((mhd, read_metaimage), (nhdr, read_nrrd)):
        with pytest.raises(InputError, match=problem) as info:
            read(path)
        assert_one_line(info, path)


def test_data_file_in_a_subfolder_is_fine(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "v.raw").write_bytes(np.arange(120, dtype="<i2").tobytes())
    (tmp_path / "v.mhd").write_text("NDims = 3\nDimSize = 6 5 4\nElementType = MET_SHORT\n"
                                    "ElementDataFile = data/v.raw\n")
    assert int(read_metaimage(tmp_path / "v.mhd").array[5, 4, 3]) == 119


def test_compressed_streams_never_inflate_past_the_header(tmp_path):
    bomb = write_raw_nrrd(tmp_path / "bomb.nrrd", _nrrd_fields(sizes="4000 4000 4000", encoding="gzip"),
                          gzip.compress(bytes(1 << 16)))
    with pytest.raises(InputError, match="far more than") as info:
        read_nrrd(bomb)
    assert_one_line(info, bomb)
    mha = tmp_path / "bomb.mha"
    mha.write_bytes(b"NDims = 3\nDimSize = 4000 4000 4000\nElementType = MET_SHORT\nCompressedData = True\n"
                    b"ElementDataFile = LOCAL\n" + zlib.compress(bytes(1 << 16)))
    with pytest.raises(InputError, match="far more than") as info:
        read_metaimage(mha)
    # a stream far longer than declared: refused after at most EXTRA_ALLOWED more bytes (its checksum
    # cannot be verified without inflating it all); a little padding is verified and dropped
    long = write_raw_nrrd(tmp_path / "long.nrrd", _nrrd_fields(encoding="gzip"), gzip.compress(bytes(50 << 20)))
    with pytest.raises(InputError, match="hold more than the 240 bytes the header declares") as info:
        read_nrrd(long)
    assert_one_line(info, long)
    padded = write_raw_nrrd(tmp_path / "padded.nrrd", _nrrd_fields(encoding="gzip"), gzip.compress(bytes(4096)))
    assert read_nrrd(padded).array.shape == SHAPE


def test_writers_refuse_what_they_cannot_write(tmp_path):
    vol = Volume(image_array(), FLIPPED)
    for path, problem in ((tmp_path / "x.nhdr", "detached .nhdr"), (tmp_path / "x.nii", "must end in .nrrd")):
        with pytest.raises(InputError, match=problem):
            write_nrrd(vol, path)
    with pytest.raises(InputError, match=r"must end in \.mha or \.mhd"):
        write_metaimage(vol, tmp_path / "x.nrrd")
    with pytest.raises(InputError, match="integer labels"):
        write_seg_nrrd(vol, tmp_path / "x.seg.nrrd")
    with pytest.raises(InputError, match="does not exist"):
        write_metaimage(vol, tmp_path / "nowhere" / "x.mhd")
    nan = image_array()
    nan[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_metaimage(Volume(nan, FLIPPED), tmp_path / "n.mhd")
    assert os.listdir(tmp_path) == []


def test_mhd_pair_is_replaced_together(tmp_path):
    first = write_metaimage(Volume(image_array(seed=1), FLIPPED), tmp_path / "v.mhd")
    second = write_metaimage(Volume(np.ones((3, 3, 3), np.uint8), OBLIQUE), tmp_path / "v.mhd")
    assert first == second
    got = read_metaimage(second)
    assert got.array.shape == (3, 3, 3) and got.array.dtype == np.uint8
    assert sorted(os.listdir(tmp_path)) == ["v.mhd", "v.raw"]
    assert (tmp_path / "v.raw").stat().st_size == 27


def test_missing_pynrrd_names_the_extra(tmp_path, monkeypatch):
    path = write_nrrd(Volume(image_array(), FLIPPED), tmp_path / "a.nrrd")
    monkeypatch.setitem(sys.modules, "nrrd", None)  # import nrrd now raises ImportError
    for call in (lambda: read_nrrd(path), lambda: write_nrrd(Volume(image_array(), FLIPPED), tmp_path / "b.nrrd"),
                 lambda: read_seg_nrrd(path)):
        with pytest.raises(InputError) as info:
            call()
        text = str(info.value)
        assert "NRRD support needs the 'formats' extra: pip install 'napari-e2enet[formats]'" in text
        assert "\n" not in text and ".nrrd" in text


def test_metaimage_needs_no_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    out = write_metaimage(Volume(image_array(), OBLIQUE), tmp_path / "a.mha")
    assert np.array_equal(read_metaimage(out).array, image_array())


def test_nrrd_list_axis_last_becomes_the_channel_axis(tmp_path):
    values = np.arange(2 * 120, dtype=np.int16).reshape(2, 4, 5, 6)  # (C, Z, Y, X) → file order x y z c
    path = write_raw_nrrd(tmp_path / "t.nrrd", [
        "type: short", "dimension: 4", "space: RAS", "sizes: 6 5 4 2",
        "space directions: (0.5,0,0) (0,2,0) (0,0,3) none", "kinds: domain domain domain vector",
        "endian: little", "encoding: raw", "space origin: (1,2,3)"], values.astype("<i2").tobytes())
    got = read_nrrd(path, allow_channels=True)
    assert got.array.shape == (2, 6, 5, 4)
    assert np.array_equal(got.array, values.transpose(0, 3, 2, 1))
    np.testing.assert_array_equal(got.affine, [[0.5, 0, 0, 1], [0, 2, 0, 2], [0, 0, 3, 3], [0, 0, 0, 1]])
    assert read_nrrd_geometry(path, allow_channels=True)[2] == 2


# ----------------------------------------------------------------------------- io dispatch


def test_io_entry_points_dispatch_on_the_name(tmp_path):
    from napari_e2enet.data.io import (
        case_name,
        read_geometry,
        read_image,
        read_labels,
        read_volume,
        write_volume,
    )

    labels = Volume(blob_labels(SHAPE, (1, 2)), OBLIQUE)
    image = Volume(image_array(), OBLIQUE)
    for name in ("a.nrrd", "a.mha", "a.mhd", "a.nii.gz", "A.MHA", "a.seg.nrrd"):
        out = write_volume(labels, tmp_path / name, label_table=BRAIN_TISSUE)
        back = read_labels(out)
        assert np.array_equal(back.array, labels.array), name
        atol = 1e-6 if name.endswith(".nii.gz") else 1e-12  # NIfTI's sform is float32
        np.testing.assert_allclose(back.affine, OBLIQUE, rtol=0, atol=atol)
        assert read_geometry(out)[0] == SHAPE
        assert case_name(out) == name.split(".")[0]
    assert read_seg_nrrd(tmp_path / "a.seg.nrrd")[1].names == BRAIN_TISSUE.names
    img = read_image(write_volume(image, tmp_path / "img.nrrd"))
    assert img.array.shape == (1, *SHAPE) and img.meta["format"] == "nrrd"
    assert read_volume(tmp_path / "img.nrrd").meta == {"format": "nrrd", "path": str(tmp_path / "img.nrrd"),
                                                      "space": "left-posterior-superior"}
    with pytest.raises(InputError, match=r"DICOM-SEG .* needs the input read from a DICOM folder") as info:
        write_volume(labels, tmp_path / "seg.dcm", like=image)
    assert_one_line(info, tmp_path / "seg.dcm")
    with pytest.raises(InputError, match="series UID only applies to a DICOM"):
        read_volume(tmp_path / "img.nrrd", series="1.2.3")
    with pytest.raises(InputError, match="not a NIfTI, NRRD or MetaImage file name"):
        read_volume(write_volume(image, tmp_path / "x.nii.gz").rename(tmp_path / "x.png"))
    with pytest.raises(InputError, match=r"output must end in \.nii, \.nii\.gz, \.nrrd"):
        write_volume(labels, tmp_path / "x.tif")
