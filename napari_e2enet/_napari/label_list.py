"""The per-label list of a Labels layer: show/hide, colour, name, volume (mL); click to paint with it.

The numbers come from the core (:func:`napari_e2enet.labels.label_rows`, i.e. ``volumes_ml`` on the
layer's source grid); this module only shows them. Hiding a label makes it transparent in the
layer's colormap (a ``DirectLabelColormap``; the colours it had are kept in the layer's plugin
metadata, so showing it again restores them). Clicking a row's name or volume makes that label the
layer's selected label (what napari's brush and fill paint with) and the layer the active one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem, QWidget

from ..errors import InputError
from ..labels import RGBA, LabelRow, LabelTable, label_rows
from .layers import META_KEY, layer_to_volume

__all__ = ["HIDDEN_KEY", "NAME_COLUMN", "VISIBLE_COLUMN", "VOLUME_COLUMN", "LabelList", "hidden_labels",
           "layer_rows", "set_label_visible"]

VISIBLE_COLUMN, NAME_COLUMN, VOLUME_COLUMN = 0, 1, 2
HIDDEN_KEY = "hidden_labels"
SHOWN_COLORS_KEY = "shown_colors"
_TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
_UNKNOWN = (0.5, 0.5, 0.5, 1.0)  # ids a frozen colormap does not know (as layers.label_colormap)


def _plugin_meta(layer: Any) -> dict[str, Any]:
    value = (getattr(layer, "metadata", None) or {}).get(META_KEY)
    return value if isinstance(value, dict) else {}


def _set_plugin_meta(layer: Any, **changes: Any) -> None:
    meta = dict(layer.metadata)
    meta[META_KEY] = {**_plugin_meta(layer), **changes}
    layer.metadata = meta


def layer_table(layer: Any) -> LabelTable | None:
    table = _plugin_meta(layer).get("label_table")
    try:
        return LabelTable.from_dict(table) if table else None
    except ValueError:
        return None


def layer_rows(layer: Any) -> list[LabelRow]:
    """One row per structure of a Labels layer (core ``label_rows`` on its source grid); [] when
    the layer is not an integer 3D volume."""
    try:
        volume = layer_to_volume(layer, check=False)
    except InputError:
        return []
    array = np.asarray(volume.array)
    if array.dtype.kind not in "iu" or array.ndim != 3:
        return []
    return label_rows(array, volume.spacing, layer_table(layer))


def hidden_labels(layer: Any) -> set[int]:
    return {int(i) for i in _plugin_meta(layer).get(HIDDEN_KEY, ())}


def _shown_colors(layer: Any) -> dict[int | None, RGBA]:
    """The colours the layer shows with nothing hidden (kept in metadata once anything is hidden)."""
    from napari.utils.colormaps import DirectLabelColormap

    stored = _plugin_meta(layer).get(SHOWN_COLORS_KEY)
    if stored is not None:
        return dict(stored)
    cmap = layer.colormap
    if isinstance(cmap, DirectLabelColormap):
        colors: dict[int | None, RGBA] = {}
        for key, value in cmap.color_dict.items():
            colors[None if key is None else int(key)] = tuple(float(c) for c in np.asarray(value).ravel()[:4])
        colors.setdefault(None, tuple(float(c) for c in np.asarray(cmap.default_color).ravel()[:4]))
        return colors
    # napari's cyclic colormap: freeze the colours of the ids present now
    ids = [int(i) for i in np.unique(np.asarray(layer.data))]
    colors = {i: tuple(float(c) for c in np.asarray(cmap.map(np.array([i]))).reshape(-1, 4)[0]) for i in ids}
    colors[None] = _UNKNOWN
    return colors


def set_label_visible(layer: Any, label_id: int, visible: bool) -> None:
    """Show or hide one label of a Labels layer (transparent in its colormap; colours restored on show)."""
    from napari.utils.colormaps import DirectLabelColormap

    shown = _shown_colors(layer)
    hidden = hidden_labels(layer)
    if visible:
        hidden.discard(int(label_id))
    else:
        hidden.add(int(label_id))
    colors = {key: (_TRANSPARENT if key in hidden else value) for key, value in shown.items()}
    for label in hidden:
        colors[label] = _TRANSPARENT
    colors[0] = _TRANSPARENT
    _set_plugin_meta(layer, **{HIDDEN_KEY: sorted(hidden), SHOWN_COLORS_KEY: shown})
    layer.colormap = DirectLabelColormap(color_dict=colors)


def _swatch(color: RGBA) -> QIcon:
    pixmap = QPixmap(14, 14)
    r, g, b = (round(255 * float(c)) for c in color[:3])
    pixmap.fill(QColor(r, g, b))
    return QIcon(pixmap)


class LabelList(QTableWidget):
    """Rows: [show] [colour swatch + name] [volume mL]. ``label_selected(id)`` after a click."""

    label_selected = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, 3, parent)
        self.setHorizontalHeaderLabels(["show", "structure", "volume (mL)"])
        header = self.horizontalHeader()
        header.setSectionResizeMode(VISIBLE_COLUMN, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(NAME_COLUMN, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(VOLUME_COLUMN, QHeaderView.ResizeMode.ResizeToContents)
        self.verticalHeader().setVisible(False)
        self.verticalHeader().setDefaultSectionSize(22)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setToolTip("Untick to hide a structure; click a structure to paint with its label")
        # about five rows visible; more scroll (the dock scrolls too)
        self.setMinimumHeight(self.horizontalHeader().sizeHint().height() + 5 * 22 + 4)
        self.layer: Any = None
        self.rows: list[LabelRow] = []
        self._filling = False
        self.itemChanged.connect(self._item_changed)
        self.cellClicked.connect(self._cell_clicked)

    def show_layer(self, layer: Any) -> list[LabelRow]:
        """Fill the list from ``layer`` (None empties it); returns the rows."""
        self.layer = layer
        self.rows = layer_rows(layer) if layer is not None else []
        hidden = hidden_labels(layer) if layer is not None else set()
        selected = int(getattr(layer, "selected_label", -1)) if layer is not None else -1
        self._filling = True
        try:
            self.setRowCount(len(self.rows))
            for row, item in enumerate(self.rows):
                check = QTableWidgetItem()
                check.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
                check.setCheckState(Qt.CheckState.Unchecked if item.id in hidden else Qt.CheckState.Checked)
                check.setData(Qt.ItemDataRole.UserRole, item.id)
                self.setItem(row, VISIBLE_COLUMN, check)
                name = QTableWidgetItem(_swatch(item.color), item.name)
                name.setToolTip(f"label {item.id}: {item.name}")
                self.setItem(row, NAME_COLUMN, name)
                volume = QTableWidgetItem(f"{item.ml:.2f}")
                volume.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(row, VOLUME_COLUMN, volume)
                if item.id == selected:
                    self.selectRow(row)
        finally:
            self._filling = False
        return self.rows

    def volumes(self) -> dict[str, float]:
        return {row.name: row.ml for row in self.rows}

    def _item_changed(self, item: QTableWidgetItem) -> None:
        if self._filling or self.layer is None or item.column() != VISIBLE_COLUMN:
            return
        label_id = int(item.data(Qt.ItemDataRole.UserRole))
        set_label_visible(self.layer, label_id, item.checkState() == Qt.CheckState.Checked)

    def _cell_clicked(self, row: int, column: int) -> None:
        if column == VISIBLE_COLUMN or self.layer is None or not 0 <= row < len(self.rows):
            return
        self.select_label(self.rows[row].id)

    def select_label(self, label_id: int) -> None:
        """Make ``label_id`` the layer's selected label (what the brush paints) and the layer active."""
        if self.layer is None:
            return
        self.layer.selected_label = int(label_id)
        self.label_selected.emit(int(label_id))
