"""Train widget: train an E2ENet with DSFF from a dataset folder or the current layers.

Options become a core ``TrainConfig``; ``Trainer.iter_fit`` runs in a napari worker. Start begins
a new run folder under the runs folder, Stop asks the trainer to stop after the current iteration
(it saves a resumable state), Resume continues the last (or the named) run exactly where it
stopped. Loss and validation Dice are drawn live (``plots.plot_loss`` / ``plots.plot_validation_dice``
on a Qt canvas). Every finished or stopped run is added to the viewer's :class:`RunRegistry`, so
it appears in the Segment widget's model list; live events are relayed to the Connectivity widget.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Image
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QWidget,
)

from ..config import TrainConfig, load_config, train_config
from ..errors import InputError
from ..modelcard import CONFIG_FILE, STATE_FILE, holds_model
from ..plots import plot_loss, plot_validation_dice
from ._qt_util import LabelsCombo, LayerCombo, open_path_dialog, scroll_layout
from .layers import META_KEY, check_same_grid, layer_to_volume
from .runs import RunRegistry, registry_for
from .segment_widget import available_devices
from .workers import Job, JobWidget, error_message


class TrainWidget(JobWidget):
    """Dock widget: data → options → Start / Stop / Resume, with live loss and Dice curves."""

    def __init__(self, napari_viewer: Any, registry: RunRegistry | None = None, parent: QWidget | None = None
                 ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.registry = registry if registry is not None else registry_for(napari_viewer)
        self.run_dir: Path | None = None
        self.last_event: Any = None
        self._history: dict[str, list] = {}
        self._reset_history()
        self.ask_open_path = open_path_dialog(self)
        self._redraw = QTimer(self)
        self._redraw.setSingleShot(True)
        self._redraw.setInterval(1000)  # at most one redraw a second: drawing holds the GIL
        self._redraw.timeout.connect(self.draw_curves)

        layout = scroll_layout(self)
        layout.addWidget(self._build_data())
        layout.addWidget(self._build_options())
        self._build_controls(layout)
        self._build_curves(layout)
        self._wire()

    def _build_data(self) -> QGroupBox:
        """Where the training cases come from: a dataset folder or the viewer's layers."""
        data = QGroupBox("Data")
        data_form = QFormLayout(data)
        self.source_folder = QRadioButton("nnU-Net / MSD folder (or phantom:N)")
        self.source_layers = QRadioButton("current image + labels layers")
        self.source_folder.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.source_folder)
        group.addButton(self.source_layers)
        data_form.addRow(self.source_folder)
        folder = QHBoxLayout()
        self.folder_edit = QLineEdit("phantom:4")
        self.folder_btn = QPushButton("…")
        folder.addWidget(self.folder_edit, 1)
        folder.addWidget(self.folder_btn)
        data_form.addRow("Dataset", folder)
        data_form.addRow(self.source_layers)
        self.image_combo = LayerCombo(self.viewer, Image)
        self.labels_combo = LabelsCombo(self.viewer, self.image_combo)  # the chosen image's labels
        data_form.addRow("Image", self.image_combo)
        data_form.addRow("Labels", self.labels_combo)
        return data


    def _build_options(self) -> QGroupBox:
        """Model, schedule, optimiser, validation, device and run folder."""
        from ..models import list_models

        opts = QGroupBox("Options")
        form = QFormLayout(opts)
        self.model_combo = QComboBox()
        self.model_combo.addItems(list_models())
        if "e2enet_small" in list_models():
            self.model_combo.setCurrentText("e2enet_small")
        form.addRow("Model", self.model_combo)
        self.overrides_edit = QLineEdit()
        self.overrides_edit.setPlaceholderText('optional JSON, e.g. {"widths": [8, 16, 32], "pools": [[2,2,2],[2,2,2]]}')
        self.overrides_edit.setToolTip("ModelConfig fields that replace the variant's defaults")
        form.addRow("Model overrides", self.overrides_edit)
        self.sparsity_spin = QDoubleSpinBox()
        self.sparsity_spin.setRange(0.0, 0.99)
        self.sparsity_spin.setSingleStep(0.05)
        self.sparsity_spin.setValue(0.8)
        form.addRow("Sparsity", self.sparsity_spin)
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(1, 10_000_000)
        self.iterations_spin.setValue(1000)
        form.addRow("Iterations", self.iterations_spin)
        self.per_epoch_spin = QSpinBox()
        self.per_epoch_spin.setRange(1, 100_000)
        self.per_epoch_spin.setValue(50)
        form.addRow("Iterations per epoch", self.per_epoch_spin)
        self._build_schedule(form)
        self.device_combo = QComboBox()
        self.device_combo.addItems(available_devices())
        form.addRow("Device", self.device_combo)
        runs = QHBoxLayout()
        self.runs_edit = QLineEdit(str(self.registry.runs_root))
        self.runs_btn = QPushButton("…")
        runs.addWidget(self.runs_edit, 1)
        runs.addWidget(self.runs_btn)
        form.addRow("Runs folder", runs)
        self.run_name_edit = QLineEdit()
        self.run_name_edit.setPlaceholderText("new folder: train-<date>-<time>")
        self.run_name_edit.setToolTip("Run folder name (Start) or the run to continue (Resume); an absolute "
                                      "path is used as is")
        form.addRow("Run", self.run_name_edit)
        return opts


    def _build_schedule(self, form: QFormLayout) -> None:
        """Patch, batch, topology-update interval, learning rate, optimiser and validation."""
        patch = QHBoxLayout()
        self.patch_spins = []
        for _ in range(3):
            spin = QSpinBox()
            spin.setRange(8, 512)
            spin.setSingleStep(8)
            spin.setValue(64)
            self.patch_spins.append(spin)
            patch.addWidget(spin)
        form.addRow("Patch (D, H, W)", patch)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 64)
        self.batch_spin.setValue(2)
        form.addRow("Batch", self.batch_spin)
        self.update_every_spin = QSpinBox()
        self.update_every_spin.setRange(0, 1_000_000)
        self.update_every_spin.setValue(0)
        self.update_every_spin.setSpecialValueText("auto")
        self.update_every_spin.setToolTip("ΔT: iterations between DSFF topology updates (auto: the paper's "
                                          "1200 / 250 000 of the run)")
        form.addRow("ΔT update every", self.update_every_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(4)
        self.lr_spin.setRange(0.0001, 1.0)
        self.lr_spin.setSingleStep(0.001)
        self.lr_spin.setValue(0.01)
        form.addRow("Learning rate", self.lr_spin)
        self.optimizer_combo = QComboBox()
        self.optimizer_combo.addItems(["sgd", "adamw"])
        self.optimizer_combo.setToolTip("sgd: the paper's SGD Nesterov 0.99. adamw: learns a short CPU run "
                                        "several times faster (a learning rate around 0.003-0.01)")
        form.addRow("Optimizer", self.optimizer_combo)
        self.validation_combo = QComboBox()
        self.validation_combo.addItem("auto (patch sample on CPU)", "auto")
        self.validation_combo.addItem("full volumes (sliding window)", "full")
        self.validation_combo.addItem("patch sample", "patches")
        self.validation_combo.setToolTip("Validation Dice after each epoch. Full: a sliding window over every "
                                         "validation case (minutes a case on CPU). Patch sample: the same 16 "
                                         "patches every time, seconds (docs/validation-sample.md). Stop "
                                         "interrupts either.")
        form.addRow("Validation", self.validation_combo)

    def _build_controls(self, layout: Any) -> None:
        """Start / Stop / Resume, the progress bar and the status line."""
        buttons = QHBoxLayout()
        self.start_btn = QPushButton("Start")
        self.stop_btn = QPushButton("Stop")
        self.resume_btn = QPushButton("Resume")
        self.stop_btn.setEnabled(False)
        for b in (self.start_btn, self.stop_btn, self.resume_btn):
            buttons.addWidget(b)
        layout.addLayout(buttons)
        self._build_progress(layout)

    def _build_curves(self, layout: Any) -> None:
        """Loss and validation Dice, redrawn at most once a second while training."""
        self.figure = Figure(figsize=(4.0, 4.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(280)
        self.ax_loss, self.ax_dice = self.figure.subplots(2, 1)
        layout.addWidget(self.canvas, 1)
        self.draw_curves()

    def _wire(self) -> None:
        self.start_btn.clicked.connect(self.start)
        self.stop_btn.clicked.connect(self.stop)
        self.resume_btn.clicked.connect(self.resume)
        self.folder_btn.clicked.connect(self._browse_folder)
        self.runs_btn.clicked.connect(self._browse_runs)
        self.runs_edit.editingFinished.connect(self._runs_edited)
        self.registry.changed.connect(self._registry_changed)

    # ------------------------------------------------------------------------------------------
    def _browse_folder(self) -> None:
        path = self.ask_open_path("folder", self.folder_edit.text())
        if path:
            self.folder_edit.setText(path)
            self.source_folder.setChecked(True)

    def _browse_runs(self) -> None:
        path = self.ask_open_path("folder", self.runs_edit.text())
        if path:
            self.runs_edit.setText(path)
            self._runs_edited()

    def _runs_edited(self) -> None:
        text = self.runs_edit.text().strip()
        if text and Path(text).expanduser() != self.registry.runs_root:
            self.registry.runs_root = text

    def _registry_changed(self) -> None:
        if self.runs_edit.text().strip() != str(self.registry.runs_root):
            self.runs_edit.setText(str(self.registry.runs_root))

    def config(self) -> TrainConfig:
        """The TrainConfig the options describe (the CLI's mapping: ``config.train_config``)."""
        source = "napari layers" if self.source_layers.isChecked() else self.folder_edit.text().strip()
        text = self.overrides_edit.text().strip()
        try:
            overrides = json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            raise InputError(f"model overrides are not valid JSON ({exc.msg})") from None
        if not isinstance(overrides, dict):
            raise InputError("model overrides must be a JSON object")
        return train_config(
            model=self.model_combo.currentText(), model_overrides=overrides,
            sparsity=float(self.sparsity_spin.value()), update_every=int(self.update_every_spin.value()),
            source=source, patch=tuple(int(s.value()) for s in self.patch_spins), batch=int(self.batch_spin.value()),
            iterations=int(self.iterations_spin.value()), iterations_per_epoch=int(self.per_epoch_spin.value()),
            lr=float(self.lr_spin.value()), optimizer=self.optimizer_combo.currentText(),
            device=self.device_combo.currentText(), validation=str(self.validation_combo.currentData()))

    def _layers_dataset(self):
        from ..data import Dataset

        image, labels = self.image_combo.layer(), self.labels_combo.layer()
        if image is None or labels is None:
            raise InputError("choose an image layer and a labels layer to train on")
        check_same_grid(image, labels)
        table = (labels.metadata.get(META_KEY, {}) or {}).get("label_table")
        names = None
        if table:
            from ..labels import LabelTable

            names = LabelTable.from_dict(table).names
        return Dataset.from_arrays([layer_to_volume(image)], [layer_to_volume(labels)], label_names=names,
                                   names=[image.name.replace(" ", "_")], name="napari layers")

    def _resolve_run(self, name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.registry.runs_root / path

    # ------------------------------------------------------------------------------------------
    def start(self) -> Job | None:
        """Start a new run with the current options."""
        if self.refuse_if_busy("napari-e2enet: training is already running"):
            return None
        self._runs_edited()
        name = self.run_name_edit.text().strip()
        run_dir = self._resolve_run(name) if name else self.registry.new_run_dir("train")
        if (run_dir / STATE_FILE).exists():
            show_error(f"{run_dir}: this run folder already holds a run; use Resume, or choose another name")
            return None
        try:
            config = self.config()
            dataset = self._layers_dataset() if self.source_layers.isChecked() else None
            if dataset is None and not config.data.source:
                raise InputError("choose a dataset folder (or phantom:N)")
        except (InputError, ValueError) as err:
            show_error(error_message(err))
            return None
        return self._launch(config, run_dir, dataset, resume=False)

    def resume(self) -> Job | None:
        """Continue the named run (or the last one of this session) from its saved state."""
        if self.refuse_if_busy("napari-e2enet: training is already running"):
            return None
        name = self.run_name_edit.text().strip()
        run_dir = self._resolve_run(name) if name else self.run_dir
        if run_dir is None or not (run_dir / STATE_FILE).is_file():
            show_error(f"{run_dir or 'Resume'}: no resumable training state ({STATE_FILE}) found")
            return None
        try:
            saved = load_config(run_dir / CONFIG_FILE, TrainConfig)
            dataset = self._layers_dataset() if saved.data.source == "napari layers" else None
        except (InputError, ValueError) as err:
            show_error(error_message(err))
            return None
        return self._launch(saved, run_dir, dataset, resume=True)

    def _launch(self, config: Any, run_dir: Path, dataset: Any, *, resume: bool) -> Job | None:
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            show_error(f"{run_dir.parent}: cannot create the runs folder ({exc.strerror or exc})")
            return None
        self.run_dir = run_dir
        if not resume:
            self._reset_history()
        total = config.iterations

        def run(stop: threading.Event) -> Iterator[Any]:
            # in a child process: its main thread keeps freed activations for the next step (a
            # worker thread's malloc arena cannot), and training leaves napari's GIL alone
            from ..training.isolated import fit_events, iter_in_subprocess

            yield from iter_in_subprocess(fit_events, config, run_dir, dataset, resume=resume, stop=stop)

        self.progress_bar.setRange(0, total)
        self.status_label.setText(f"{'Resuming' if resume else 'Starting'} {run_dir.name}…")
        self.job = Job(run, on_event=self._on_event, on_done=self._on_done,
                       description=f"Training {run_dir.name} (iterations)", total=total)
        self._set_busy(True)
        return self.job

    def stop(self) -> None:
        """The Stop button: the run saves its state at the current iteration (Resume continues it)."""
        self.cancel()

    def _cancelling(self) -> None:
        self.stop_btn.setEnabled(False)
        self.status_label.setText("Stopping after the current iteration (a validation is abandoned)…")

    # ------------------------------------------------------------------------------------------
    def _reset_history(self) -> None:
        self._history = {"it": [], "loss": [], "epoch_it": [], "epoch_loss": [], "val_it": [], "dice": [],
                         "epoch_losses": []}

    def _on_event(self, event: Any) -> None:
        self.last_event = event
        h = self._history
        kind = event.kind
        if kind == "start":
            self.status_label.setText(event.message)
        elif kind == "iteration":
            h["it"].append(event.iteration)
            h["loss"].append(event.loss)
            h["epoch_losses"].append(event.loss)
            self.progress_bar.setRange(0, int(event.total))
            self.progress_bar.setValue(int(event.iteration))
            if self.job is not None:
                self.job.set_progress(event.iteration, event.total)
            self.status_label.setText(f"iteration {event.iteration}/{event.total}  epoch {event.epoch}  "
                                      f"loss {event.loss:.4f}  lr {event.lr:.2g}")
        elif kind == "validation":
            h["val_it"].append(event.iteration)
            h["dice"].append(dict(event.dice or {}))
        elif kind == "checkpoint":
            if h["epoch_losses"]:
                h["epoch_it"].append(event.iteration)
                h["epoch_loss"].append(float(np.mean(h["epoch_losses"])))
                h["epoch_losses"] = []
        elif kind == "topology" and event.update is not None:
            update = event.update
            self.status_label.setText(f"iteration {event.iteration}: topology update — pruned "
                                      f"{getattr(update, 'total_pruned', '?')}, regrown "
                                      f"{getattr(update, 'total_regrown', '?')}")
        if self.run_dir is not None:
            self.registry.training_event.emit(self.run_dir, event)
        if not self._redraw.isActive():
            self._redraw.start()

    def draw_curves(self) -> None:
        h = self._history
        plot_loss(self.ax_loss, h["it"], h["loss"], h["epoch_it"], h["epoch_loss"])
        plot_validation_dice(self.ax_dice, h["val_it"], h["dice"])
        self.canvas.draw_idle()

    def _on_done(self, job: Job) -> None:
        self._set_busy(False)
        self.draw_curves()
        run_dir = self.run_dir
        if job.error is not None:
            self.status_label.setText("Training failed.")
            show_error(error_message(job.error))
            return
        kind = getattr(self.last_event, "kind", "")
        if run_dir is not None and holds_model(run_dir):
            stopped = job.cancelled or kind == "stopped"
            self.registry.add(run_dir, label=run_dir.name + (" (stopped)" if stopped else ""), kind="train")
            what = "stopped (Resume continues it)" if stopped else "finished"
            self.status_label.setText(f"{run_dir.name} {what}; its model is in the Segment widget's list.")
            show_info(f"napari-e2enet: training {what}: {run_dir}")
        else:
            self.status_label.setText("Training stopped before the first checkpoint.")

    def _set_busy(self, busy: bool) -> None:
        self.start_btn.setEnabled(not busy)
        self.resume_btn.setEnabled(not busy)
        self.stop_btn.setEnabled(busy)
