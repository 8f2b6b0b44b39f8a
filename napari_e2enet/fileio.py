"""Atomic output: every file the project writes appears whole or not at all.

A writer gets a temporary path in the destination folder (same file system, so the final
``os.replace`` is atomic); on success the file gets the destination's permissions (0644 for a new
file) and is renamed into place; on any failure the temporary file is removed and the destination
is untouched. A crash (kill -9) can leave at most a hidden ``.NAME.*.tmp`` file, never a
half-written ``NAME``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


@contextmanager
def atomic_output(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` when the block succeeds.

    ``suffix`` is appended to the temporary name (e.g. ``.nii.gz`` for writers that pick the format
    from the name). A missing or unwritable folder raises InputError naming ``path``.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {folder} does not exist", path)
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=folder)
    except OSError as exc:
        raise InputError(f"cannot write ({exc.strerror or exc})", path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write ({exc.strerror or exc})", path) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
