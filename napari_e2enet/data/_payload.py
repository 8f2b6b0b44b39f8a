"""Voxel payloads of header + data formats (NRRD, MetaImage): bounded reads, one-line errors.

The readers parse a text header and then need exactly ``nbytes`` of voxel data from a file, either
stored raw or compressed (zlib / gzip / bzip2). Everything here reads at most what the header
promises: a compressed stream that would inflate beyond it (a decompression bomb) stops there, a
stream or file that ends early is a one-line ``InputError`` ("truncated"), never a half-filled
array. Detached data files must sit inside the header's folder.
"""

from __future__ import annotations

import bz2
import zlib
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError

_CHUNK = 1 << 22  # 4 MiB of compressed input per step
# DEFLATE cannot compress better than ~1032:1: a header promising more bytes than that is lying.
MAX_DEFLATE_RATIO = 1032


def matching_suffix(path: Path, suffixes: tuple[str, ...]) -> str | None:
    """The first of ``suffixes`` (lower case) that ``path``'s name ends with, any case, and that is
    not the whole name; None when none does."""
    lower = path.name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    return None


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
        raise InputError(f"data file {name!r} not found next to the header", header_path)
    return target


def read_exact(fh: BinaryIO, nbytes: int, where: Path) -> bytearray:
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


def inflate(fh: BinaryIO, nbytes: int, where: Path, *, codec: str) -> bytearray:
    """Decompress ``fh`` from its current position until ``nbytes`` are out, never more.

    ``codec``: ``"zlib"`` (zlib or gzip stream, auto-detected; concatenated gzip members are
    followed) or ``"bzip2"``. A stream that ends before ``nbytes`` is "truncated"; bytes that do not
    decode are "corrupt". Extra data after ``nbytes`` is ignored, unread.
    """

    def new():
        return zlib.decompressobj(47) if codec == "zlib" else bz2.BZ2Decompressor()

    out = bytearray()
    dec = new()
    pending = b""
    try:
        while len(out) < nbytes:
            if not pending:
                pending = fh.read(_CHUNK)
                if not pending:
                    break
            if codec == "zlib":
                out += dec.decompress(pending, nbytes - len(out))
                pending = dec.unconsumed_tail
                if dec.eof:
                    pending = dec.unused_data
                    dec = new()
            else:
                if dec.eof:
                    pending, dec = dec.unused_data + pending, new()
                    continue
                out += dec.decompress(pending, nbytes - len(out))
                pending = b""
                while len(out) < nbytes and not dec.eof and not dec.needs_input:
                    out += dec.decompress(b"", nbytes - len(out))
                if dec.eof and dec.unused_data:
                    pending = dec.unused_data
                    dec = new()
    except (zlib.error, OSError, EOFError, ValueError) as exc:
        raise InputError(f"corrupt compressed voxel data ({why(exc)})", where) from None
    if len(out) < nbytes:
        raise InputError(f"truncated voxel data: {len(out)} of {nbytes} bytes after decompression", where)
    return out


def read_ascii(fh: BinaryIO, count: int, dtype, where: Path):
    """``count`` whitespace-separated numbers as a numpy array of ``dtype`` (ASCII-encoded data)."""
    import numpy as np

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


def voxels_for_writing(array, where: Path):
    """The array as a writer stores it, and whether it is a label map.

    Integer / bool arrays are label maps (uint8, int16 or int32: the smallest that fits, via
    ``as_label_array``); float arrays are images, stored as float32; anything else is refused.
    The same rule as the NIfTI writer, so every format stores the same voxels.
    """
    import numpy as np

    from .io import as_label_array

    array = np.asarray(array)
    if array.dtype.kind in "biu":
        return as_label_array(array, where), True
    if array.dtype.kind == "f":
        data = array.astype(np.float32, copy=False)
        if not np.all(np.isfinite(data)):
            raise InputError("image contains NaN or Inf voxels", where)
        return data, False
    raise InputError(f"cannot write voxels of type {array.dtype}", where)
