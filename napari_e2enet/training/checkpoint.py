"""The resumable training state (``training_state.pt``).

Optimizer, DSFF updater, iteration and history; only plain tensors and containers, loaded with
``torch.load(weights_only=True)`` so a pickle payload cannot run, and verified against the SHA-256
of its content stored inside it (damage is refused, not resumed). Written to a temporary name and
renamed, so a crash never leaves half a file. Model files are :mod:`napari_e2enet.modelcard`'s.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..fileio import atomic_output
from ..modelcard import first_line

__all__ = ["DIGEST_KEY", "load_state", "save_state", "state_digest"]

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
            raise InputError(f"cannot write ({first_line(exc)})", path) from None
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
