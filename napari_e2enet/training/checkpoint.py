"""Model files and resumable training state.

- ``model.safetensors``: the state dict — weights (pruned kernels exactly zero) and the kernel masks
  (bool buffers ``<module>.kernel_mask``) — plus metadata (model config, preprocessing plan, label table, format version)
  in the safetensors header. Loading never executes code.
- ``training_state.pt``: optimizer, DSFF updater, iteration and history; only plain tensors and
  containers, loaded with ``torch.load(weights_only=True)`` so a pickle payload cannot run, and
  verified against the SHA-256 of its content stored inside it (damage is refused, not resumed).
Both are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..errors import InputError
from ..fileio import atomic_output
from ..models import E2ENet, create_model

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
            raise InputError(f"cannot write ({_first_line(exc)})", path) from None
    return path


def update_metadata(path: str | Path, changes: dict[str, Any]) -> Path:
    """Rewrite a model file's metadata with ``changes`` (JSON-able values), tensors unchanged, atomically."""
    path = Path(path)
    read_metadata(path)  # refuses a file that is not a napari-e2enet model
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    tensors = load_file(str(path), device="cpu")
    for key, value in changes.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    with atomic_output(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except SafetensorError as exc:
            raise InputError(f"cannot write ({_first_line(exc)})", path) from None
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split())[:200] if text else type(exc).__name__


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a model file, JSON values decoded. Raises InputError for non-model files."""
    from ..pathcheck import require_file

    path = require_file(path, "model file not found")  # a FIFO or /dev/zero: said so, never read
    try:
        from safetensors import safe_open

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

    def __torch_function__(self, func, types, args=(), kwargs=None):
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
    from safetensors import safe_open

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


DIGEST_KEY = "content_sha256"


def state_digest(state: Any) -> str:
    """SHA-256 of a training state's content: every tensor's dtype, shape and bytes, every key, number
    and string, in a fixed order (``DIGEST_KEY`` itself left out). Independent of the file's zip
    layout, so it proves that what was loaded is what was saved."""
    digest = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            digest.update(f"D{len(obj)}".encode())
            for key in sorted(obj, key=repr):
                if key == DIGEST_KEY:
                    continue
                digest.update(f"K{key!r}".encode())
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            digest.update(f"L{len(obj)}".encode())
            for item in obj:
                feed(item)
        else:  # str, int, float, bool, None: repr is exact (floats round-trip)
            digest.update(f"V{type(obj).__name__}:{obj!r}".encode())

    feed(state)
    return digest.hexdigest()


def save_state(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write a training state made of tensors, numbers, strings and containers, with the
    SHA-256 of its content (``DIGEST_KEY``) that :func:`load_state` verifies."""
    path = Path(path)
    state = {**state, DIGEST_KEY: state_digest(state)}
    with atomic_output(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # e.g. disk full: torch's zip writer reports a short write as RuntimeError
            raise InputError(f"cannot write ({_first_line(exc)})", path) from None
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a training state with ``weights_only=True``: a pickle carrying code is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputError("training state not found", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"refused to load training state ({_why_refused(exc)})", path) from None
    if not isinstance(state, dict):
        raise InputError(f"not a training state (holds a {type(state).__name__}, not a mapping)", path)
    expected = state.pop(DIGEST_KEY, None)  # states saved before the checksum existed have none
    if expected is not None:
        actual = state_digest(state)
        if actual != expected:
            raise InputError(f"checksum mismatch (stored {str(expected)[:12]}…, content {actual[:12]}…): the "
                             "training state is damaged; resume from a copy, or start again", path)
    return state


def _why_refused(exc: BaseException) -> str:
    """The useful part of a ``torch.load`` failure, as one short line (no ANSI, no "load it unsafely" advice)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if match:
        return f"it references {match.group(1)}, which is not a tensor or plain data; refused so that no code runs"
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if match:
        detail = match.group(1)
    else:  # skip torch's paragraph about weights_only defaults: it advises loading the file unsafely
        lines = [line for line in text.strip().splitlines() if line.strip() and "weights_only" not in line]
        detail = lines[0] if lines else type(exc).__name__
    return f"not a valid training-state file: {' '.join(detail.split())[:160]}"
