"""Edits are sacred: erased voxels count as edits, Segment writes through napari's undo, the
labels picker and per-label list follow the chosen image, Save dialogs never start in the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

TIMEOUT = 120_000


def _errors(notes) -> list[str]:
    return [str(n.message) for n in notes if str(n.severity).lower().endswith("error")]


def _wait_idle(qtbot, widget, timeout=TIMEOUT):
    job = widget.job
    if job.running:
        qtbot.waitSignal(job.done, timeout=timeout).wait()
    qtbot.waitUntil(lambda: not job.running, timeout=5_000)
    assert not widget.busy


def _click(qtbot, button):
    from qtpy.QtCore import Qt

    assert button.isEnabled(), button.text()
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _labels_layers(viewer):
    from napari.layers import Labels

    return [layer for layer in viewer.layers if isinstance(layer, Labels)]


def _segment(qtbot, widget, mode):
    widget.existing_combo.setCurrentIndex(widget.existing_combo.findData(mode))
    _click(qtbot, widget.segment_btn)
    _wait_idle(qtbot, widget)


def test_fill_keeps_erased_voxels_and_undo_reverts_a_replace(make_napari_viewer, qtbot, phantom_files,
                                                             tiny_phantom_model, notes):
    from napari_e2enet._napari.edits import edited_mask, prediction_of

    viewer = make_napari_viewer()
    viewer.open(str(phantom_files["image"]), plugin="napari-e2enet")
    widget = viewer.window.add_plugin_dock_widget("napari-e2enet", "Segment")[1]
    widget.add_model(tiny_phantom_model)
    _segment(qtbot, widget, "auto")
    (labels,) = _labels_layers(viewer)
    predicted = np.array(labels.data)
    np.testing.assert_array_equal(prediction_of(labels), predicted)
    assert not edited_mask(labels).any() and not widget.is_edited(labels)
    labelled = np.argwhere(predicted != 0)
    background = np.argwhere(predicted == 0)
    assert len(labelled) > 20 and len(background) > 20  # the tiny random model labels some voxels, not all

    # the user erases four labelled voxels (two with the eraser brush, two as a script would) and paints one
    labels.brush_size = 1
    erased = [tuple(int(v) for v in labelled[i]) for i in (0, 5, 10, 15)]
    for voxel in erased[:2]:
        labels.paint(voxel, 0)  # napari's brush/eraser path (a masked history atom)
    labels.data_setitem(tuple(np.array([v]) for v in zip(*erased[2:], strict=True)), 0)
    painted = tuple(int(v) for v in background[7])
    labels.paint(painted, 2)
    user = np.array(labels.data)
    expected_edits = np.zeros(predicted.shape, bool)
    for voxel in [*erased, painted]:
        expected_edits[voxel] = True
    np.testing.assert_array_equal(edited_mask(labels), expected_edits)
    assert all(user[v] == 0 for v in erased) and user[painted] == 2

    # "fill unlabelled" with the same model: the erased voxels stay erased, the paint stays
    _segment(qtbot, widget, "fill")
    assert len(_labels_layers(viewer)) == 1
    after_fill = np.array(labels.data)
    assert all(after_fill[v] == 0 for v in erased), "fill-unlabelled refilled a voxel the user erased"
    np.testing.assert_array_equal(after_fill, np.where(expected_edits, user, predicted))
    np.testing.assert_array_equal(edited_mask(labels), expected_edits)  # still the user's edits

    # "replace" (the user agrees to lose the edits), then napari's undo brings them back
    asked = []
    widget.confirm = lambda question: asked.append(question) or True
    _segment(qtbot, widget, "replace")
    assert len(asked) == 1 and "edited" in asked[0]
    np.testing.assert_array_equal(labels.data, predicted)
    assert not edited_mask(labels).any()
    labels.undo()
    np.testing.assert_array_equal(labels.data, after_fill)
    labels.redo()
    np.testing.assert_array_equal(labels.data, predicted)
    assert not _errors(notes), _errors(notes)


def test_labels_picker_and_label_list_follow_the_chosen_image(make_napari_viewer, qtbot, phantom_files, notes):
    from qtpy.QtCore import Qt

    from napari_e2enet._napari.label_list import NAME_COLUMN, VISIBLE_COLUMN, VOLUME_COLUMN

    viewer = make_napari_viewer()
    brain, tissue = viewer.open_sample("napari-e2enet", "mni152")
    widget = viewer.window.add_plugin_dock_widget("napari-e2enet", "Segment")[1]
    widget.image_combo.set_layer(brain)
    assert widget.labels_combo.layer() == tissue
    assert [widget.volumes_table.item(r, NAME_COLUMN).text() for r in range(3)] == [
        "CSF/other", "grey matter", "white matter"]

    # a Labels layer of another image is added (and becomes napari's active layer): Segment stays on the brain
    ct, organs = viewer.open([str(phantom_files["image"]), str(phantom_files["labels"])], plugin="napari-e2enet")
    viewer.layers.selection.active = organs
    widget.image_combo.set_layer(brain)
    assert widget.labels_combo.layer() == tissue
    assert widget.volumes_table.rowCount() == 3
    # choosing the CT makes the picker and the list follow it
    widget.image_combo.set_layer(ct)
    assert widget.labels_combo.layer() == organs
    ml = {widget.volumes_table.item(r, NAME_COLUMN).text(): float(widget.volumes_table.item(r, VOLUME_COLUMN).text())
          for r in range(widget.volumes_table.rowCount())}
    spacing = np.prod(np.abs(np.asarray(organs.scale)))
    expected = {f"label {i}": np.count_nonzero(np.asarray(organs.data) == i) * spacing / 1000 for i in (1, 2)}
    assert ml == pytest.approx(expected, abs=0.006)
    # an image with no labels on its grid: nothing is shown rather than another image's labels
    lonely = viewer.add_image(np.zeros((5, 6, 7), np.float32), name="lonely")
    widget.image_combo.set_layer(lonely)
    assert widget.labels_combo.layer() is None and widget.volumes_table.rowCount() == 0

    # the list: click a structure to paint with it; untick to hide it (transparent), tick to show it again
    widget.image_combo.set_layer(brain)
    table = widget.volumes_table
    before = np.asarray(tissue.colormap.map(np.array([2], dtype=tissue.data.dtype))).ravel()
    assert before[3] == 1.0
    viewer.window._qt_window.show()
    table.scrollToItem(table.item(1, NAME_COLUMN))
    rect = table.visualItemRect(table.item(1, NAME_COLUMN))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert tissue.selected_label == 2 and viewer.layers.selection.active == tissue
    table.item(1, VISIBLE_COLUMN).setCheckState(Qt.CheckState.Unchecked)
    hidden = np.asarray(tissue.colormap.map(np.array([2], dtype=tissue.data.dtype))).ravel()
    assert hidden[3] == 0.0
    assert np.asarray(tissue.colormap.map(np.array([3], dtype=tissue.data.dtype))).ravel()[3] == 1.0
    table.item(1, VISIBLE_COLUMN).setCheckState(Qt.CheckState.Checked)
    np.testing.assert_allclose(np.asarray(tissue.colormap.map(np.array([2], dtype=tissue.data.dtype))).ravel(),
                               before, atol=1e-6)
    assert not _errors(notes), _errors(notes)


def test_save_dialogs_start_next_to_the_source_or_at_home(make_napari_viewer, qtbot, tmp_path, phantom_files,
                                                         monkeypatch, notes):
    import napari_e2enet

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(Path(napari_e2enet.__file__).parent)  # a relative default would land in the package
    viewer = make_napari_viewer()
    brain, tissue = viewer.open_sample("napari-e2enet", "mni152")  # files inside the package
    widget = viewer.window.add_plugin_dock_widget("napari-e2enet", "Segment")[1]
    widget.image_combo.set_layer(brain)
    assert widget.labels_combo.layer() == tissue
    proposed = []
    widget.ask_save_path = lambda default: proposed.append(Path(default)) and None
    _click(qtbot, widget.save_btn)
    assert proposed[-1].parent == home

    ct, organs = viewer.open([str(phantom_files["image"]), str(phantom_files["labels"])], plugin="napari-e2enet")
    widget.image_combo.set_layer(ct)
    assert widget.labels_combo.layer() == organs
    _click(qtbot, widget.save_btn)
    assert proposed[-1].parent == Path(phantom_files["image"]).parent
    assert proposed[-1].name.endswith("_labels.nii.gz")

    # the Connectivity widget, showing the bundled model's record (inside the package), proposes home too
    conn = viewer.window.add_plugin_dock_widget("napari-e2enet", "Connectivity")[1]
    from napari_e2enet.bundled import bundled_model

    assert conn.load(bundled_model().folder)
    asked = []
    conn.ask_png_path = lambda default: asked.append(Path(default)) and None
    conn.ask_csv_path = lambda default: asked.append(Path(default)) and None
    _click(qtbot, conn.png_btn)
    _click(qtbot, conn.csv_btn)
    assert [p.parent for p in asked] == [home, home]
    # a DICOM series folder: next to the folder, not inside it; a relative or missing path: home
    from napari_e2enet._napari._qt_util import save_start_folder

    series = tmp_path / "series"
    series.mkdir()
    assert save_start_folder(series) == tmp_path
    assert save_start_folder("relative/file.nii.gz", tmp_path / "gone" / "x.nii") == home
    assert not _errors(notes), _errors(notes)
