"""Case lists: nnU-Net v2 / MSD folders, explicit file pairs, in-memory arrays, the phantom.

A ``Dataset`` is a list of ``Case``s plus the label table (``{id: name}``, 0 = background), the
channel names and the modality ("CT", "MRI" or another name; only "CT" gets CT normalisation).
Cases load lazily: a case read from disk holds paths until ``Case.load()`` is called.

Every problem with the input (a malformed or missing ``dataset.json``, a missing file, image/label
shape or affine mismatch, label values that ``labels`` does not name, paths that escape the dataset
folder through ``..``, absolute paths or symlinks) raises ``InputError`` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..pathcheck import require_file
from ._payload import VOLUME_SUFFIXES
from .io import NIFTI_SUFFIXES, _same_geometry, as_label_array, read_geometry, read_image, read_labels
from .phantom import AMOS_LABELS, make_phantom
from .volume import Volume

__all__ = ["Case", "Dataset", "load_dataset", "modality_from_channels"]

_MRI_NAMES = {
    "mr", "mri", "t1", "t1w", "t1c", "t1ce", "t1gd", "t1n", "t2", "t2w", "t2f", "t2star", "flair",
    "adc", "dwi", "pd", "pdw", "swi", "bold", "dce", "nonenhanced", "enhanced", "t1-weighted",
    "t2-weighted", "ssfp", "cine", "hbv", "perfusion",
}  # fmt: skip


_MAX_LABEL_ID = 32767

# The ``file_ending``s a dataset.json may name (nnU-Net v2 names one per dataset): NIfTI and NRRD
# (an attached ``.nrrd``, or a detached ``.nhdr`` header whose data file lies next to it). The readers
# in .io dispatch on the name, so an NRRD case gets the same header checks, RAS+ affine and errors.
DATASET_ENDINGS = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr")


def modality_from_channels(channel_names: Sequence[str]) -> str:
    """Returns "CT" when every channel is CT, "MRI" when all name MR contrasts, else "other"."""
    names = [str(n).strip().lower() for n in channel_names]
    if names and all(n == "ct" for n in names):
        return "CT"
    if names and all(n in _MRI_NAMES or n.startswith(("t1", "t2", "mr")) for n in names):
        return "MRI"
    return "other"


@dataclass
class Case:
    """One training/evaluation case.

    ``image`` is a ``Volume`` ((X, Y, Z) or (C, X, Y, Z)) or the tuple of its channel files (one file
    may itself hold C channels as a 4D series); ``label`` is a ``Volume``, a file path or None.
    ``factory`` (optional) makes both on demand (used by the lazy phantom). Nothing is read from disk
    before ``load_image`` / ``load_label`` / ``load`` is called, and nothing is cached.
    """

    name: str
    image: Volume | tuple[Path, ...] | None = None
    label: Volume | Path | None = None
    factory: Callable[[], tuple[Volume, Volume | None]] | None = field(default=None, repr=False)

    def load_image(self) -> Volume:
        """The image Volume; from files it is (C, X, Y, Z) float32."""
        if isinstance(self.image, Volume):
            return self.image
        if self.image is None:
            if self.factory is None:
                raise InputError(f"case {self.name!r} has no image")
            return self.factory()[0]
        return read_image(self.image, name=self.name)

    def load_label(self) -> Volume | None:
        """The label Volume (integer array), or None for an unlabelled case."""
        if isinstance(self.label, Volume):
            return self.label
        if self.label is None:
            return None if self.factory is None or self.image is not None else self.factory()[1]
        return read_labels(self.label)

    def load(self, label_ids: Sequence[int] | None = None) -> tuple[Volume, Volume | None]:
        """(image, label) after checking they share the grid and that label values are known ids.

        Raises InputError naming the label file (or the case) on a shape/affine mismatch or on label
        values outside ``label_ids``.
        """
        if self.factory is not None and self.image is None:
            image, label = self.factory()
        else:
            image, label = self.load_image(), self.load_label()
        if label is None:
            return image, None
        where: str | Path = self.label if isinstance(self.label, Path) else f"case {self.name}"
        if label.array.ndim != 3:
            raise InputError(f"label map must be 3D, got shape {label.array.shape}", where)
        if label.spatial_shape != image.spatial_shape:
            raise InputError(
                f"label shape {label.spatial_shape} does not match image shape {image.spatial_shape}", where
            )
        if not _same_geometry(label.affine, image.affine):
            raise InputError("label affine does not match the image affine", where)
        if label_ids is not None:
            check_label_values(label.array, label_ids, where)
        return image, label


def check_label_values(array: np.ndarray, label_ids: Sequence[int], where: str | Path | None) -> None:
    present = np.unique(array)
    unknown = sorted(set(int(v) for v in present) - set(int(i) for i in label_ids))
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise InputError(f"label values {shown} are not in the dataset's labels {sorted(label_ids)}", where)


def _normalise_label_table(
    labels: Mapping[Any, Any] | Sequence[str], where: str | Path | None
) -> dict[int, str]:
    if isinstance(labels, Mapping):
        items = list(labels.items())
    else:
        items = list(enumerate(labels))
    table: dict[int, str] = {}
    for key, name in items:
        try:
            ident = int(key)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"label id {key!r} is not an integer", where) from None
        if isinstance(key, bool) or ident < 0 or (ident != key and str(ident) != str(key).strip()):
            raise InputError(f"label id {key!r} is not a non-negative integer", where)
        if ident > _MAX_LABEL_ID:
            raise InputError(f"label id {ident} is too large (at most {_MAX_LABEL_ID})", where)
        if ident in table:
            raise InputError(f"label id {ident} is given twice", where)
        table[ident] = str(name)
    table.setdefault(0, "background")
    return dict(sorted(table.items()))


@dataclass
class Dataset:
    """Cases plus their label table, channel names and modality.

    ``labels``: ``{id: name}`` with 0 = background (added when missing). ``num_classes`` is
    ``max(id) + 1`` (network output channels).
    """

    cases: list[Case]
    labels: dict[int, str]
    channel_names: tuple[str, ...] = ("CT",)
    modality: str = "CT"
    name: str = ""
    root: Path | None = None

    def __post_init__(self) -> None:
        self.labels = _normalise_label_table(self.labels, self.root)
        self.channel_names = tuple(str(c) for c in self.channel_names)
        if not self.channel_names:
            raise InputError("a dataset needs at least one channel", self.root)
        seen: set[str] = set()
        for case in self.cases:
            if case.name in seen:
                raise InputError(f"case name {case.name!r} appears twice", self.root)
            seen.add(case.name)

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def __getitem__(self, key: int | str) -> Case:
        if isinstance(key, str):
            for case in self.cases:
                if case.name == key:
                    return case
            raise KeyError(key)
        return self.cases[key]

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Network output channels: the largest label id + 1 (background included)."""
        return max(self.labels) + 1

    def load(self, key: int | str) -> tuple[Volume, Volume | None]:
        """(image, label) of one case, validated against the grid and this dataset's label ids."""
        case = self[key]
        image, label = case.load(list(self.labels))
        if image.num_channels != self.num_channels:
            raise InputError(
                f"image has {image.num_channels} channels, the dataset declares {self.num_channels}",
                case.image[0] if isinstance(case.image, tuple) else f"case {case.name}",
            )
        return image, label

    def validate(self) -> Dataset:
        """Load every case once (slow for big datasets) so that any bad file is reported now."""
        for i in range(len(self)):
            self.load(i)
        return self

    def subset(self, indices: Sequence[int], name: str | None = None) -> Dataset:
        return Dataset(
            [self.cases[i] for i in indices], dict(self.labels), self.channel_names, self.modality,
            self.name if name is None else name, self.root,
        )  # fmt: skip

    def split(
        self, validation_fraction: float = 0.2, num_validation: int | None = None, seed: int = 0
    ) -> tuple[Dataset, Dataset]:
        """Deterministic (train, validation) split; at least one case of each when len >= 2."""
        n = len(self)
        if num_validation is None:
            num_validation = round(n * validation_fraction)
        num_validation = min(max(num_validation, 1 if n >= 2 else 0), max(n - 1, 0))
        order = np.random.default_rng([int(seed), 0x5B117]).permutation(n)
        val = sorted(int(i) for i in order[:num_validation])
        train = sorted(int(i) for i in order[num_validation:])
        return self.subset(train), self.subset(val)

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[tuple[str | Path | Sequence[str | Path], str | Path | None]],
        labels: Mapping[int, str] | Sequence[str] | None = None,
        *,
        channel_names: Sequence[str] | None = None,
        modality: str | None = None,
        name: str = "",
    ) -> Dataset:
        """Cases from explicit ``(image_path_or_channel_paths, label_path_or_None)`` pairs.

        Shapes and affines are checked from the headers now. Without ``labels`` the label files are
        read to collect their values (named ``label_<id>``). Without ``modality``: "CT" when the
        channel names say so, else guessed from the first image (values below -500 → CT, else MRI).
        """
        cases: list[Case] = []
        num_channels: int | None = None
        for image_spec, label_spec in pairs:
            image_paths = (
                (Path(image_spec),)
                if isinstance(image_spec, str | Path)
                else tuple(Path(p) for p in image_spec)
            )
            if not image_paths:
                raise InputError("an image entry lists no files")
            label_path = None if label_spec is None else Path(label_spec)
            channels = _check_case_files(image_paths, label_path)
            if num_channels is None:
                num_channels = channels
            elif channels != num_channels:
                raise InputError(
                    f"has {channels} channels, the first case has {num_channels}", image_paths[0]
                )
            case_id = _strip_channel_suffix(_stem(image_paths[0]))
            cases.append(Case(_unique(case_id, cases), image_paths, label_path))
        if not cases:
            raise InputError("Dataset.from_pairs: no cases given")
        assert num_channels is not None
        if channel_names is None:
            channel_names = (
                ("CT",) * num_channels
                if modality == "CT"
                else tuple(f"channel_{i}" for i in range(num_channels))
            )
        if len(channel_names) != num_channels:
            raise InputError(f"{len(channel_names)} channel names given for {num_channels} channels")
        if labels is None:
            found: set[int] = set()
            for case in cases:
                if isinstance(case.label, Path):  # from_pairs makes every label a path
                    found |= set(int(v) for v in np.unique(read_labels(case.label).array))
            labels = {v: ("background" if v == 0 else f"label_{v}") for v in sorted(found | {0})}
        if modality is None:
            modality = modality_from_channels(channel_names)
            if modality == "other":
                first = cases[0].load_image().array
                modality = "CT" if float(first.min()) < -500 else "MRI"
        return cls(cases, dict(labels) if isinstance(labels, Mapping) else labels, tuple(channel_names),  # type: ignore[arg-type]
                   modality, name)  # fmt: skip

    @classmethod
    def from_arrays(
        cls,
        images: Sequence[np.ndarray | Volume],
        labels: Sequence[np.ndarray | Volume | None] | None = None,
        affines: np.ndarray | Sequence[np.ndarray | None] | None = None,
        label_names: Mapping[int, str] | Sequence[str] | None = None,
        *,
        names: Sequence[str] | None = None,
        channel_names: Sequence[str] | None = None,
        modality: str | None = None,
        name: str = "",
    ) -> Dataset:
        """In-memory cases (e.g. napari layers already turned into NIfTI voxel order).

        ``images[i]``: (X, Y, Z) or (C, X, Y, Z) array (or Volume); ``labels[i]``: (X, Y, Z) integer
        array, Volume or None; ``affines``: None (identity, 1 mm), one 4×4 for all, or one per case.
        ``label_names``: ``{id: name}`` or a list indexed by id; None → collected from the labels.
        ``modality``: None → from ``channel_names`` when they say CT/MR, else guessed from the first
        image (values below -500 → "CT", else "MRI").
        """
        n = len(images)
        if n == 0:
            raise InputError("Dataset.from_arrays: no images given")
        if labels is not None and len(labels) != n:
            raise InputError(f"Dataset.from_arrays: {n} images but {len(labels)} label maps")
        if names is not None and len(names) != n:
            raise InputError(f"Dataset.from_arrays: {n} images but {len(names)} names")
        if affines is None or (isinstance(affines, np.ndarray) and affines.shape == (4, 4)):
            affine_list: list[np.ndarray | None] = [affines] * n
        else:
            affine_list = list(affines)
            if len(affine_list) != n:
                raise InputError(f"Dataset.from_arrays: {n} images but {len(affine_list)} affines")
        cases: list[Case] = []
        # the Volumes again, as Volumes (a Case may also hold paths)
        vols: list[Volume] = []
        labs: list[Volume | None] = []
        for i, image in enumerate(images):
            case_name = names[i] if names is not None else f"case_{i:03d}"
            vol = _array_case_image(image, affine_list[i], case_name)
            lab_vol = _array_case_label(None if labels is None else labels[i], vol, case_name)
            cases.append(Case(case_name, vol, lab_vol))
            vols.append(vol)
            labs.append(lab_vol)
        nc = {v.num_channels for v in vols}
        if len(nc) != 1:
            raise InputError(f"Dataset.from_arrays: images have different channel counts {sorted(nc)}")
        num_channels = nc.pop()
        if label_names is None:
            found: set[int] = {0}
            for lab in labs:
                if lab is not None:
                    found |= set(int(v) for v in np.unique(lab.array))
            label_names = {v: ("background" if v == 0 else f"label_{v}") for v in sorted(found)}
        table = _normalise_label_table(label_names, None)
        for c, lab in zip(cases, labs, strict=True):
            if lab is not None:
                check_label_values(lab.array, list(table), f"case {c.name}")
        if modality is None:
            modality = modality_from_channels(channel_names) if channel_names is not None else "other"
            if modality == "other":
                first = vols[0].array
                modality = "CT" if float(first.min()) < -500 else "MRI"
        if channel_names is None:
            channel_names = (
                ("CT",) * num_channels
                if modality == "CT"
                else tuple(f"channel_{i}" for i in range(num_channels))
            )
        if len(channel_names) != num_channels:
            raise InputError(f"{len(channel_names)} channel names given for {num_channels} channels")
        return cls(cases, table, tuple(channel_names), modality, name)


# -------------------------------------------------------------------- helpers


def _array_case_image(image: np.ndarray | Volume, affine: np.ndarray | None, case_name: str) -> Volume:
    """One ``from_arrays`` image as a float Volume (identity affine by default), finite values only."""
    where = f"case {case_name}"
    if isinstance(image, Volume):
        vol = image
    else:
        arr = np.asarray(image)
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{where}: image has unsupported type {arr.dtype}")
        aff = np.eye(4) if affine is None else np.asarray(affine, np.float64)
        try:
            vol = Volume(arr.astype(np.float32, copy=False), aff, None, case_name)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
    if vol.array.dtype.kind == "f" and not np.all(np.isfinite(vol.array)):
        raise InputError(f"{where}: image contains NaN or Inf")
    return vol


def _array_case_label(lab: np.ndarray | Volume | None, vol: Volume, case_name: str) -> Volume | None:
    """One ``from_arrays`` label map as a Volume on the image's grid (None stays None)."""
    where = f"case {case_name}"
    lab_vol: Volume | None = None
    if lab is not None:
        lab_arr = lab.array if isinstance(lab, Volume) else np.asarray(lab)
        try:
            lab_arr = as_label_array(lab_arr)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        if lab_arr.shape != vol.spatial_shape:
            raise InputError(
                f"{where}: label shape {lab_arr.shape} does not match image shape {vol.spatial_shape}"
            )
        lab_aff = lab.affine if isinstance(lab, Volume) else vol.affine
        if not _same_geometry(lab_aff, vol.affine):
            raise InputError(f"{where}: label affine does not match the image affine")
        lab_vol = Volume(lab_arr, vol.affine, vol.header, case_name)
    return lab_vol


def _stem(path: Path) -> str:
    lower = path.name.lower()
    for suffix in VOLUME_SUFFIXES:  # .seg.nrrd before .nrrd, .nii.gz before .nii
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _strip_channel_suffix(name: str) -> str:
    m = re.fullmatch(r"(.+)_\d{4}", name)
    return m.group(1) if m else name


def _unique(name: str, cases: Sequence[Case]) -> str:
    names = {c.name for c in cases}
    if name not in names:
        return name
    k = 1
    while f"{name}_{k}" in names:
        k += 1
    return f"{name}_{k}"


def _check_case_files(image_paths: Sequence[Path], label_path: Path | None) -> int:
    """Header-level checks of one case; returns its channel count."""
    if len(image_paths) == 1:
        shape, affine, channels = read_geometry(image_paths[0], allow_channels=True)
    else:
        shape, affine = None, None
        for p in image_paths:
            s, a, _ = read_geometry(p)
            if shape is None:
                shape, affine = s, a
            elif s != shape:
                raise InputError(f"channel shape {s} differs from {shape} of {image_paths[0].name}", p)
            elif not _same_geometry(a, affine):  # type: ignore[arg-type]
                raise InputError(f"channel affine differs from that of {image_paths[0].name}", p)
        channels = len(image_paths)
    if label_path is not None:
        ls, la, _ = read_geometry(label_path)
        if ls != shape:
            raise InputError(f"label shape {ls} does not match image shape {shape}", label_path)
        if not _same_geometry(la, affine):  # type: ignore[arg-type]
            raise InputError("label affine does not match the image affine", label_path)
    return channels


def _inside(root: Path, candidate: Path, where: Path, shown: str) -> Path:
    """``candidate`` if it stays inside ``root`` after resolving ``..`` and symlinks, else InputError."""
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise InputError(f"cannot resolve {shown!r} ({exc})", where) from None
    if not resolved.is_relative_to(root):
        raise InputError(f"{shown!r} points outside the dataset folder {root}; refused", where)
    return candidate


def _relative_entry(root: Path, value: Any, json_path: Path, what: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what} must be a non-empty relative path string, got {value!r}", json_path)
    try:
        os.fsencode(value)
    except (UnicodeError, ValueError):
        raise InputError(f"{what} is not a valid file name: {value!r}", json_path) from None
    if "\x00" in value:
        raise InputError(f"{what} contains a NUL character", json_path)
    rel = Path(value)
    if rel.is_absolute() or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise InputError(
            f"absolute path {value!r} refused; paths must be relative to the dataset folder", json_path
        )
    return _inside(root, root / rel, json_path, value)


def _entries(folder: Path, cache: dict[Path, dict[str, Path]]) -> dict[str, Path]:
    """The non-hidden entries of ``folder`` by lower-case name (file names match in any case:
    ``CASE_0000.NII.GZ`` is found for ``.nii.gz``), listed once per folder."""
    if folder not in cache:
        try:
            cache[folder] = {e.name.lower(): e for e in folder.iterdir() if not e.name.startswith(".")}
        except OSError:
            cache[folder] = {}
    return cache[folder]


def _channel_files(
    root: Path, images_dir: Path, case_id: str, ending: str, channels: int,
    cache: dict[Path, dict[str, Path]] | None = None,
) -> tuple[Path, ...]:
    """The image files of a case, matched by channel number: ``CASE_0000<ending>`` … one per
    declared channel (any case), or one ``CASE<ending>`` (MSD: a 4D series). A channel file beyond
    the declared channels is refused: it would otherwise be left out without a word."""
    entries = _entries(images_dir, {} if cache is None else cache)

    def find(name: str) -> Path | None:
        return entries.get(name.lower())

    files = [find(f"{case_id}_{c:04d}{ending}") for c in range(channels)]
    extra = find(f"{case_id}_{channels:04d}{ending}")
    if all(f is not None for f in files):
        if extra is not None:
            raise InputError(f"channel file beyond the {channels} channel(s) dataset.json declares (channel_names); "
                             "declare it or move it away", extra)
        return tuple(_inside(root, f, f, f.name) for f in files if f is not None)
    single = find(f"{case_id}{ending}")  # MSD: one (possibly 4D) file per case
    if single is not None and not any(files):
        return (_inside(root, single, single, single.name),)
    missing = next(c for c, f in enumerate(files) if f is None)
    raise InputError(f"image file not found (case {case_id!r} has {sum(f is not None for f in files)} of the "
                     f"{channels} channel file(s) dataset.json declares)", images_dir / f"{case_id}_{missing:04d}{ending}")


def _parse_channels(data: dict, json_path: Path) -> tuple[str, ...]:
    raw = data.get("channel_names", data.get("modality"))
    if raw is None:
        raise InputError(
            "dataset.json has neither 'channel_names' (nnU-Net v2) nor 'modality' (MSD)", json_path
        )
    if isinstance(raw, list):
        items = list(enumerate(raw))
    elif isinstance(raw, dict):
        items = []
        for key, value in raw.items():
            try:
                items.append((int(key), value))
            except (TypeError, ValueError):
                raise InputError(f"channel index {key!r} is not an integer", json_path) from None
    else:
        raise InputError("'channel_names' must map channel indices to names", json_path)
    if not items:
        raise InputError("'channel_names' is empty", json_path)
    items.sort()
    if [k for k, _ in items] != list(range(len(items))):
        raise InputError(
            f"channel indices must be 0..{len(items) - 1}, got {[k for k, _ in items]}", json_path
        )
    if not all(isinstance(v, str) and v.strip() for _, v in items):
        raise InputError("channel names must be non-empty strings", json_path)
    return tuple(v for _, v in items)


def _parse_labels(data: dict, json_path: Path) -> dict[int, str]:
    raw = data.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise InputError("dataset.json needs a non-empty 'labels' mapping", json_path)
    values = list(raw.values())
    if any(isinstance(v, list | dict) for v in values):
        raise InputError("region-based labels (lists of ids) are not supported", json_path)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):  # nnU-Net v2: {name: id}
        if not all(isinstance(k, str) for k in raw):
            raise InputError("'labels' names must be strings", json_path)
        table: dict[int, str] = {}
        for label_name, ident in raw.items():
            if ident < 0:
                raise InputError(f"label {label_name!r} has a negative id {ident}", json_path)
            if ident in table:
                raise InputError(f"labels {table[ident]!r} and {label_name!r} share id {ident}", json_path)
            table[ident] = label_name
        return _normalise_label_table(table, json_path)
    if all(isinstance(v, str) for v in values) and all(
        re.fullmatch(r"\s*[0-9]{1,9}\s*", k) for k in raw
    ):  # MSD
        table = {}
        for k, v in raw.items():
            if int(k) in table:
                raise InputError(f"label id {int(k)} is given twice", json_path)
            table[int(k)] = v
        return _normalise_label_table(table, json_path)
    raise InputError(
        "'labels' must map names to integer ids (nnU-Net v2) or id strings to names (MSD)", json_path
    )


def _load_folder(root_in: Path, check: bool) -> Dataset:
    if root_in.is_file() and root_in.name == "dataset.json":
        root_in = root_in.parent
    if not root_in.exists():
        raise InputError("dataset folder not found", root_in)
    if not root_in.is_dir():
        raise InputError("expected a dataset folder (with dataset.json) or phantom:N", root_in)
    root = root_in.resolve()
    json_path = root_in / "dataset.json"
    require_file(json_path, "no dataset.json in the dataset folder")
    _inside(root, json_path, json_path, "dataset.json")
    data = _read_dataset_json(json_path)
    channel_names = _parse_channels(data, json_path)
    labels = _parse_labels(data, json_path)
    ending = data.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or ending not in DATASET_ENDINGS:
        raise InputError(f"file_ending {ending!r} is not supported (only {', '.join(DATASET_ENDINGS)})", json_path)
    listed: dict[Path, dict[str, Path]] = {}  # folder listings, read once
    if data.get("training") is not None:
        cases = _msd_cases(data["training"], root, json_path, ending, len(channel_names), listed)
    elif data.get("dataset") is not None:
        cases = _explicit_cases(data["dataset"], root, json_path)
    else:
        cases = _layout_cases(root_in, root, ending, len(channel_names), listed)
    built: list[Case] = []
    for case_id, images, label in cases:
        for p in (*images, label):
            require_file(p)  # a folder, FIFO or broken link named like a case file is said to be one
        if check:
            channels = _check_case_files(images, label)
            if channels != len(channel_names):
                raise InputError(
                    f"image has {channels} channels, dataset.json declares {len(channel_names)}", images[0]
                )
        built.append(Case(_unique(case_id, built), images, label))
    modality = modality_from_channels(channel_names)
    given_name = data.get("name")
    name = given_name if isinstance(given_name, str) else root_in.name
    return Dataset(built, labels, channel_names, modality, name, root)


def _read_dataset_json(json_path: Path) -> dict:
    """dataset.json as a JSON object (one-line InputError otherwise)."""
    try:
        text = json_path.read_text(encoding="utf-8")
        data = json.loads(text)
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})", json_path) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise InputError(f"not valid JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                         json_path) from None  # fmt: skip
    if not isinstance(data, dict):
        raise InputError("dataset.json must hold a JSON object", json_path)
    return data


def _msd_cases(training: Any, root: Path, json_path: Path, ending: str, n_channels: int,
               listed: dict) -> list[tuple[str, tuple[Path, ...], Path]]:
    """MSD / nnU-Net v1: ``"training": [{"image": "./imagesTr/x.nii.gz", "label": ...}]``."""
    cases: list[tuple[str, tuple[Path, ...], Path]] = []
    if not isinstance(training, list) or not training:
        raise InputError("'training' must be a non-empty list of {image, label} entries", json_path)
    for k, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(f"training entry {k} must have 'image' and 'label'", json_path)
        label = _relative_entry(root, entry["label"], json_path, f"training[{k}].label")
        img_spec = entry["image"]
        if isinstance(img_spec, list):
            images = tuple(_relative_entry(root, v, json_path, f"training[{k}].image") for v in img_spec)
            if not images:
                raise InputError(f"training entry {k} lists no image files", json_path)
        else:
            image = _relative_entry(root, img_spec, json_path, f"training[{k}].image")
            if image.exists():
                images = (image,)
            else:  # nnU-Net v1 lists 'x.nii.gz' while the files are 'x_0000.nii.gz', ...
                images = _channel_files(root, image.parent, _stem(image), ending, n_channels, listed)
        cases.append((_stem(label), images, label))
    return cases


def _explicit_cases(custom: Any, root: Path, json_path: Path) -> list[tuple[str, tuple[Path, ...], Path]]:
    """nnU-Net v2 explicit: ``"dataset": {"case": {"images": [...], "label": "..."}}``."""
    cases: list[tuple[str, tuple[Path, ...], Path]] = []
    if not isinstance(custom, dict) or not custom:
        raise InputError("'dataset' must map case ids to {images, label}", json_path)
    for case_id, entry in custom.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("images"), list)
            or "label" not in entry
        ):
            raise InputError(
                f"dataset entry {case_id!r} must have 'images' (a list) and 'label'", json_path
            )
        images = tuple(_relative_entry(root, v, json_path, f"{case_id}.images") for v in entry["images"])
        if not images:
            raise InputError(f"dataset entry {case_id!r} lists no image files", json_path)
        label = _relative_entry(root, entry["label"], json_path, f"{case_id}.label")
        cases.append((str(case_id), images, label))
    return cases


def _layout_cases(root_in: Path, root: Path, ending: str, n_channels: int,
                  listed: dict) -> list[tuple[str, tuple[Path, ...], Path]]:
    """nnU-Net v2 layout: labelsTr/CASE.nii.gz + imagesTr/CASE_0000.nii.gz ..."""
    cases: list[tuple[str, tuple[Path, ...], Path]] = []
    labels_dir, images_dir = root_in / "labelsTr", root_in / "imagesTr"
    for d in (labels_dir, images_dir):
        if not d.is_dir():
            raise InputError(f"no {d.name} folder (and no 'training' list in dataset.json)", d)
        _inside(root, d, d, d.name)
    for label in sorted(labels_dir.iterdir()):
        lower = label.name.lower()
        if label.name.startswith(".") or not lower.endswith(ending) or len(lower) == len(ending):
            continue  # any case: LIVER_001.NII.GZ is a label file too
        _inside(root, label, label, label.name)
        case_id = label.name[: -len(ending)]
        images = _channel_files(root, images_dir, case_id, ending, n_channels, listed)
        cases.append((case_id, images, label))
    if not cases:
        raise InputError(f"no label files ending in {ending} in labelsTr", labels_dir)
    return cases


def load_dataset(source: str | Path, *, check: bool = True) -> Dataset:
    """A dataset from ``source``.

    - ``"phantom:N"`` (or ``"phantom:N:SEED"``): N procedural abdominal CT cases with AMOS labels.
    - a folder (or its ``dataset.json``) in nnU-Net v2 or MSD layout: ``dataset.json`` with
      ``channel_names`` or ``modality``, ``labels`` as ``{name: id}`` (v2) or ``{"id": name}`` (MSD),
      ``file_ending`` (``.nii.gz``, ``.nii``, ``.nrrd`` or ``.nhdr``); cases from a ``training`` list, a v2 ``dataset`` mapping, or ``labelsTr/`` +
      ``imagesTr/CASE_0000<ending>`` (or ``imagesTr/CASE<ending>`` as a 4D series).

    ``check``: read every file header now (shape, affine, channel count) — fast, no voxels read.
    Label values are checked when a case is loaded (``Dataset.load``).
    """
    text = str(source)
    if text.startswith("phantom:"):
        m = re.fullmatch(r"phantom:(\d+)(?::(\d+))?", text.strip())
        if not m or int(m.group(1)) < 1:
            raise InputError(f"{text!r}: expected phantom:N (N >= 1) or phantom:N:SEED")
        return phantom_dataset(int(m.group(1)), seed=int(m.group(2) or 0))
    return _load_folder(Path(source), check)


def _phantom_case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def phantom_dataset(
    n: int,
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0),
    lazy: bool = False,
) -> Dataset:
    """``n`` phantom cases (CT, AMOS labels) named ``phantom_000`` …; case i uses seed (seed, i).

    In memory by default; ``lazy=True`` renders each case on ``Case.load()`` instead (for many cases).
    """
    if n < 1:
        raise ValueError("phantom_dataset: n must be >= 1")
    cases = []
    for i in range(n):
        case_seed = _phantom_case_seed(seed, i)
        name = f"phantom_{i:03d}"
        if lazy:

            def factory(s: int = case_seed, nm: str = name) -> tuple[Volume, Volume | None]:
                img, lab = make_phantom(s, shape, spacing)
                img.name = lab.name = nm
                return img, lab

            cases.append(Case(name, None, None, factory))
        else:
            img, lab = make_phantom(case_seed, shape, spacing)
            img.name = lab.name = name
            cases.append(Case(name, img, lab))
    return Dataset(cases, dict(AMOS_LABELS), ("CT",), "CT", f"phantom:{n}", None)
