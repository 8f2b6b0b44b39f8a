"""What the user changed in a Labels layer that Segment made, and how Segment writes into it.

Qt-free (napari layer API only), so the fine-tuning code and tests can use it without a widget.

Edit tracking
-------------
When Segment puts a prediction into a Labels layer it keeps a read-only copy of that prediction
(display order, the layer's own shape) in ``layer.metadata["napari_e2enet"]["prediction"]``.
:func:`edited_mask` is then simply ``layer.data != prediction``: True on every voxel whose label
differs from what the model put there — painted, filled, drawn with the polygon tool, erased
(an erased voxel is 0 where the prediction was not) or written by any other plugin or script.

Why a saved copy and not napari's ``paint`` events: the diff is exact whatever wrote the voxels
(brush, fill, polygon, eraser, ``data_setitem``, ``layer.data[...] = ...``), it stays right after
napari's undo and redo (``Labels.undo`` emits no paint event, so a mask built from events would
still flag undone strokes), and it costs one compare and one copy of the label array (1 byte a
voxel for uint8 labels; napari's own undo history already keeps comparable copies). The one thing
it cannot see is a stroke that leaves a voxel at the value the model gave it (painting a voxel
with its own label, or painting and then erasing a voxel the model left at 0): such a voxel
carries no correction, so treating it as unedited is what fine-tuning on corrections wants.

Writing into an existing layer
------------------------------
:func:`apply_labels` writes a new label array into a layer through napari's public
``Labels.data_setitem`` inside one ``Labels.block_history()``: only the voxels that change are
written, and the whole change is ONE step of napari's undo (Ctrl-Z brings the previous labels
and the user's corrections back).

:func:`fill_unlabelled` is the "fill unlabelled voxels only" rule: a voxel takes the new
prediction only if it is 0 *and* the user did not make it 0 (edited voxels, erased ones
included, stay exactly as the user left them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .layers import META_KEY

__all__ = [
    "PREDICTION_KEY",
    "apply_labels",
    "edited_mask",
    "fill_unlabelled",
    "is_edited",
    "prediction_of",
    "remember_prediction",
]

PREDICTION_KEY = "prediction"


def _plugin_meta(layer: Any) -> dict[str, Any]:
    meta = getattr(layer, "metadata", None) or {}
    value = meta.get(META_KEY)
    return value if isinstance(value, dict) else {}


def prediction_of(layer: Any) -> np.ndarray | None:
    """The prediction Segment last put into ``layer`` (display order), or None."""
    prediction = _plugin_meta(layer).get(PREDICTION_KEY)
    if prediction is None:
        return None
    prediction = np.asarray(prediction)
    if prediction.shape != tuple(np.shape(layer.data)):
        return None  # the layer's data was replaced by something of another shape
    return prediction


def remember_prediction(layer: Any, prediction: np.ndarray) -> None:
    """Record ``prediction`` (a copy, read-only) as the baseline :func:`edited_mask` compares with."""
    baseline = np.array(prediction, copy=True)
    if baseline.shape != tuple(np.shape(layer.data)):
        raise ValueError(f"prediction shape {baseline.shape} != layer shape {tuple(np.shape(layer.data))}")
    baseline.setflags(write=False)
    meta = dict(layer.metadata)
    plugin = dict(meta.get(META_KEY) or {})
    plugin[PREDICTION_KEY] = baseline
    plugin.pop("prediction_digest", None)  # superseded by the saved prediction
    meta[META_KEY] = plugin
    layer.metadata = meta


def edited_mask(layer: Any) -> np.ndarray | None:
    """Bool array, the layer's shape: True on every voxel the user changed since the last
    prediction was put in (paint, fill, polygon, erase, ...). None when the layer holds no
    prediction to compare with (not made by Segment, or its data was replaced by another shape)."""
    prediction = prediction_of(layer)
    if prediction is None:
        return None
    return np.asarray(layer.data) != prediction


def is_edited(layer: Any) -> bool:
    """True if any voxel differs from the last prediction (or there is no prediction to compare with)."""
    mask = edited_mask(layer)
    return True if mask is None else bool(mask.any())


def fill_unlabelled(current: np.ndarray, new: np.ndarray, edited: np.ndarray | None) -> np.ndarray:
    """The "fill unlabelled voxels only" rule: ``new`` where ``current`` is 0 and not edited, else ``current``.

    ``edited`` None (nothing known about edits) fills every 0 voxel.
    """
    current = np.asarray(current)
    take = current == 0
    if edited is not None:
        take &= ~np.asarray(edited, dtype=bool)
    return np.where(take, np.asarray(new), current).astype(current.dtype, copy=False)


def apply_labels(layer: Any, new: np.ndarray) -> int:
    """Write ``new`` into the Labels ``layer`` as one undoable step; returns the number of voxels changed.

    Goes through napari's public ``data_setitem`` (which records the previous values) inside
    ``block_history`` (one undo item), so ``layer.undo()`` restores the layer exactly.
    """
    data = layer.data
    new = np.asarray(new)
    if new.shape != tuple(np.shape(data)):
        raise ValueError(f"new labels shape {new.shape} != layer shape {tuple(np.shape(data))}")
    changed = np.asarray(data) != new
    count = int(np.count_nonzero(changed))
    if count == 0:
        return 0
    indices = np.nonzero(changed)
    with layer.block_history():
        layer.data_setitem(indices, new[indices])
    return count


RESULT_MODES = ("auto", "new", "replace", "fill")


def result_action(mode: str, target_exists: bool, target_edited: bool, confirm_replace: Callable[[], bool]) -> str:
    """Where Segment puts its result: "new" (a new layer), "replace" or "fill" (the latest result
    layer of the image, as one undo step).

    ``mode``: one of :data:`RESULT_MODES`. *auto* never touches an edited layer; *replace* asks
    (``confirm_replace()``) before it destroys edits and makes a new layer when the user says no;
    *fill* keeps every label the user painted or erased.
    """
    if mode not in RESULT_MODES:
        raise ValueError(f"unknown result mode {mode!r}; one of {RESULT_MODES}")
    if not target_exists or mode == "new":
        return "new"
    if mode == "auto":
        return "new" if target_edited else "replace"
    if mode == "replace":
        return "replace" if not target_edited or confirm_replace() else "new"
    return "fill"


def put_result(layer: Any, new: np.ndarray, action: str) -> int:
    """Write a new prediction ``new`` (display order) into the result ``layer`` ("replace" or "fill"),
    as one step of napari's undo; returns the voxels changed.

    What is remembered as the layer's prediction afterwards: the new one, except that voxels the user
    had edited keep the old prediction as their baseline, so they still count as edits ("fill").
    """
    if action == "fill":
        edited = edited_mask(layer)
        merged = fill_unlabelled(np.array(layer.data), new, edited)
        old = prediction_of(layer)
        baseline = np.where(edited, old, merged) if edited is not None and old is not None else merged
    elif action == "replace":
        merged = baseline = np.asarray(new)
    else:
        raise ValueError(f"put_result writes into a layer by 'replace' or 'fill', not {action!r}")
    changed = apply_labels(layer, merged)
    remember_prediction(layer, baseline)
    return changed
