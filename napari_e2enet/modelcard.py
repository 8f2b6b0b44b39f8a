"""The model-file contract: where a model lives, what its file holds, and how it is read and written.

Training writes model files, inference reads them, the CLI, the widgets and fine-tuning name them;
all of them go through this module, which sits below ``training`` and ``inference`` (and above
``data`` and ``models``, whose types the card holds). It owns:

- the file names of a run folder (``MODEL_FILE``, ``CONFIG_FILE``, ``STATE_FILE``, ...) and of a
  bundled-model folder (``CARD_FILE``): each name is spelled here and nowhere else;
- the model spec a user gives (``--model``, the Segment widget's model list): a bundled model name,
  a ``model.safetensors`` file or a folder holding one (:func:`resolve_model`);
- the model file itself: weights (pruned kernels exactly zero) and kernel masks (bool buffers
  ``<module>.kernel_mask``) in safetensors, with metadata in its header — the format and
  ``format_version`` (a newer version is refused), the model config, and the model card (plan,
  label table, training patch, mirror axes, intended input, train config; :class:`ModelCard`).
  Loading never executes code, checks shapes before allocating, and refuses NaN/Inf weights.

Every write goes to a temporary name and is renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .data.intended_input import IntendedInput
from .data.preprocess import Plan
from .errors import InputError
from .fileio import atomic_output
from .labels import LabelTable
from .models import E2ENet, create_model
from .pathcheck import require_file, special_kind

__all__ = [
    "CARD_FILE", "CONFIG_FILE", "CONNECTIVITY_FILE", "DEFAULT_MODEL", "ERROR_LOG", "FINETUNE_FILE", "FORMAT",
    "FORMAT_VERSION", "LOCK_FILE", "METRICS_FILE", "MODEL_FILE", "RESULT_FILES", "RUN_FILES", "STATE_FILE",
    "BundledModel", "ModelCard", "ModelSource", "bundled_model", "first_line", "holds_model", "list_bundled_models",
    "load_model", "model_file_in", "read_card", "read_metadata", "resolve_model", "resources_dir", "save_model",
    "sha256_of", "update_metadata",
]

# -- file names ----------------------------------------------------------------------------------
MODEL_FILE = "model.safetensors"  # weights + masks + model card (every model folder)
CONFIG_FILE = "config.json"  # the resolved TrainConfig of a run
STATE_FILE = "training_state.pt"  # optimizer, DSFF updater, iteration, history (resumable)
METRICS_FILE = "metrics.csv"  # one row per epoch
CONNECTIVITY_FILE = "connectivity.json"  # DSFF connectivity history
LOCK_FILE = "train.lock"  # held while a process trains in the folder
ERROR_LOG = "error.log"  # where the CLI puts the traceback of an unexpected error in this run
FINETUNE_FILE = "finetune.json"  # what a fine-tune did (base model, image, settings)
CARD_FILE = "model_card.json"  # a bundled model's provenance, held-out Dice, sha256 of its weights
# Files that make a folder hold a run (config.json alone is a run that never saved anything).
RESULT_FILES = (MODEL_FILE, STATE_FILE, METRICS_FILE, CONNECTIVITY_FILE)
RUN_FILES = (CONFIG_FILE, *RESULT_FILES, ERROR_LOG)

DEFAULT_MODEL = "mni152-tissue"
DEFAULT_PATCH = (64, 64, 64)  # model files from before the train config was stored in them


def model_file_in(path: str | Path) -> Path:
    """The model file a path names: a folder's ``model.safetensors``, or the path itself."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def holds_model(folder: str | Path) -> bool:
    """Whether a folder holds a model file (a run, a fine-tuned run, a bundled-model folder)."""
    return (Path(folder) / MODEL_FILE).is_file()


# -- bundled models --------------------------------------------------------------------------------
def resources_dir() -> Path:
    """``napari_e2enet/resources/``: the bundled models and the sample (package data, in the wheel too)."""
    return Path(__file__).resolve().parent / "resources"


@dataclass(frozen=True)
class BundledModel:
    """``resources/models/<name>/``: the model file and its ``model_card.json``."""

    name: str
    folder: Path
    card: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def sha256(self) -> str:
        return str(self.card["sha256"])

    @property
    def intended(self) -> IntendedInput | None:
        """The card's ``intended_input`` (what the model expects), None when the card has none."""
        try:
            return IntendedInput.from_dict(self.card["intended_input"])
        except (KeyError, ValueError):
            return None


def list_bundled_models() -> list[str]:
    root = resources_dir() / "models"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CARD_FILE).is_file())


def bundled_model(name: str = DEFAULT_MODEL) -> BundledModel:
    folder = resources_dir() / "models" / name
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        available = ", ".join(list_bundled_models()) or "none"
        raise InputError(f"no bundled model {name!r} (available: {available})")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable model card ({exc})", card_path) from None
    return BundledModel(name, folder, card)


# -- model specs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points: the model file, the checksum it must have (bundled models) and
    the bundled name (None for a file or run folder)."""

    path: Path
    sha256: str | None = None
    bundled: str | None = None


def resolve_model(spec: str | Path | None) -> ModelSource:
    """``None`` → the default bundled model; a bundled name; or a model file / a folder holding one.

    A FIFO, device or socket is refused as what it is, a path that does not exist as such; a folder
    without a model file resolves to its (missing) ``model.safetensors``, which the reader names.
    """
    if spec is None or str(spec) in list_bundled_models():
        bundled = bundled_model(DEFAULT_MODEL if spec is None else str(spec))
        return ModelSource(bundled.weights, bundled.sha256, bundled.name)
    kind = special_kind(spec)
    if kind is not None:
        raise InputError(f"not a model file, run folder or bundled model name ({kind})", spec)
    if not Path(spec).exists():
        raise InputError("no such model file, run folder or bundled model name", spec)
    return ModelSource(model_file_in(spec))


# -- the model card ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCard:
    """What a model file says about its model, besides the weights.

    plan: the preprocessing plan (spacing, orientation, normalisation); labels: the label table;
    patch: the (D, H, W) training patch, also the inference tile; mirror_axes: the network axes the
    training flipped (the TTA flips allowed); intended: what input the model expects (None: derive it
    from the plan); train_config: the TrainConfig as a dict ({} when unknown); iterations: how many
    the weights saw; extra: any other metadata (e.g. ``finetune``), kept as read.
    """

    plan: Plan
    labels: LabelTable
    model_config: ModelConfig
    patch: tuple[int, int, int] = DEFAULT_PATCH
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    intended: IntendedInput | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    iterations: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = frozenset({"format", "format_version", "model_config", "plan", "labels", "patch", "mirror_axes",
                        "intended_input", "train_config", "iterations"})

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], path: str | Path | None = None) -> ModelCard:
        """The card of decoded metadata (:func:`read_metadata`); InputError naming ``path`` when a
        field is missing or unusable."""
        if "plan" not in meta or "labels" not in meta:
            raise InputError("model file lacks its preprocessing plan or label table", path)
        try:
            config = ModelConfig.from_dict(meta["model_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"invalid model config in metadata ({exc})", path) from None
        try:
            train = meta.get("train_config") or {}
            patch = tuple(int(p) for p in (train.get("data") or {}).get("patch") or meta.get("patch")
                          or DEFAULT_PATCH)
            if len(patch) != 3 or min(patch) < 1:
                raise ValueError(f"patch {list(patch)} is not 3 positive sizes")
            plan, labels = Plan.from_dict(meta["plan"]), LabelTable.from_dict(meta["labels"])
            mirror_axes = tuple(int(a) for a in meta.get("mirror_axes", (0, 1, 2)))  # older files: all
            if not set(mirror_axes) <= {0, 1, 2}:
                raise ValueError(f"mirror axes {list(mirror_axes)} are not network axes 0..2")
            intended = IntendedInput.from_dict(meta["intended_input"]) if "intended_input" in meta else None
            iterations = int(meta["iterations"]) if meta.get("iterations") is not None else None
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise InputError(f"unusable metadata in the model file ({detail})", path) from None
        extra = {k: v for k, v in meta.items() if k not in cls._KNOWN}
        return cls(plan, labels, config, (patch[0], patch[1], patch[2]), mirror_axes, intended, dict(train),
                   iterations, extra)

    def to_metadata(self) -> dict[str, Any]:
        """The metadata :func:`save_model` writes besides format and model config (which it takes
        from the model). ``patch`` is written only where the train config does not hold it."""
        meta: dict[str, Any] = {"plan": self.plan.to_dict(), "labels": self.labels.to_dict()}
        if self.iterations is not None:
            meta["iterations"] = self.iterations
        if self.train_config:
            meta["train_config"] = self.train_config
        if tuple((self.train_config.get("data") or {}).get("patch") or ()) != self.patch:
            meta["patch"] = list(self.patch)
        meta["mirror_axes"] = list(self.mirror_axes)
        if self.intended is not None:
            meta["intended_input"] = self.intended.to_dict()
        return {**meta, **self.extra}


def read_card(path: str | Path) -> ModelCard:
    """The model card of a model file (or of the folder holding one), without loading the weights."""
    path = model_file_in(path)
    return ModelCard.from_metadata(read_metadata(path), path)


# -- the model file ------------------------------------------------------------------------------------
FORMAT = "napari-e2enet/model"
FORMAT_VERSION = "1"
MASK_KEY = "kernel_mask"


def save_model(model: E2ENet, path: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write weights, masks and metadata (JSON-able values) to a safetensors file atomically."""
    path = Path(path)
    tensors = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "model_config": json.dumps(model.config.to_dict())}
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    with atomic_output(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except SafetensorError as exc:  # e.g. disk full: safetensors reports I/O errors as SafetensorError
            raise InputError(f"cannot write ({first_line(exc)})", path) from None
    return path


def update_metadata(path: str | Path, changes: dict[str, Any]) -> Path:
    """Rewrite a model file's metadata with ``changes`` (JSON-able values), tensors unchanged, atomically."""
    path = Path(path)
    read_metadata(path)  # refuses a file that is not a napari-e2enet model
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    tensors = load_file(str(path), device="cpu")
    for key, value in changes.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    with atomic_output(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except SafetensorError as exc:
            raise InputError(f"cannot write ({first_line(exc)})", path) from None
    return path


def first_line(exc: BaseException) -> str:
    """An exception as one short line (for "cannot write (...)" messages)."""
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split())[:200] if text else type(exc).__name__


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the checksum a bundled model's card records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a model file, JSON values decoded. Raises InputError for non-model files."""
    path = require_file(path, "model file not found")  # a FIFO or /dev/zero: said so, never read
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"not a safetensors model file ({exc})", path) from None
    if raw.get("format") != FORMAT:
        raise InputError("not a napari-e2enet model file (no napari-e2enet metadata)", path)
    version = str(raw.get("format_version", FORMAT_VERSION)).strip()
    if not version.isdigit():
        raise InputError(f"unreadable model format_version {version[:40]!r} (this napari-e2enet reads version "
                         f"{FORMAT_VERSION})", path)
    if int(version) > int(FORMAT_VERSION):  # written by a newer napari-e2enet: fields may mean something else
        raise InputError(f"model format_version {version} is newer than this napari-e2enet reads ({FORMAT_VERSION}); "
                         "update napari-e2enet to use this model", path)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # kept as text; whoever needs it refuses it
            out[key] = value
    return out


def load_model(path: str | Path, *, expected_sha256: str | None = None,
               device: str | torch.device = "cpu") -> tuple[E2ENet, dict[str, Any]]:
    """Build the model a file describes and load its weights and masks; returns (model, metadata).

    ``expected_sha256``: refuse the file unless its checksum matches (bundled models).
    """
    path = Path(path)
    if expected_sha256 is not None:
        actual = sha256_of(path) if path.is_file() else None
        if actual != expected_sha256:
            raise InputError(f"checksum mismatch (expected {expected_sha256[:12]}…, got "
                             f"{(actual or 'missing')[:12]}…): the file is damaged or was replaced", path)
    meta = read_metadata(path)
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"invalid model config in metadata ({exc})", path) from None
    _check_shapes(config, path)  # before any allocation: a tampered config cannot ask for terabytes
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise InputError(f"cannot read weights ({exc})", path) from None
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InputError(f"tensor {name} contains NaN or Inf values", path)
    model = create_model(config, sparsity=0.0)
    masks = {k[: -len(MASK_KEY)] + "weight": v for k, v in tensors.items() if k.endswith(MASK_KEY)}
    try:
        model.set_masks(masks)  # creates the mask buffers, so the strict load below expects them
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"weights do not fit the described architecture ({str(exc).splitlines()[0][:200]})",
                         path) from None
    model.apply_masks()
    return model.to(device), meta


class _SkipInitOnMeta(torch.overrides.TorchFunctionMode):
    """In-place ops (weight init) on meta tensors are no-ops: only shapes are wanted, and torch's first
    ``normal_`` on the meta device costs seconds. Thread-local, like the ``torch.device`` context."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _check_shapes(config: ModelConfig, path: Path) -> None:
    """Compare the file's tensor names and shapes with the architecture its metadata describes.

    The model is built on the ``meta`` device (no memory), so a file whose metadata was altered to
    describe a huge or different network is refused before anything is allocated.
    """
    try:
        with torch.device("meta"), _SkipInitOnMeta():
            expected = {k: tuple(v.shape) for k, v in create_model(config, sparsity=0.0).state_dict().items()}
        with safe_open(str(path), framework="pt") as fh:
            found = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"cannot read weights ({str(exc).splitlines()[0][:200] if str(exc) else exc!r})",
                         path) from None
    for name, shape in found.items():
        if name.endswith(MASK_KEY):
            weight = name[: -len(MASK_KEY)] + "weight"
            if weight not in expected:
                raise InputError(f"mask {name} has no weight in the described architecture", path)
            continue
        if name not in expected:
            raise InputError(f"unexpected tensor {name} (the file does not fit the described architecture)", path)
        if shape != expected[name]:
            raise InputError(f"tensor {name} has shape {list(shape)} but the described architecture needs "
                             f"{list(expected[name])}", path)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise InputError(f"tensor {missing[0]} is missing ({len(missing)} missing; the file does not fit the "
                         "described architecture)", path)
