"""Train and Connectivity widgets in a real viewer; the README screenshots."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytestmark = pytest.mark.gui

TIMEOUT = 180_000
TINY = '{"widths": [4, 8, 8], "pools": [[2, 2, 2], [2, 2, 2]]}'


@pytest.fixture
def notes():
    from napari.utils.notifications import notification_manager

    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


def _errors(notes) -> list[str]:
    return [str(n.message) for n in notes if str(n.severity).lower().endswith("error")]


def _click(qtbot, button):
    from qtpy.QtCore import Qt

    assert button.isEnabled(), button.text()
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _wait_idle(qtbot, widget, timeout=TIMEOUT):
    """Wait on the worker's finished signal (no Python polling: it would slow the worker)."""
    job = widget.job
    if job.running:
        qtbot.waitSignal(job.done, timeout=timeout).wait()
    qtbot.waitUntil(lambda: not job.running, timeout=5_000)
    assert not widget.busy and not job.worker.is_running


def _dock(viewer, name, **kwargs):
    return viewer.window.add_plugin_dock_widget("napari-e2enet", name, **kwargs)[1]


def _tiny_options(train, iterations, per_epoch, update_every=2):
    train.source_layers.setChecked(True)
    train.model_combo.setCurrentText("e2enet_small")
    train.overrides_edit.setText(TINY)
    train.iterations_spin.setValue(iterations)
    train.per_epoch_spin.setValue(per_epoch)
    for spin in train.patch_spins:
        spin.setValue(16)
    train.batch_spin.setValue(1)
    train.update_every_spin.setValue(update_every)
    train.device_combo.setCurrentText("cpu")


def _write_record(folder):
    """A ConnectivityRecord written directly (3 snapshots, 2 updates) — no training needed."""
    from napari_e2enet import create_model
    from napari_e2enet.sparse import ConnectivityRecord

    model = create_model("e2enet_small", num_classes=3, widths=(4, 8, 8), pools=((2, 2, 2),) * 2, sparsity=0.8)
    record = ConnectivityRecord.for_model(model, sparsity=0.8)
    update = {"iteration": 0, "update_index": 0, "prune_fraction": 0.5, "regrow": "random", "pruned": {},
              "regrown": {}, "total_pruned": 12, "total_regrown": 12, "active": 100, "kernels": 500,
              "survived": None, "previous_regrown": None, "total_survived": None}
    for epoch, iteration in enumerate((0, 5, 10)):
        if iteration:
            with_it = {**update, "iteration": iteration - 2, "update_index": epoch - 1}
            record.record(model, "update", iteration - 2, epoch=epoch, update=with_it, loss=1.0 / (epoch + 1))
        record.record(model, "epoch", iteration, epoch=epoch, loss=1.0 / (epoch + 1))
    folder.mkdir(parents=True, exist_ok=True)
    return record.to_json(folder / "connectivity.json")


def test_connectivity_widget_draws_exports_and_reports_bad_files(make_napari_viewer, qtbot, tmp_path, notes,
                                                                  screenshot_dir):
    viewer = make_napari_viewer()
    widget = _dock(viewer, "Connectivity")
    run = tmp_path / "recorded_run"
    _write_record(run)
    assert widget.load(run)
    assert widget.epoch_slider.maximum() == 2 and widget.epoch_slider.value() == 2
    assert "epoch 2" in widget.epoch_label.text()
    axes = widget.figure.axes
    assert len(axes) >= 3
    bars = [p for p in axes[0].patches]
    assert len(bars) == 3 * 3  # 3 fused nodes × forward/up/down (zero-height for absent directions)
    widget.epoch_slider.setValue(0)
    assert "epoch 0" in widget.epoch_label.text()
    widget.measure_combo.setCurrentIndex(widget.measure_combo.findData("l1"))
    assert "L1" in widget.figure.axes[0].get_ylabel()
    widget.ask_png_path = lambda default: str(tmp_path / "conn")
    widget.ask_csv_path = lambda default: str(tmp_path / "conn.csv")
    _click(qtbot, widget.png_btn)
    _click(qtbot, widget.csv_btn)
    assert (tmp_path / "conn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "conn.csv").open()))
    assert {r["direction"] for r in rows} == {"forward", "up", "down"}
    assert len(rows) == 5 * (2 + 3 + 2)  # 5 entries × (x0_1: 2, x1_1: 3, x0_2: 2 directions)
    # a bad file: one notification, the plots stay
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "connectivity.json").write_text("{not json")
    assert not widget.load(bad)
    assert widget.record is not None
    assert any("connectivity.json" in e for e in _errors(notes))


def test_train_from_layers_live_curves_registry_and_connectivity(make_napari_viewer, qtbot, phantom_files,
                                                                 _runs_root, notes, screenshot_dir):
    viewer = make_napari_viewer()
    image, labels = viewer.open([str(phantom_files["image"]), str(phantom_files["labels"])],
                                plugin="napari-e2enet")
    assert labels._type_string == "labels"
    segment = _dock(viewer, "Segment")
    train = _dock(viewer, "Train")
    conn = _dock(viewer, "Connectivity")
    train.image_combo.set_layer(image)
    train.labels_combo.set_layer(labels)
    _tiny_options(train, iterations=12, per_epoch=4, update_every=2)
    events = []
    _click(qtbot, train.start_btn)
    train.job.worker.yielded.connect(lambda e: events.append(e.kind))
    assert not train.start_btn.isEnabled() and train.stop_btn.isEnabled()
    _wait_idle(qtbot, train)
    assert not _errors(notes), _errors(notes)
    assert train.last_event.kind == "done" and train.last_event.iteration == 12
    assert "topology" in events and events.count("validation") == 3
    # live curves: one loss point per iteration, one Dice point per validation
    assert len(train.ax_loss.lines[0].get_xdata()) == 12
    assert train.ax_dice.lines and len(train.ax_dice.lines[-1].get_xdata()) == 3
    # the run is offered by the Segment widget ...
    run_dir = train.run_dir
    assert run_dir.parent == _runs_root
    assert segment.model_combo.findData(str(run_dir.resolve())) >= 0
    # ... and the Connectivity widget followed it live
    assert conn.record is not None and conn.record_path.parent == run_dir
    assert conn.epoch_slider.maximum() >= 3
    # the README picture of the connectivity widget: a floating one, big enough for its three panels
    from napari_e2enet._napari.connectivity_widget import ConnectivityWidget

    floating = ConnectivityWidget(viewer)
    qtbot.addWidget(floating)
    floating.resize(720, 1000)
    floating.show()
    assert floating.load(run_dir)
    floating.epoch_slider.setValue(floating.epoch_slider.maximum())
    qtbot.wait(100)
    floating.grab().save(str(screenshot_dir / "connectivity_widget.png"))
    floating.close()
    train.grab().save(str(screenshot_dir / "train_widget.png"))


def test_train_stop_then_resume_continues(make_napari_viewer, qtbot, phantom_files, notes):
    viewer = make_napari_viewer()
    image, labels = viewer.open([str(phantom_files["image"]), str(phantom_files["labels"])],
                                plugin="napari-e2enet")
    train = _dock(viewer, "Train")
    train.image_combo.set_layer(image)
    train.labels_combo.set_layer(labels)
    _tiny_options(train, iterations=6, per_epoch=3)
    train.optimizer_combo.setCurrentText("adamw")
    _click(qtbot, train.start_btn)
    job = train.job
    seen = []

    def stop_early(event):
        seen.append(event.kind)
        if event.kind == "iteration" and event.iteration == 1:
            _click(qtbot, train.stop_btn)

    job.worker.yielded.connect(stop_early)
    _wait_idle(qtbot, train)
    assert not job.worker.is_running
    assert train.last_event.kind == "stopped" and train.last_event.iteration < 6
    stopped_at = train.last_event.iteration
    assert (train.run_dir / "training_state.pt").is_file()
    assert train.registry.runs()[0].label.endswith("(stopped)")
    _click(qtbot, train.resume_btn)
    first = []
    train.job.worker.yielded.connect(lambda e: first.append(e) if e.kind == "iteration" else None)
    _wait_idle(qtbot, train)
    assert not _errors(notes), _errors(notes)
    assert first[0].iteration == stopped_at + 1
    assert train.last_event.kind == "done" and train.last_event.iteration == 6
    assert json.loads((train.run_dir / "config.json").read_text())["optimizer"] == "adamw"  # resumed as chosen


def test_screenshot_viewer_with_overlay_and_widgets(make_napari_viewer, qtbot, tmp_path, screenshot_dir):
    """The README picture: the MNI sample, its tissue overlay, the three widgets docked."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    _image, reference = viewer.open_sample("napari-e2enet", "mni152")
    reference.visible = True
    reference.opacity = 0.45
    from napari_e2enet._napari.connectivity_widget import ConnectivityWidget
    from napari_e2enet._napari.runs import registry_for
    from napari_e2enet._napari.segment_widget import SegmentWidget
    from napari_e2enet._napari.train_widget import TrainWidget

    registry = registry_for(viewer)
    segment, train, conn = (SegmentWidget(viewer, registry), TrainWidget(viewer, registry),
                            ConnectivityWidget(viewer, registry))
    viewer.window.add_dock_widget(segment, name="Segment (napari-e2enet)", area="right")
    viewer.window.add_dock_widget(train, name="Train (napari-e2enet)", area="left")
    viewer.window.add_dock_widget(conn, name="Connectivity (napari-e2enet)", area="left", tabify=True)
    run = tmp_path / "runs" / "demo-run"
    _write_record(run)
    conn.load(run)
    segment.labels_combo.set_layer(reference)
    assert segment.volumes_table.rowCount() == 3  # CSF/other, grey matter, white matter (mL)
    viewer.dims.set_point(0, float(np.mean(viewer.dims.range[0][:2])) + 10)
    viewer.reset_view()
    qtbot.wait(200)
    shot = viewer.screenshot(str(screenshot_dir / "viewer_widgets.png"), canvas_only=False)
    assert shot.shape[0] > 500 and shot.shape[1] > 1000
    canvas = viewer.screenshot(canvas_only=True)
    assert canvas[..., :3].std() > 5  # the slice and its overlay were drawn
    # the CT phantom with its organ overlay (AMOS colours) and organ volumes
    viewer.layers.clear()
    _ct, organs = viewer.open_sample("napari-e2enet", "abdomen_phantom")
    organs.opacity = 0.6
    segment.labels_combo.set_layer(organs)
    assert segment.volumes_table.rowCount() == 15
    viewer.dims.set_point(0, float(np.mean(viewer.dims.range[0][:2])))
    viewer.reset_view()
    qtbot.wait(200)
    viewer.screenshot(str(screenshot_dir / "viewer_phantom.png"), canvas_only=False)
    del train


def test_closing_the_viewer_stops_training(make_napari_viewer, qtbot, phantom_files):
    viewer = make_napari_viewer()
    image, labels = viewer.open([str(phantom_files["image"]), str(phantom_files["labels"])],
                                plugin="napari-e2enet")
    train = _dock(viewer, "Train")
    train.image_combo.set_layer(image)
    train.labels_combo.set_layer(labels)
    _tiny_options(train, iterations=100_000, per_epoch=100_000)
    _click(qtbot, train.start_btn)
    job = train.job
    with qtbot.waitSignal(job.worker.yielded, timeout=TIMEOUT):
        pass
    del train
    viewer.close()
    if job.running:
        qtbot.waitSignal(job.done, timeout=TIMEOUT).wait()
    assert job.cancelled and not job.worker.is_running
