"""Label tables: class ids → names and RGBA colours, presets, and per-class volumes.

A :class:`LabelTable` maps integer label ids (0 = background) to a name and an RGBA colour with
components in 0..1. Background is always present, named ``"background"`` by default, and fully
transparent. Tables come from a preset (:func:`get_preset`), from a dataset's ``dataset.json``
(:meth:`LabelTable.from_dataset_json`, nnU-Net v2 or Medical Segmentation Decathlon form) or from
the project's own JSON (:meth:`LabelTable.from_dict` / :meth:`LabelTable.to_dict`, used by
``resources/sample/labels.json`` and model cards)::

    {"labels": {"0": "background", "1": "CSF/other", ...},
     "colors": {"0": [0.0, 0.0, 0.0, 0.0], "1": [0.27, 0.51, 0.9, 1.0], ...}}

Colour table
------------
Fixed and documented so that a structure looks the same in every table, whatever its id. Organ
colours are modelled on 3D Slicer's ``GenericAnatomyColors`` (liver reddish-brown, spleen purple,
kidneys orange-brown, vessels red/blue, ...), adjusted where two neighbouring organs would be hard
to tell apart (left/right pairs get two shades). RGB in 0..255, alpha 1:

==========================  ===============  ==========================  ===============
name                        RGB              name                        RGB
==========================  ===============  ==========================  ===============
spleen                      157, 108, 162    pancreas                    249, 205, 70
right kidney                205, 125, 65     right adrenal gland         0, 190, 170
left kidney                 235, 160, 95     left adrenal gland          110, 225, 205
gallbladder                 110, 170, 60     duodenum                    255, 236, 205
esophagus                   235, 150, 175    bladder                     250, 245, 130
liver                       160, 75, 55      prostate/uterus             205, 80, 150
stomach                     210, 180, 140    portal and splenic veins    110, 140, 250
aorta                       225, 30, 40      edema                       175, 230, 40
inferior vena cava          0, 120, 215      non-enhancing tumour        215, 25, 30
CSF/other                   70, 130, 230     enhancing tumour            30, 140, 255
grey matter                 213, 94, 0       white matter                0, 158, 115
==========================  ===============  ==========================  ===============

Brain tissue is drawn over a greyscale MRI, so its three colours are saturated hues (blue,
vermillion, bluish green: Okabe–Ito colours, told apart with the common colour-vision
deficiencies too), never grey or white, which would vanish into the image.

Aliases map common dataset spellings onto these names (``"postcava"``/``"ivc"`` → inferior vena
cava, ``"gall bladder"``, AMOS's ``"arota"``, ``"tumor"``/``"tumour"``, ...). Any id whose name is
not in the table gets a deterministic colour from its id (golden-ratio hue steps), distinct from
its neighbours.
"""

from __future__ import annotations

import colorsys
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

RGBA = tuple[float, float, float, float]
TRANSPARENT: RGBA = (0.0, 0.0, 0.0, 0.0)

__all__ = [
    "AMOS",
    "BRAIN_TISSUE",
    "BRATS",
    "BTCV",
    "PRESETS",
    "RGBA",
    "LabelRow",
    "LabelTable",
    "color_for",
    "get_preset",
    "label_rows",
    "volumes_ml",
]


def _rgb(r: int, g: int, b: int) -> RGBA:
    return (r / 255.0, g / 255.0, b / 255.0, 1.0)


#: The fixed colour table (see the module docstring), keyed by normalised name.
ANATOMY_COLORS: dict[str, RGBA] = {
    "spleen": _rgb(157, 108, 162),
    "right kidney": _rgb(205, 125, 65),
    "left kidney": _rgb(235, 160, 95),
    "gallbladder": _rgb(110, 170, 60),
    "esophagus": _rgb(235, 150, 175),
    "liver": _rgb(160, 75, 55),
    "stomach": _rgb(210, 180, 140),
    "aorta": _rgb(225, 30, 40),
    "inferior vena cava": _rgb(0, 120, 215),
    "portal and splenic veins": _rgb(110, 140, 250),
    "pancreas": _rgb(249, 205, 70),
    "right adrenal gland": _rgb(0, 190, 170),
    "left adrenal gland": _rgb(110, 225, 205),
    "duodenum": _rgb(255, 236, 205),
    "bladder": _rgb(250, 245, 130),
    "prostate/uterus": _rgb(205, 80, 150),
    "edema": _rgb(175, 230, 40),
    "non-enhancing tumour": _rgb(215, 25, 30),
    "enhancing tumour": _rgb(30, 140, 255),
    "csf/other": _rgb(70, 130, 230),
    "grey matter": _rgb(213, 94, 0),
    "white matter": _rgb(0, 158, 115),
}

_ALIASES: dict[str, str] = {
    "postcava": "inferior vena cava",
    "ivc": "inferior vena cava",
    "vena cava inferior": "inferior vena cava",
    "gall bladder": "gallbladder",
    "arota": "aorta",  # sic, AMOS's dataset.json
    "oesophagus": "esophagus",
    "urinary bladder": "bladder",
    "prostate": "prostate/uterus",
    "uterus": "prostate/uterus",
    "prostate or uterus": "prostate/uterus",
    "portal vein and splenic vein": "portal and splenic veins",
    "portal vein": "portal and splenic veins",
    "splenic vein": "portal and splenic veins",
    "kidney right": "right kidney",
    "kidney left": "left kidney",
    "adrenal gland right": "right adrenal gland",
    "adrenal gland left": "left adrenal gland",
    "oedema": "edema",
    "peritumoral edema": "edema",
    "non-enhancing tumor": "non-enhancing tumour",
    "non enhancing tumor": "non-enhancing tumour",
    "non enhancing tumour": "non-enhancing tumour",
    "necrotic tumor core": "non-enhancing tumour",
    "enhancing tumor": "enhancing tumour",
    "csf": "csf/other",
    "gray matter": "grey matter",
    "gm": "grey matter",
    "wm": "white matter",
}


def _normalise_name(name: str) -> str:
    key = re.sub(r"[_\s]+", " ", name.strip().lower())
    return _ALIASES.get(key, key)


def _generated_color(label_id: int) -> RGBA:
    """Deterministic colour for an id without a named colour: golden-ratio hue steps, so ids
    close to each other get far-apart hues; saturation and value alternate in a slow cycle."""
    hue = (label_id * 0.618033988749895) % 1.0
    sat = (0.85, 0.6, 0.75)[(label_id // 5) % 3]
    val = (0.95, 0.8)[(label_id // 3) % 2]
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (float(r), float(g), float(b), 1.0)


def color_for(label_id: int, name: str | None = None) -> RGBA:
    """The colour a label gets when none is given: transparent for 0, the fixed table's colour for
    a known ``name`` (aliases and case/underscore variants accepted), else a deterministic colour
    derived from the id."""
    if label_id == 0:
        return TRANSPARENT
    if name is not None:
        known = ANATOMY_COLORS.get(_normalise_name(name))
        if known is not None:
            return known
    return _generated_color(int(label_id))


def _as_id(key: Any, what: str) -> int:
    """An integer label id from a JSON key/value (``"3"``, ``3``, ``3.0``); refuses bools/negatives."""
    if isinstance(key, bool):
        raise ValueError(f"{what}: label id {key!r} is not an integer")
    if isinstance(key, (int, np.integer)):
        value = int(key)
    elif isinstance(key, float) and key.is_integer():
        value = int(key)
    elif isinstance(key, str) and re.fullmatch(r"\s*\d+\s*", key):
        value = int(key)
    else:
        raise ValueError(f"{what}: label id {key!r} is not a non-negative integer")
    if value < 0:
        raise ValueError(f"{what}: label id {value} is negative")
    return value


def _as_rgba(value: Any, what: str) -> RGBA:
    """RGBA in 0..1 from a 3- or 4-sequence of numbers in 0..1, or a ``"#rrggbb[aa]"`` string."""
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if not re.fullmatch(r"[0-9a-fA-F]{6}([0-9a-fA-F]{2})?", text):
            raise ValueError(f"{what}: colour {value!r} is not #rrggbb or #rrggbbaa")
        comps = [int(text[i : i + 2], 16) / 255.0 for i in range(0, len(text), 2)]
    else:
        try:
            comps = [float(c) for c in value]
        except (TypeError, ValueError):
            raise ValueError(f"{what}: colour {value!r} is not a sequence of numbers") from None
    if len(comps) == 3:
        comps.append(1.0)
    if len(comps) != 4 or not all(0.0 <= c <= 1.0 for c in comps):
        raise ValueError(f"{what}: colour {value!r} must be 3 or 4 numbers in 0..1")
    return (comps[0], comps[1], comps[2], comps[3])


@dataclass(frozen=True)
class LabelTable:
    """Names and RGBA colours (0..1) for integer label ids; 0 is background and transparent.

    ``names`` and ``colors`` are plain dicts sorted by id; ``colors`` has an entry for every id in
    ``names`` (missing ones are filled with :func:`color_for`). Names must be unique (they key
    :func:`volumes_ml`). Construct with only ``names`` to get the default colours.
    """

    names: dict[int, str]
    colors: dict[int, RGBA] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names: dict[int, str] = {}
        for key, name in self.names.items():
            label_id = _as_id(key, "label table")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"label table: name for id {label_id} must be a non-empty string")
            names[label_id] = name.strip()
        names.setdefault(0, "background")
        seen: dict[str, int] = {}
        for label_id, name in names.items():
            if name.lower() in seen:
                raise ValueError(
                    f"label table: name {name!r} is used by ids {seen[name.lower()]} and {label_id}"
                )
            seen[name.lower()] = label_id
        colors: dict[int, RGBA] = {}
        for key, value in self.colors.items():
            label_id = _as_id(key, "label table")
            if label_id not in names:
                raise ValueError(f"label table: colour given for id {label_id}, which has no name")
            colors[label_id] = _as_rgba(value, f"label table id {label_id}")
        colors[0] = TRANSPARENT  # background is always transparent
        ordered = sorted(names)
        object.__setattr__(self, "names", {i: names[i] for i in ordered})
        object.__setattr__(
            self, "colors", {i: colors[i] if i in colors else color_for(i, names[i]) for i in ordered}
        )

    # ---- queries ----------------------------------------------------------------------------

    @property
    def ids(self) -> list[int]:
        """All label ids, background included, ascending."""
        return list(self.names)

    @property
    def num_classes(self) -> int:
        """Number of classes a network predicts for this table: max id + 1 (background included)."""
        return max(self.names) + 1

    def name_of(self, label_id: int) -> str:
        """The name of ``label_id``; ``"label <id>"`` for an id the table does not know."""
        return self.names.get(int(label_id), f"label {int(label_id)}")

    def color_of(self, label_id: int) -> RGBA:
        """The colour of ``label_id``; for an unknown id the deterministic colour of :func:`color_for`."""
        label_id = int(label_id)
        return self.colors[label_id] if label_id in self.colors else color_for(label_id)

    def is_contiguous(self) -> bool:
        """True when the ids are exactly 0..max (what a network's output channels need)."""
        return self.ids == list(range(len(self.names)))

    # ---- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-ready ``{"labels": {"0": "background", ...}, "colors": {"0": [r, g, b, a], ...}}``."""
        return {
            "labels": {str(i): n for i, n in self.names.items()},
            "colors": {str(i): [float(c) for c in self.colors[i]] for i in self.names},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelTable:
        """Inverse of :meth:`to_dict`. Also accepts a bare ``{"0": "background", "1": ...}`` mapping,
        or ``{"labels": ...}`` in either dataset.json orientation (without ``colors``: defaults).
        Raises ``ValueError`` on malformed input."""
        if not isinstance(data, Mapping):
            raise ValueError(f"label table: expected a JSON object, got {type(data).__name__}")
        if "labels" in data:
            names = _names_from_labels(data["labels"], "label table")
            colors = data.get("colors", data.get("colours", {})) or {}
            if not isinstance(colors, Mapping):
                raise ValueError("label table: 'colors' must be an object mapping ids to colours")
            return cls(names, dict(colors))
        return cls(_names_from_labels(data, "label table"))

    def to_json(self, path: str | Path | None = None) -> str:
        """:meth:`to_dict` as indented JSON text (one colour per line); written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        text = re.sub(r"\[\s+([^\[\]]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
        text += "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> LabelTable:
        """Read a label table (or a dataset.json) from a file; bad files raise ``InputError``."""
        data = _read_json(path)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise InputError(str(err), path) from None

    @classmethod
    def from_dataset_json(cls, data: Mapping[str, Any] | str | Path) -> LabelTable:
        """The label table of an nnU-Net v2 or MSD ``dataset.json`` (a parsed dict or a path).

        - nnU-Net v2: ``{"labels": {"background": 0, "liver": 1, ...}}`` (name → id)
        - MSD:        ``{"labels": {"0": "background", "1": "edema", ...}}`` (id → name)

        Colours come from the fixed table by name (aliases accepted), else from the id.
        Region-based nnU-Net labels (a list of ids per name) raise ``ValueError`` (``InputError``
        naming the file when given a path): this project trains one channel per label id.
        """
        if isinstance(data, (str, Path)):
            parsed = _read_json(data)
            try:
                return cls.from_dataset_json(parsed)
            except ValueError as err:  # the path names the file: no second "dataset.json:" after it
                raise InputError(str(err).removeprefix("dataset.json: "), data) from None
        if not isinstance(data, Mapping) or "labels" not in data:
            raise ValueError("dataset.json: no 'labels' entry")
        return cls(_names_from_labels(data["labels"], "dataset.json"))

    def __hash__(self) -> int:
        return hash((tuple(self.names.items()), tuple(self.colors.items())))

    def __str__(self) -> str:
        return ", ".join(f"{i}: {n}" for i, n in self.names.items())


def _names_from_labels(labels: Any, what: str) -> dict[int, str]:
    """id → name from either ``{"0": "background"}`` (MSD) or ``{"background": 0}`` (nnU-Net v2)."""
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"{what}: 'labels' must be a non-empty object")
    values = list(labels.values())
    if any(isinstance(v, (list, tuple)) for v in values):
        regions = {k: v for k, v in labels.items() if isinstance(v, (list, tuple))}
        name, ids = next(iter(regions.items()))
        raise ValueError(
            f"{what}: region-based labels are not supported ({name!r}: {list(ids)}); "
            "napari-e2enet needs one integer id per class"
        )
    if all(isinstance(v, str) for v in values):  # MSD / ours: id -> name
        return {_as_id(k, what): v for k, v in labels.items()}
    if all(isinstance(v, (int, float, np.integer)) and not isinstance(v, bool) for v in values):
        names: dict[int, str] = {}  # nnU-Net v2: name -> id
        for name, value in labels.items():
            label_id = _as_id(value, what)
            if label_id in names:
                raise ValueError(f"{what}: id {label_id} is given to both {names[label_id]!r} and {name!r}")
            names[label_id] = str(name)
        return names
    raise ValueError(f"{what}: 'labels' must map ids to names or names to integer ids")


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read ({err.__class__.__name__})", path) from None
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON (line {err.lineno}: {err.msg})", path) from None
    except RecursionError:
        raise InputError("not valid JSON (nested too deeply)", path) from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise InputError(f"not valid JSON ({' '.join(str(err).split())[:120]})", path) from None


# ---- presets ----------------------------------------------------------------------------------

#: AMOS 2022 (15 abdominal organs, CT/MRI).
AMOS = LabelTable(
    {
        1: "spleen",
        2: "right kidney",
        3: "left kidney",
        4: "gallbladder",
        5: "esophagus",
        6: "liver",
        7: "stomach",
        8: "aorta",
        9: "postcava",
        10: "pancreas",
        11: "right adrenal gland",
        12: "left adrenal gland",
        13: "duodenum",
        14: "bladder",
        15: "prostate/uterus",
    }
)

#: BTCV / Synapse multi-organ abdominal CT (13 organs).
BTCV = LabelTable(
    {
        1: "spleen",
        2: "right kidney",
        3: "left kidney",
        4: "gallbladder",
        5: "esophagus",
        6: "liver",
        7: "stomach",
        8: "aorta",
        9: "inferior vena cava",
        10: "portal and splenic veins",
        11: "pancreas",
        12: "right adrenal gland",
        13: "left adrenal gland",
    }
)

#: Medical Segmentation Decathlon Task01 BrainTumour (BraTS; 4 MRI channels).
BRATS = LabelTable({1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"})

#: The embedded sample's tissue classes (``resources/sample/``, MNI ICBM152).
BRAIN_TISSUE = LabelTable({1: "CSF/other", 2: "grey matter", 3: "white matter"})

PRESETS: dict[str, LabelTable] = {
    "amos": AMOS,
    "btcv": BTCV,
    "brats": BRATS,
    "brain_tissue": BRAIN_TISSUE,
}


def get_preset(name: str) -> LabelTable:
    """A preset by name, case-insensitive: ``amos``, ``btcv``, ``brats``, ``brain_tissue``
    (``-``/space accepted for ``_``; ``msd_task01``/``task01`` → BraTS, ``tissue``/``mni152`` →
    brain tissue). Unknown names raise ``InputError``."""
    key = re.sub(r"[-\s]+", "_", str(name).strip().lower())
    key = {"msd_task01": "brats", "task01": "brats", "tissue": "brain_tissue", "mni152": "brain_tissue"}.get(
        key, key
    )
    if key not in PRESETS:
        raise InputError(f"unknown label preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]


# ---- measurements -----------------------------------------------------------------------------


def volumes_ml(
    labels: np.ndarray, spacing: tuple[float, ...] | list[float] | np.ndarray, table: LabelTable | None = None
) -> dict[str, float]:
    """Volume of each labelled structure in millilitres.

    ``labels``: integer array in voxel order (e.g. (X, Y, Z)); ``spacing``: voxel size in mm per
    axis, same order and length as ``labels.ndim``. Returns ``{name: mL}`` (voxel count × voxel
    volume in mm³ / 1000) for every non-background id of ``table`` (0.0 when absent), in id order,
    followed by any other non-zero id found in ``labels`` as ``"label <id>"``. Background is left
    out. Without a table every id is named ``"label <id>"``.
    """
    arr = np.asarray(labels)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"volumes_ml: labels must be an integer array, got dtype {arr.dtype}")
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.size != arr.ndim:
        raise ValueError(f"volumes_ml: spacing has {sp.size} values for a {arr.ndim}-D label array")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"volumes_ml: spacing must be positive, got {sp.tolist()}")
    if arr.size and arr.min() < 0:
        raise ValueError("volumes_ml: labels contain negative ids")
    counts = np.bincount(arr.ravel().astype(np.int64)) if arr.size else np.zeros(1, dtype=np.int64)
    voxel_ml = float(np.prod(sp)) / 1000.0
    table = table if table is not None else LabelTable({})
    out: dict[str, float] = {}
    for label_id, name in table.names.items():
        if label_id != 0:
            out[name] = float(counts[label_id]) * voxel_ml if label_id < counts.size else 0.0
    for found in np.flatnonzero(counts):
        found_id = int(found)
        if found_id != 0 and found_id not in table.names:
            out[table.name_of(found_id)] = float(counts[found_id]) * voxel_ml
    return out


@dataclass(frozen=True)
class LabelRow:
    """One structure of a label map: its id, name, RGBA colour and volume (mL)."""

    id: int
    name: str
    color: RGBA
    ml: float


def label_rows(
    labels: np.ndarray, spacing: tuple[float, ...] | list[float] | np.ndarray, table: LabelTable | None = None
) -> list[LabelRow]:
    """:func:`volumes_ml` with each structure's id and colour: one row per non-background id of
    ``table`` (0 mL when absent), then every other id present in ``labels`` (named ``"label <id>"``)."""
    arr = np.asarray(labels)
    volumes = volumes_ml(arr, spacing, table)
    table = table if table is not None else LabelTable({})
    ids = [i for i in table.names if i != 0]
    known = set(table.names)
    ids += [int(i) for i in np.unique(arr) if int(i) != 0 and int(i) not in known] if arr.size else []
    return [LabelRow(i, table.name_of(i), table.color_of(i), volumes[table.name_of(i)]) for i in ids]
