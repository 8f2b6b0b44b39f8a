"""napari reader/writer for the new formats: a DICOM folder opens with the same world geometry as the
NIfTI of the same volume, several series ask which (cancel opens nothing), Labels layers on a DICOM
image save as .seg.nrrd (names and colours) and as DICOM-SEG that references the series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
pytest.importorskip("nrrd")

from napari_e2enet.data import Volume, read_volume, write_volume  # noqa: E402
from napari_e2enet.labels import BRAIN_TISSUE  # noqa: E402
from tests.dicom_util import write_dicom_series  # noqa: E402

PLUGIN = "napari-e2enet"


def _volume(seed: int = 0) -> Volume:
    """A small anisotropic CT-like volume whose slice axis runs inferior (the DICOM reader sorts it
    the other way round, so the DICOM Volume is stored differently from the NIfTI one)."""
    rng = np.random.default_rng(seed)
    array = np.round(rng.normal(40, 200, (12, 10, 6))).astype(np.float32)
    affine = np.array([[-0.8, 0, 0, 20.0], [0, -1.1, 0, 15.5], [0, 0, -2.5, 40.0], [0, 0, 0, 1]])
    return Volume(array, affine, name="ct")


def _world_corners(layer) -> np.ndarray:
    shape = np.asarray(layer.data.shape)
    corners = [np.array(c) * (shape - 1) for c in np.ndindex(2, 2, 2)]
    return np.array([layer.data_to_world(c) for c in corners])


def test_dicom_folder_opens_like_the_nifti_of_the_same_volume(make_napari_viewer, tmp_path):
    from napari.layers import Image

    from napari_e2enet._napari.layers import META_KEY

    volume = _volume()
    nifti = write_volume(volume, tmp_path / "ct.nii.gz")
    write_dicom_series(volume, tmp_path / "dicom")
    assert not np.allclose(read_volume(tmp_path / "dicom").affine, volume.affine)  # stored the other way
    viewer = make_napari_viewer()
    (ref,) = viewer.open(str(nifti), plugin=PLUGIN)
    (got,) = viewer.open(str(tmp_path / "dicom"), plugin=PLUGIN)
    assert isinstance(got, Image) and isinstance(ref, Image)
    assert np.array_equal(np.asarray(got.data), np.asarray(ref.data))  # both shown in (S, P, L)
    np.testing.assert_allclose(got.scale, ref.scale, atol=1e-6)
    np.testing.assert_allclose(got.translate, ref.translate, atol=1e-6)
    np.testing.assert_allclose(_world_corners(got), _world_corners(ref), atol=1e-6)
    meta = got.metadata[META_KEY]["meta"]
    assert meta["format"] == "dicom" and len(meta["sop_instance_uids"]) == 6


def test_several_series_ask_which_and_cancel_opens_nothing(make_napari_viewer, tmp_path, monkeypatch):
    from napari_e2enet._napari import reader

    folder = tmp_path / "study"
    first, second = _volume(1), _volume(2)
    write_dicom_series(first, folder / "a", series_uid="1.2.826.0.1.3680043.8.498.11", description="first")
    write_dicom_series(second, folder / "b", series_uid="1.2.826.0.1.3680043.8.498.12", description="second")
    asked = []

    def pick_second(path, series):
        asked.append((path, sorted(s.description for s in series)))
        return "1.2.826.0.1.3680043.8.498.12"

    monkeypatch.setattr(reader, "choose_series", pick_second)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(folder), plugin=PLUGIN)
    assert asked == [(folder, ["first", "second"])]
    assert layer.metadata["napari_e2enet"]["meta"]["series_uid"] == "1.2.826.0.1.3680043.8.498.12"
    np.testing.assert_array_equal(np.sort(np.asarray(layer.data).ravel()), np.sort(second.array.ravel()))

    monkeypatch.setattr(reader, "choose_series", lambda path, series: None)
    viewer.open(str(folder), plugin=PLUGIN)
    assert len(viewer.layers) == 1  # cancelled: nothing added, no error


def test_series_dialog_maps_the_chosen_row_to_its_uid(qtbot, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QInputDialog

    from napari_e2enet._napari.reader import _ask_series
    from napari_e2enet.data.dicom import DicomSeries

    series = [DicomSeries("1.2.3", "T1", "MR", 20, 64, 64), DicomSeries("1.2.4", "T2", "MR", 24, 64, 64)]
    shown = {}

    def get_item(parent, title, label, items, current, editable):
        shown.update(title=title, items=list(items))
        return items[1], True

    monkeypatch.setattr(QInputDialog, "getItem", staticmethod(get_item))
    assert _ask_series(tmp_path / "study", series) == "1.2.4"
    assert len(shown["items"]) == 2 and "T2" in shown["items"][1] and "1.2.4" in shown["items"][1]
    monkeypatch.setattr(QInputDialog, "getItem", staticmethod(lambda *a: ("", False)))
    assert _ask_series(tmp_path / "study", series) is None


def test_labels_on_a_dicom_image_save_as_seg_nrrd_and_dicom_seg(make_napari_viewer, tmp_path):
    import highdicom as hd

    from napari_e2enet._napari.layers import geometry_of, labels_layer_kwargs
    from napari_e2enet._napari.writer import write_labels
    from napari_e2enet.data.nrrd import read_seg_nrrd
    from napari_e2enet.errors import InputError

    write_dicom_series(_volume(), tmp_path / "dicom")
    source = read_volume(tmp_path / "dicom")
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "dicom"), plugin=PLUGIN)
    display = np.zeros(np.asarray(image.data).shape, np.uint8)
    display[1:3, 2:6, 3:8] = 1
    display[4, :, :] = 3
    display[5, 1:4, 1:4] = 2
    labels = viewer.add_labels(display, **labels_layer_kwargs(image, BRAIN_TISSUE))
    expected = np.asarray(geometry_of(image).from_display(display))  # on the DICOM voxel grid

    seg_nrrd = tmp_path / "painted.seg.nrrd"
    labels.save(str(seg_nrrd), plugin=PLUGIN)
    got, table = read_seg_nrrd(seg_nrrd)
    assert np.array_equal(got.array, expected)
    np.testing.assert_allclose(got.affine, source.affine, atol=1e-9)
    assert table.names == BRAIN_TISSUE.names
    assert {i: c[:3] for i, c in table.colors.items()} == {i: c[:3] for i, c in BRAIN_TISSUE.colors.items()}

    dcm = tmp_path / "painted.dcm"
    labels.save(str(dcm), plugin=PLUGIN)
    seg = hd.seg.segread(dcm)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.meta["series_uid"]
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [
        "CSF/other", "grey matter", "white matter"]
    planes = seg.get_pixels_by_source_instance(source_sop_instance_uids=source.meta["sop_instance_uids"],
                                               combine_segments=True, skip_overlap_checks=True)
    assert np.array_equal(np.asarray([0, 1, 2, 3])[np.transpose(planes, (2, 1, 0))], expected)

    plain = viewer.add_labels(display)  # napari's own labels layer: no DICOM series to reference
    with pytest.raises(InputError, match="DICOM-SEG needs a labels layer on a DICOM image's grid") as info:
        write_labels(str(tmp_path / "plain.dcm"), plain.data, plain.as_layer_data_tuple()[1])
    assert "\n" not in str(info.value) and "plain.dcm" in str(info.value)
    with pytest.warns(UserWarning):  # napari turns a writer's ValueError into "not a valid writer"
        assert plain.save(str(tmp_path / "plain.dcm"), plugin=PLUGIN) == []
    assert not (tmp_path / "plain.dcm").exists()
    assert Path(seg_nrrd).exists() and Path(dcm).exists()
