"""Small Qt helpers shared by the widgets: layer pickers, dialogs that tests can replace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog, QLabel, QMessageBox, QWidget


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of one type by name; follows the active layer.

    Holds layer names, not layers (no references that could keep a closed viewer alive).
    """

    def __init__(self, viewer: Any, layer_type: type, parent: QWidget | None = None, *,
                 follow_active: bool = True, allow_none: bool = False) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.layer_type = layer_type
        self.follow_active = follow_active
        self.allow_none = allow_none
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        layers = viewer.layers
        layers.events.inserted.connect(self._on_inserted)
        layers.events.removed.connect(self.refresh)
        layers.events.moved.connect(self.refresh)
        layers.selection.events.active.connect(self._on_active)
        for layer in layers:
            layer.events.name.connect(self.refresh)
        self.refresh()
        self._on_active()

    def _on_inserted(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            layer.events.name.connect(self.refresh)
        self.refresh()
        if layer is not None and isinstance(layer, self.layer_type) and self.follow_active:
            self.set_layer(layer)

    def _on_active(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if self.follow_active and isinstance(active, self.layer_type):
            self.set_layer(active)

    def refresh(self, event: Any = None) -> None:
        current = self.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, self.layer_type)]
        self.blockSignals(True)
        self.clear()
        if self.allow_none:
            self.addItem("")
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        if current not in names:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Any | None:
        name = self.currentText()
        if not name or name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        return layer if isinstance(layer, self.layer_type) else None

    def set_layer(self, layer: Any) -> None:
        index = self.findText(layer.name)
        if index >= 0:
            self.setCurrentIndex(index)


def confirm_dialog(parent: QWidget | None) -> Callable[[str], bool]:
    def ask(question: str) -> bool:
        answer = QMessageBox.question(parent, "napari-e2enet", question,
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    return ask


def save_path_dialog(parent: QWidget | None, caption: str, filters: str) -> Callable[[str], str | None]:
    def ask(default: str) -> str | None:
        path, _ = QFileDialog.getSaveFileName(parent, caption, default, filters,
                                              options=QFileDialog.Option.DontConfirmOverwrite)
        return path or None

    return ask


def open_path_dialog(parent: QWidget | None) -> Callable[[str, str], str | None]:
    """``ask(kind, start)`` with kind "file" (a model file) or "folder" (a run / dataset folder)."""
    def ask(kind: str, start: str = "") -> str | None:
        if kind == "folder":
            path = QFileDialog.getExistingDirectory(parent, "Choose a folder", start)
        else:
            path, _ = QFileDialog.getOpenFileName(parent, "Choose a model file", start,
                                                  "Model files (*.safetensors);;All files (*)")
        return path or None

    return ask


def heading(text: str) -> QLabel:
    label = QLabel(f"<b>{text}</b>")
    label.setTextFormat(Qt.TextFormat.RichText)
    return label
