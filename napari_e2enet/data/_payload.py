"""Voxel payloads: bounded reads, compressed data verified end to end, one-line errors.

The readers parse a header and then need exactly ``nbytes`` of voxel data from a file, either
stored raw or compressed (zlib / gzip / bzip2). Everything here reads at most what the header
promises: a compressed stream that would inflate far beyond it (a decompression bomb) is refused,
a stream or file that ends early is a one-line ``InputError`` ("truncated"), never a half-filled
array. Every compressed payload — ``.nii.gz`` (:mod:`.io`), gzip/bzip2 NRRD, compressed MetaImage —
goes through :class:`CheckedStream`, which streams the file through the decompressor once and
refuses it unless every member's checksum and length match and nothing but zero padding follows.
Detached data files must sit inside the header's folder.

It also holds what every format shares and :mod:`.io` re-exports — the case name of a file
(:func:`case_name`) and the label-map rule (:func:`as_label_array`, :func:`labels_dtype`) — so
the readers (:mod:`.nrrd`, :mod:`.metaimage`, :mod:`.dicom`) never import :mod:`.io`, which
dispatches to them.
"""

from __future__ import annotations

import bz2
import io
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

from ..errors import InputError

_CHUNK = 1 << 22  # 4 MiB of compressed input per step
# DEFLATE cannot compress better than ~1032:1: a header promising more bytes than that is lying.
MAX_DEFLATE_RATIO = 1032
# Files that hold one volume (a folder or .zip of DICOM is the other kind of input), longest first.
VOLUME_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_NAME_SUFFIXES = (*VOLUME_SUFFIXES, ".zip", ".dcm")


def matching_suffix(path: Path, suffixes: tuple[str, ...]) -> str | None:
    """The first of ``suffixes`` (lower case) that ``path``'s name ends with, any case, and that is
    not the whole name; None when none does."""
    lower = path.name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    return None


def case_name(path: str | Path) -> str:
    """The name without its format suffix, any case (``liver_003.nii.gz`` → ``liver_003``,
    ``ct.seg.nrrd`` → ``ct``, ``scan.MHA`` → ``scan``, ``series.zip`` → ``series``); a folder keeps
    its name."""
    path = Path(path)
    lower = path.name.lower()
    for suffix in _NAME_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return path.name if path.is_dir() else path.stem


def why(exc: BaseException) -> str:
    """``ExcType: first line`` of an exception, at most 160 characters (for one-line messages)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    name = type(exc).__name__
    msg = f"{name}: {first}" if first else name
    return msg if len(msg) <= 160 else msg[:157] + "..."


def data_file_inside(header_path: Path, name: str) -> Path:
    """The detached data file ``name`` of ``header_path``, refused unless it lies in the header's folder.

    Sub-folders are fine; absolute paths, ``..`` and symbolic links that lead elsewhere are refused:
    a header must not make the reader open arbitrary files.
    """
    name = name.strip()
    if not name:
        raise InputError("empty data file name in the header", header_path)
    folder = header_path.resolve().parent
    candidate = Path(name)
    target = (folder / candidate).resolve()
    if candidate.is_absolute() or not target.is_relative_to(folder):
        raise InputError(f"data file {name!r} lies outside the header's folder (refused)", header_path)
    if not target.is_file():
        from ..pathcheck import special_kind

        kind = special_kind(folder / candidate) or ("a folder" if target.is_dir() else None)
        problem = f"is not a regular file ({kind})" if kind else "not found next to the header"
        raise InputError(f"data file {name!r} {problem}", header_path)
    return target


def read_exact(fh: io.BufferedIOBase, nbytes: int, where: Path) -> bytearray:
    """Exactly ``nbytes`` from ``fh`` (a writable buffer), or InputError when the file ends early."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = fh.readinto(view[got:])
        if not n:
            raise InputError(f"truncated voxel data: {got} of {nbytes} bytes present", where)
        got += n
    return buf


# Extra decompressed bytes beyond what a header declares that are still accepted (CRC-checked, then
# dropped): some writers pad. More than this is refused rather than inflated just to reach the checksum.
EXTRA_ALLOWED = 1 << 20
_MAGIC = {"gzip": b"\x1f\x8b", "zlib": b"\x1f\x8b", "bzip2": b"BZh"}
_WBITS = {"gzip": 31, "zlib": 47}  # 31: gzip only; 47: zlib or gzip, auto-detected
_OUT_STEP = 1 << 22  # at most 4 MiB of decompressed output per step


class CheckedStream(io.RawIOBase):
    """The decompressed bytes of a compressed payload, read once from ``fh``, forward only, and
    verified end to end.

    ``codec``: ``"gzip"`` (gzip members only, as in ``.nii.gz``), ``"zlib"`` (a zlib or gzip stream,
    auto-detected) or ``"bzip2"``. zlib itself checks each gzip member's CRC-32 and ISIZE (a zlib
    stream's Adler-32; bzip2 its block and stream CRCs) when it reaches that member's end;
    :meth:`finish` drives the stream there, so nothing counts as read until every checksum has
    matched. Concatenated members are followed; zero bytes after the last member are padding; any
    other trailing byte, a member cut before its trailer, or a checksum mismatch is a one-line
    ``InputError`` naming ``where``. Only the bytes in flight are held (a few MiB), so a caller can
    ``readinto`` its own buffer and the file is read from disk exactly once.
    """

    def __init__(self, fh: BinaryIO, where: Path, *, codec: str = "gzip") -> None:
        super().__init__()
        if codec not in _MAGIC:
            raise ValueError(f"unknown codec {codec!r}")
        self._fh, self._where, self._codec = fh, where, codec
        self._dec: Any = None
        self._pending = b""
        self._members = 0
        self._ended = False
        self._pos = 0  # decompressed bytes handed out so far

    # -- io.RawIOBase ------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # forward only (what nibabel's array reader needs: seek to the voxel offset)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self._pos + offset if whence == 1 else -1
        if target < self._pos:
            raise OSError(f"{self._where}: a compressed stream can only be read forward")
        while self._pos < target:
            if not self._produce(min(target - self._pos, _OUT_STEP)):
                break
        return self._pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Fill ``buffer`` completely unless the stream ends first; returns the bytes written."""
        view = memoryview(buffer).cast("B")
        got = 0
        while got < len(view):
            out = self._produce(min(len(view) - got, _OUT_STEP))
            if not out:
                break
            view[got:got + len(out)] = out
            got += len(out)
        return got

    # -- verification ------------------------------------------------------------------------
    def finish(self, extra_allowed: int = EXTRA_ALLOWED) -> int:
        """Read the stream to its end so every member's checksum and length are verified.

        Up to ``extra_allowed`` decompressed bytes after what was read are accepted and dropped;
        more is refused (a header that declares less than the stream holds). Returns the total
        number of decompressed bytes.
        """
        declared, extra = self._pos, 0
        while True:
            out = self._produce(min(_OUT_STEP, extra_allowed - extra + 1))
            if not out:
                return self._pos
            extra += len(out)
            if extra > extra_allowed:
                raise InputError(f"the compressed data hold more than the {declared} bytes the header declares "
                                 f"(over {extra_allowed} bytes more); refused", self._where)

    def _read(self) -> bytes:
        try:
            return self._fh.read(_CHUNK)
        except OSError as exc:
            raise InputError(f"cannot read ({exc.strerror or why(exc)})", self._where) from None

    def _new(self) -> Any:
        return bz2.BZ2Decompressor() if self._codec == "bzip2" else zlib.decompressobj(_WBITS[self._codec])

    def _start_member(self) -> bool:
        """Open the next member; False at the (verified) end of the data."""
        if self._ended:
            return False
        if self._members == 0:  # the decompressor judges the first member's magic itself
            self._dec = self._new()
            return True
        magic = _MAGIC[self._codec]
        while len(self._pending) < len(magic):
            more = self._read()
            if not more:
                break
            self._pending += more
        if self._pending[:len(magic)] == magic:
            self._dec = self._new()
            return True
        trailing = len(self._pending)
        nonzero = self._pending.strip(b"\0") != b""
        while not nonzero:  # zero padding to the end of the file is allowed (gzip ignores it too)
            more = self._read()
            if not more:
                break
            trailing += len(more)
            nonzero = more.strip(b"\0") != b""
        if nonzero:
            raise InputError("unexpected bytes after the end of the compressed data (the file is damaged or "
                             "something was appended)", self._where)
        self._ended = True
        self._pending = b""
        return False

    def _produce(self, limit: int) -> bytes:
        """Up to ``limit`` (> 0) further decompressed bytes; b"" only at the verified end."""
        try:
            while True:
                if self._dec is None and not self._start_member():
                    return b""
                dec = self._dec
                if self._codec == "bzip2":
                    data = b""
                    if dec.needs_input:
                        if not self._pending:
                            self._pending = self._read()
                            if not self._pending:
                                self._truncated()
                        data, self._pending = self._pending, b""
                    out = dec.decompress(data, limit)
                else:
                    if not self._pending:
                        self._pending = self._read()
                        if not self._pending:
                            self._truncated()
                    out = dec.decompress(self._pending, limit)
                    self._pending = dec.unconsumed_tail
                if dec.eof:  # this member's checksum and length matched
                    # unused_data holds every input byte after the member's end. zlib may also leave
                    # them in unconsumed_tail (when an earlier call stopped at ``limit``): adding the
                    # two would read the rest of the file twice (a second member seen twice, zero
                    # padding followed by a copy of the data refused as garbage).
                    self._pending = dec.unused_data
                    self._dec = None
                    self._members += 1
                if out:
                    self._pos += len(out)
                    return out
        except InputError:
            raise
        except zlib.error as exc:
            text = str(exc)
            if "incorrect data check" in text:
                problem = "checksum (CRC) mismatch"
            elif "incorrect length check" in text:
                problem = "length check (ISIZE) mismatch"
            else:
                problem = f"corrupt data ({why(exc)})"
            raise InputError(f"compressed data fail verification: {problem}; the file is damaged",
                             self._where) from None
        except (OSError, EOFError, ValueError) as exc:  # bz2: "Invalid data stream"
            raise InputError(f"compressed data fail verification: corrupt data ({why(exc)}); the file is damaged",
                             self._where) from None

    def _truncated(self) -> None:
        raise InputError(f"truncated: the compressed data end after {self._pos} bytes, before their end marker and "
                         "checksum", self._where)


def inflate(fh: BinaryIO, nbytes: int, where: Path, *, codec: str) -> bytearray:
    """Decompress ``fh`` from its current position: exactly ``nbytes``, verified end to end.

    ``codec``: ``"gzip"``, ``"zlib"`` (zlib or gzip, auto-detected) or ``"bzip2"``; see
    :class:`CheckedStream`. A stream that ends before ``nbytes`` is "truncated"; a checksum
    mismatch, a member cut before its trailer or appended garbage is refused; more than
    ``EXTRA_ALLOWED`` bytes past ``nbytes`` are refused without inflating them all.
    """
    stream = CheckedStream(fh, where, codec=codec)
    buf = bytearray(nbytes)
    got = stream.readinto(buf)
    if got < nbytes:
        raise InputError(f"truncated voxel data: {got} of {nbytes} bytes after decompression", where)
    stream.finish()
    return buf


def read_ascii(fh: BinaryIO, count: int, dtype: npt.DTypeLike, where: Path) -> np.ndarray:
    """``count`` whitespace-separated numbers as a numpy array of ``dtype`` (ASCII-encoded data)."""
    try:
        tokens = fh.read().split()
    except OSError as exc:
        raise InputError(f"cannot read voxel data ({why(exc)})", where) from None
    if len(tokens) < count:
        raise InputError(f"truncated voxel data: {len(tokens)} of {count} values present", where)
    try:
        return np.array([float(t) for t in tokens[:count]]).astype(dtype)
    except ValueError as exc:
        raise InputError(f"corrupt ASCII voxel data ({why(exc)})", where) from None


def voxels_for_writing(array: npt.ArrayLike, where: Path) -> tuple[np.ndarray, bool]:
    """The array as a writer stores it, and whether it is a label map.

    Integer / bool arrays are label maps (uint8, int16 or int32: the smallest that fits, via
    ``as_label_array``); float arrays are images, stored as float32; anything else is refused.
    The same rule as the NIfTI writer, so every format stores the same voxels.
    """
    array = np.asarray(array)
    if array.dtype.kind in "biu":
        return as_label_array(array, where), True
    if array.dtype.kind == "f":
        data = array.astype(np.float32, copy=False)
        if not np.all(np.isfinite(data)):
            raise InputError("image contains NaN or Inf voxels", where)
        return data, False
    raise InputError(f"cannot write voxels of type {array.dtype}", where)


def labels_dtype(lo: int, hi: int) -> np.dtype:
    """The smallest of uint8 / int16 / int32 that holds [lo, hi]."""
    if lo >= 0 and hi <= 255:
        return np.dtype(np.uint8)
    if lo >= -32768 and hi <= 32767:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def as_label_array(array: np.ndarray, where: str | Path | None = None) -> np.ndarray:
    """Validate and convert a label map: integer-valued, non-negative → uint8/int16/int32."""
    array = np.asarray(array)
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InputError("label map contains NaN or Inf", where)
        fractional = array != np.round(array)
        if fractional.any():
            example = float(array[fractional].flat[0])
            raise InputError(
                f"label values must be integers; found {example:g} ({int(fractional.sum())} voxels)", where
            )
    elif array.dtype.kind not in "iu":
        raise InputError(f"label map has unsupported type {array.dtype}", where)
    if array.size == 0:
        return array.astype(np.uint8)
    lo, hi = float(array.min()), float(array.max())
    if lo < 0:
        raise InputError(f"negative label value {lo:g}; labels are 0 (background) or positive ids", where)
    if hi > np.iinfo(np.int32).max:
        raise InputError(f"label value {hi:g} is too large", where)
    return array.astype(labels_dtype(int(lo), int(hi)), copy=False)
