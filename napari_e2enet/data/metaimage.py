"""MetaImage volumes (``.mha``, ``.mhd`` + ``.raw``/``.zraw``), read and written here in plain Python.

Why not SimpleITK. MetaImage is a text header of ``Key = Value`` lines ending with
``ElementDataFile`` followed by raw or zlib-compressed voxels: about 150 lines of numpy + zlib
read and write every file ITK writes. SimpleITK (the other choice; only in the ``test`` extra now)
installs **264 MB** (one 272 MB shared library) and takes **~0.18 s** to import (measured on the
2-core CI box, warm cache). Doing it here means MHA/MHD need no extra at all, and we control what
SimpleITK would decide for us: an ``ElementDataFile`` outside the header's folder is refused
before any file is opened, a compressed stream never inflates beyond ``DimSize``, every bad file
is one line, and an ``.mhd`` + data pair is renamed into place together. SimpleITK remains the
reference the tests check against, in both directions (it reads our files, we read its files,
same voxels and physical points).

Supported: ``NDims`` 3 (or 4 with a channel axis), every ``MET_*`` scalar type, little or big
endian (``BinaryDataByteOrderMSB`` / ``ElementByteOrderMSB``), ``CompressedData`` (zlib or gzip
stream), ``ElementNumberOfChannels`` > 1 (interleaved channels), ``HeaderSize`` (including -1),
ASCII data (``BinaryData = False``), the synonyms ITK accepts (``Offset``/``Position``/``Origin``,
``TransformMatrix``/``Rotation``/``Orientation``, ``ElementSize`` when ``ElementSpacing`` is
missing). Refused in one line: ``ElementDataFile = LIST`` or file patterns (multi-file slices),
data files outside the folder, 2D images, NaN voxels, degenerate geometry.

Geometry: ITK's. A voxel index (i, j, k) is at ``Offset + D · diag(ElementSpacing) · (i, j, k)`` in
**LPS** millimetres, where ``TransformMatrix`` lists the direction matrix D column by column (one
voxel axis after the other). The RAS+ affine flips the signs of the first two rows, exactly.
``AnatomicalOrientation`` is informative (ITK ignores it when reading too); it is written for the
nearest axis codes. Numbers are written with Python's shortest round-trip ``repr``, so
spacing/direction/offset re-read to the same doubles; the affine's columns are re-formed as
direction × spacing, within 1 ulp.

Writing: ``.mha`` is one file, zlib-compressed (``ElementDataFile = LOCAL``); ``.mhd`` writes the
classic uncompressed pair ``NAME.mhd`` + ``NAME.raw`` (what tools that read raw voxels expect).
Both files are written under temporary names and renamed data first, header last, so the header
never names incomplete data.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import InputError
from ..fileio import atomic_output
from ._payload import (
    MAX_DEFLATE_RATIO,
    case_name,
    data_file_inside,
    inflate,
    matching_suffix,
    read_ascii,
    read_exact,
    voxels_for_writing,
    why,
)
from .volume import Volume

__all__ = [
    "METAIMAGE_SUFFIXES",
    "is_metaimage_path",
    "read_metaimage",
    "read_metaimage_geometry",
    "write_metaimage",
]

METAIMAGE_SUFFIXES = (".mha", ".mhd")

_MAX_HEADER_BYTES = 1 << 20
_ZLIB_LEVEL = 6  # as for NRRD (see nrrd._GZIP_LEVEL for the measurement)
_LPS = np.array([-1.0, -1.0, 1.0])

_SIZES = {"CHAR": "i1", "UCHAR": "u1", "SHORT": "i2", "USHORT": "u2", "INT": "i4", "UINT": "u4",
          "LONG": "i4", "ULONG": "u4", "LONG_LONG": "i8", "ULONG_LONG": "u8", "FLOAT": "f4", "DOUBLE": "f8"}
_WRITE_TYPES = {"u1": "MET_UCHAR", "i1": "MET_CHAR", "u2": "MET_USHORT", "i2": "MET_SHORT", "u4": "MET_UINT",
                "i4": "MET_INT", "u8": "MET_ULONG_LONG", "i8": "MET_LONG_LONG", "f4": "MET_FLOAT",
                "f8": "MET_DOUBLE"}
_SYNONYMS = {"position": "offset", "origin": "offset", "rotation": "transformmatrix",
             "orientation": "transformmatrix", "elementbyteordermsb": "binarydatabyteordermsb"}


def _suffix(path: Path) -> str | None:
    return matching_suffix(path, METAIMAGE_SUFFIXES)


def is_metaimage_path(path: str | Path) -> bool:
    """True for a ``.mha`` or ``.mhd`` file name (any case)."""
    return _suffix(Path(path)) is not None


# ---------------------------------------------------------------------------------------------
# reading


class _Header:
    def __init__(self, path: Path, fields: dict[str, str], offset: int) -> None:
        self.path = path
        self.fields = fields  # lower-case keys (synonyms folded), raw string values
        self.offset = offset  # first byte after the header (LOCAL data)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.fields.get(key, default)

    def numbers(self, key: str, count: int, *, default: list[float] | None = None) -> np.ndarray:
        text = self.get(key)
        if text is None:
            if default is None:
                raise InputError(f"MetaImage header lacks {key!r}", self.path)
            return np.asarray(default, dtype=np.float64)
        try:
            values = np.array([float(v) for v in text.split()], dtype=np.float64)
        except ValueError:
            raise InputError(f"MetaImage field {key!r} is not numeric: {text[:60]!r}", self.path) from None
        if values.size != count or not np.all(np.isfinite(values)):
            raise InputError(f"MetaImage field {key!r} needs {count} finite numbers, got {text[:60]!r}", self.path)
        return values

    def flag(self, key: str) -> bool:
        return str(self.get(key, "False")).strip().lower() in ("true", "1", "yes")


def _read_header(path: Path) -> _Header:
    try:
        if not path.exists():
            raise InputError("file not found", path)
        if path.is_dir():
            raise InputError("is a folder, not a MetaImage file", path)
        if path.stat().st_size == 0:
            raise InputError("empty file", path)
        fields: dict[str, str] = {}
        with open(path, "rb") as fh:
            total = 0
            while True:
                line = fh.readline(_MAX_HEADER_BYTES + 1 - total)
                if not line:
                    raise InputError("not a MetaImage file (no ElementDataFile line)", path)
                total += len(line)
                if total > _MAX_HEADER_BYTES:
                    raise InputError("not a MetaImage file (no ElementDataFile within 1 MB)", path)
                text = line.decode("utf-8", "replace").strip()
                if not text or text.startswith("#"):
                    continue
                key, eq, value = text.partition("=")
                if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
                    raise InputError(f"not a MetaImage file (unexpected header line {text[:40]!r})", path)
                key = key.strip().lower()
                fields[_SYNONYMS.get(key, key)] = value.strip()
                if key == "elementdatafile":
                    break
            offset = fh.tell()
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or why(exc)})", path) from None
    if "objecttype" in fields and fields["objecttype"].lower() != "image":
        raise InputError(f"MetaImage ObjectType {fields['objecttype']!r} is not an image", path)
    return _Header(path, fields, offset)


class _Layout:
    """Everything the header says about the voxels: dtype, sizes, channels, geometry, data place."""

    def __init__(self, header: _Header) -> None:
        path = self.path = header.path
        try:
            ndims = int(header.get("ndims", "") or 0)
            dims = [int(v) for v in (header.get("dimsize") or "").split()]
            channels = int(header.get("elementnumberofchannels", "1") or 1)
        except ValueError:
            raise InputError("MetaImage NDims, DimSize or ElementNumberOfChannels is not an integer", path) from None
        if ndims < 1 or len(dims) != ndims:
            raise InputError(f"MetaImage DimSize {dims} does not match NDims {ndims}", path)
        if any(d < 1 for d in dims) or channels < 1:
            raise InputError(f"header declares an empty shape {dims}", path)
        if ndims < 3 or min(dims[:3]) == 1:
            raise InputError(f"2D image (DimSize {dims}); a 3D volume is needed", path)
        if ndims > 4 or (ndims == 4 and channels > 1):
            raise InputError(f"{ndims}D image of DimSize {dims} with {channels} channel(s) is not supported", path)
        type_name = str(header.get("elementtype", "")).upper().removeprefix("MET_").removesuffix("_ARRAY")
        if type_name not in _SIZES:
            raise InputError(f"unsupported MetaImage ElementType {header.get('elementtype')!r}", path)
        dtype = np.dtype(_SIZES[type_name])
        if dtype.itemsize > 1:
            dtype = dtype.newbyteorder(">" if header.flag("binarydatabyteordermsb") else "<")
        self.dtype = dtype
        self.dims = dims
        self.channels = channels if ndims == 3 else dims[3]
        self.interleaved = ndims == 3 and channels > 1  # vector pixels: channel fastest
        self.compressed = header.flag("compresseddata")
        self.binary = header.flag("binarydata") if header.get("binarydata") is not None else True

        spacing = header.numbers("elementspacing", ndims, default=None) if header.get("elementspacing") \
            else header.numbers("elementsize", ndims, default=[1.0] * ndims)
        matrix = header.numbers("transformmatrix", ndims * ndims, default=list(np.eye(ndims).ravel()))
        offset = header.numbers("offset", ndims, default=[0.0] * ndims)
        direction = matrix.reshape(ndims, ndims).T[:3, :3]  # TransformMatrix lists D column by column
        lps = direction * spacing[None, :3]
        affine = np.eye(4)
        affine[:3, :3] = _LPS[:, None] * lps
        affine[:3, 3] = _LPS * offset[:3]
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError("invalid geometry (zero spacing or a degenerate TransformMatrix)", path)
        self.affine = affine

        name = str(header.get("elementdatafile", "")).strip()
        if name.upper() == "LOCAL":
            self.data_path, self.local = path, True
        elif name.upper().split()[:1] == ["LIST"] or "%" in name:
            raise InputError(f"multi-file MetaImage data (ElementDataFile = {name}) is not supported", path)
        else:
            self.data_path, self.local = data_file_inside(path, name), False
        self.start = header.offset if self.local else 0
        try:
            self.header_size = int(header.get("headersize", "0") or 0)
        except ValueError:
            raise InputError("MetaImage HeaderSize is not an integer", path) from None
        self.compressed_size = header.get("compresseddatasize")

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return (self.dims[0], self.dims[1], self.dims[2])


def read_metaimage_geometry(path: str | Path, *, allow_channels: bool = False
                            ) -> tuple[tuple[int, int, int], np.ndarray, int]:
    """Header-only check: ((X, Y, Z), affine, channels) without reading voxels (like NIfTI's)."""
    layout = _layout(path, allow_channels)
    return layout.spatial_shape, layout.affine.copy(), layout.channels


def _layout(path: str | Path, allow_channels: bool) -> _Layout:
    path = Path(path)
    if _suffix(path) is None:
        raise InputError("not a MetaImage file name (expected .mha or .mhd)", path)
    layout = _Layout(_read_header(path))
    if layout.channels > 1 and not allow_channels:
        raise InputError(f"image with {layout.channels} channels (DimSize {layout.dims}); expected one 3D volume",
                         path)
    return layout


def read_metaimage(path: str | Path, *, allow_channels: bool = False) -> Volume:
    """Read a ``.mha`` / ``.mhd`` (+ data file) into a ``Volume``.

    (X, Y, Z) voxels in the file's dtype, or (C, X, Y, Z) for a multi-channel image when
    ``allow_channels``. Raises ``InputError("<path>: <problem>")`` for every kind of bad file.
    """
    layout = _layout(path, allow_channels)
    path = layout.path
    count = int(np.prod(layout.dims, dtype=np.int64)) * (layout.channels if layout.interleaved else 1)
    nbytes = count * layout.dtype.itemsize
    try:
        size = layout.data_path.stat().st_size
        available = size - layout.start - max(layout.header_size, 0)
        if not layout.binary:
            with open(layout.data_path, "rb") as fh:
                fh.seek(layout.start)
                data = read_ascii(fh, count, layout.dtype.newbyteorder("="), layout.data_path)
        elif layout.compressed:
            if nbytes > available * MAX_DEFLATE_RATIO + 65536:
                raise InputError(f"header declares {nbytes} bytes of voxels, far more than {available} compressed "
                                 "bytes can hold", path)
            with open(layout.data_path, "rb") as fh:
                fh.seek(layout.start + max(layout.header_size, 0))
                # errors name the file that holds the damage: a detached .zraw, not its .mhd
                data = np.frombuffer(inflate(fh, nbytes, layout.data_path, codec="zlib"), layout.dtype)
        else:
            if nbytes > available:
                raise InputError(f"truncated voxel data: header declares {layout.dims} {layout.dtype.name} voxels "
                                 f"({nbytes} bytes), the file holds {max(available, 0)}", path)
            with open(layout.data_path, "rb") as fh:
                skip = size - nbytes if layout.header_size == -1 else layout.start + layout.header_size
                fh.seek(skip)
                data = np.frombuffer(read_exact(fh, nbytes, layout.data_path), layout.dtype)
    except MemoryError:
        raise InputError(f"not enough memory to read {layout.dims} voxels", path) from None
    except OSError as exc:
        raise InputError(f"cannot read voxel data ({exc.strerror or why(exc)})", path) from None
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if layout.interleaved:  # bytes: channel fastest, then x, y, z
        data = data.reshape(layout.dims[2], layout.dims[1], layout.dims[0], layout.channels).T
    else:
        data = data.reshape(layout.dims[::-1]).T  # (X, Y, Z[, T])
        if data.ndim == 4:
            data = np.moveaxis(data, 3, 0)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputError(f"{int(bad.sum())} voxels are NaN or Inf", path)
    meta: dict[str, Any] = {"format": "metaimage", "path": str(path)}
    return Volume(data, layout.affine.copy(), None, case_name(path), meta)


# ---------------------------------------------------------------------------------------------
# writing


def _number(value: float) -> str:
    value = float(value) + 0.0  # no "-0"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _numbers(values: npt.ArrayLike) -> str:
    return " ".join(_number(v) for v in np.asarray(values, dtype=np.float64).ravel())


def _orientation_code(direction: np.ndarray) -> str:
    """ITK's AnatomicalOrientation: per voxel axis, the side it comes *from* (identity LPS → RAI)."""
    letters = (("R", "L"), ("A", "P"), ("I", "S"))  # +x (towards L) comes from R, ...
    code = ""
    for axis in range(3):
        column = direction[:, axis]
        world = int(np.argmax(np.abs(column)))
        code += letters[world][0 if column[world] > 0 else 1]
    return code


def _header_text(data: np.ndarray, affine: np.ndarray, *, compressed: bool, compressed_size: int | None,
                 data_file: str) -> bytes:
    lps = _LPS[:, None] * affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing[None, :]
    offset = _LPS * affine[:3, 3]
    channels = data.shape[0] if data.ndim == 4 else 1
    dims = data.shape[-3:]
    lines = [
        "ObjectType = Image",
        "NDims = 3",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        f"CompressedData = {compressed}",
    ]
    if compressed_size is not None:
        lines.append(f"CompressedDataSize = {compressed_size}")
    lines += [
        f"TransformMatrix = {_numbers(direction.T)}",  # column by column
        f"Offset = {_numbers(offset)}",
        "CenterOfRotation = 0 0 0",
        f"AnatomicalOrientation = {_orientation_code(direction)}",
        f"ElementSpacing = {_numbers(spacing)}",
        f"DimSize = {dims[0]} {dims[1]} {dims[2]}",
    ]
    if channels > 1:
        lines.append(f"ElementNumberOfChannels = {channels}")
    lines += [f"ElementType = {_WRITE_TYPES[data.dtype.str[1:]]}", f"ElementDataFile = {data_file}"]
    return ("\n".join(lines) + "\n").encode("ascii")


def write_metaimage(volume: Volume, path: str | Path, *, like: Volume | None = None) -> Path:
    """Write ``volume`` as ``.mha`` (one zlib-compressed file) or ``.mhd`` + ``.raw``, atomically.

    Labels (integer/bool) → uint8/int16/int32, images → float32; (C, X, Y, Z) → a vector image
    with ``ElementNumberOfChannels = C``. Geometry from ``like`` when given (same spatial shape),
    else from ``volume``. Returns the header's path.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix is None:
        raise InputError("output must end in .mha or .mhd", path)
    ref = like if like is not None else volume
    if ref.spatial_shape != volume.spatial_shape:
        raise InputError(
            f"volume shape {volume.spatial_shape} does not match the reference grid {ref.spatial_shape}", path)
    data, _ = voxels_for_writing(volume.array, path)
    data = data.astype(data.dtype.newbyteorder("<"), copy=False)
    raw = data.tobytes(order="F")  # x fastest; for (C, X, Y, Z) the channel is fastest (interleaved)
    affine = np.asarray(ref.affine, dtype=np.float64)
    if suffix == ".mha":
        payload = zlib.compress(raw, _ZLIB_LEVEL)
        del raw
        head = _header_text(data, affine, compressed=True, compressed_size=len(payload), data_file="LOCAL")
        with atomic_output(path, ".mha") as tmp, open(tmp, "wb") as fh:
            fh.write(head)
            fh.write(payload)
        return path
    data_path = path.with_name(path.name[: -len(suffix)] + ".raw")
    head = _header_text(data, affine, compressed=False, compressed_size=None, data_file=data_path.name)
    # Exit order of the stack: the data file is renamed into place first, the header last.
    with contextlib.ExitStack() as stack:
        tmp_header = stack.enter_context(atomic_output(path, ".mhd"))
        tmp_data = stack.enter_context(atomic_output(data_path, ".raw"))
        tmp_data.write_bytes(raw)
        tmp_header.write_bytes(head)
    return path
