"""Atomic output: every file the project writes appears whole or not at all.

A writer gets a temporary path in the destination folder (same file system, so the final
``os.replace`` is atomic); on success the file gets the destination's permissions (0644 for a new
file) and is renamed into place; on any failure the temporary file is removed and the destination
is untouched. A crash (kill -9) can leave at most a hidden ``.NAME.PID-HOST.XXXXXXXX.tmp`` file, never
a half-written ``NAME``; the temporary's name says which process wrote it, so the next run can delete
the leftovers of dead processes (:func:`remove_stale_temporaries`) and never a live writer's file.

:class:`FolderLock` is the lock a training run holds on its folder for its whole lifetime.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
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
        fd, name = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp" + suffix, dir=folder)
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


# -- temporaries --------------------------------------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
# ``.NAME.`` [``PID-HOST.``] ``XXXXXXXX.tmp`` [suffix]: mkstemp's 8 random characters; files from
# before the owner was part of the name have no ``PID-HOST.``.
_TEMPORARY = re.compile(r"\.(?P<name>.+?)\.(?:(?P<pid>\d+)-(?P<host>[A-Za-z0-9-]+)\.)?[a-z0-9_]{8}\.tmp(?:\..+)?")


def temporary_prefix(name: str) -> str:
    """The start of the hidden temporary name :func:`atomic_output` uses for ``name`` (owner included)."""
    return f".{name}.{os.getpid()}-{_HOST}."


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's process), or we cannot tell: keep its files
    return True


def remove_stale_temporaries(folder: str | Path, names: Iterable[str] | None = None, *,
                             any_owner: bool = False) -> list[Path]:
    """Delete the hidden temporaries that :func:`atomic_output` left in ``folder`` when its process
    was killed (``kill -9``, a power cut). Returns the paths deleted.

    A temporary is stale when the process named in it no longer runs on this host; those of other
    hosts (a shared file system) and of running processes are kept. ``any_owner``: every temporary
    counts as stale — only for a caller that holds the folder's :class:`FolderLock`, so that no other
    process writes there. ``names``: only the temporaries of these destination names.
    """
    wanted = None if names is None else set(names)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or (wanted is not None and match["name"] not in wanted):
            continue
        if not any_owner:
            if match["pid"] is None or match["host"] != _HOST or _pid_running(int(match["pid"])):
                continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass  # gone already, or not ours to delete: harmless
    return removed


# -- folder lock --------------------------------------------------------------------------------
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def _os_lock(fd: int) -> bool | None:
    """Try the OS lock on ``fd``: True (got it), False (another process holds it), None (the file
    system has no locks, e.g. some network mounts)."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            import msvcrt

            os.lseek(fd, 1 << 20, os.SEEK_SET)  # a byte past the record, so others can still read it
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:
        import errno

        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _read_record(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0) if hasattr(os, "pread") else b""
        record = json.loads(raw.decode("utf-8"))
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(record: dict) -> str:
    """``pid 123 on HOST since 2025-01-01 12:00:00 (COMMAND)`` from a lock record (missing parts left out)."""
    text = f"pid {record.get('pid', '?')} on {record.get('host', '?')}"
    if record.get("started"):
        text += f" since {record['started']}"
    if record.get("command"):
        text += f" ({' '.join(str(record['command']).split())[:120]})"
    return text


class FolderLock:
    """An exclusive lock on a folder, held for the lifetime of one process's work there.

    ``folder/name`` holds one JSON record: pid, host, start time and command line of the holder (what
    a refused process is told). What excludes is the OS lock on that file (``flock``), which the
    kernel drops when the holder dies, even by ``kill -9``: a lock file left by a dead process is
    taken over (its record is kept in ``took_over`` for a note). On a file system without OS locks the
    record decides: a holder on this host whose pid no longer runs is dead; any other is respected.
    """

    def __init__(self, folder: str | Path, name: str = "train.lock", *, command: str = "") -> None:
        self.path = Path(folder) / name
        self.command = command
        self.took_over: dict | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock, or raise InputError naming the lock file and its holder."""
        for _ in range(100):  # retried only when a releasing holder unlinked the file under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise InputError(f"cannot create the lock file ({exc.strerror or exc})", self.path) from None
            got = _os_lock(fd)
            previous = _read_record(fd)
            if got is None:  # no OS locks here: judge by the record
                got = not previous or (previous.get("host") == _HOST and not _pid_running(int(previous.get("pid", 0))))
            if not got:
                os.close(fd)
                raise InputError(f"the folder is in use by another run: {describe_holder(previous)}; wait for it "
                                 "to end, or use another folder (delete this file only if that process is gone)",
                                 self.path)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if not same:  # the previous holder removed the file after we opened it: lock the new one
                os.close(fd)
                continue
            if previous:
                self.took_over = previous
            record = {"pid": os.getpid(), "host": _HOST, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "command": self.command}
            try:
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            except OSError as exc:
                os.close(fd)
                raise InputError(f"cannot write the lock file ({exc.strerror or exc})", self.path) from None
            self._fd = fd
            return self
        raise InputError("the lock file keeps being replaced by other processes", self.path)

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if fcntl is not None:  # unlink while still holding it, so nobody locks a file being removed
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    os.unlink(self.path)
        except OSError:
            pass  # already gone (the folder was removed or moved): closing releases the lock
        finally:
            os.close(fd)
        if fcntl is None:  # Windows cannot delete an open file: remove it after closing
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
