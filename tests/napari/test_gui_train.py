"""Train and Connectivity widgets in a real viewer; the README screenshots."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytestmark = pytest.mark.gui

TIMEOUT = 180_000
TINY = '{"widths": [4, 8, 8], "pools": [[2, 2, 2], [2, 2, 2]]}'


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
    train.scroll_area.widget().grab().save(str(screenshot_dir / "train_widget.png"))  # all of it, unscrolled


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


def test_all_three_docks_fit_a_1366x768_screen_and_readme_screenshots(make_napari_viewer, qtbot, tmp_path,
                                                                      screenshot_dir):
    """The three widgets docked as a user docks them (Plugins menu: all on the right) fit a 1366×768
    laptop screen; the README pictures are taken at that size."""
    from napari_e2enet._napari._qt_util import DOCK_MIN_HEIGHT

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    _image, reference = viewer.open_sample("napari-e2enet", "mni152")
    segment, train, conn = (_dock(viewer, name) for name in ("Segment", "Train", "Connectivity"))
    qtbot.wait(50)
    minimum = window.minimumSizeHint().height()
    print(f"\nminimum window height with the three docks: {minimum} px")
    assert minimum <= 768
    window.resize(1366, 768)
    qtbot.waitUntil(lambda: window.height() <= 768, timeout=5_000)
    assert window.width() == 1366
    docks = [w.parentWidget() for w in (segment, train, conn)]
    while not all(hasattr(d, "isFloating") for d in docks):  # the QDockWidget around each widget
        docks = [d if hasattr(d, "isFloating") else d.parentWidget() for d in docks]
    for dock in docks:
        assert dock.isVisible() and not dock.isFloating()
        assert not dock.visibleRegion().isEmpty()
        assert dock.height() >= DOCK_MIN_HEIGHT
    # every control can be scrolled into view, and the per-label list shows several rows at once
    for widget, control in ((segment, segment.finetune_btn), (train, train.stop_btn), (conn, conn.csv_btn)):
        widget.scroll_area.ensureWidgetVisible(control)
        qtbot.wait(20)
        assert not control.visibleRegion().isEmpty(), control.text()
    segment.labels_combo.set_layer(reference)
    assert segment.volumes_table.rowCount() == 3  # CSF/other, grey matter, white matter (mL)
    segment.scroll_area.ensureWidgetVisible(segment.volumes_table)
    qtbot.wait(20)
    row = segment.volumes_table.rowHeight(0)
    assert segment.volumes_table.visibleRegion().boundingRect().height() >= 4 * row

    # the README picture: the MNI sample, its tissue overlay, the three widgets docked
    reference.visible = True
    reference.opacity = 0.5
    run = tmp_path / "runs" / "demo-run"
    _write_record(run)
    conn.load(run)
    segment.scroll_area.ensureWidgetVisible(segment.segment_btn)
    for widget in (train, conn):
        widget.scroll_area.verticalScrollBar().setValue(0)
    viewer.dims.set_point(0, float(np.mean(viewer.dims.range[0][:2])) + 10)
    viewer.reset_view()
    qtbot.wait(200)
    shot = viewer.screenshot(str(screenshot_dir / "viewer_widgets.png"), canvas_only=False)
    assert shot.shape[0] <= 768 + 40 and shot.shape[1] >= 1366  # (the frame's own pixels aside)
    canvas = viewer.screenshot(canvas_only=True)
    assert canvas[..., :3].std() > 5  # the slice and its overlay were drawn
    # the CT phantom with its organ overlay (AMOS colours) and the per-label list
    viewer.layers.clear()
    _ct, organs = viewer.open_sample("napari-e2enet", "abdomen_phantom")
    organs.opacity = 0.6
    assert segment.labels_combo.layer() == organs
    assert segment.volumes_table.rowCount() == 15
    segment.scroll_area.ensureWidgetVisible(segment.volumes_table)
    viewer.dims.set_point(0, float(np.mean(viewer.dims.range[0][:2])))
    viewer.reset_view()
    qtbot.wait(200)
    viewer.screenshot(str(screenshot_dir / "viewer_phantom.png"), canvas_only=False)


def test_stop_during_a_slow_validation_returns_within_one_iteration(make_napari_viewer, qtbot, tmp_path, notes):
    """Stop clicked while a (deliberately slow: ~400 tiles) full validation runs: the validation is
    abandoned (within one tile: tests/training/test_stop_validation.py counts them), the state is
    saved, and Resume validates that epoch first. Training runs in a child process, so the click
    comes half a second after iteration 2, the last before that validation."""
    import time

    import torch
    from qtpy.QtCore import QTimer

    from napari_e2enet.data import make_phantom, write_volume

    image_v, labels_v = make_phantom(4, shape=(80, 80, 48), spacing=(1.5, 1.5, 1.5))
    labels_v.array = np.where(labels_v.array > 2, 0, labels_v.array).astype(np.uint8)
    viewer = make_napari_viewer()
    image, labels = viewer.open([str(write_volume(image_v, tmp_path / "big.nii.gz")),
                                 str(write_volume(labels_v, tmp_path / "big_seg.nii.gz"))], plugin="napari-e2enet")
    train = _dock(viewer, "Train")
    train.image_combo.set_layer(image)
    assert train.labels_combo.layer() == labels  # follows the image
    _tiny_options(train, iterations=4, per_epoch=2)
    train.validation_combo.setCurrentIndex(train.validation_combo.findData("full"))
    assert train.config().validation == "full"

    clicked: dict[str, float] = {}
    events = []

    def click_stop():
        clicked["at"] = time.perf_counter()
        _click(qtbot, train.stop_btn)

    def on_event(e):
        events.append((e, "at" in clicked))
        if e.kind == "iteration" and e.iteration == 2:
            QTimer.singleShot(500, click_stop)  # the validation has started by then

    _click(qtbot, train.start_btn)
    train.job.worker.yielded.connect(on_event)
    _wait_idle(qtbot, train)
    done = time.perf_counter()
    assert "at" in clicked, "the run ended before Stop could be clicked"
    print(f"\nStop → stopped and saved in {done - clicked['at']:.2f} s")
    after_stop = [e.kind for e, late in events if late]
    assert "validation" not in [e.kind for e, _ in events]  # abandoned, never reported
    assert "iteration" not in after_stop
    assert train.last_event.kind == "stopped" and train.last_event.iteration == 2
    state = torch.load(train.run_dir / "training_state.pt", weights_only=True)
    assert state["iteration"] == 2
    assert list(csv.DictReader((train.run_dir / "metrics.csv").open())) == []  # that epoch is not over yet
    assert train.registry.runs()[0].label.endswith("(stopped)")

    # Resume: the abandoned validation first, then iterations 3 and 4
    _click(qtbot, train.resume_btn)
    resumed, stamps = [], []
    train.job.worker.yielded.connect(lambda e: resumed.append(e) or stamps.append(time.perf_counter()))
    _wait_idle(qtbot, train)
    kinds = [e.kind for e in resumed]
    print(f"the whole validation (what Stop used to wait for, plus a checkpoint): {stamps[1] - stamps[0]:.1f} s")
    assert kinds[1] == "validation" and resumed[1].iteration == 2
    assert [e.iteration for e in resumed if e.kind == "iteration"] == [3, 4]
    assert train.last_event.kind == "done" and train.last_event.iteration == 4
    rows = list(csv.DictReader((train.run_dir / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [2, 4]
    assert not _errors(notes), _errors(notes)


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


def test_a_run_folder_in_use_or_holding_a_run_is_one_notification(make_napari_viewer, qtbot, phantom_files, notes):
    """Issue 16: the Train widget goes through the same Trainer as the CLI, so it gets the run lock and
    the "already holds a run" refusal, each as one error notification, with the folder untouched."""
    import os

    from napari_e2enet.fileio import FolderLock

    viewer = make_napari_viewer()
    image, labels = viewer.open([str(phantom_files["image"]), str(phantom_files["labels"])],
                                plugin="napari-e2enet")
    train = _dock(viewer, "Train")
    train.image_combo.set_layer(image)
    train.labels_combo.set_layer(labels)
    _tiny_options(train, iterations=2, per_epoch=1)
    _click(qtbot, train.start_btn)
    _wait_idle(qtbot, train)
    run = train.run_dir
    assert not _errors(notes), _errors(notes)
    train.run_name_edit.setText(str(run))

    lock = FolderLock(run, command="napari-e2enet train --out elsewhere").acquire()  # another run holds it
    try:
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        _click(qtbot, train.resume_btn)
        _wait_idle(qtbot, train)
        errors = _errors(notes)
        assert len(errors) == 1, errors
        assert errors[0].startswith(f"{run / 'train.lock'}: the folder is in use by another run: pid {os.getpid()}")
        assert "(napari-e2enet train --out elsewhere)" in errors[0]
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    finally:
        lock.release()

    notes.clear()
    (run / "training_state.pt").unlink()  # holds a run (its model, metrics) but nothing to resume
    _click(qtbot, train.start_btn)
    _wait_idle(qtbot, train)
    errors = _errors(notes)
    assert len(errors) == 1 and errors[0].startswith(f"{run}: already holds a training run (model.safetensors"), errors
    assert not (run / "train.lock").exists()
