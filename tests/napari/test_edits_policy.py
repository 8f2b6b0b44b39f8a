"""Segment's result policy without Qt (``_napari/edits.py``): where a new result goes, and what a
fill or replace writes into a layer the user corrected."""

from __future__ import annotations

import numpy as np
import pytest

from napari_e2enet._napari import edits


def _never() -> bool:
    raise AssertionError("asked although nothing would be lost")


@pytest.mark.parametrize(("mode", "exists", "edited", "answer", "expected"), [
    ("auto", False, False, None, "new"),
    ("auto", True, False, None, "replace"),
    ("auto", True, True, None, "new"),  # never over corrections
    ("new", True, False, None, "new"),
    ("replace", True, False, None, "replace"),
    ("replace", True, True, True, "replace"),  # asked, and the user agreed
    ("replace", True, True, False, "new"),  # asked, and the user said no: nothing lost
    ("fill", True, True, None, "fill"),
    ("fill", False, False, None, "new"),
])
def test_where_a_result_goes(mode, exists, edited, answer, expected):
    asked = []

    def confirm() -> bool:
        asked.append(True)
        return bool(answer)

    assert edits.result_action(mode, exists, edited, _never if answer is None else confirm) == expected
    assert bool(asked) == (answer is not None)
    with pytest.raises(ValueError, match="unknown result mode"):
        edits.result_action("merge", exists, edited, _never)


def test_fill_keeps_painted_and_erased_voxels_and_undo_brings_the_old_labels_back():
    from napari.layers import Labels  # the layer model only: no viewer, no Qt

    first = np.zeros((4, 6, 6), np.uint8)
    first[:, :3] = 1
    layer = Labels(first.copy())
    edits.remember_prediction(layer, first)
    layer.data_setitem((np.array([0]), np.array([0]), np.array([0])), 0)  # the user erases a voxel
    layer.data_setitem((np.array([1]), np.array([5]), np.array([5])), 2)  # and paints one
    corrected = np.asarray(layer.data).copy()
    new = np.full(first.shape, 3, np.uint8)
    changed = edits.put_result(layer, new, "fill")
    data = np.asarray(layer.data)
    assert data[0, 0, 0] == 0 and data[1, 5, 5] == 2  # both edits kept
    assert (data[:, :3][first[:, :3] == 1] == 1).sum() == first.sum() - 1  # earlier labels kept
    assert (data[:, 3:] == 3).sum() == 4 * 3 * 6 - 1  # unlabelled voxels filled
    assert changed == 4 * 3 * 6 - 1
    assert edits.edited_mask(layer).sum() == 2  # the edits still count as edits
    layer.undo()  # one step: the fill as a whole
    np.testing.assert_array_equal(np.asarray(layer.data), corrected)
    edits.put_result(layer, new, "replace")
    assert (np.asarray(layer.data) == 3).all() and not edits.is_edited(layer)
    with pytest.raises(ValueError, match="not 'new'"):
        edits.put_result(layer, new, "new")
