"""Segment picks the bundled model that fits the image: the CT sample gets organs, the MRI sample tissue;
a model picked by hand stays picked, and a model that does not fit the image says so."""

from __future__ import annotations

import numpy as np
import pytest

from .test_gui_segment import _click, _errors, _labels_layers, _same_geometry, _segment_widget, _wait_idle

pytestmark = pytest.mark.gui

CT_MODEL = "phantom-abdomen-ct"
BRAIN_MODEL = "mni152-tissue"
# measured: mean organ Dice 0.930 of the bundled CT model on the sample make_phantom(0); margin 0.03
MIN_ORGAN_DICE = 0.90


def _warnings(notes) -> list[str]:
    return [str(n.message) for n in notes if str(n.severity).lower().endswith("warning")]


def test_the_ct_sample_gets_the_organ_model_and_organs(make_napari_viewer, qtbot, notes, screenshot_dir):
    from napari_e2enet.labels import AMOS
    from napari_e2enet.metrics import dice

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    widget = _segment_widget(viewer)
    assert widget.model_spec() == BRAIN_MODEL  # no image yet: the default
    image, reference = viewer.open_sample("napari-e2enet", "abdomen_phantom")
    assert widget.image_combo.layer() == image
    assert widget.model_spec() == CT_MODEL
    assert CT_MODEL in widget.status_label.text() and "synthetic" in widget.status_label.text()
    _click(qtbot, widget.segment_btn)
    _wait_idle(qtbot, widget)
    assert not _errors(notes) and not _warnings(notes), [str(n.message) for n in notes]
    (result,) = [layer for layer in _labels_layers(viewer) if layer is not reference]
    _same_geometry(result, image)
    assert list(result.features["name"]) == [AMOS.names[k] for k in sorted(AMOS.names)]
    pred, ref = np.asarray(result.data), np.asarray(reference.data)
    assert set(np.unique(pred)) <= set(AMOS.names)
    present = [k for k in np.unique(ref) if k]
    scores = {AMOS.names[k]: dice(pred, ref, int(k)) for k in present}
    assert float(np.mean(list(scores.values()))) > MIN_ORGAN_DICE, scores
    assert {"liver", "spleen", "left kidney", "right kidney"} <= set(widget.update_volumes())  # organ volumes
    # the README picture: predicted organs on the CT sample, the Segment widget beside them
    reference.visible = False
    result.opacity = 0.6
    viewer.dims.set_point(0, float(np.mean(viewer.dims.range[0][:2])))
    viewer.reset_view()
    qtbot.wait(200)
    shot = viewer.screenshot(str(screenshot_dir / "viewer_ct_organs.png"), canvas_only=False)
    assert shot.shape[0] > 500 and shot.shape[1] > 1000


def test_the_mri_sample_gets_the_brain_model_and_a_hand_pick_stays(make_napari_viewer, qtbot, notes):
    viewer = make_napari_viewer()
    widget = _segment_widget(viewer)
    viewer.open_sample("napari-e2enet", "abdomen_phantom")
    assert widget.model_spec() == CT_MODEL
    viewer.open_sample("napari-e2enet", "mni152")
    assert widget.image_combo.layer().name == "mni152 T1"
    assert widget.model_spec() == BRAIN_MODEL
    widget.image_combo.set_layer(viewer.layers["phantom CT 0"])
    assert widget.model_spec() == CT_MODEL  # back to the CT: the organ model again

    # the user picks the organ model for the MRI: it stays, and Segment warns that it does not fit
    index = widget.model_combo.findData(CT_MODEL)
    widget.model_combo.setCurrentIndex(index)
    widget.model_combo.activated.emit(index)  # what a click in the list emits
    widget.image_combo.set_layer(viewer.layers["mni152 T1"])
    assert widget.model_spec() == CT_MODEL
    _click(qtbot, widget.segment_btn)
    _wait_idle(qtbot, widget)
    warnings = _warnings(notes)
    assert any("does not look like a CT" in w and f"'{BRAIN_MODEL}'" in w for w in warnings), warnings
    assert not _errors(notes)
    assert len(_labels_layers(viewer)) == 3  # two references and the result: a warning, not a refusal


def test_a_ct_stored_with_an_offset_is_told_how_and_corrected_by_the_ct_offset_box(make_napari_viewer, qtbot,
                                                                                   notes, tmp_path):
    """A phantom stored as raw uint16 (+1024, air near 0): the CT model is still chosen, Segment warns
    and names the 'CT offset' box; ticked, the next Segment adds -1024 first and labels what the
    scan in HU gives."""
    from napari_e2enet._napari.layers import geometry_of
    from napari_e2enet.data import make_phantom, write_volume

    image, _ = make_phantom(0, shape=(48, 48, 32))  # one tile: a few seconds
    path = write_volume(image.with_array(np.round(image.array + 1024).astype(np.uint16)), tmp_path / "ct_raw.nii.gz")
    viewer = make_napari_viewer()
    widget = _segment_widget(viewer)
    (layer,) = viewer.open(str(path), plugin="napari-e2enet")
    assert widget.model_spec() == CT_MODEL  # an offset CT is still a CT
    assert not widget.ct_offset_check.isChecked()
    _click(qtbot, widget.segment_btn)
    _wait_idle(qtbot, widget)
    (warning,) = _warnings(notes)
    assert "looks like a CT stored with a +1024 offset" in warning and "'CT offset'" in warning
    notes.clear()
    widget.ct_offset_check.setChecked(True)
    widget.existing_combo.setCurrentIndex(widget.existing_combo.findData("new"))
    _click(qtbot, widget.segment_btn)
    _wait_idle(qtbot, widget)
    (note,) = _warnings(notes)
    assert "added -1024 to the voxel values" in note
    assert not _errors(notes)
    raw, corrected = (np.asarray(result.data) for result in _labels_layers(viewer))
    # the scan in HU through the widget's own (cached) predictor, in the layer's display order
    in_hu = geometry_of(layer).to_display(widget._predictor(CT_MODEL, widget.inference_config()).predict(image).array)
    # measured: 0.526 of the voxels agree uncorrected, 0.9998 corrected (uint16 rounds the HU)
    assert np.mean(raw == in_hu) < 0.8 and np.mean(corrected == in_hu) > 0.999
