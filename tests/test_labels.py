"""Label tables: presets, JSON round trip, dataset.json forms, colours, volumes."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from napari_e2enet.errors import InputError
from napari_e2enet.labels import (
    AMOS,
    BRAIN_TISSUE,
    BRATS,
    BTCV,
    PRESETS,
    LabelTable,
    color_for,
    get_preset,
    volumes_ml,
)

AMOS_NAMES = [
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
    "prostate/uterus",
]  # fmt: skip
BTCV_NAMES = [
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland",
    "left adrenal gland",
]  # fmt: skip


def _rgb_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a[:3]) - np.asarray(b[:3])))


# ---- presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "names"),
    [
        (AMOS, AMOS_NAMES),
        (BTCV, BTCV_NAMES),
        (BRATS, ["edema", "non-enhancing tumour", "enhancing tumour"]),
        (BRAIN_TISSUE, ["CSF/other", "grey matter", "white matter"]),
    ],
)
def test_presets_are_complete_and_contiguous(table: LabelTable, names: list[str]) -> None:
    assert table.names[0] == "background"
    assert [table.names[i] for i in range(1, len(names) + 1)] == names
    assert table.ids == list(range(len(names) + 1))
    assert table.is_contiguous()
    assert table.num_classes == len(names) + 1
    assert set(table.colors) == set(table.names)
    assert table.colors[0] == (0.0, 0.0, 0.0, 0.0)  # background transparent
    for i in table.ids[1:]:
        r, g, b, a = table.colors[i]
        assert a == 1.0
        assert all(0.0 <= c <= 1.0 for c in (r, g, b))


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_colours_are_distinct(name: str) -> None:
    table = PRESETS[name]
    colours = [table.colors[i] for i in table.ids[1:]]
    for a, b in itertools.combinations(colours, 2):
        assert _rgb_distance(a, b) > 0.15


def test_shared_structures_share_colours_across_presets() -> None:
    for organ in ["spleen", "liver", "aorta", "pancreas", "left kidney"]:
        amos_id = next(i for i, n in AMOS.names.items() if n == organ)
        btcv_id = next(i for i, n in BTCV.names.items() if n == organ)
        assert AMOS.colors[amos_id] == BTCV.colors[btcv_id]
    # AMOS calls the IVC "postcava": same colour as BTCV's "inferior vena cava"
    assert AMOS.colors[9] == BTCV.colors[9]


def test_documented_colour_character() -> None:
    def rgb(table: LabelTable, name: str) -> np.ndarray:
        return np.asarray(table.colors[next(i for i, n in table.names.items() if n == name)][:3])

    liver, spleen, aorta, ivc = (rgb(AMOS, n) for n in ("liver", "spleen", "aorta", "postcava"))
    assert liver[0] > liver[1] > liver[2]  # reddish-brown
    assert aorta[0] > 0.8 and aorta[1] < 0.2  # red
    assert ivc[2] > ivc[0] and ivc[2] > ivc[1]  # blue
    assert spleen[0] > spleen[1] and spleen[2] > spleen[1]  # purple
    csf, gm, wm = (rgb(BRAIN_TISSUE, n) for n in ("CSF/other", "grey matter", "white matter"))
    assert csf[2] > csf[0]  # blue
    # drawn over a greyscale MRI: no tissue colour may be greyish (chroma), and no two alike
    for colour in (csf, gm, wm):
        assert np.ptp(colour) >= 0.5, colour
    for a, b in ((csf, gm), (csf, wm), (gm, wm)):
        assert np.linalg.norm(a - b) >= 0.4, (a, b)


def test_get_preset() -> None:
    assert get_preset("AMOS") is AMOS
    assert get_preset("btcv") is BTCV
    assert get_preset("BraTS") is BRATS
    assert get_preset("brain-tissue") is BRAIN_TISSUE
    with pytest.raises(InputError, match="unknown label preset 'kits'"):
        get_preset("kits")


# ---- JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_round_trip(name: str, tmp_path) -> None:
    table = PRESETS[name]
    again = LabelTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again == table
    assert again.colors == table.colors
    path = tmp_path / "labels.json"
    table.to_json(path)
    assert LabelTable.from_json(path) == table


def test_to_dict_form() -> None:
    d = BRAIN_TISSUE.to_dict()
    assert d["labels"] == {"0": "background", "1": "CSF/other", "2": "grey matter", "3": "white matter"}
    assert set(d["colors"]) == {"0", "1", "2", "3"}
    assert all(len(c) == 4 for c in d["colors"].values())


def test_custom_colours_and_defaults() -> None:
    table = LabelTable.from_dict(
        {"labels": {"0": "bg", "1": "liver", "2": "thing"}, "colors": {"2": "#ff000080", "0": [1, 1, 1]}}
    )
    assert table.names == {0: "bg", 1: "liver", 2: "thing"}
    assert table.colors[0] == (0.0, 0.0, 0.0, 0.0)  # background stays transparent
    assert table.colors[1] == AMOS.colors[6]  # named colour for liver
    assert table.colors[2] == pytest.approx((1.0, 0.0, 0.0, 128 / 255))
    # a bare id -> name mapping works too, and background is added
    assert LabelTable.from_dict({"1": "edema"}).names == {0: "background", 1: "edema"}


@pytest.mark.parametrize(
    "bad",
    [
        {"labels": {"0": "background", "1": "a"}, "colors": {"1": [2.0, 0, 0]}},  # out of 0..1
        {"labels": {"0": "background", "1": "a"}, "colors": {"5": [1.0, 0, 0]}},  # no such id
        {"labels": {"0": "background", "1": "a", "2": "a"}},  # duplicate name
        {"labels": {"-1": "a"}},
        {"labels": {"x": "a"}},
        {"labels": {}},
    ],
)
def test_bad_tables_raise_value_error(bad) -> None:
    with pytest.raises(ValueError):
        LabelTable.from_dict(bad)


# ---- dataset.json ----------------------------------------------------------------------------


def test_dataset_json_nnunet_v2_and_msd_forms_agree() -> None:
    nnunet = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "liver tumour": 2}}
    msd = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "liver tumour"}}
    a = LabelTable.from_dataset_json(nnunet)
    b = LabelTable.from_dataset_json(msd)
    assert a == b
    assert a.names == {0: "background", 1: "liver", 2: "liver tumour"}
    assert a.colors[1] == AMOS.colors[6]  # liver gets the liver colour whatever its id


def test_dataset_json_msd_brain_tumour_matches_brats_preset() -> None:
    msd_task01 = {
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    }
    table = LabelTable.from_dataset_json(msd_task01)
    assert table.names[2] == "non-enhancing tumor"  # the dataset's own name is kept
    assert table.colors == BRATS.colors  # ... with the preset's colours (spelling alias)


def test_dataset_json_amos_spellings_get_organ_colours() -> None:
    amos = {"labels": {"0": "background", "4": "gall bladder", "8": "arota", "9": "postcava"}}
    table = LabelTable.from_dataset_json(amos)
    assert table.colors[4] == AMOS.colors[4]
    assert table.colors[8] == AMOS.colors[8]
    assert table.colors[9] == AMOS.colors[9]


def test_dataset_json_region_based_is_refused(tmp_path) -> None:
    regions = {
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
        "regions_class_order": [1, 2, 3],
    }
    with pytest.raises(ValueError, match="region-based"):
        LabelTable.from_dataset_json(regions)
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(regions))
    with pytest.raises(InputError, match="region-based") as err:
        LabelTable.from_dataset_json(path)
    assert str(err.value).startswith(str(path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [{"name": "no labels"}, {"labels": {"background": 0, "a": 1, "b": 1}}, {"labels": {"a": True}}],
)
def test_dataset_json_malformed(bad) -> None:
    with pytest.raises(ValueError):
        LabelTable.from_dataset_json(bad)


def test_dataset_json_from_path(tmp_path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, "spleen": 1}}))
    assert LabelTable.from_dataset_json(path).names == {0: "background", 1: "spleen"}
    with pytest.raises(InputError, match="file not found"):
        LabelTable.from_dataset_json(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        LabelTable.from_dataset_json(tmp_path / "broken.json")


# ---- colours for unknown ids -----------------------------------------------------------------


def test_generated_colours_are_deterministic_and_distinct() -> None:
    colours = [color_for(i) for i in range(1, 65)]
    assert colours == [color_for(i) for i in range(1, 65)]
    assert color_for(0) == (0.0, 0.0, 0.0, 0.0)
    for a, b in itertools.combinations(colours, 2):
        assert _rgb_distance(a, b) > 0.02
    for a, b in itertools.pairwise(colours):  # neighbouring ids look clearly different
        assert _rgb_distance(a, b) > 0.3
    table = LabelTable({1: "thing one", 2: "thing two"})
    assert table.colors[1] == color_for(1) and table.colors[2] == color_for(2)
    assert table.color_of(40) == color_for(40)
    assert table.name_of(40) == "label 40"


# ---- volumes ---------------------------------------------------------------------------------


def test_volumes_ml_with_anisotropic_spacing() -> None:
    labels = np.zeros((4, 5, 6), dtype=np.int16)
    labels[0, 0, :5] = 1  # 5 voxels
    labels[1:3, 1:4, 2] = 2  # 6 voxels
    labels[3, 4, 5] = 7  # an id the table does not know
    spacing = (0.5, 0.8, 2.5)  # 1.0 mm³ per voxel
    table = LabelTable({1: "liver", 2: "spleen", 3: "aorta"})
    vols = volumes_ml(labels, spacing, table)
    assert list(vols) == ["liver", "spleen", "aorta", "label 7"]
    assert vols["liver"] == pytest.approx(5 * 1.0 / 1000)
    assert vols["spleen"] == pytest.approx(6 * 1.0 / 1000)
    assert vols["aorta"] == 0.0
    assert vols["label 7"] == pytest.approx(1 / 1000)
    assert "background" not in vols
    # a 10 cm cube at 2 × 2 × 5 mm is one litre
    cube = np.ones((50, 50, 20), dtype=np.uint8)
    assert volumes_ml(cube, (2.0, 2.0, 5.0), BRAIN_TISSUE)["CSF/other"] == pytest.approx(1000.0)


@pytest.mark.parametrize(
    ("labels", "spacing"),
    [
        (np.zeros((2, 2, 2), dtype=float), (1, 1, 1)),
        (np.zeros((2, 2, 2), dtype=np.uint8), (1, 1)),
        (np.zeros((2, 2, 2), dtype=np.uint8), (1, 0, 1)),
        (np.full((2, 2, 2), -1, dtype=np.int8), (1, 1, 1)),
    ],
)
def test_volumes_ml_rejects_bad_input(labels, spacing) -> None:
    with pytest.raises(ValueError):
        volumes_ml(labels, spacing, BRATS)
