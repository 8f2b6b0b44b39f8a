"""DICOM in (one image series → ``Volume``), DICOM-SEG out (a label map → a Segmentation instance).

Reading
-------
A *source* is a folder (searched recursively) or a ``.zip`` holding DICOM files. Files are found by
the ``DICM`` marker at byte 128, whatever their names; hidden files and ``DICOMDIR`` are skipped.
Headers are read first (``stop_before_pixels``) to group the files into series and to check the
geometry; pixel data is decoded only for the chosen series, after its geometry passed.

Slices are ordered by their position along the slice normal (the cross product of the
ImageOrientationPatient row and column cosines), ascending, never by file name or InstanceNumber.
The result is in NIfTI voxel order (X, Y, Z) = (column index, row index, slice index), float32 after
RescaleSlope/RescaleIntercept (integer-valued data stays exact: float32 holds integers to 2**24).
Its affine maps (i, j, k) to RAS+ millimetres:

- column i: the row cosine (direction of increasing column index) × PixelSpacing[1]
- column j: the column cosine (direction of increasing row index) × PixelSpacing[0]
- column k: the unit normal × the slice spacing (positive: slices are sorted ascending along it)
- origin: ImagePositionPatient of the first sorted slice,

built in DICOM patient space (LPS) and turned into RAS by negating its first two rows. Because the
slices are sorted ascending along the normal, (i, j, k) is always right-handed in LPS: a NIfTI
volume whose third axis pointed the other way comes back with its slice axis reversed (the same
voxels at the same millimetre positions).

Refused, each with one ``InputError`` line naming the path: no DICOM files, several image series
without a choice, a single slice, missing geometry tags, mixed orientations / image sizes / pixel
spacings, duplicate positions, gantry tilt or shear (positions off the normal), non-uniform slice
spacing, colour images, transfer syntaxes that no installed pydicom plugin can decode, and
unreadable or truncated files. Tolerances are in ``_POSITION_TOL_MM`` / ``_POSITION_TOL_REL``.

Enhanced (multi-frame) images are read through their functional groups (per-frame
PlanePositionSequence, shared or per-frame PlaneOrientation / PixelMeasures /
PixelValueTransformation), with the same checks.

Writing
-------
:func:`write_dicom_seg` writes a BINARY DICOM Segmentation (highdicom) of a label map that lies on
the grid of a series read by :func:`read_dicom_series`; it references that series' instances and
carries one segment per label present, coded with SNOMED CT where the label has a standard concept.

pydicom and highdicom come with the ``formats`` extra; they are imported inside the functions so
that this module imports without them.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import InputError
from ..fileio import atomic_output
from ..labels import LabelTable, _normalise_name
from ._payload import as_label_array
from ._payload import why as _why
from .volume import Volume

__all__ = [
    "FORMATS_HINT",
    "DicomSeries",
    "is_dicom_source",
    "list_dicom_series",
    "read_dicom_series",
    "segment_concepts",
    "write_dicom_seg",
]

FORMATS_HINT = "DICOM support needs the 'formats' extra: pip install 'napari-e2enet[formats]'"

# Slice positions are DS strings of up to 16 characters, so scanners store them to well below
# 0.01 mm; 1% of the slice spacing is far below partial-volume blur. A dropped slice (a 100% gap
# error, ≥ 50% position error) or a change of reconstruction interval (≥ 10%) is far above both.
# A slice may sit this far (the larger of the two) from where the affine puts it, along the normal
# (spacing) and across it (tilt, relative to the smaller pixel spacing), before the series is refused.
_POSITION_TOL_MM = 0.01
_POSITION_TOL_REL = 0.01
# Direction cosines are DS too; 1e-3 (0.06°) tells a rounding difference from a different plane.
_ORIENTATION_TOL = 1e-3
# Sniffing a folder or zip for DICOM looks at this many candidate files at most.
_SNIFF_FILES = 16
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"

_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR, whatever its file name
# SOP classes that carry Rows/Columns but are not images to segment: the 1.2.840.10008.5.1.4.1.1.66
# family (segmentations, registrations, label maps), SR, presentation states, RT objects (dose).
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66.",
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.481.",
    "1.2.840.10008.5.1.4.1.1.104.",
)


def _import_pydicom(path: str | Path | None = None) -> Any:
    try:
        import pydicom
    except ImportError:
        raise InputError(FORMATS_HINT, path) from None
    return pydicom


def _import_highdicom(path: str | Path | None = None) -> Any:
    _import_pydicom(path)
    try:
        import highdicom
    except ImportError:
        raise InputError(FORMATS_HINT, path) from None
    return highdicom


# ---- sources: a folder or a zip ----------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    """One candidate file: a path on disk, or a member name inside the source zip."""

    name: str
    file: Path | None = None


class _Where:
    """Makes InputErrors that name one member of the source (a file, or a zip member)."""

    def __init__(self, source: _Source, member: _Member) -> None:
        self.source, self.member = source, member

    def __call__(self, problem: str) -> InputError:
        return self.source.error(self.member, problem)


class _Source:
    """A folder (recursive) or a zip of DICOM files; opens members and names them in errors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            exists, is_dir = self.path.exists(), self.path.is_dir()
        except OSError as exc:
            raise InputError(f"cannot access ({exc.strerror or _why(exc)})", self.path) from None
        if not exists:
            raise InputError("not found", self.path)
        self.zip: zipfile.ZipFile | None = None
        if not is_dir:
            if self.path.suffix.lower() != ".zip":
                if _has_magic_file(self.path):
                    raise InputError("a single DICOM file; pass the folder that holds its series", self.path)
                raise InputError("expected a folder of DICOM files or a .zip of them", self.path)
            try:
                self.zip = zipfile.ZipFile(self.path)
                listed, declared = len(self.zip.infolist()), _declared_members(self.zip)
            except (OSError, zipfile.BadZipFile, ValueError, RuntimeError) as exc:  # NotImplementedError: "zip file version"
                self.close()
                raise InputError(f"not a readable zip file ({_why(exc)})", self.path) from None
            # zipfile reads the central directory by its byte size and never counts its entries: a
            # bit flipped in one entry's comment length hides the entries after it (slices missing,
            # no error). Writers without ZIP64 store the count modulo 65536.
            if declared is not None and listed % 65536 != declared % 65536:
                self.zip.close()
                raise InputError(f"the zip's central directory holds {listed} entries but its end record "
                                 f"declares {declared}; the archive is damaged", self.path)

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def display_name(self) -> str:
        return self.path.stem if self.zip is not None else self.path.name

    def error(self, member: _Member, problem: str) -> InputError:
        """An InputError naming the member: its file path, or the zip plus the member name."""
        if member.file is not None:
            return InputError(problem, member.file)
        return InputError(f"member {member.name}: {problem}", self.path)

    def candidates(self, limit: int | None = None, *, strict: bool = True) -> Iterator[_Member]:
        """Non-hidden files other than DICOMDIR, in a stable order (up to ``limit``).

        ``strict``: a zip member whose name escapes the archive's folder raises InputError (else it
        is skipped, for sniffing: the read that follows refuses the archive with that message).
        """
        count = 0
        for member in self._walk_zip(strict) if self.zip is not None else self._walk_folder():
            if limit is not None and count >= limit:
                return
            count += 1
            yield member

    def _walk_folder(self) -> Iterator[_Member]:
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not _skipped_name(name):
                    yield _Member(name, Path(root) / name)

    def _walk_zip(self, strict: bool) -> Iterator[_Member]:
        assert self.zip is not None
        for info in self.zip.infolist():
            if info.is_dir():
                continue
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            # Members are read into memory, never extracted, but a name that escapes its folder
            # marks a crafted archive: refuse it rather than guess.
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                if not strict:
                    continue
                raise InputError(f"zip member {name!r} has an unsafe path (absolute or '..')", self.path)
            if any(p.startswith(".") or p == "__MACOSX" for p in parts) or _skipped_name(parts[-1]):
                continue
            yield _Member(name)

    def has_magic(self, member: _Member) -> bool:
        """True when bytes 128..131 are ``DICM`` (the DICOM Part 10 file marker)."""
        if member.file is not None:
            return _has_magic_file(member.file)
        assert self.zip is not None
        try:
            with self.zip.open(member.name) as fh:
                head = fh.read(_MAGIC_OFFSET + len(_MAGIC))
        except (OSError, zipfile.BadZipFile, zlib.error, RuntimeError, ValueError, EOFError) as exc:
            raise self.error(member, f"cannot read from the zip ({_why(exc)})") from None
        return head[_MAGIC_OFFSET:] == _MAGIC

    def dicom_members(self) -> list[_Member]:
        """The candidates with the ``DICM`` marker.

        In a zip every other member (no marker, hidden, DICOMDIR, a folder entry) is read to its end
        here, so that zipfile checks its name, CRC-32 and size: a bit flipped in a DICOM member's
        marker, compression method or central-directory name is refused, never taken for a member
        to leave out of the series (a missing end slice would be a silently smaller volume).
        """
        members = [m for m in self.candidates() if self.has_magic(m)]
        if self.zip is not None:
            used = {m.name for m in members}
            for info in self.zip.infolist():
                if info.filename not in used:
                    self._verify(_Member(info.filename))
        return members

    def _verify(self, member: _Member) -> None:
        """Read a zip member to its end (zipfile checks its CRC-32 and size there), keeping nothing."""
        assert self.zip is not None
        try:
            with self.zip.open(member.name) as fh:
                while fh.read(1 << 20):
                    pass
        except (OSError, zipfile.BadZipFile, zlib.error, RuntimeError, ValueError, EOFError) as exc:
            raise self.error(member, f"cannot read from the zip ({_why(exc)}); the archive is damaged") from None

    def read(self, member: _Member, *, headers_only: bool) -> Any:
        """The member as a pydicom dataset (without pixel data when ``headers_only``).

        A zip member's header is streamed (only its first bytes leave the archive); its pixels are
        read whole, which is when zipfile checks the member's CRC-32 and size: every member that
        becomes voxels is verified, and none is read from the archive twice.
        """
        pydicom = _import_pydicom()
        try:
            if member.file is not None:
                return pydicom.dcmread(member.file, stop_before_pixels=headers_only)
            assert self.zip is not None
            if headers_only:
                with self.zip.open(member.name) as fh:
                    return pydicom.dcmread(fh, stop_before_pixels=True)
            data = self.zip.read(member.name)
            return pydicom.dcmread(BytesIO(data))
        except InputError:
            raise
        except MemoryError:
            raise self.error(member, "not enough memory to read it") from None
        except (zipfile.BadZipFile, zlib.error) as exc:  # a CRC-32 or size mismatch, corrupt deflate data
            raise self.error(member, f"cannot read from the zip ({_why(exc)}); the archive is damaged") from None
        except Exception as exc:  # truncated / corrupt files raise all kinds of errors in pydicom
            raise self.error(member, f"not a readable DICOM file ({_why(exc)})") from None


def _skipped_name(name: str) -> bool:
    return name.startswith(".") or name.upper() == "DICOMDIR"


def _declared_members(archive: zipfile.ZipFile) -> int | None:
    """The member count the archive's end-of-central-directory record declares (ZIP64 included),
    read with zipfile's own parser; None where this Python's zipfile no longer has it."""
    end_record = getattr(zipfile, "_EndRecData", None)
    index = getattr(zipfile, "_ECD_ENTRIES_TOTAL", None)
    if end_record is None or index is None or archive.fp is None:
        return None
    record = end_record(archive.fp)
    return None if not record else int(record[index])


def _has_magic_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(_MAGIC_OFFSET + len(_MAGIC))
    except OSError:
        return False
    return head[_MAGIC_OFFSET:] == _MAGIC


def is_dicom_source(path: str | Path) -> bool:
    """True for a folder (searched recursively) or a ``.zip`` that holds DICOM files.

    Cheap: looks at the ``DICM`` marker of at most a handful of files (hidden files and DICOMDIR
    skipped), never parses a header or pixel data, and never raises (False when unreadable).
    """
    path = Path(path)
    try:
        if not (path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")):
            return False
        with _Source(path) as source:
            return any(source.has_magic(m) for m in source.candidates(_SNIFF_FILES, strict=False))
    except (InputError, OSError):
        return False


# ---- series listing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomSeries:
    """One image series of a source (from headers only).

    ``num_slices`` counts frames: files for a classic series, NumberOfFrames for an enhanced one.
    ``rows`` × ``columns`` is the image size of the series' first file.
    """

    uid: str
    description: str
    modality: str
    num_slices: int
    rows: int
    columns: int
    series_number: int | None = None
    patient_id: str = ""
    study_uid: str = ""
    num_files: int = 0

    def summary(self) -> str:
        """``UID 'description' (N slices)`` for messages."""
        return f"{self.uid} {self.description!r} ({self.num_slices} slices)"


@dataclass
class _Header:
    member: _Member
    ds: Any  # pydicom Dataset without pixel data


@dataclass
class _Scan:
    """The image series of a source: series uid → headers (in file order)."""

    source: _Source
    series: dict[str, list[_Header]] = field(default_factory=dict)

    def describe(self) -> list[DicomSeries]:
        out = []
        for uid, headers in self.series.items():
            first = headers[0].ds
            try:
                number: int | None = int(first.get("SeriesNumber"))
            except (TypeError, ValueError):  # absent or malformed: only used for sorting
                number = None
            out.append(
                DicomSeries(
                    uid=uid,
                    description=str(first.get("SeriesDescription", "") or ""),
                    modality=str(first.get("Modality", "") or ""),
                    num_slices=sum(_num_frames(h.ds) for h in headers),
                    rows=int(first.get("Rows", 0) or 0),
                    columns=int(first.get("Columns", 0) or 0),
                    series_number=number,
                    patient_id=str(first.get("PatientID", "") or ""),
                    study_uid=str(first.get("StudyInstanceUID", "") or ""),
                    num_files=len(headers),
                )
            )
        out.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else -1, s.uid))
        return out


def _num_frames(ds: Any) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _is_image(ds: Any, where: _Where) -> bool:
    """True for an image to read; False for other objects (SR, SEG, ...); InputError if incomplete.

    pydicom returns whatever it parsed from a truncated file without complaint, so a file whose
    basic attributes are missing is refused here rather than silently left out of its series.
    """
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    if not sop_class:
        raise where("incomplete DICOM file (no SOP class): truncated?")
    if str(sop_class) == _MEDIA_DIRECTORY or str(sop_class).startswith(_NON_IMAGE_PREFIXES):
        return False
    if not ds.get("SOPInstanceUID"):
        raise where("incomplete DICOM file (no SOPInstanceUID): truncated?")
    has_size = "Rows" in ds and "Columns" in ds
    if "Image Storage" in str(getattr(sop_class, "name", "")) and not has_size:
        raise where(f"incomplete {sop_class.name} file (no Rows/Columns): truncated?")
    return has_size


def _scan(path: str | Path) -> _Scan:
    """Read every DICOM header of ``path`` and group the image files by SeriesInstanceUID."""
    source = _Source(path)
    try:
        members = source.dicom_members()
        if not members:
            raise InputError("no DICOM files found (no file has the 'DICM' marker at byte 128)", source.path)
        scan = _Scan(source)
        for member in members:
            ds = source.read(member, headers_only=True)
            if not _is_image(ds, _Where(source, member)):
                continue
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            if not uid:
                raise source.error(member, "missing SeriesInstanceUID")
            scan.series.setdefault(uid, []).append(_Header(member, ds))
        if not scan.series:
            raise InputError(
                f"{len(members)} DICOM files but no image series (only non-image objects)", source.path
            )
    except BaseException:
        source.close()
        raise
    return scan


def list_dicom_series(path: str | Path) -> list[DicomSeries]:
    """The image series in a folder (recursively) or a zip, from headers only.

    Sorted by study, SeriesNumber, then UID. Segmentations, SR, presentation states and RT objects
    in the same folder are not listed. Raises InputError for a source without DICOM image files.
    """
    _import_pydicom(path)
    scan = _scan(path)
    try:
        return scan.describe()
    finally:
        scan.source.close()


def _choose(scan: _Scan, series_uid: str | None) -> str:
    listed = scan.describe()
    if series_uid is not None:
        if series_uid in scan.series:
            return series_uid
        found = "; ".join(s.summary() for s in listed)
        raise InputError(f"no image series with UID {series_uid}; found {found}", scan.source.path)
    if len(listed) > 1:
        found = "; ".join(s.summary() for s in listed)
        raise InputError(
            f"{len(listed)} image series: {found}; choose one with --series UID", scan.source.path
        )
    return listed[0].uid


# ---- geometry ----------------------------------------------------------------------------------


@dataclass
class _Frame:
    """One 2D plane of the series: where it came from and its geometry (LPS millimetres)."""

    header: _Header
    index: int  # 0-based frame number within its instance
    position: np.ndarray  # ImagePositionPatient (3,), LPS mm
    orientation: np.ndarray  # ImageOrientationPatient (6,): row cosine, column cosine
    pixel_spacing: np.ndarray  # (row spacing, column spacing) mm
    slope: float
    intercept: float


def _functional_value(ds: Any, per_frame: Any, sequence: str, keyword: str) -> Any:
    """``keyword`` from the per-frame group, else the shared group, else the top level (or None)."""
    groups = [per_frame]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        if group is not None and sequence in group and len(group[sequence].value) > 0:
            item = group[sequence].value[0]
            if keyword in item and item[keyword].value is not None:
                return item[keyword].value
    value = ds.get(keyword)
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _floats(value: Any, count: int, keyword: str, where: _Where) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise where(f"{keyword} is not {count} numbers ({value!r})") from None
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise where(f"{keyword} must be {count} finite numbers, got {value!r}")
    return arr


def _frames_of(source: _Source, header: _Header) -> list[_Frame]:
    ds = header.ds
    where = _Where(source, header.member)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise where(f"colour images ({ds.get('PhotometricInterpretation', 'RGB')}) are not supported")
    if "ModalityLUTSequence" in ds:  # a lookup table instead of slope/intercept (XA, MG; not CT/MR)
        raise where("pixel values use a Modality LUT Sequence, which is not supported")
    count = _num_frames(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if count > 1 and (not per_frame or len(per_frame) != count):
        raise where(f"multi-frame image with {count} frames but no per-frame positions")
    frames = []
    for index in range(count):
        group = per_frame[index] if per_frame else None
        values = {}
        for sequence, keyword in (
            ("PlanePositionSequence", "ImagePositionPatient"),
            ("PlaneOrientationSequence", "ImageOrientationPatient"),
            ("PixelMeasuresSequence", "PixelSpacing"),
        ):
            value = _functional_value(ds, group, sequence, keyword)
            if value is None:
                raise where(f"missing {keyword} (slice geometry); cannot place the slices in 3D")
            values[keyword] = value
        slope = _functional_value(ds, group, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional_value(ds, group, "PixelValueTransformationSequence", "RescaleIntercept")
        try:
            slope_f = 1.0 if slope is None else float(slope)
            intercept_f = 0.0 if intercept is None else float(intercept)
        except (TypeError, ValueError):
            raise where(f"RescaleSlope/RescaleIntercept are not numbers ({slope!r}, {intercept!r})") from None
        if not (np.isfinite(slope_f) and np.isfinite(intercept_f)) or slope_f == 0:
            raise where(f"invalid RescaleSlope/RescaleIntercept ({slope_f:g}, {intercept_f:g})")
        spacing = _floats(values["PixelSpacing"], 2, "PixelSpacing", where)
        if np.any(spacing <= 0):
            raise where(f"PixelSpacing must be positive, got {spacing.tolist()}")
        frames.append(
            _Frame(
                header=header,
                index=index,
                position=_floats(values["ImagePositionPatient"], 3, "ImagePositionPatient", where),
                orientation=_floats(values["ImageOrientationPatient"], 6, "ImageOrientationPatient", where),
                pixel_spacing=spacing,
                slope=slope_f,
                intercept=intercept_f,
            )
        )
    return frames


@dataclass
class _Geometry:
    frames: list[_Frame]  # in slice order (ascending along the normal)
    rows: int
    columns: int
    affine: np.ndarray  # (4, 4) voxel (i, j, k) → RAS+ mm


def _geometry(source: _Source, headers: list[_Header]) -> _Geometry:
    """Check that the frames of one series form a regular 3D grid; sort them along the normal."""
    where = source.path
    sizes = Counter((int(h.ds.Rows), int(h.ds.Columns)) for h in headers)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} in {n} file{'s' * (n > 1)}" for (r, c), n in sizes.most_common())
        raise InputError(f"mixed image sizes in one series (rows x columns): {listed}", where)
    rows, columns = next(iter(sizes))
    frames = [f for h in headers for f in _frames_of(source, h)]
    if len(frames) < 2:
        raise InputError("a single slice (a 2D image); a 3D series of at least 2 slices is needed", where)
    first = frames[0]
    row_cos, col_cos, normal = _slice_axes(frames, where)
    frames, spacing = _stack_along(frames, normal, float(np.min(first.pixel_spacing)), where)
    col_spacing, row_spacing = float(first.pixel_spacing[1]), float(first.pixel_spacing[0])
    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing  # i: along a row (increasing column index)
    lps[:3, 1] = col_cos * row_spacing  # j: down a column (increasing row index)
    lps[:3, 2] = normal * spacing  # k: slice order, ascending along the normal
    lps[:3, 3] = frames[0].position
    affine = lps.copy()
    affine[:2] *= -1  # LPS → RAS
    return _Geometry(frames, rows, columns, affine)


def _slice_axes(frames: list, where: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unit row, column and normal directions the frames share (one orientation and pixel
    spacing throughout, perpendicular unit vectors)."""
    first = frames[0]
    for frame in frames[1:]:
        if not np.allclose(frame.orientation, first.orientation, rtol=0, atol=_ORIENTATION_TOL):
            raise InputError(
                f"mixed slice orientations (ImageOrientationPatient {_fmt(first.orientation)} in "
                f"{first.header.member.name}, {_fmt(frame.orientation)} in {frame.header.member.name}); "
                "a localizer or several stacks in one series?",
                where,
            )
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise InputError(
                f"mixed pixel spacings ({_fmt(first.pixel_spacing)} and {_fmt(frame.pixel_spacing)} mm)",
                where,
            )
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    if min(np.linalg.norm(row_cos), np.linalg.norm(col_cos)) < 0.5:
        raise InputError(f"ImageOrientationPatient {_fmt(first.orientation)} is not two unit vectors", where)
    row_cos = row_cos / np.linalg.norm(row_cos)
    col_cos = col_cos / np.linalg.norm(col_cos)
    if abs(float(row_cos @ col_cos)) > _ORIENTATION_TOL:
        raise InputError(
            f"ImageOrientationPatient {_fmt(first.orientation)}: row and column directions are not perpendicular",
            where,
        )
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    return row_cos, col_cos, normal


def _stack_along(frames: list, normal: np.ndarray, pixel: float, where: Any) -> tuple[list, float]:
    """The frames sorted along ``normal`` and their spacing; refuses duplicates, tilt or shear
    (``pixel``: the smallest in-plane spacing, which scales the tolerance across the normal) and
    uneven gaps."""
    distance = np.array([f.position @ normal for f in frames])
    order = np.argsort(distance, kind="stable")
    frames = [frames[i] for i in order]
    distance = distance[order]
    gaps = np.diff(distance)
    dup_tol = _POSITION_TOL_MM
    if np.any(gaps <= dup_tol):
        k = int(np.argmax(gaps <= dup_tol))
        count = int(np.sum(gaps <= dup_tol))
        raise InputError(
            f"duplicate slice positions: {count} slice{'s' * (count > 1)} repeat{'s' * (count == 1)} "
            "another's position, e.g. "
            f"{frames[k].header.member.name} and {frames[k + 1].header.member.name} at "
            f"{distance[k]:.3f} mm along the normal (several acquisitions, echoes or time points in one series?)",
            where,
        )
    n = len(frames)
    spacing = float(distance[-1] - distance[0]) / (n - 1)

    # Across the normal: every slice must start on the line through the first one (no tilt/shear).
    offsets = np.array([f.position - frames[0].position for f in frames])
    across = offsets - np.outer(offsets @ normal, normal)
    across_err = float(np.max(np.linalg.norm(across, axis=1)))
    across_tol = max(_POSITION_TOL_MM, _POSITION_TOL_REL * pixel)
    if across_err > across_tol:
        stack = offsets[-1]
        angle = float(np.degrees(np.arccos(np.clip(abs(stack @ normal) / np.linalg.norm(stack), 0, 1))))
        raise InputError(
            f"slice positions are not along the slice normal (gantry tilt or a sheared stack: "
            f"{angle:.2f}° off, up to {across_err:.3f} mm); resample the series first (dcm2niix corrects tilt)",
            where,
        )
    # Along the normal: every slice within tolerance of first + k × spacing.
    along_err = np.abs(distance - (distance[0] + spacing * np.arange(n)))
    along_tol = max(_POSITION_TOL_MM, _POSITION_TOL_REL * spacing)
    if float(np.max(along_err)) > along_tol:
        raise InputError(
            f"non-uniform slice spacing: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
            f"(mean {spacing:.4g} mm) over {n} slices; a missing slice, or slices from several stacks?",
            where,
        )
    return frames, spacing


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v + 0.0:.4g}" for v in values) + "]"  # + 0.0: no "-0"


# ---- pixel data --------------------------------------------------------------------------------


def _check_decodable(ds: Any, where: _Where) -> None:
    """One line naming the transfer syntax when no installed pydicom plugin can decode it."""
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or not syntax.is_compressed:
        return
    try:
        available = get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):
        available = False
    if not available:
        raise where(
            f"compressed transfer syntax {syntax.name} ({syntax}) cannot be decoded here "
            "(pydicom needs pylibjpeg or python-gdcm for it); convert the series to uncompressed, "
            "e.g. with 'gdcmconv --raw' or 'dcmdjpeg'"
        )


def _decode(source: _Source, header: _Header, rows: int, columns: int) -> np.ndarray:
    """All frames of one instance as (frames, rows, columns), stored values (no rescale yet)."""
    where = _Where(source, header.member)
    ds = source.read(header.member, headers_only=False)
    _check_decodable(ds, where)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise where("no pixel data (truncated?)")
    try:
        pixels = np.asarray(ds.pixel_array)
    except MemoryError:
        raise where("not enough memory to decode the pixel data") from None
    except Exception as exc:  # truncated data, bad encapsulation, decoder failures
        raise where(f"unreadable pixel data ({_why(exc)})") from None
    count = _num_frames(header.ds)
    expected = (count, rows, columns)
    if pixels.shape == expected[1:] and count == 1:
        pixels = pixels[None]
    if pixels.shape != expected:
        raise where(f"pixel data of shape {pixels.shape}, expected {expected}")
    return pixels


def read_dicom_series(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read one DICOM image series (a folder, searched recursively, or a zip) as a ``Volume``.

    Returns a float32 (X, Y, Z) = (column, row, slice) array after RescaleSlope/Intercept (HU for
    CT), with the RAS+ affine described in the module docstring, ``name`` = the SeriesDescription
    (else the folder or zip name) and ``meta`` = ``{"format": "dicom", "path", "series_uid",
    "modality", "sop_instance_uids" (one per slice, in slice order), "frame_numbers" (1-based frame
    of each slice in its instance: all 1 for a classic series)}``.

    ``series_uid`` picks one series when the source holds several (else that is an InputError
    listing them). Every bad input raises ``InputError("<path>: <problem>")``.
    """
    _import_pydicom(path)
    scan = _scan(path)
    with scan.source as source:
        uid = _choose(scan, series_uid)
        headers = scan.series[uid]
        geometry = _geometry(source, headers)
        frames = geometry.frames
        rows, columns = geometry.rows, geometry.columns
        try:
            array = np.empty((columns, rows, len(frames)), dtype=np.float32)
        except MemoryError:
            raise InputError(
                f"not enough memory for {columns}x{rows}x{len(frames)} voxels", source.path
            ) from None
        by_instance: dict[int, list[tuple[int, _Frame]]] = {}
        for k, frame in enumerate(frames):
            by_instance.setdefault(id(frame.header), []).append((k, frame))
        for placed in by_instance.values():
            header = placed[0][1].header
            pixels = _decode(source, header, rows, columns)
            for k, frame in placed:
                plane = pixels[frame.index].astype(np.float64) * frame.slope + frame.intercept
                array[:, :, k] = plane.T  # (rows, columns) → (X = column, Y = row)
        first = headers[0].ds
        description = str(first.get("SeriesDescription", "") or "").strip()
        meta = {
            "format": "dicom",
            "path": os.path.abspath(source.path),  # absolute: a later DICOM-SEG re-reads it from any cwd
            "series_uid": uid,
            "modality": str(first.get("Modality", "") or ""),
            "sop_instance_uids": [str(f.header.ds.SOPInstanceUID) for f in frames],
            "frame_numbers": [f.index + 1 for f in frames],
        }
        return Volume(array, geometry.affine, None, description or source.display_name, meta)


# ---- DICOM-SEG ---------------------------------------------------------------------------------

# name (normalised as in labels.py, or the raw lower-case name) → (category, type, laterality).
# Categories are those of DICOM CID 7150 (it has no "Organ": organs are Anatomical Structures);
# types are pydicom's bundled SNOMED CT constants; laterality goes into the segmented property
# type modifier (CID 244), as dcmqi / 3D Slicer encode "Kidney, right".
_CONCEPTS: dict[str, tuple[str, str, str | None]] = {
    "spleen": ("AnatomicalStructure", "Spleen", None),
    "right kidney": ("AnatomicalStructure", "Kidney", "Right"),
    "left kidney": ("AnatomicalStructure", "Kidney", "Left"),
    "kidney": ("AnatomicalStructure", "Kidney", None),
    "gallbladder": ("AnatomicalStructure", "Gallbladder", None),
    "esophagus": ("AnatomicalStructure", "Esophagus", None),
    "liver": ("AnatomicalStructure", "Liver", None),
    "stomach": ("AnatomicalStructure", "Stomach", None),
    "aorta": ("AnatomicalStructure", "Aorta", None),
    "inferior vena cava": ("AnatomicalStructure", "InferiorVenaCava", None),
    "portal and splenic veins": ("AnatomicalStructure", "Vein", None),
    "pancreas": ("AnatomicalStructure", "Pancreas", None),
    "right adrenal gland": ("AnatomicalStructure", "AdrenalGland", "Right"),
    "left adrenal gland": ("AnatomicalStructure", "AdrenalGland", "Left"),
    "adrenal gland": ("AnatomicalStructure", "AdrenalGland", None),
    "duodenum": ("AnatomicalStructure", "Duodenum", None),
    "bladder": ("AnatomicalStructure", "Bladder", None),
    "prostate": ("AnatomicalStructure", "Prostate", None),
    "uterus": ("AnatomicalStructure", "Uterus", None),
    # AMOS's "prostate/uterus" is one class for two organs: no single concept, so the generic one.
    "prostate/uterus": ("AnatomicalStructure", "AnatomicalStructure", None),
    "grey matter": ("Tissue", "GrayMatter", None),
    "white matter": ("Tissue", "WhiteMatter", None),
    "csf/other": ("BodySubstance", "CerebrospinalFluid", None),
    "edema": ("MorphologicallyAbnormalStructure", "Edema", None),
    # BraTS tumour sub-regions have no SNOMED CT concepts of their own: Neoplasm + the label text.
    "non-enhancing tumour": ("MorphologicallyAbnormalStructure", "Neoplasm", None),
    "enhancing tumour": ("MorphologicallyAbnormalStructure", "Neoplasm", None),
    "tumour": ("MorphologicallyAbnormalStructure", "Neoplasm", None),
    "tumor": ("MorphologicallyAbnormalStructure", "Neoplasm", None),
}


def segment_concepts(name: str) -> tuple[Any, Any, Any | None]:
    """(category, type, laterality or None) pydicom ``Code``s for a label name.

    Looks the raw lower-case name up first (so "prostate" stays the prostate), then its
    labels.py normal form (aliases: "postcava" → inferior vena cava, ...); unknown names get the
    generic Tissue / Tissue pair (the segment label still carries the name).
    """
    from pydicom.sr.codedict import codes

    raw = re.sub(r"[_\s]+", " ", name.strip().lower())
    entry = _CONCEPTS.get(raw) or _CONCEPTS.get(_normalise_name(name)) or ("Tissue", "Tissue", None)
    category, prop, side = entry
    return (
        getattr(codes.cid7150, category),
        getattr(codes.SCT, prop),
        None if side is None else getattr(codes.cid244, side),
    )


def _package_version() -> str:
    try:
        from .. import __version__
    except ImportError:  # pragma: no cover - the package always defines it
        return "unknown"
    return str(__version__)


def _lo(text: str, limit: int = 64) -> str:
    """A DICOM LO value: one line, at most ``limit`` characters, no backslash (the VM separator)."""
    text = " ".join(str(text).replace("\\", "/").split())
    return text[:limit]


def write_dicom_seg(
    labels: Volume,
    path: str | Path,
    *,
    source: Volume,
    label_table: LabelTable,
    series_description: str = "E2ENet segmentation",
    algorithm_name: str = "napari-e2enet",
    algorithm_version: str | None = None,
) -> Path:
    """Write ``labels`` as a BINARY DICOM Segmentation that references the series of ``source``.

    ``labels``: an integer label map (X, Y, Z) on the grid of ``source`` (same shape and affine),
    which must come from :func:`read_dicom_series` (its ``meta`` names the series; the source
    headers are re-read from ``meta["path"]``). Slice k of ``labels`` becomes the frame of the
    source slice k (``meta["sop_instance_uids"][k]``), transposed to (rows, columns). One segment
    per non-zero label value present, numbered 1.. in label order, named by ``label_table``, coded
    with :func:`segment_concepts` and coloured with the table's colour; empty frames are left out.
    ``algorithm_version`` defaults to the package version. The file is written atomically.
    """
    meta = source.meta or {}
    if meta.get("format") != "dicom" or not meta.get("path") or not meta.get("series_uid"):
        raise InputError("DICOM-SEG needs a DICOM source image", path)
    hd = _import_highdicom(path)
    from pydicom.sr.codedict import codes

    path = Path(path)
    label_map, present = _seg_label_map(labels, source, path)
    source_images, pixels = _seg_frames(label_map, present, meta, labels.spatial_shape[2], path)
    version = algorithm_version if algorithm_version is not None else _package_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(algorithm_name), family=codes.cid7162.ArtificialIntelligence, version=_lo(version)
    )
    descriptions = _segment_descriptions(hd, present, label_table, algorithm)
    first = source_images[0]
    try:
        number = int(first.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    try:
        seg = hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=number + 1000 if 0 <= number < 2**31 - 1000 else 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="napari-e2enet",
            manufacturer_model_name=_lo(algorithm_name),
            software_versions=_lo(version),
            device_serial_number="0",
            content_description=_lo(series_description),
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom validates the source headers (patient/study module, geometry) as it copies them.
        raise InputError(f"cannot build a DICOM-SEG from this source ({_why(exc)})", path) from None
    seg.SeriesDescription = _lo(series_description)
    with atomic_output(path) as tmp:
        seg.save_as(tmp)
    return path


def _seg_label_map(labels: Volume, source: Volume, path: Path) -> tuple[np.ndarray, list[int]]:
    """The label map checked against the source grid, and its non-zero label values (ascending)."""
    if path.is_dir():
        raise InputError("is a folder; give the DICOM-SEG file name (e.g. seg.dcm)", path)
    if labels.array.ndim != 3:
        raise InputError(f"label map must be 3D (X, Y, Z), got shape {labels.array.shape}", path)
    if labels.spatial_shape != source.spatial_shape:
        raise InputError(
            f"label map shape {labels.spatial_shape} is not the source grid {source.spatial_shape}", path
        )
    if not np.allclose(labels.affine, source.affine, rtol=1e-5, atol=1e-3):
        raise InputError(
            "label map affine differs from the source image's; resample it onto the source grid", path
        )
    label_map = as_label_array(labels.array, path)
    if int(label_map.max()) < 2**16:  # bincount is several times faster than unique's sort
        present = [int(v) for v in np.flatnonzero(np.bincount(label_map.ravel())) if v != 0]
    else:
        present = [int(v) for v in np.unique(label_map) if v != 0]
    if not present:
        raise InputError("the label map is empty (no segment to write)", path)
    return label_map, present


def _seg_frames(
    label_map: np.ndarray, present: list[int], meta: dict, nz: int, path: Path
) -> tuple[list, np.ndarray]:
    """The source instances (re-read from ``meta["path"]``) and the segment-number frames in their
    order: one frame per source slice, or the frames of one multi-frame instance."""
    uids = list(meta.get("sop_instance_uids") or [])
    frame_numbers = list(meta.get("frame_numbers") or [1] * len(uids))
    if len(uids) != nz or len(frame_numbers) != nz:
        raise InputError(f"source meta lists {len(uids)} slices for {nz} label slices", path)
    scan = _scan(meta["path"])
    with scan.source:
        headers = scan.series.get(str(meta["series_uid"]))
        if not headers:
            raise InputError(f"source series {meta['series_uid']} is no longer in {meta['path']}", path)
        by_uid = {str(h.ds.SOPInstanceUID): h.ds for h in headers}
    missing = [u for u in uids if u not in by_uid]
    if missing:
        raise InputError(f"source instance {missing[0]} is no longer in {meta['path']}", path)
    multi = any(_num_frames(by_uid[u]) > 1 for u in uids)

    # Segment numbers 1..N (highdicom needs them consecutive) in label-id order: the index of each
    # value in [0, *present] is its segment number (0 stays background).
    seg_dtype = np.uint8 if len(present) < 256 else np.uint16
    volume = np.searchsorted(np.asarray([0, *present]), label_map).astype(seg_dtype)  # (X, Y, Z)
    if multi:
        if len(set(uids)) != 1:
            raise InputError(
                "DICOM-SEG of a series made of several multi-frame instances is not supported", path
            )
        source_images = [by_uid[uids[0]]]
        pixels = np.zeros((_num_frames(source_images[0]), *volume.shape[1::-1]), dtype=seg_dtype)
        for k, frame_number in enumerate(frame_numbers):
            pixels[int(frame_number) - 1] = volume[:, :, k].T
    else:
        source_images = [by_uid[u] for u in uids]
        pixels = np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))  # (slices, rows, columns)
    return source_images, pixels


def _segment_descriptions(hd: Any, present: list[int], label_table: LabelTable, algorithm: Any) -> list:
    """One highdicom SegmentDescription per label value, numbered 1.. in label order."""
    descriptions = []
    for number, label_id in enumerate(present, start=1):
        name = label_table.name_of(label_id)
        category, prop, side = segment_concepts(name)
        r, g, b, _ = label_table.color_of(label_id)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=_lo(name),
            segmented_property_category=category,
            segmented_property_type=prop,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=_lo(name),
            tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(r * 255.0, g * 255.0, b * 255.0),
        )
        if side is not None:
            description.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(side)]
        descriptions.append(description)
    return descriptions
