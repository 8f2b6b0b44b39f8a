"""Connectivity widget: what DSFF learned, from a run, a checkpoint folder, a bundled model, or live.

Reads ``connectivity.json`` (core ``ConnectivityRecord``) and draws, with the Qt-free functions
of :mod:`napari_e2enet.plots`: (a) per fused node the forward / up / down shares as stacked bars,
with an epoch slider; (b) the fusion graph (levels × stages), edge width ∝ share (active-kernel
count or L1 mass); (c) topology updates over training (kernels pruned / regrown, loss). Export PNG
(the same three panels) and CSV (one row per entry × node × direction).

"Follow live training" reloads the record whenever the Train widget (or a fine-tune from the
Segment widget) of the same viewer writes a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QWidget,
)

from ..errors import InputError
from ..modelcard import CONNECTIVITY_FILE as RECORD_FILE
from ..plots import connectivity_figure, entry_label, save_figure_png, snapshots, write_connectivity_csv
from ._qt_util import open_path_dialog, save_path_dialog, save_start_folder, scroll_layout
from .runs import RunRegistry, registry_for


def find_record(path: str | Path) -> Path:
    """``connectivity.json`` itself, or the one inside a run / checkpoint / bundled-model folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / RECORD_FILE
        if not candidate.is_file():
            raise InputError(f"no {RECORD_FILE} in this folder (not a run, checkpoint or model folder)", path)
        return candidate
    if not path.is_file():
        raise InputError("no such file or folder", path)
    return path


class ConnectivityWidget(QWidget):
    """Dock widget: choose a run → slider over epochs → three connectivity panels; export."""

    def __init__(self, napari_viewer: Any, registry: RunRegistry | None = None, parent: QWidget | None = None
                 ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.registry = registry if registry is not None else registry_for(napari_viewer)
        self.record: Any = None
        self.record_path: Path | None = None
        self.ask_open_path = open_path_dialog(self)
        self.ask_png_path = save_path_dialog(self, "Export PNG", "PNG image (*.png)")
        self.ask_csv_path = save_path_dialog(self, "Export CSV", "CSV table (*.csv)")

        layout = scroll_layout(self)
        form = QFormLayout()
        source = QHBoxLayout()
        self.source_combo = QComboBox()
        self.source_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.source_combo.setMinimumContentsLength(14)
        self.folder_btn = QPushButton("Folder…")
        self.file_btn = QPushButton("File…")
        source.addWidget(self.source_combo, 1)
        source.addWidget(self.folder_btn)
        source.addWidget(self.file_btn)
        form.addRow("Run", source)
        self.live_check = QCheckBox("follow live training in this viewer")
        self.live_check.setChecked(True)
        form.addRow("Live", self.live_check)
        self.measure_combo = QComboBox()
        self.measure_combo.addItem("active kernels", "active")
        self.measure_combo.addItem("kernel L1 mass", "l1")
        form.addRow("Edge width / share", self.measure_combo)
        slider_row = QHBoxLayout()
        self.epoch_slider = QSlider(Qt.Orientation.Horizontal)
        self.epoch_slider.setRange(0, 0)
        self.epoch_label = QLabel("—")
        self.epoch_label.setMinimumWidth(150)
        slider_row.addWidget(self.epoch_slider, 1)
        slider_row.addWidget(self.epoch_label)
        form.addRow("Epoch", slider_row)
        layout.addLayout(form)

        self.figure = Figure(figsize=(5.0, 7.0), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(560)
        layout.addWidget(self.canvas, 1)

        buttons = QHBoxLayout()
        self.png_btn = QPushButton("Export PNG…")
        self.csv_btn = QPushButton("Export CSV…")
        buttons.addWidget(self.png_btn)
        buttons.addWidget(self.csv_btn)
        layout.addLayout(buttons)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)

        self.refresh_sources()
        self.source_combo.activated.connect(self._source_chosen)
        self.folder_btn.clicked.connect(lambda: self._browse("folder"))
        self.file_btn.clicked.connect(lambda: self._browse("file"))
        self.measure_combo.currentIndexChanged.connect(self.redraw)
        self.epoch_slider.valueChanged.connect(self.redraw)
        self.png_btn.clicked.connect(self.export_png)
        self.csv_btn.clicked.connect(self.export_csv)
        self.registry.changed.connect(self.refresh_sources)
        self.registry.training_event.connect(self._on_training_event)
        self.redraw()

    # ------------------------------------------------------------------------------------------
    def refresh_sources(self) -> None:
        """Runs of this viewer (registry) and bundled model folders that carry a record."""
        from ..bundled import bundled_model, list_bundled_models

        current = self.source_combo.currentData()
        self.source_combo.blockSignals(True)
        self.source_combo.clear()
        self.source_combo.addItem("", None)
        for run in self.registry.runs():
            if (run.path / RECORD_FILE).is_file():
                self.source_combo.addItem(f"run: {run.label}", str(run.path))
        for name in list_bundled_models():
            try:
                folder = bundled_model(name).folder
            except InputError:
                continue
            if (folder / RECORD_FILE).is_file():
                self.source_combo.addItem(f"bundled: {name}", str(folder))
        if self.record_path is not None and self.source_combo.findData(str(self.record_path.parent)) < 0:
            self.source_combo.addItem(f"file: {self.record_path.parent.name}", str(self.record_path.parent))
        index = self.source_combo.findData(current)
        self.source_combo.setCurrentIndex(max(index, 0))
        self.source_combo.blockSignals(False)

    def _source_chosen(self, index: int) -> None:
        path = self.source_combo.itemData(index)
        if path:
            self.load(path)

    def _browse(self, kind: str) -> None:
        path = self.ask_open_path(kind, str(self.registry.runs_root))
        if path:
            self.load(path)

    def load(self, path: str | Path, *, keep_position: bool = False) -> bool:
        """Read a record (file or folder); InputError → notification, the old plots stay."""
        from ..sparse import ConnectivityRecord

        try:
            record_path = find_record(path)
            record = ConnectivityRecord.from_json(record_path)
        except InputError as err:
            show_error(str(err))
            return False
        at_end = self.epoch_slider.value() == self.epoch_slider.maximum()
        self.record, self.record_path = record, record_path
        n = len(snapshots(record))
        self.epoch_slider.blockSignals(True)
        self.epoch_slider.setRange(0, max(n - 1, 0))
        if not keep_position or at_end:
            self.epoch_slider.setValue(max(n - 1, 0))
        self.epoch_slider.blockSignals(False)
        self.refresh_sources()
        index = self.source_combo.findData(str(record_path.parent))
        if index >= 0:
            self.source_combo.setCurrentIndex(index)
        updates = sum(1 for e in record.entries if e.get("kind") == "update")
        self.status_label.setText(f"{record_path}: {len(record.nodes)} fused nodes, {n} snapshots, "
                                  f"{updates} topology updates")
        self.redraw()
        return True

    def _on_training_event(self, run_dir: Any, event: Any) -> None:
        if not self.live_check.isChecked():
            return
        if getattr(event, "kind", "") in ("checkpoint", "done", "stopped"):
            record = Path(run_dir) / RECORD_FILE
            if record.is_file():
                self.load(run_dir, keep_position=True)

    # ------------------------------------------------------------------------------------------
    def measure(self) -> str:
        return self.measure_combo.currentData()

    def redraw(self, *_: Any) -> None:
        if self.record is None:
            self.figure.clear()
            ax = self.figure.add_subplot(1, 1, 1)
            ax.text(0.5, 0.5, "Choose a run, checkpoint or model folder\n(one with connectivity.json)",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            self.epoch_label.setText("—")
        else:
            entries = snapshots(self.record)
            index = min(self.epoch_slider.value(), max(len(entries) - 1, 0))
            self.epoch_label.setText(entry_label(entries[index]) if entries else "—")
            connectivity_figure(self.record, index, self.measure(), figure=self.figure)
        self.canvas.draw_idle()

    def export_png(self) -> Path | None:
        if self.record is None:
            show_error("napari-e2enet: load a connectivity record first")
            return None
        default = save_start_folder(self.record_path) / "connectivity.png"  # never inside the package
        answer = self.ask_png_path(str(default))
        if not answer:
            return None
        path = Path(answer)
        if path.suffix.lower() != ".png":
            path = path.with_name(path.name + ".png")
        entries = snapshots(self.record)
        index = min(self.epoch_slider.value(), max(len(entries) - 1, 0))
        try:
            save_figure_png(connectivity_figure(self.record, index, self.measure()), path)
        except InputError as err:
            show_error(str(err))
            return None
        show_info(f"napari-e2enet: saved {path}")
        return path

    def export_csv(self) -> Path | None:
        if self.record is None:
            show_error("napari-e2enet: load a connectivity record first")
            return None
        default = save_start_folder(self.record_path) / "connectivity.csv"  # never inside the package
        answer = self.ask_csv_path(str(default))
        if not answer:
            return None
        path = Path(answer)
        if path.suffix.lower() != ".csv":
            path = path.with_name(path.name + ".csv")
        try:
            write_connectivity_csv(self.record, path)
        except InputError as err:
            show_error(str(err))
            return None
        show_info(f"napari-e2enet: saved {path}")
        return path
