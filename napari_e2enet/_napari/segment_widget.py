"""Segment widget: whole-volume segmentation, organ volumes, and the correction loop.

Everything numeric happens in the core (``Predictor.iter_predict``, ``Trainer.iter_fit``,
``volumes_ml``, ``write_volume``); this widget only gathers options, runs the core generators in a
napari worker (:mod:`.workers`) and turns results into layers (:mod:`.layers` convention).

Never losing corrections: each result layer keeps a copy of the prediction it was given
(:mod:`.edits`; ``edits.edited_mask(layer)`` is every voxel the user changed since, erased ones
included). When Segment runs again for the same image, "if a result exists" decides: *auto*
replaces an untouched result but adds a new layer if the old one was edited; *replace* asks before
overwriting an edited layer (and makes a new layer if the answer is no); *fill unlabelled* fills
only label-0 voxels the user did not erase, from the new prediction; *new layer* always adds one.
Replace and fill write into the layer as one step of napari's undo.

The labels picker (and the per-label list under it) follows the chosen image: a Segment result of
that image or a Labels layer on its grid (``_qt_util.LabelsCombo``). The widget scrolls, so it can
share a 768-pixel-high screen with the other two.

Tests replace ``confirm``, ``ask_save_path`` and ``ask_open_path`` with plain functions.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..errors import InputError
from ..labels import LabelTable
from ..modelcard import holds_model, resolve_model
from ..training.finetune import FinetuneConfig, warm_up_finetune
from . import edits
from ._qt_util import (
    LabelsCombo,
    LayerCombo,
    confirm_dialog,
    open_path_dialog,
    save_path_dialog,
    save_start_folder,
    scroll_layout,
)
from .label_list import LabelList
from .layers import META_KEY, check_same_grid, geometry_of, labels_layer_kwargs, layer_to_volume
from .runs import RunRegistry, registry_for
from .workers import Job, JobWidget, error_message

EXISTING_MODES = {
    "auto": "auto (new layer if edited)",
    "new": "new layer",
    "replace": "replace (asks if edited)",
    "fill": "fill unlabelled voxels only",
}


def available_devices() -> list[str]:
    import torch

    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def model_file_for(spec: str | None) -> Path:
    """The ``model.safetensors`` behind a model spec (bundled name, file, or run folder)."""
    path = resolve_model(spec).path
    if not path.is_file():
        raise InputError("no model file here", path)
    return path


class SegmentWidget(JobWidget):
    """Dock widget: image → model → Segment; organ volumes; save / fine-tune corrections."""

    def __init__(self, napari_viewer: Any, registry: RunRegistry | None = None, parent: QWidget | None = None
                 ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.registry = registry if registry is not None else registry_for(napari_viewer)
        self._job_kind = ""
        self._pending: Any = None
        self._predictors: dict[tuple, Any] = {}
        self._predictor_lock = threading.Lock()
        self._custom_models: list[str] = []
        self._model_by_hand = False  # until the user picks a model, Segment follows the image (fit_model)
        self._finetune_run: Path | None = None
        self._warmed_up = False
        self._volume_timer = QTimer(self)
        self._volume_timer.setSingleShot(True)
        self._volume_timer.setInterval(300)
        self._volume_timer.timeout.connect(self.update_volumes)
        self._watched: Any = None
        # injectable interactions (tests replace these)
        self.confirm = confirm_dialog(self)
        self.ask_save_path = save_path_dialog(self, "Save labels", "NIfTI (*.nii.gz *.nii)")
        self.ask_open_path = open_path_dialog(self)

        layout = scroll_layout(self)
        layout.addWidget(self._build_segment())
        self._build_controls(layout)
        # -- per-label list: show/hide, colour, name, volume (mL); click to paint with a label ------
        self.volumes_table = LabelList()
        self.volumes_table.label_selected.connect(self._label_selected)
        layout.addWidget(self.volumes_table)
        layout.addWidget(self._build_correct())
        layout.addStretch(1)
        self._wire()

    def _build_segment(self) -> QGroupBox:
        """Image, model (bundled, file or run folder) and the inference options."""
        box = QGroupBox("Segment")
        form = QFormLayout(box)
        self.image_combo = LayerCombo(self.viewer, Image)
        form.addRow("Image", self.image_combo)
        self.model_combo = QComboBox()
        self.model_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_combo.setMinimumContentsLength(14)
        pick = QHBoxLayout()
        pick.addWidget(self.model_combo, 1)
        self.model_file_btn = QPushButton("File…")
        self.model_dir_btn = QPushButton("Folder…")
        self.model_file_btn.setToolTip("Use a model.safetensors file from disk")
        self.model_dir_btn.setToolTip("Use a training run folder (or a bundled-model folder)")
        pick.addWidget(self.model_file_btn)
        pick.addWidget(self.model_dir_btn)
        form.addRow("Model", pick)
        self._build_inference_options(form)
        return box

    def _build_inference_options(self, form: QFormLayout) -> None:
        """Device, overlap, TTA, precision, fast path and what to do with an existing result."""
        self.device_combo = QComboBox()
        self.device_combo.addItems(available_devices())
        form.addRow("Device", self.device_combo)
        self.overlap_spin = QDoubleSpinBox()
        self.overlap_spin.setRange(0.0, 0.9)
        self.overlap_spin.setSingleStep(0.125)
        self.overlap_spin.setValue(0.5)
        form.addRow("Tile overlap", self.overlap_spin)
        self.tta_check = QCheckBox("mirror test-time augmentation (8× slower)")
        form.addRow("TTA", self.tta_check)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(["auto", "fp32", "bf16"])
        form.addRow("Precision", self.precision_combo)
        self.accelerate_check = QCheckBox("sparse fast path (compacted model)")
        self.accelerate_check.setChecked(True)
        self.accelerate_check.setToolTip("Run the compacted sparse model (core inference.accelerate); "
                                         "off: the plain masked network")
        form.addRow("Accelerate", self.accelerate_check)
        # the CLI's --intensity-offset auto: a CT model's scan stored with +1024 (air near 0) is
        # shifted back to HU; the warning for such a scan names this row (intended_input.CT_OFFSET_WIDGET)
        self.ct_offset_check = QCheckBox("correct if detected (raw values, air at ~0)")
        self.ct_offset_check.setToolTip("When the image looks like a CT stored without its rescale intercept "
                                        "(air near 0 instead of -1000 HU) and the model is a CT model, subtract "
                                        "the detected offset (usually 1024) before segmenting")
        form.addRow("CT offset", self.ct_offset_check)
        self.existing_combo = QComboBox()
        for key, text in EXISTING_MODES.items():
            self.existing_combo.addItem(text, key)
        form.addRow("If a result exists", self.existing_combo)


    def _build_controls(self, layout: Any) -> None:
        """Segment / Cancel, the progress bar and the status line."""
        buttons = QHBoxLayout()
        self.segment_btn = QPushButton("Segment")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        buttons.addWidget(self.segment_btn)
        buttons.addWidget(self.cancel_btn)
        layout.addLayout(buttons)
        self._build_progress(layout)
        self.progress_bar.setValue(0)

    def _build_correct(self) -> QGroupBox:
        """The correction loop: labels to save or fine-tune on, fine-tune options, runs folder."""
        fix = QGroupBox("Correct")
        fix_form = QFormLayout(fix)
        self.labels_combo = LabelsCombo(self.viewer, self.image_combo)  # follows the chosen image
        fix_form.addRow("Labels", self.labels_combo)
        self.save_btn = QPushButton("Save labels…")
        fix_form.addRow(self.save_btn)
        self.finetune_iters = QSpinBox()
        self.finetune_iters.setRange(1, 100_000)
        self.finetune_iters.setValue(FinetuneConfig().iterations)
        fix_form.addRow("Fine-tune iterations", self.finetune_iters)
        self.finetune_lr = QDoubleSpinBox()
        self.finetune_lr.setDecimals(4)
        self.finetune_lr.setRange(0.0001, 0.1)
        self.finetune_lr.setSingleStep(0.001)
        self.finetune_lr.setValue(FinetuneConfig().lr)
        fix_form.addRow("Fine-tune learning rate", self.finetune_lr)
        self._build_finetune_target(fix_form)
        return fix

    def _build_finetune_target(self, fix_form: QFormLayout) -> None:
        """Where fine-tuned runs go, and the Fine-tune button."""
        runs = QHBoxLayout()
        self.runs_edit = QLineEdit(str(self.registry.runs_root))
        self.runs_edit.setToolTip("Fine-tuned runs are saved in a new folder under this one")
        self.runs_btn = QPushButton("…")
        runs.addWidget(self.runs_edit, 1)
        runs.addWidget(self.runs_btn)
        fix_form.addRow("Runs folder", runs)
        self.finetune_btn = QPushButton("Fine-tune on this volume")
        self.finetune_btn.setToolTip("Train the current model briefly on this image + the corrected labels, "
                                     "then segment again with the result")
        fix_form.addRow(self.finetune_btn)

    def _wire(self) -> None:
        self.segment_btn.clicked.connect(self.segment)
        self.cancel_btn.clicked.connect(self.cancel)
        self.model_file_btn.clicked.connect(lambda: self._browse_model("file"))
        self.model_dir_btn.clicked.connect(lambda: self._browse_model("folder"))
        self.save_btn.clicked.connect(self.save_labels)
        self.finetune_btn.clicked.connect(self.fine_tune)
        self.runs_btn.clicked.connect(self._browse_runs)
        self.runs_edit.editingFinished.connect(self._runs_edited)
        self.labels_combo.currentIndexChanged.connect(self._watch_labels)
        self.registry.changed.connect(self.refresh_models)
        self.model_combo.activated.connect(self._model_picked)
        self.image_combo.currentIndexChanged.connect(self.fit_model)
        self.refresh_models()
        self.fit_model()
        self._watch_labels()

    # ------------------------------------------------------------------------------------------
    # model list
    def refresh_models(self) -> None:
        """Bundled models, then runs from the registry, then files/folders picked from disk."""
        from ..bundled import list_bundled_models

        current = self.model_combo.currentData()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for name in list_bundled_models():
            self.model_combo.addItem(f"bundled: {name}", name)
        for run in self.registry.runs():
            self.model_combo.addItem(f"run: {run.label}", str(run.path))
            self.model_combo.setItemData(self.model_combo.count() - 1, str(run.path), Qt.ItemDataRole.ToolTipRole)
        known = {self.model_combo.itemData(i) for i in range(self.model_combo.count())}
        for path in self._custom_models:
            if path not in known:
                self.model_combo.addItem(f"file: {Path(path).name}", path)
                self.model_combo.setItemData(self.model_combo.count() - 1, path, Qt.ItemDataRole.ToolTipRole)
        if current is not None:
            index = self.model_combo.findData(current)
            if index >= 0:
                self.model_combo.setCurrentIndex(index)
        self.model_combo.blockSignals(False)

    def add_model(self, spec: str | Path, select: bool = True) -> None:
        """Add a model file or run folder to the list (and select it)."""
        spec = str(Path(spec).resolve())
        if spec not in self._custom_models:
            self._custom_models.insert(0, spec)
        self.refresh_models()
        if select:
            self.select_model(spec)

    def select_model(self, spec: str | Path) -> bool:
        """Choose a model as the user would: it then stays chosen when the image changes."""
        for candidate in (str(spec), str(Path(spec).resolve())):
            index = self.model_combo.findData(candidate)
            if index >= 0:
                self.model_combo.setCurrentIndex(index)
                self._model_by_hand = True
                return True
        return False

    def _model_picked(self, *_: Any) -> None:
        self._model_by_hand = True

    def fit_model(self, *_: Any) -> str | None:
        """Select the bundled model that fits the chosen image (core ``best_bundled_model``: the
        model cards' intended input against cheap scan statistics), unless the user picked a model.
        Returns the bundled model's name, or None when nothing was changed."""
        from ..bundled import best_bundled_model, bundled_model

        layer = self.image_combo.layer()
        if self._model_by_hand or layer is None:
            return None
        try:
            name = best_bundled_model(layer_to_volume(layer, check=False))
        except (InputError, ValueError):  # not a 3D volume: Segment will say so
            return None
        index = self.model_combo.findData(name)
        if index < 0:
            return None
        self.model_combo.setCurrentIndex(index)
        intended = bundled_model(name).intended
        expects = f": it expects {intended.summary()}" if intended is not None else ""
        self.status_label.setText(f"Model {name} chosen for {layer.name}{expects}")
        return name

    def model_spec(self) -> str | None:
        return self.model_combo.currentData()

    def _browse_model(self, kind: str) -> None:
        path = self.ask_open_path(kind, str(self.registry.runs_root))
        if path:
            self.add_model(path)

    def _browse_runs(self) -> None:
        path = self.ask_open_path("folder", self.runs_edit.text())
        if path:
            self.runs_edit.setText(path)
            self._runs_edited()

    def _runs_edited(self) -> None:
        text = self.runs_edit.text().strip()
        if text and Path(text).expanduser() != self.registry.runs_root:
            self.registry.runs_root = text

    def inference_config(self):
        from ..config import InferenceConfig

        return InferenceConfig(overlap=float(self.overlap_spin.value()), tta=self.tta_check.isChecked(),
                               precision=self.precision_combo.currentText(), device=self.device_combo.currentText(),
                               accelerate=self.accelerate_check.isChecked())

    def _predictor(self, spec: str | None, config: Any):
        """Load (or reuse) the Predictor for ``spec`` — called in the worker thread."""
        from ..inference.predictor import Predictor

        stamp = None
        if spec is not None and Path(spec).exists():
            try:
                stamp = model_file_for(spec).stat().st_mtime_ns
            except (InputError, OSError):
                stamp = None
        key = (spec, json.dumps(config.to_dict(), sort_keys=True), stamp)
        with self._predictor_lock:
            predictor = self._predictors.get(key)
            if predictor is None:
                predictor = Predictor.from_any(spec, config=config)
                self._predictors = {key: predictor}  # keep one model in memory
            return predictor

    # ------------------------------------------------------------------------------------------
    # segmentation
    def segment(self, *, mode: str | None = None) -> Job | None:
        """Start segmenting the chosen image; the result layer appears when the worker is done."""
        if self.refuse_if_busy("napari-e2enet: a job is already running"):
            return None
        image_layer = self.image_combo.layer()
        if image_layer is None:
            show_error("napari-e2enet: choose an image layer to segment")
            return None
        try:
            volume = layer_to_volume(image_layer)
        except InputError as err:
            show_error(str(err))
            return None
        spec = self.model_spec()
        config = self.inference_config()
        intensity_offset = "auto" if self.ct_offset_check.isChecked() else None
        mode = mode or self.existing_combo.currentData()
        image_name = image_layer.name

        def run(stop: threading.Event) -> Iterator[Any]:
            predictor = self._predictor(spec, config)
            yield ("model", predictor.describe())
            yield from predictor.iter_predict(volume, stop=stop, intensity_offset=intensity_offset)

        self._pending = None
        self._job_kind = "segment"
        self.status_label.setText(f"Segmenting {image_name}…")
        self.progress_bar.setRange(0, 0)
        self.job = Job(run, on_event=self._on_predict_event,
                       on_done=lambda job: self._on_segment_done(job, image_name, mode),
                       description=f"Segmenting {image_name} (tiles)")
        self._set_busy(True)
        return self.job

    def _on_predict_event(self, event: Any) -> None:
        from ..inference.predictor import InputWarning, Prediction, PredictProgress

        if isinstance(event, InputWarning):
            show_warning(f"napari-e2enet: {event.message}")
        elif isinstance(event, PredictProgress):
            self.progress_bar.setRange(0, int(event.total))
            self.progress_bar.setValue(int(event.done))
            if self.job is not None:
                self.job.set_progress(event.done, event.total)
        elif isinstance(event, Prediction):
            self._pending = event
        elif isinstance(event, tuple) and event and event[0] == "model":
            info = event[1]
            self.status_label.setText(f"Model {Path(info.get('source', '')).parent.name or info.get('source')} on "
                                      f"{info.get('device')}; {len(info.get('classes', {}))} classes; "
                                      f"backend {info.get('backend')} ({info.get('backend_reason')})")

    def _on_segment_done(self, job: Job, image_name: str, mode: str) -> None:
        prediction, self._pending = self._pending, None
        self._set_busy(False)
        if job.error is not None:
            self.status_label.setText("Segmentation failed.")
            show_error(error_message(job.error))
            return
        if job.cancelled or prediction is None:
            self.status_label.setText("Segmentation cancelled; nothing was added.")
            show_info("napari-e2enet: segmentation cancelled")
            return
        if image_name not in self.viewer.layers:
            self.status_label.setText(f"Image {image_name!r} was closed; result discarded.")
            return
        layer = self._put_result(self.viewer.layers[image_name], prediction, mode)
        self._warm_up_finetune()
        ran = f" ({prediction.backend} {prediction.precision}: {prediction.backend_reason})" if prediction.backend else ""
        self.status_label.setText(f"{layer.name}: {prediction.tiles} tiles in {prediction.seconds:.1f} s on "
                                  f"{prediction.device}{ran}")

    def _warm_up_finetune(self) -> None:
        """Once: load what a fine-tune's first step needs in a background thread while the user looks
        at the result and paints corrections, so that Fine-tune starts within seconds of its click."""
        if not self._warmed_up:
            self._warmed_up = True
            threading.Thread(target=warm_up_finetune, name="napari-e2enet warm-up", daemon=True).start()

    # ------------------------------------------------------------------------------------------
    # result layers
    def result_layers(self, image_layer: Any) -> list[Labels]:
        """Labels layers made by this plugin from ``image_layer`` (oldest first)."""
        out = []
        for layer in self.viewer.layers:
            meta = layer.metadata.get(META_KEY, {}) if isinstance(layer, Labels) else {}
            if meta.get("result_of") == str(image_layer.unique_id):
                out.append(layer)
        return out

    @staticmethod
    def is_edited(layer: Any) -> bool:
        """True if the layer's voxels differ from the prediction it was last given (:mod:`.edits`)."""
        return edits.is_edited(layer)

    def _put_result(self, image_layer: Any, prediction: Any, mode: str) -> Labels:
        table: LabelTable = prediction.label_table
        display = geometry_of(image_layer).to_display(np.asarray(prediction.labels.array))
        existing = self.result_layers(image_layer)
        target = existing[-1] if existing else None
        edited = target is not None and self.is_edited(target)
        action = edits.result_action(
            mode, target is not None, edited,
            lambda: self.confirm(f"Labels layer {target.name!r} has been edited. Replace it with the new "
                                 "segmentation (your corrections will be lost)?"))
        if mode == "auto" and edited:
            show_info(f"napari-e2enet: {target.name!r} has edits; the new result goes to a new layer")
        if action == "new":
            name = f"{image_layer.name} labels"
            kwargs = labels_layer_kwargs(image_layer, table, name=name)
            kwargs["metadata"][META_KEY].update({"result_of": str(image_layer.unique_id),
                                                 "model": prediction.labels.name})
            layer = self.viewer.add_labels(display, **kwargs)
            edits.remember_prediction(layer, display)
        else:
            # into the existing layer as ONE step of napari's undo (Ctrl-Z brings the old labels back)
            layer = target
            edits.put_result(layer, display, action)
            meta = dict(layer.metadata)
            meta[META_KEY] = {**meta.get(META_KEY, {}), "label_table": table.to_dict(),
                              "model": prediction.labels.name}
            layer.metadata = meta
        self.labels_combo.refresh()
        self.labels_combo.set_layer(layer)
        self.viewer.layers.selection.active = layer
        self.update_volumes()
        return layer

    # ------------------------------------------------------------------------------------------
    # organ volumes
    def _watch_labels(self, *_: Any) -> None:
        layer = self.labels_combo.layer()
        if self._watched is not None and self._watched is not layer:
            try:
                self._watched.events.paint.disconnect(self._schedule_volumes)
                self._watched.events.data.disconnect(self._schedule_volumes)
            except (TypeError, ValueError, RuntimeError):
                pass
            self._watched = None
        if layer is not None and self._watched is None:
            layer.events.paint.connect(self._schedule_volumes)
            layer.events.data.connect(self._schedule_volumes)
            self._watched = layer
        self.update_volumes()

    def _schedule_volumes(self, *_: Any) -> None:
        self._volume_timer.start()

    def update_volumes(self) -> dict[str, float]:
        """Refill the per-label list (core ``label_rows`` / ``volumes_ml``, mL) for the chosen labels layer."""
        self.volumes_table.show_layer(self.labels_combo.layer())
        return self.volumes_table.volumes()

    def _label_selected(self, label_id: int) -> None:
        layer = self.labels_combo.layer()
        if layer is not None:
            self.viewer.layers.selection.active = layer

    # ------------------------------------------------------------------------------------------
    # saving
    def _labels_and_image(self) -> tuple[Any, Any]:
        labels = self.labels_combo.layer()
        if labels is None:
            raise InputError("choose a labels layer first")
        image = self.image_combo.layer()
        if image is not None:
            check_same_grid(image, labels)
        return labels, image

    def save_labels(self) -> Path | None:
        """Write the chosen labels layer as NIfTI on the image's source geometry (asks before overwriting)."""
        from ..data.io import write_volume

        try:
            labels, image = self._labels_and_image()
            labels_volume = layer_to_volume(labels)
            like = layer_to_volume(image) if image is not None else None
        except InputError as err:
            show_error(str(err))
            return None
        folder = save_start_folder(*((layer.metadata.get(META_KEY, {}) or {}).get(key) for layer in
                                     (image, labels) if layer is not None for key in ("saved_to", "source")))
        stem = image.name if image is not None else labels.name
        default = folder / f"{stem.replace(' ', '_')}_labels.nii.gz"
        answer = self.ask_save_path(str(default))
        if not answer:
            return None
        path = Path(answer)
        if not path.name.lower().endswith((".nii", ".nii.gz")):
            path = path.with_name(path.name + ".nii.gz")
        if path.exists() and not self.confirm(f"{path} already exists. Overwrite it?"):
            return None
        try:
            write_volume(labels_volume, path, like=like)
        except InputError as err:
            show_error(str(err))
            return None
        meta = dict(labels.metadata)
        meta[META_KEY] = {**meta.get(META_KEY, {}), "saved_to": str(path)}
        labels.metadata = meta
        show_info(f"napari-e2enet: saved {path}")
        self.status_label.setText(f"Saved {path.name}")
        return path

    # ------------------------------------------------------------------------------------------
    # fine-tuning
    def fine_tune(self) -> Job | None:
        """Fine-tune the current model on the slices the user corrected (``training.finetune``: the
        edited planes only, encoder frozen, no validation), then segment again with the result."""
        from ..training.isolated import finetune_events, iter_in_subprocess

        if self.refuse_if_busy("napari-e2enet: a job is already running"):
            return None
        try:
            labels, image = self._labels_and_image()
            if image is None:
                raise InputError("choose the image the labels belong to")
            model_file = model_file_for(self.model_spec())
            image_volume = layer_to_volume(image)
            labels_volume = layer_to_volume(labels)
            changed = edits.edited_mask(labels)
            edited = None
            if changed is not None:  # a Segment result: learn from what the user changed
                if not changed.any():
                    raise InputError("no corrections yet: paint or erase labels on a few slices, then fine-tune")
                edited = layer_to_volume(labels, data=changed.astype(np.uint8)).array.astype(bool)
            config = FinetuneConfig(iterations=int(self.finetune_iters.value()), lr=float(self.finetune_lr.value()),
                                    device=self.device_combo.currentText())
        except (InputError, KeyError, ValueError) as err:
            show_error(error_message(err))
            return None
        self._runs_edited()
        run_dir = self.registry.new_run_dir(f"finetune-{image.name}")
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            show_error(f"{run_dir.parent}: cannot create the runs folder ({exc.strerror or exc})")
            return None
        self._finetune_run = run_dir
        image_name = image.name
        intensity_offset = "auto" if self.ct_offset_check.isChecked() else None  # learn from what was segmented

        def run(stop: threading.Event) -> Iterator[Any]:
            # in a child process, as the Train widget's runs (training.isolated says why)
            yield from iter_in_subprocess(finetune_events, model_file, image_volume, labels_volume, run_dir,
                                          edited=edited, config=config, intensity_offset=intensity_offset,
                                          stop=stop)

        self._job_kind = "finetune"
        self.status_label.setText(f"Fine-tuning on the corrected slices of {image_name} → {run_dir}")
        self.progress_bar.setRange(0, config.iterations)
        self.progress_bar.setValue(0)
        self.job = Job(run, on_event=self._on_train_event,
                       on_done=lambda job: self._on_finetune_done(job, run_dir, image_name),
                       description=f"Fine-tuning on {image_name} (iterations)", total=config.iterations)
        self._set_busy(True)
        return self.job

    def _on_train_event(self, event: Any) -> None:
        kind = getattr(event, "kind", "")
        if kind == "iteration":
            self.progress_bar.setRange(0, int(event.total))
            self.progress_bar.setValue(int(event.iteration))
            if self.job is not None:
                self.job.set_progress(event.iteration, event.total)
            self.status_label.setText(f"Fine-tuning: iteration {event.iteration}/{event.total}, "
                                      f"loss {event.loss:.3f}")
        elif kind == "start" and getattr(event, "message", ""):
            self.status_label.setText(f"Fine-tuning: {event.message}")
        if self._finetune_run is not None:
            self.registry.training_event.emit(self._finetune_run, event)

    def _on_finetune_done(self, job: Job, run_dir: Path, image_name: str) -> None:
        self._set_busy(False)
        self._finetune_run = None
        if job.error is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
            self.status_label.setText("Fine-tuning failed.")
            show_error(error_message(job.error))
            return
        if job.cancelled:
            # the folder was created by this job a moment ago: a cancelled fine-tune leaves no trace
            shutil.rmtree(run_dir, ignore_errors=True)
            self.status_label.setText("Fine-tuning cancelled; nothing was kept.")
            show_info("napari-e2enet: fine-tuning cancelled")
            return
        if not holds_model(run_dir):
            show_error(f"{run_dir}: fine-tuning finished without writing a model")
            return
        self.registry.add(run_dir, label=run_dir.name, kind="finetune")
        self.select_model(run_dir)
        show_info(f"napari-e2enet: fine-tuned model saved in {run_dir}; segmenting again")
        if image_name in self.viewer.layers:
            self.image_combo.set_layer(self.viewer.layers[image_name])
            self.segment(mode="auto")

    # ------------------------------------------------------------------------------------------
    def _cancelling(self) -> None:
        self.status_label.setText("Cancelling…")
        self.cancel_btn.setEnabled(False)

    def _set_busy(self, busy: bool) -> None:
        for w in (self.segment_btn, self.finetune_btn, self.save_btn, self.model_file_btn, self.model_dir_btn):
            w.setEnabled(not busy)
        self.cancel_btn.setEnabled(busy)
        if not busy:
            self.progress_bar.setRange(0, max(self.progress_bar.maximum(), 1))
