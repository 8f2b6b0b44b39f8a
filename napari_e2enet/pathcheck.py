"""What a path really is, and whether an output can be written there — asked before any work starts.

A FIFO, a character device such as ``/dev/zero``, a socket or a broken symbolic link named as an
input must be reported as what it is (reading a FIFO would block forever, ``/dev/zero`` never ends),
not as "not found" or "empty". An output location is probed by creating and removing the same kind
of hidden temporary file the atomic writer (:mod:`.fileio`) will create, so a read-only file system,
a missing permission or a name too long for the file system is found before minutes of computing,
not after. (``os.access`` is not enough: it says yes to root on most of these.)
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import InputError
from .fileio import temporary_prefix

__all__ = ["check_writable", "require_file", "special_kind"]


def special_kind(path: str | Path) -> str | None:
    """``"a FIFO"``, ``"a character device"``, ``"a block device"``, ``"a socket"`` or
    ``"a broken symbolic link to …"`` for such a path; None for a regular file, a folder, a path
    that does not exist, or one that cannot be examined (the caller's own error then applies)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                return f"a broken symbolic link to {os.readlink(path)}"
            except OSError:
                return "a broken symbolic link"
        return None
    except (OSError, ValueError):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return None


def require_file(path: str | Path, missing: str = "file not found") -> Path:
    """``path`` if it is a regular file (or a link to one); else InputError saying what it is:
    ``not a regular file (a FIFO)``, ``is a folder, not a file``, or ``missing``."""
    path = Path(path)
    kind = special_kind(path)
    if kind is not None:
        raise InputError(f"not a regular file ({kind})", path)
    if path.is_dir():
        raise InputError("is a folder, not a file", path)
    if not path.is_file():
        raise InputError(missing, path)
    return path


def check_writable(target: str | Path, suffix: str = "") -> None:
    """Raise InputError naming ``target`` unless a file can be created next to it now.

    Creates and removes a hidden temporary file named as :func:`.fileio.atomic_output` names its
    temporaries (``.NAME.PID-HOST.XXXXXXXX.tmp<suffix>``), so what will fail at the end fails here instead.
    A target that exists but is a folder, a FIFO or a device is refused too.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"output folder {folder} {problem}", target)
    kind = special_kind(target)
    if kind is not None and not kind.startswith("a broken"):  # a dangling link is simply replaced
        raise InputError(f"exists and is {kind}, not a file that can be replaced", target)
    if target.is_dir():
        raise InputError("exists and is a folder; choose another output name", target)
    try:
        # the atomic writer's own temporary name (it carries the writer's pid and host), so that a
        # name too long for the file system fails here exactly when it would fail there
        fd, name = tempfile.mkstemp(prefix=temporary_prefix(target.name), suffix=".tmp" + suffix, dir=folder)
    except OSError as exc:
        raise InputError(f"cannot write ({exc.strerror or exc})", target) from None
    os.close(fd)
    os.unlink(name)
