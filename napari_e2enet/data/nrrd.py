"""NRRD volumes (``.nrrd``, detached ``.nhdr``) and 3D Slicer segmentations (``.seg.nrrd``).

Library: **pynrrd** (the ``formats`` extra; 176 kB of pure Python, ~0.12 s to import) parses the
header fields (typed vectors, ``none`` rows, quoted lists) and writes header + gzip payload. It is
the small, exact tool for the job: SimpleITK also reads NRRD but is 264 MB and rounds a 4D
segmentation through ITK image types. Two things are done here rather than in pynrrd:

- the voxel payload is read with :mod:`._payload`, which never inflates more than the header
  declares (pynrrd decompresses the whole stream first: a small file could fill the memory) and
  turns a short or corrupt stream into one line;
- ``key:=value`` pairs (where Slicer keeps segment names) are decoded as UTF-8 from the raw header
  bytes (pynrrd decodes ASCII and drops other characters) and written the same way.

Geometry. ``space directions`` gives, per axis, the vector from one voxel to the next and
``space origin`` the centre of the first voxel, both in the coordinates named by ``space``:
``right-anterior-superior`` / ``RAS``, ``left-anterior-superior`` / ``LAS`` or
``left-posterior-superior`` / ``LPS`` (any case; 3D Slicer writes LPS, older Slicer files RAS).
They become the RAS+ affine by flipping the signs of the L/P rows — an exact operation, so a
round trip keeps every bit. Other spaces (``scanner-xyz``, ``3D-right-handed``, ``*-time``) have no
patient orientation and are refused in one line; units other than mm likewise. A file without any
space field (only ``spacings``) is placed as ITK and Slicer place it: LPS axes, origin 0.

Channels. A 4D NRRD with one non-spatial axis (``none`` in ``space directions``, kind ``list``,
``vector``, ``RGB-color``...) becomes (C, X, Y, Z) when ``allow_channels``; where that axis sits in
the file does not matter.

Writing uses ``space: left-posterior-superior``: it is what 3D Slicer and ITK write, so every NRRD
reader (Slicer, ITK/SimpleITK, MITK, pynrrd users) meets the dialect it is tested with, and the
RAS ↔ LPS flip is exact. Images are stored as float32, labels as uint8/int16/int32, gzip-encoded,
numbers with 17 significant digits (``space directions`` are the affine's columns, unchanged).
Only attached ``.nrrd`` files are written: a detached ``.nhdr`` + data pair is read, not written.

3D Slicer segmentations (``.seg.nrrd``, vtkMRMLSegmentationStorageNode). The voxels are one label
map per *layer* (a 3D file holds one layer; a 4D file has a ``list`` axis of layers). Segment ``i``
is described by ``Segment{i}_ID``, ``_Name``, ``_Color`` ("r g b" in 0..1), ``_LabelValue`` (its
value inside its layer), ``_Layer`` and ``_Extent`` (the voxel box it may occupy: voxels outside
it are not part of it). :func:`read_seg_nrrd` turns that into one integer label map plus a
:class:`~napari_e2enet.labels.LabelTable`: each segment keeps its label value as its id when all
segments' values differ (the usual single-layer file), otherwise segments are numbered 1..N in file
order (layers often reuse value 1). Layers are merged when no voxel belongs to two segments; an
overlap is a one-line error (napari-e2enet keeps one label per voxel). :func:`write_seg_nrrd`
writes what Slicer's own writer writes for one layer, so Slicer opens it with the names and colours
(alpha is a display property in Slicer and is not stored).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import InputError
from ..fileio import atomic_output
from ..labels import LabelTable
from ._payload import (
    MAX_DEFLATE_RATIO,
    as_label_array,
    case_name,
    data_file_inside,
    inflate,
    labels_dtype,
    matching_suffix,
    read_ascii,
    read_exact,
    voxels_for_writing,
    why,
)
from .volume import Volume

__all__ = [
    "NRRD_SUFFIXES",
    "SEG_NRRD_SUFFIX",
    "is_nrrd_path",
    "read_nrrd",
    "read_nrrd_and_table",
    "read_nrrd_geometry",
    "read_seg_nrrd",
    "write_nrrd",
    "write_seg_nrrd",
]

NRRD_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr")
SEG_NRRD_SUFFIX = ".seg.nrrd"
EXTRA_MESSAGE = "NRRD support needs the 'formats' extra: pip install 'napari-e2enet[formats]'"

_MAX_HEADER_BYTES = 16 << 20  # Slicer headers with hundreds of segments are ~100 kB
# zlib's default. Measured on the MNI sample (99×117×95): float32 image 4.3 MB → 491 kB in 0.10 s
# (level 9: 487 kB in 0.17 s; level 1: 538 kB in 0.02 s); uint8 labels 1.1 MB → 16 kB in 0.006 s
# (level 9: 15 kB in 0.044 s). pynrrd's own default is 9.
_GZIP_LEVEL = 6

# RAS sign of each file axis, by normalised space name (lower case, no '-', '_' or spaces).
_SPACES: dict[str, tuple[float, float, float]] = {
    "rightanteriorsuperior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "leftanteriorsuperior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "leftposteriorsuperior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}
_LPS = np.array([-1.0, -1.0, 1.0])

_TYPES: dict[str, str] = {}
for _names, _code in (
    (("signed char", "int8", "int8_t"), "i1"),
    (("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    (("int", "signed int", "int32", "int32_t"), "i4"),
    (("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
      "int64_t"), "i8"),
    (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    (("float",), "f4"),
    (("double",), "f8"),
):
    for _name in _names:
        _TYPES[_name] = _code

_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2",
              "ascii": "ascii", "text": "ascii", "txt": "ascii"}
_KEY_VALUE = re.compile(r"([^:]*):=(.*)$")


def _pynrrd(path: Path) -> ModuleType:
    try:
        import nrrd
    except ImportError:
        raise InputError(EXTRA_MESSAGE, path) from None
    return nrrd


def _suffix(path: Path) -> str | None:
    return matching_suffix(path, NRRD_SUFFIXES)


def is_nrrd_path(path: str | Path) -> bool:
    """True for a ``.nrrd``, ``.seg.nrrd`` or ``.nhdr`` file name (any case)."""
    return _suffix(Path(path)) is not None


# ---------------------------------------------------------------------------------------------
# header


@dataclass
class _Header:
    path: Path
    fields: dict[str, Any]
    pairs: dict[str, str]  # key:=value pairs, UTF-8
    data_path: Path
    offset: int  # where the payload (after line/byte skips) starts in data_path
    dtype: np.dtype
    sizes: tuple[int, ...]
    encoding: str
    spatial: list[int]  # file axes that are spatial, in order
    list_axis: int | None  # the non-spatial axis of a 4D file
    affine: np.ndarray
    space: str

    @property
    def channels(self) -> int:
        return 1 if self.list_axis is None else self.sizes[self.list_axis]

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        s = [self.sizes[a] for a in self.spatial]
        return (s[0], s[1], s[2])

    @property
    def is_segmentation(self) -> bool:
        return "Segment0_ID" in self.pairs or "Segmentation_MasterRepresentation" in self.pairs


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "")


def _header_lines(path: Path) -> tuple[list[bytes], int]:
    """The raw header lines (magic first, no line ends) and the byte offset just past the header."""
    try:
        if not path.exists():
            raise InputError("file not found", path)
        if path.is_dir():
            raise InputError("is a folder, not an NRRD file", path)
        if path.stat().st_size == 0:
            raise InputError("empty file", path)
        lines: list[bytes] = []
        with open(path, "rb") as fh:
            magic = fh.readline(64)
            if not re.match(rb"NRRD\d{4}\s*$", magic):
                raise InputError("not an NRRD file (it does not start with NRRD000x)", path)
            lines.append(magic.rstrip(b"\r\n"))
            total = len(magic)
            while True:
                line = fh.readline(_MAX_HEADER_BYTES + 1 - total)
                if not line:
                    break  # end of file: a detached header may end without a blank line
                total += len(line)
                if total > _MAX_HEADER_BYTES:
                    raise InputError(f"header larger than {_MAX_HEADER_BYTES >> 20} MB (no blank line ends it)", path)
                if not line.strip():
                    break
                lines.append(line.rstrip(b"\r\n"))
            offset = fh.tell()
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or why(exc)})", path) from None
    return lines, offset


def _parse_header(path: str | Path) -> _Header:
    """Read and check everything the header says; no voxel is read."""
    path = Path(path)
    if _suffix(path) is None:
        raise InputError("not an NRRD file name (expected .nrrd, .seg.nrrd or .nhdr)", path)
    nrrd = _pynrrd(path)
    raw, offset = _header_lines(path)
    text = [line.decode("ascii", "ignore") for line in raw]
    try:
        fields = dict(nrrd.read_header(text))
    except Exception as exc:  # pynrrd raises NRRDError, ValueError, IndexError... on bad fields
        raise InputError(f"corrupt NRRD header ({why(exc)})", path) from None
    pairs: dict[str, str] = {}
    for line in raw[1:]:
        decoded = line.decode("utf-8", "replace")
        if decoded.startswith("#"):
            continue
        match = _KEY_VALUE.match(decoded)
        if match:
            pairs[match.group(1).strip()] = _unescape(match.group(2).strip())
    for required in ("type", "dimension", "sizes", "encoding"):
        if required not in fields:
            raise InputError(f"NRRD header lacks the required field {required!r}", path)
    type_name = str(fields["type"]).strip().lower()
    if type_name == "block":
        raise InputError("NRRD type 'block' (opaque records) is not a voxel type", path)
    if type_name not in _TYPES:
        raise InputError(f"unknown NRRD type {fields['type']!r}", path)
    dtype = np.dtype(_TYPES[type_name])
    encoding = _ENCODINGS.get(str(fields["encoding"]).strip().lower())
    if encoding is None:
        raise InputError(f"unsupported NRRD encoding {fields['encoding']!r} (raw, gzip, bzip2 or ascii)", path)
    if dtype.itemsize > 1 and encoding != "ascii":
        endian = str(fields.get("endian", "")).strip().lower()
        if endian not in ("little", "big"):
            raise InputError("NRRD header lacks 'endian: little' or 'endian: big'", path)
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    dim = int(fields["dimension"])
    sizes = tuple(int(s) for s in np.atleast_1d(fields["sizes"]))
    if len(sizes) != dim:
        raise InputError(f"'sizes' has {len(sizes)} values for dimension {dim}", path)
    if any(s < 1 for s in sizes):
        raise InputError(f"header declares an empty shape {sizes}", path)
    spatial, list_axis, affine, space = _geometry(fields, sizes, path)

    data_name = fields.get("data file", fields.get("datafile"))
    if data_name is not None:
        data_name = str(data_name).strip()
        if data_name.upper().split()[:1] == ["LIST"] or "%" in data_name:
            raise InputError(f"multi-file NRRD data ('data file: {data_name}') is not supported", path)
        data_path, start = data_file_inside(path, data_name), 0
    elif path.name.lower().endswith(".nhdr"):
        raise InputError("detached .nhdr header without a 'data file' field", path)
    else:
        data_path, start = path, offset
    return _Header(path, fields, pairs, data_path, start, dtype, sizes, encoding, spatial, list_axis, affine,
                   space)


def _geometry(fields: dict[str, Any], sizes: tuple[int, ...], path: Path
              ) -> tuple[list[int], int | None, np.ndarray, str]:
    """(spatial axes, list axis, RAS affine, space name) from the header fields."""
    dim = len(sizes)
    space = fields.get("space")
    if space is None and "space dimension" in fields:
        raise InputError("NRRD 'space dimension' without a 'space' has no patient orientation", path)
    if space is not None:
        key = re.sub(r"[-_\s]", "", str(space).lower())
        if key not in _SPACES:
            raise InputError(
                f"NRRD space {space!r} has no patient orientation; readable spaces are "
                "right-anterior-superior (RAS), left-anterior-superior (LAS), left-posterior-superior (LPS)",
                path)
        sign = np.array(_SPACES[key])
        space_name = str(space)
    else:
        sign, space_name = _LPS, "left-posterior-superior (default: no space field)"
    units = fields.get("space units")
    if units is not None and any(str(u).strip().lower() not in ("mm", "") for u in units):
        raise InputError(f"NRRD space units {list(units)} are not supported (only mm)", path)

    directions = fields.get("space directions")
    kinds = [str(k).lower() for k in fields.get("kinds", [])] or None
    if kinds is not None and len(kinds) != dim:
        raise InputError(f"'kinds' has {len(kinds)} values for dimension {dim}", path)
    if directions is not None:
        directions = np.asarray(directions, dtype=np.float64)
        if directions.ndim != 2 or directions.shape != (dim, 3):
            raise InputError(f"'space directions' must give {dim} vectors of 3 numbers", path)
        none_rows = np.all(np.isnan(directions), axis=1)
        if np.any(np.isnan(directions[~none_rows])):
            raise InputError("'space directions' holds NaN", path)
        spatial = [a for a in range(dim) if not none_rows[a]]
        columns = [directions[a] for a in spatial]
    else:
        if space is not None:
            raise InputError("NRRD header gives a 'space' but no 'space directions'", path)
        if kinds is not None:
            spatial = [a for a in range(dim) if kinds[a] in ("domain", "space")]
        else:
            spatial = list(range(min(dim, 3)))
        spacings = np.atleast_1d(fields.get("spacings", np.full(dim, np.nan))).astype(np.float64)
        if spacings.size != dim:
            raise InputError(f"'spacings' has {spacings.size} values for dimension {dim}", path)
        columns = []
        for n, a in enumerate(spatial[:3]):
            step = spacings[a] if np.isfinite(spacings[a]) else 1.0
            columns.append(np.eye(3)[n] * step)
    if len(spatial) < 3 or (len(spatial) == 3 and min(sizes[a] for a in spatial) == 1):
        raise InputError(f"2D image (sizes {list(sizes)}); a 3D volume is needed", path)
    if len(spatial) > 3:
        raise InputError(f"{len(spatial)} spatial axes (sizes {list(sizes)}); a 3D volume is needed", path)
    others = [a for a in range(dim) if a not in spatial]
    if len(others) > 1:
        raise InputError(f"{dim}D NRRD of sizes {list(sizes)} is not supported (3D, or 3D + one list axis)",
                         path)
    origin = fields.get("space origin")
    origin = np.zeros(3) if origin is None else np.asarray(origin, dtype=np.float64).reshape(-1)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise InputError("'space origin' must be 3 finite numbers", path)
    affine = np.eye(4)
    affine[:3, :3] = sign[:, None] * np.stack(columns, axis=1)
    affine[:3, 3] = sign * origin
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError("invalid geometry (zero or degenerate 'space directions')", path)
    return spatial, (others[0] if others else None), affine, space_name


def read_nrrd_geometry(path: str | Path, *, allow_channels: bool = False
                       ) -> tuple[tuple[int, int, int], np.ndarray, int]:
    """Header-only check: ((X, Y, Z), affine, channels) without reading voxels (like NIfTI's)."""
    header = _parse_header(path)
    channels = 1 if header.is_segmentation else header.channels
    if channels > 1 and not allow_channels:
        raise InputError(f"4D image with {channels} volumes (sizes {list(header.sizes)}); expected one 3D "
                         "volume", header.path)
    return header.spatial_shape, header.affine.copy(), channels


# ---------------------------------------------------------------------------------------------
# voxels


def _read_voxels(header: _Header) -> np.ndarray:
    """The voxel array in file axis order (sizes), native byte order, writable."""
    path = header.path
    count = int(np.prod(header.sizes, dtype=np.int64))
    nbytes = count * header.dtype.itemsize
    line_skip = int(header.fields.get("line skip", header.fields.get("lineskip", 0)))
    byte_skip = int(header.fields.get("byte skip", header.fields.get("byteskip", 0)))
    if line_skip < 0 or byte_skip < -1:
        raise InputError(f"invalid line skip {line_skip} / byte skip {byte_skip}", path)
    if byte_skip == -1 and header.encoding != "raw":
        raise InputError("'byte skip: -1' is only valid for raw data", path)
    try:
        size = header.data_path.stat().st_size
        available = size - header.offset
        if header.encoding == "raw" and nbytes > available:
            raise InputError(f"truncated voxel data: header declares {list(header.sizes)} {header.dtype.name} "
                             f"voxels ({nbytes} bytes), the file holds {max(available, 0)}", path)
        if header.encoding == "gzip" and nbytes > available * MAX_DEFLATE_RATIO + 65536:
            raise InputError(f"header declares {nbytes} bytes of voxels, far more than {available} compressed "
                             "bytes can hold", path)
        with open(header.data_path, "rb") as fh:
            fh.seek(header.offset)
            for _ in range(line_skip):
                fh.readline()
            if header.encoding == "raw":
                if byte_skip == -1:
                    fh.seek(size - nbytes)
                else:
                    fh.seek(byte_skip, 1)
                buf = read_exact(fh, nbytes, header.data_path)  # the file that holds the damage
                data = np.frombuffer(buf, header.dtype)
            elif header.encoding == "ascii":
                data = read_ascii(fh, count, header.dtype.newbyteorder("="), header.data_path)
            else:
                codec = "zlib" if header.encoding == "gzip" else "bzip2"
                buf = inflate(fh, nbytes + byte_skip, header.data_path, codec=codec)
                data = np.frombuffer(buf, header.dtype, offset=byte_skip, count=count)
    except MemoryError:
        raise InputError(f"not enough memory to read {list(header.sizes)} voxels", path) from None
    except OSError as exc:
        raise InputError(f"cannot read voxel data ({exc.strerror or why(exc)})", path) from None
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    data = data.reshape(header.sizes[::-1]).T  # NRRD: first axis fastest
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputError(f"{int(bad.sum())} voxels are NaN or Inf", path)
    return data


def _spatial_array(header: _Header, data: np.ndarray) -> np.ndarray:
    """File-order voxels → (X, Y, Z) or (C, X, Y, Z) in the affine's axis order."""
    order = ([header.list_axis] if header.list_axis is not None else []) + header.spatial
    data = np.transpose(data, order)
    if header.list_axis is not None and data.shape[0] == 1:
        data = data[0]
    return data


def _meta(header: _Header) -> dict[str, Any]:
    return {"format": "nrrd", "path": str(header.path), "space": header.space}


def read_nrrd(path: str | Path, *, allow_channels: bool = False) -> Volume:
    """Read a ``.nrrd`` / ``.nhdr`` (+ its data file) into a ``Volume``.

    (X, Y, Z) voxels in the file's dtype, or (C, X, Y, Z) for a 4D file with a list axis when
    ``allow_channels``. A 3D Slicer segmentation (segment fields in the header) is returned as its
    merged integer label map (see :func:`read_seg_nrrd` for the names and colours).
    Raises ``InputError("<path>: <problem>")`` for every kind of bad file.
    """
    return read_nrrd_and_table(path, allow_channels=allow_channels)[0]


# ---------------------------------------------------------------------------------------------
# 3D Slicer segmentations


@dataclass
class _Segment:
    index: int
    name: str
    color: tuple[float, float, float] | None
    value: int
    layer: int
    extent: tuple[int, int, int, int, int, int] | None


def _segments(header: _Header) -> list[_Segment]:
    pairs, path = header.pairs, header.path
    out: list[_Segment] = []
    i = 0
    while f"Segment{i}_ID" in pairs:  # the loop Slicer's reader runs
        get = lambda key, i=i: pairs.get(f"Segment{i}_{key}")  # noqa: E731
        name = (get("Name") or get("ID") or f"Segment_{i}").strip() or f"Segment_{i}"
        color = None
        text = get("Color") or get("DefaultColor")
        if text:
            try:
                rgb = [float(v) for v in text.split()[:3]]
            except ValueError:
                rgb = []
            if len(rgb) == 3 and all(0.0 <= c <= 1.0 for c in rgb):
                color = (rgb[0], rgb[1], rgb[2])
        try:
            value = int(get("LabelValue") or 1)  # files from before layers: one binary mask per layer
            layer_text = get("Layer")
            layer = int(layer_text) if layer_text is not None else i
            extent_text = get("Extent")
            extent = tuple(int(v) for v in extent_text.split()) if extent_text else None
        except ValueError as exc:
            raise InputError(f"segment {name!r}: unreadable label value, layer or extent ({exc})", path) from None
        if value <= 0:
            raise InputError(f"segment {name!r} has label value {value}; segments need a positive value", path)
        if extent is not None and len(extent) != 6:
            raise InputError(f"segment {name!r}: extent needs 6 numbers, got {len(extent)}", path)
        out.append(_Segment(i, name, color, value, layer, extent))
        i += 1
    return out


def _read_segmentation(header: _Header) -> tuple[Volume, LabelTable]:
    path = header.path
    data = _spatial_array(header, _read_voxels(header))
    layers = data if data.ndim == 4 else data[None]
    if layers.dtype.kind == "f" or layers.dtype.itemsize > 4:
        layers = np.stack([as_label_array(layer, path) for layer in layers])
    elif layers.size and int(layers.min()) < 0:
        raise InputError(f"negative label value {int(layers.min())} in the segmentation", path)
    segments = _segments(header)
    shape = layers.shape[1:]
    if not segments:  # a plain label map saved as .seg.nrrd: every value is a segment
        if len(layers) > 1:
            raise InputError(f"{len(layers)} layers but no segment fields (Segment0_ID...): cannot tell the "
                             "segments apart", path)
        labels = as_label_array(layers[0], path)
        ids = [int(v) for v in np.unique(labels) if v != 0]
        volume = Volume(labels, header.affine.copy(), None, case_name(path), {**_meta(header), "segmentation": True})
        return volume, LabelTable({i: f"label {i}" for i in ids})
    for seg in segments:
        if not 0 <= seg.layer < len(layers):
            raise InputError(f"segment {seg.name!r} is in layer {seg.layer} but the file has {len(layers)}", path)
    values = [s.value for s in segments]
    ids = values if len(set(values)) == len(values) else list(range(1, len(segments) + 1))
    out = np.zeros(shape, dtype=labels_dtype(0, max(ids)))
    owner = {new: seg for new, seg in zip(ids, segments)}
    for layer in sorted({s.layer for s in segments}):
        members = [(new, s) for new, s in zip(ids, segments) if s.layer == layer]
        mapped = _map_layer(layers[layer], members, out.dtype)
        clash = (out != 0) & (mapped != 0)
        if clash.any():
            where = tuple(int(c[0]) for c in np.nonzero(clash))
            a, b = owner[int(out[where])].name, owner[int(mapped[where])].name
            raise InputError(f"segments {a!r} and {b!r} overlap in {int(clash.sum())} voxels; napari-e2enet "
                             "keeps one label per voxel", path)
        np.copyto(out, mapped, where=mapped != 0)
    names: dict[int, str] = {}
    colors: dict[int, tuple[float, float, float, float]] = {}
    used: set[str] = {"background"}
    for new, seg in zip(ids, segments):
        name = seg.name if seg.name.lower() not in used else f"{seg.name} ({seg.index})"
        used.add(name.lower())
        names[new] = name
        if seg.color is not None:
            colors[new] = (*seg.color, 1.0)
    try:
        table = LabelTable(names, colors)
    except ValueError as exc:
        raise InputError(str(exc), path) from None
    volume = Volume(out, header.affine.copy(), None, case_name(path), {**_meta(header), "segmentation": True})
    return volume, table


def _map_layer(layer: np.ndarray, members: list[tuple[int, _Segment]], dtype: np.dtype) -> np.ndarray:
    """The layer with each member's value replaced by its new id (others 0), clipped to its extent."""
    hi = int(layer.max()) if layer.size else 0
    if hi <= 65535:
        lut = np.zeros(hi + 1, dtype=dtype)
        for new, seg in members:
            if seg.value <= hi:
                lut[seg.value] = new
        mapped = lut[layer]
    else:
        mapped = np.zeros(layer.shape, dtype=dtype)
        for new, seg in members:
            mapped[layer == seg.value] = new
    for new, seg in members:
        if seg.extent is None:
            continue
        box = tuple(slice(max(seg.extent[2 * a], 0), max(seg.extent[2 * a + 1] + 1, 0)) for a in range(3))
        if all(b.start == 0 and b.stop >= n for b, n in zip(box, layer.shape)):
            continue
        inside = np.zeros(layer.shape, dtype=bool)
        inside[box] = True
        mapped[(mapped == new) & ~inside] = 0  # Slicer: voxels outside a segment's extent are not in it
    return mapped


def read_nrrd_and_table(path: str | Path, *, allow_channels: bool = False) -> tuple[Volume, LabelTable | None]:
    """:func:`read_nrrd`, plus the segments' names and colours when the file is a 3D Slicer
    segmentation (whatever its name), else None: one header parse for readers that must tell."""
    header = _parse_header(path)
    if header.is_segmentation:
        return _read_segmentation(header)
    if header.channels > 1 and not allow_channels:
        raise InputError(f"4D image with {header.channels} volumes (sizes {list(header.sizes)}); expected one "
                         "3D volume", header.path)
    data = _spatial_array(header, _read_voxels(header))
    return Volume(data, header.affine.copy(), None, case_name(header.path), _meta(header)), None


def read_seg_nrrd(path: str | Path) -> tuple[Volume, LabelTable]:
    """A 3D Slicer ``.seg.nrrd``: its merged integer label map and the segments' names and colours.

    A file without segment fields (a plain label map) gets names ``label <id>`` for the ids found.
    See the module docstring for layers, label values and overlaps.
    """
    return _read_segmentation(_parse_header(path))


# ---------------------------------------------------------------------------------------------
# writing


def _check_output(path: Path) -> None:
    lower = path.name.lower()
    if lower.endswith(".nhdr"):
        raise InputError("writing a detached .nhdr header is not supported; write a .nrrd file", path)
    if not lower.endswith(".nrrd") or len(lower) <= len(".nrrd"):
        raise InputError("output must end in .nrrd or .seg.nrrd", path)


def _grid(volume: Volume, like: Volume | None, path: Path) -> np.ndarray:
    ref = like if like is not None else volume
    if ref.spatial_shape != volume.spatial_shape:
        raise InputError(
            f"volume shape {volume.spatial_shape} does not match the reference grid {ref.spatial_shape}", path)
    return np.asarray(ref.affine, dtype=np.float64)


def _space_fields(affine: np.ndarray, channels: bool) -> dict[str, Any]:
    directions = (_LPS[:, None] * affine[:3, :3]).T + 0.0  # row n: the LPS step along voxel axis n (+0.0: no "-0")
    origin = _LPS * affine[:3, 3] + 0.0
    if channels:
        directions = np.vstack([np.full((1, 3), np.nan), directions])
    return {
        "space": "left-posterior-superior",
        "space directions": directions,
        "kinds": (["list"] if channels else []) + ["domain"] * 3,
        "encoding": "gzip",
        "space origin": origin,
    }


def _encode(nrrd: ModuleType, data: np.ndarray, fields: dict[str, Any], pairs: dict[str, str], path: Path) -> bytes:
    """Header + gzip payload as bytes, with ``pairs`` added as UTF-8 ``key:=value`` lines."""
    data = data.astype(data.dtype.newbyteorder("<"), copy=False)
    buffer = io.BytesIO()
    try:
        nrrd.write(buffer, data, dict(fields), compression_level=_GZIP_LEVEL, index_order="F")
    except Exception as exc:
        raise InputError(f"cannot encode NRRD ({why(exc)})", path) from None
    payload = buffer.getvalue()
    if not pairs:
        return payload
    end = payload.index(b"\n\n") + 1  # pynrrd ends its header with one blank line
    lines = "".join(f"{key}:={_escape(value)}\n" for key, value in pairs.items()).encode("utf-8")
    return payload[:end] + lines + payload[end:]


def write_nrrd(volume: Volume, path: str | Path, *, like: Volume | None = None) -> Path:
    """Write ``volume`` as one ``.nrrd`` file, atomically, on ``like``'s grid (default: its own).

    Labels (integer/bool) → uint8/int16/int32, images → float32, (C, X, Y, Z) → a 4D file whose
    first axis is a ``list`` axis. ``space: left-posterior-superior``, gzip; the affine is stored
    exactly (see the module docstring). Returns the written path.
    """
    path = Path(path)
    _check_output(path)
    nrrd = _pynrrd(path)
    affine = _grid(volume, like, path)
    data, _ = voxels_for_writing(volume.array, path)
    payload = _encode(nrrd, data, _space_fields(affine, data.ndim == 4), {}, path)
    with atomic_output(path, ".nrrd") as tmp:
        tmp.write_bytes(payload)
    return path


def _rgb_text(rgb: tuple[float, ...]) -> str:
    return " ".join(repr(float(c)) for c in rgb[:3])


def write_seg_nrrd(labels: Volume, path: str | Path, *, label_table: LabelTable | None = None,
                   like: Volume | None = None) -> Path:
    """Write a label map as a 3D Slicer segmentation (``.seg.nrrd``) that Slicer opens with the
    table's names and colours.

    One layer (a 3D uint8/int16/int32 label map, LPS, gzip) and, per non-background id of the table
    plus any other id present in ``labels``, the fields Slicer's vtkMRMLSegmentationStorageNode
    writes: ``Segment{i}_ID/_Name/_NameAutoGenerated/_Color/_ColorAutoGenerated/_LabelValue/_Layer/
    _Extent/_Tags`` and ``Segmentation_MasterRepresentation``, ``_ContainedRepresentationNames``,
    ``_ReferenceImageExtentOffset``. Without a table the ids are the names (``label <id>``).
    """
    path = Path(path)
    _check_output(path)
    nrrd = _pynrrd(path)
    affine = _grid(labels, like, path)
    array = np.asarray(labels.array)
    if array.ndim != 3:
        raise InputError(f"a segmentation is one 3D label map; got shape {array.shape}", path)
    if array.dtype.kind not in "biu":
        raise InputError(f"a segmentation needs integer labels, got {array.dtype}", path)
    data, _ = voxels_for_writing(array, path)
    table = label_table if label_table is not None else LabelTable({})
    present = {int(v) for v in np.unique(data)} - {0}
    ids = sorted(({i for i in table.ids if i != 0}) | present)
    x, y, z = data.shape
    extent = f"0 {x - 1} 0 {y - 1} 0 {z - 1}"
    pairs = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for i, label_id in enumerate(ids):
        pairs.update({
            f"Segment{i}_ID": f"Segment_{label_id}",
            f"Segment{i}_Name": table.name_of(label_id),
            f"Segment{i}_NameAutoGenerated": "0" if label_id in table.names else "1",
            f"Segment{i}_Color": _rgb_text(table.color_of(label_id)),
            f"Segment{i}_ColorAutoGenerated": "0" if label_id in table.colors else "1",
            f"Segment{i}_LabelValue": str(label_id),
            f"Segment{i}_Layer": "0",
            f"Segment{i}_Extent": extent,
            f"Segment{i}_Tags": "",
        })
    payload = _encode(nrrd, data, _space_fields(affine, False), pairs, path)
    with atomic_output(path, ".nrrd") as tmp:
        tmp.write_bytes(payload)
    return path
