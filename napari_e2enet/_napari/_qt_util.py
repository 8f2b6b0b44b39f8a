"""Small Qt helpers shared by the widgets: layer pickers, dialogs that tests can replace, the
scrolling dock body, where Save dialogs start."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFrame,
    QLabel,
    QMessageBox,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

#: The least height a docked widget asks for: its title and a few rows; the rest scrolls.
DOCK_MIN_HEIGHT = 120


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


class LabelsCombo(LayerCombo):
    """A Labels-layer picker that follows an image picker: it shows a Labels layer of the chosen
    image (a Segment result of it, or any Labels layer on its voxel grid), never one of another
    image just because that one was added or clicked last.

    When the image changes: the current Labels layer stays if it fits the new image, else the
    newest Segment result of the image, else the last fitting Labels layer, else none (""). A
    Labels layer that is added or activated is followed only if it fits the chosen image.
    """

    def __init__(self, viewer: Any, image_combo: LayerCombo, parent: QWidget | None = None) -> None:
        from napari.layers import Labels

        self.image_combo = image_combo
        super().__init__(viewer, Labels, parent, allow_none=True)
        image_combo.currentIndexChanged.connect(self.follow_image)
        self.follow_image()

    def fits(self, layer: Any) -> bool:
        """True if ``layer`` belongs to the chosen image (made from it, or on its voxel grid)."""
        from ..errors import InputError
        from .layers import META_KEY, check_same_grid

        image = self.image_combo.layer()
        if image is None or not isinstance(layer, self.layer_type):
            return image is None and isinstance(layer, self.layer_type)
        if (layer.metadata.get(META_KEY) or {}).get("result_of") == str(image.unique_id):
            return True
        try:
            check_same_grid(image, layer)
        except (InputError, ValueError, TypeError):
            return False
        return True

    def _on_inserted(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            layer.events.name.connect(self.refresh)
        self.refresh()
        if layer is not None and self.fits(layer):
            self.set_layer(layer)

    def _on_active(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if isinstance(active, self.layer_type) and self.fits(active):
            self.set_layer(active)

    def refresh(self, event: Any = None) -> None:
        before = self.currentText()
        super().refresh(event)
        if before and self.currentText() != before:  # the chosen layer was removed or renamed away
            self.follow_image()

    def follow_image(self, *_: Any) -> None:
        from .layers import META_KEY

        current = self.layer()
        if current is not None and self.fits(current):
            return
        image = self.image_combo.layer()
        candidates = [layer for layer in self.viewer.layers if isinstance(layer, self.layer_type) and self.fits(layer)]
        results = [layer for layer in candidates if image is not None
                   and (layer.metadata.get(META_KEY) or {}).get("result_of") == str(image.unique_id)]
        choice = (results or candidates or [None])[-1]
        if choice is None:
            self.setCurrentIndex(0)  # the empty entry
        else:
            self.set_layer(choice)


class DockScrollArea(QScrollArea):
    """A vertical scroll area for a dock widget's content: as wide as the content needs, as short
    as :data:`DOCK_MIN_HEIGHT` (the content scrolls), and as tall as the content by preference."""

    def _extra_width(self) -> int:
        return self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:
        inner = self.widget()
        width = inner.minimumSizeHint().width() if inner is not None else 0
        return QSize(width + self._extra_width(), DOCK_MIN_HEIGHT)

    def sizeHint(self) -> QSize:
        inner = self.widget()
        if inner is None:
            return super().sizeHint()
        hint = inner.sizeHint()
        return QSize(hint.width() + self._extra_width(), hint.height() + 2 * self.frameWidth())


def scroll_layout(widget: QWidget) -> QVBoxLayout:
    """Put a :class:`DockScrollArea` into ``widget`` and return the layout of its content.

    Docked side by side or one above the other, the plugin's widgets then fit a 1366×768 screen:
    each asks for little height and scrolls, instead of forcing napari's window taller than the
    screen."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = DockScrollArea(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    body = QWidget(area)
    area.setWidget(body)
    outer.addWidget(area)
    widget.scroll_area = area  # type: ignore[attr-defined]
    return QVBoxLayout(body)


def package_folders() -> list[Path]:
    """The installed package's folder (and, in a source checkout, the resources it links to)."""
    import napari_e2enet

    root = Path(napari_e2enet.__file__).parent
    return sorted({root.resolve(), (root / "resources").resolve()})


def save_start_folder(*candidates: Any) -> Path:
    """Where a Save dialog starts: the folder holding the first candidate (a source file, or a
    DICOM series folder, or a file saved before) that exists and lies outside the package, else
    the home folder. Never inside the package (a pip user's site-packages, or the bundled models'
    folder)."""
    inside = package_folders()
    for candidate in candidates:
        if not candidate:
            continue
        folder = Path(candidate).expanduser().parent
        try:
            resolved = folder.resolve()
        except OSError:
            continue
        if not resolved.is_dir() or not folder.is_absolute():
            continue
        if any(resolved == p or resolved.is_relative_to(p) for p in inside):
            continue
        return folder
    return Path.home()


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
