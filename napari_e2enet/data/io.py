"""NIfTI reading and writing (nibabel) with one-line ``InputError`` for every bad file.

Reading never lets a nibabel/numpy/zlib exception escape: a missing path, an empty or truncated file,
bytes that are not NIfTI, a 2D image, a 4D series where one volume was expected, a header whose
dimensions do not fit the bytes on disk, or NaN/Inf voxels all end in ``InputError("<path>: ...")``.

Writing keeps the source geometry exactly: the reference header is copied, its sform/qform codes are
restored and the affine is written into both, so ``nibabel.load(out).affine`` equals the source
affine bit for bit. Files are written to a temporary name in the destination folder, then renamed.

Other formats go through the same entry points: :func:`read_volume`, :func:`read_image`,
:func:`read_labels` and :func:`read_geometry` dispatch on the name (``.nrrd``/``.nhdr``/``.seg.nrrd``
→ :mod:`.nrrd`, ``.mha``/``.mhd`` → :mod:`.metaimage`, a folder or ``.zip`` → :mod:`.dicom`), and
:func:`write_volume` on the output extension (``.nrrd``, ``.seg.nrrd``, ``.mha``/``.mhd``, ``.dcm``
for DICOM-SEG). NIfTI names take exactly the code below, as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy

from ..errors import InputError
from ..fileio import atomic_output
from ..labels import LabelTable
from ..pathcheck import special_kind
from ._payload import VOLUME_SUFFIXES, CheckedStream, as_label_array, case_name, labels_dtype, matching_suffix
from ._payload import why as _why
from .volume import Volume

# case_name, as_label_array, labels_dtype and VOLUME_SUFFIXES live in _payload so that the format
# readers (nrrd, metaimage, dicom), which io dispatches to, need not import io back; they stay
# importable from here, where callers have always found them.
__all__ = [
    "NIFTI_SUFFIXES",
    "OUTPUT_FORMATS",
    "VOLUME_SUFFIXES",
    "as_label_array",
    "case_name",
    "float32_voxels",
    "is_volume_file",
    "labels_dtype",
    "volume_format",
    "read_geometry",
    "read_image",
    "read_labels",
    "read_volume",
    "write_volume",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Output format name (CLI --output-format) → file suffix; the suffix picks the writer.
OUTPUT_FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "seg.nrrd": ".seg.nrrd", "mha": ".mha",
                  "dcm": ".dcm"}
_UNKNOWN_TYPE = ("not a NIfTI, NRRD or MetaImage file name (expected .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, "
                 "or a DICOM folder or .zip)")

# DEFLATE cannot compress better than ~1032:1, so a .nii.gz whose header promises more decompressed
# bytes than this is lying about its size (and reading it would only allocate memory to fail later).
_MAX_DEFLATE_RATIO = 1032
_AFFINE_ATOL_MM = 1e-3


class _QuietNibabel(logging.Filter):
    """Drops nibabel's header-repair log lines ("sizeof_hdr should be 348; ...") while we read.

    A bad file becomes one InputError line; nibabel's own messages would otherwise reach stderr.
    Only records from the thread currently inside ``_quiet()`` are dropped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "depth", 0)


_QUIET = _QuietNibabel()
logging.getLogger("nibabel.global").addFilter(_QUIET)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    _QUIET.local.depth = getattr(_QUIET.local, "depth", 0) + 1
    try:
        yield
    finally:
        _QUIET.local.depth -= 1


def _nifti_suffix(path: Path) -> str | None:
    return matching_suffix(path, NIFTI_SUFFIXES)


def is_volume_file(path: str | Path) -> bool:
    """True for a file name that one of the readers takes (NIfTI, NRRD, MetaImage), any case."""
    lower = Path(path).name.lower()
    return any(lower.endswith(s) and len(lower) > len(s) for s in VOLUME_SUFFIXES)


def volume_format(path: str | Path) -> str:
    """Which reader a path goes to: ``"nifti"``, ``"nrrd"``, ``"metaimage"``, ``"dicom"`` (a folder
    or a ``.zip``), or ``"unknown"``. By name only (a folder counts as DICOM unless its name ends in
    a file suffix), so a missing file still gets its format's own "file not found"."""
    path = Path(path)
    if _nifti_suffix(path):
        return "nifti"
    lower = path.name.lower()
    if lower.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if lower.endswith((".mha", ".mhd")):
        return "metaimage"
    if lower.endswith(".zip") or path.is_dir():
        return "dicom"
    return "unknown"


def _refuse_special(path: str | Path) -> None:
    """A FIFO, device, socket or broken link is named as what it is (reading a FIFO would block)."""
    kind = special_kind(path)
    if kind is not None:
        raise InputError(f"not a regular file ({kind})", path)


def _read_other(path: Path, kind: str, allow_channels: bool, series: str | None) -> Volume:
    """read_volume for NRRD, MetaImage and DICOM (the optional libraries are imported inside)."""
    if series is not None and kind != "dicom":
        raise InputError("a series UID only applies to a DICOM folder or .zip", path)
    if kind == "nrrd":
        from .nrrd import read_nrrd

        return read_nrrd(path, allow_channels=allow_channels)
    if kind == "metaimage":
        from .metaimage import read_metaimage

        return read_metaimage(path, allow_channels=allow_channels)
    if kind == "dicom":
        from .dicom import read_dicom_series

        return read_dicom_series(path, series_uid=series)
    if not path.exists():
        raise InputError("file not found", path)
    raise InputError(_UNKNOWN_TYPE, path)


def _load_nifti(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """``nib.load`` (lazy, header only), for names in any case: nib.load itself rewrites a
    mixed-case name such as ``scan.Nii.Gz`` into one that does not exist, so a file whose first
    four bytes give a NIfTI-1/-2 header size is opened through a file map naming the real file."""
    from nibabel.fileholders import FileHolder
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as fh:  # picks gzip from the suffix in any case
        head = fh.read(4)
    sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")} if len(head) == 4 else set()
    klass = nib.Nifti1Image if 348 in sizes else nib.Nifti2Image if 540 in sizes else None
    if klass is None:  # not a NIfTI header: nib.load words the error
        return nib.load(str(path), mmap=False)
    holder = {"header": FileHolder(filename=str(path)), "image": FileHolder(filename=str(path))}
    return klass.from_file_map(holder, mmap=False)


def _load_header(path: str | Path, allow_channels: bool) -> tuple[Path, nib.Nifti1Image, int]:
    """Open ``path`` lazily and validate everything that the header alone can tell.

    Returns (path, image, channel_axis_count) where the last is 0 for a 3D volume or C for a
    4D series (only when ``allow_channels``).
    """
    path = Path(path)
    try:
        if not path.exists():
            raise InputError("file not found", path)
        if path.is_dir():
            raise InputError("is a folder, not a NIfTI file", path)
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot access ({exc.strerror or _why(exc)})", path) from None
    suffix = _nifti_suffix(path)
    if suffix is None:
        raise InputError("not a NIfTI file name (expected .nii or .nii.gz)", path)
    if size == 0:
        raise InputError("empty file", path)
    try:
        with _quiet():
            img = _load_nifti(path)
    except Exception as exc:  # any parse error is a bad file
        raise InputError(f"not a readable NIfTI file ({_why(exc)})", path) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"not a NIfTI-1/NIfTI-2 image (nibabel read it as {type(img).__name__})", path)
    try:
        hdr = img.header
        shape = tuple(int(s) for s in img.shape)
        dtype = np.dtype(hdr.get_data_dtype())
        offset = int(getattr(img.dataobj, "offset", None) or hdr.get_data_offset())
    except Exception as exc:
        raise InputError(f"corrupt NIfTI header ({_why(exc)})", path) from None
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise InputError(f"unsupported voxel type {dtype} (expected integers or floats)", path)
    if len(shape) < 3:
        raise InputError(f"2D image of shape {shape}; a 3D volume is needed", path)
    if any(s < 1 for s in shape):
        raise InputError(f"header declares an empty shape {shape}", path)
    if min(shape[:3]) == 1:
        raise InputError(f"2D image (a single slice, shape {shape}); a 3D volume is needed", path)
    extra = [s for s in shape[3:] if s != 1]
    if len(extra) > 1:
        raise InputError(f"{len(shape)}D data of shape {shape} is not supported", path)
    channels = extra[0] if extra else 0
    if channels and not allow_channels:
        raise InputError(f"4D image with {channels} volumes (shape {shape}); expected one 3D volume", path)
    expected = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if suffix == ".nii" and offset + expected > size:
        raise InputError(
            f"header declares {shape} {dtype} voxels ({expected} bytes) but the file holds only "
            f"{max(size - offset, 0)} bytes of data",
            path,
        )
    if suffix == ".nii.gz" and offset + expected > size * _MAX_DEFLATE_RATIO + 65536:
        raise InputError(
            f"header declares {shape} {dtype} voxels ({expected} bytes), far more than a "
            f"{size}-byte compressed file can hold",
            path,
        )
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise InputError(f"corrupt NIfTI geometry ({_why(exc)})", path) from None
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError("invalid affine (NaN or Inf in sform/qform)", path)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError("invalid affine (zero or degenerate voxel size)", path)
    return path, img, channels


def read_geometry(
    path: str | Path, *, allow_channels: bool = False, series: str | None = None
) -> tuple[tuple[int, int, int], np.ndarray, int]:
    """((X, Y, Z), affine (4, 4), channels) of a volume: header-only for NIfTI, NRRD and MetaImage;
    a DICOM series is read whole (its geometry needs every slice's position)."""
    _refuse_special(path)
    kind = volume_format(path)
    if kind == "nrrd" and series is None:
        from .nrrd import read_nrrd_geometry

        return read_nrrd_geometry(path, allow_channels=allow_channels)
    if kind == "metaimage" and series is None:
        from .metaimage import read_metaimage_geometry

        return read_metaimage_geometry(path, allow_channels=allow_channels)
    if kind != "nifti" or series is not None:
        vol = _read_other(Path(path), kind, allow_channels, series)
        return vol.spatial_shape, vol.affine.copy(), vol.num_channels
    path, img, channels = _load_header(path, allow_channels)
    shape = img.shape
    return (int(shape[0]), int(shape[1]), int(shape[2])), np.asarray(img.affine, np.float64), max(channels, 1)


def _checked_voxels(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """The voxels of a ``.nii.gz``, scaled as nibabel scales them, with the gzip data verified.

    nibabel stops inflating at the size the header declares and never reaches the gzip trailer, so a
    flipped bit or a cut-off trailer would go unnoticed. Here the file is streamed once through
    :class:`._payload.CheckedStream` straight into the voxel buffer, then to its end: every member's
    CRC-32 and length must match and nothing but zero padding may follow.
    """
    proxy = img.dataobj
    nbytes = int(np.prod(proxy.shape, dtype=np.int64)) * np.dtype(proxy.dtype).itemsize
    with open(path, "rb") as fh:
        stream = CheckedStream(fh, path, codec="gzip")
        spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
        checked = ArrayProxy(stream, spec, mmap=False, order=proxy.order)
        try:
            data = np.asanyarray(checked)
        except OSError:  # a stream that ends cleanly but early (nibabel: "Expected n bytes, got m")
            raise InputError(f"truncated voxel data: the header declares {nbytes} bytes of voxels after "
                             f"{proxy.offset} header bytes; the compressed data hold {stream.tell()}", path) from None
        stream.finish()
    return data


def read_volume(path: str | Path, *, allow_channels: bool = False, series: str | None = None) -> Volume:
    """Read one volume into a ``Volume``: a NIfTI file (.nii / .nii.gz), an NRRD (.nrrd, .nhdr,
    .seg.nrrd: its label map), a MetaImage (.mha, .mhd) or a DICOM series (a folder or .zip;
    ``series`` picks one series UID when there are several).

    Returns (X, Y, Z) voxels in the file's own dtype (NIfTI: scaled by scl_slope/inter when the
    header sets them; DICOM: float32 after the rescale), or (C, X, Y, Z) when ``allow_channels`` and
    the file is a 4D series of C volumes.
    Raises ``InputError("<path>: <problem>")`` for every kind of bad file, never anything else.
    """
    _refuse_special(path)
    kind = volume_format(path)
    if kind != "nifti" or series is not None:
        return _read_other(Path(path), kind, allow_channels, series)
    path, img, channels = _load_header(path, allow_channels)
    try:
        with _quiet():
            data = _checked_voxels(path, img) if _nifti_suffix(path) == ".nii.gz" else np.asanyarray(img.dataobj)
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"not enough memory to read {img.shape} voxels", path) from None
    except Exception as exc:  # short data, zlib errors...
        raise InputError(f"truncated or corrupt voxel data ({_why(exc)})", path) from None
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise InputError(f"unsupported voxel type {data.dtype}", path)
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputError(f"{int(bad.sum())} voxels are NaN or Inf", path)
    spatial = data.shape[:3]
    data = data.reshape(*spatial, channels) if channels else data.reshape(spatial)
    if channels:
        data = np.ascontiguousarray(np.moveaxis(data, -1, 0))
    header = img.header.copy()
    return Volume(data, np.asarray(img.affine, np.float64), header, case_name(path))


def _same_geometry(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-5, atol=_AFFINE_ATOL_MM))


def read_image(paths: str | Path | Sequence[str | Path], *, name: str | None = None,
               series: str | None = None) -> Volume:
    """Read an image as (C, X, Y, Z) float32.

    ``paths`` is one file (a 3D volume, or a 4D series whose volumes are the channels, as in MSD),
    one DICOM folder or zip (``series``: the series UID when it holds several), or a list of 3D
    channel files (nnU-Net ``CASE_0000``, ``CASE_0001``, ...) that must share their shape and affine.
    The result carries the first file's affine, header and ``meta``.
    """
    files = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not files:
        raise InputError("read_image: no image files given")
    if len(files) == 1:
        vol = read_volume(files[0], allow_channels=True, series=series)
        array = float32_voxels(vol.channels(), files[0])
        return Volume(array, vol.affine, vol.header, name or _strip_channel(vol.name), vol.meta)
    if series is not None:
        raise InputError("a series UID only applies to one DICOM folder or .zip", files[0])
    volumes: list[Volume] = []
    for path in files:
        vol = read_volume(path)
        if volumes:
            first = volumes[0]
            if vol.spatial_shape != first.spatial_shape:
                raise InputError(
                    f"channel shape {vol.spatial_shape} differs from {first.spatial_shape} of {files[0].name}",
                    path,
                )
            if not _same_geometry(vol.affine, first.affine):
                raise InputError(f"channel affine differs from that of {files[0].name}", path)
        volumes.append(vol)
    array = np.stack([float32_voxels(v.array, p) for v, p in zip(volumes, files, strict=True)])
    first = volumes[0]
    return Volume(array, first.affine, first.header, name or _strip_channel(first.name), first.meta)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_voxels(array: np.ndarray, where: str | Path | None) -> np.ndarray:
    """``array`` as float32 (no copy when it already is), refused when a voxel is not finite *after*
    the conversion: a float64 1e300 (or a scaled integer beyond ±3.4e38) passes a NaN/Inf check in
    its own dtype but becomes Inf in float32, and the network would see it."""
    array = np.asarray(array)
    with np.errstate(over="ignore", invalid="ignore"):  # counted below, not warned on stderr
        out = array.astype(np.float32, copy=False)
    bad = ~np.isfinite(out)
    if bad.any():
        source = array[bad]
        overflow = source[np.isfinite(source)]
        if overflow.size:
            raise InputError(f"{overflow.size} voxels (e.g. {float(overflow.flat[0]):g}) lie beyond the float32 "
                             f"range (±{_FLOAT32_MAX:.4g}) and would become Inf", where)
        raise InputError(f"{int(bad.sum())} voxels are NaN or Inf", where)
    return out


def _strip_channel(name: str) -> str:
    stem, _, tail = name.rpartition("_")
    return stem if stem and len(tail) == 4 and tail.isdigit() else name


def read_labels(path: str | Path) -> Volume:
    """Read a label map: a 3D integer ``Volume`` (uint8/int16/int32, 0 = background).

    Raises InputError for non-integer (e.g. 1.5) or negative values, and for 4D files.
    """
    vol = read_volume(path)
    vol.array = as_label_array(vol.array, path)
    return vol


def _is_label_dtype(dtype: np.dtype) -> bool:
    return dtype.kind in "biu"


def write_volume(volume: Volume, path: str | Path, *, like: Volume | None = None,
                 label_table: LabelTable | None = None) -> Path:
    """Write ``volume`` atomically in the format its extension names, keeping the source geometry.

    ``.nii`` / ``.nii.gz``: NIfTI, as described below. ``.nrrd``: :func:`.nrrd.write_nrrd`;
    ``.seg.nrrd``: a 3D Slicer segmentation with ``label_table``'s names and colours (default: the
    ids as names); ``.mha`` / ``.mhd``: :func:`.metaimage.write_metaimage`; ``.dcm``: a DICOM-SEG
    (:func:`.dicom.write_dicom_seg`) that references the series ``like`` was read from (``like`` must
    be a Volume read from DICOM). NIfTI:

    - integer / bool arrays are label maps, stored as uint8, int16 or int32 (the smallest that fits);
      float arrays are images, stored as float32. (C, X, Y, Z) arrays are stored as 4D (X, Y, Z, C).
    - geometry and metadata come from ``like`` when given (its spatial shape must match), else from
      ``volume`` itself: the header is copied, its sform and qform codes are kept and the affine is
      written into both, so nibabel re-reads exactly that affine.
    - the file is written under a temporary name in the destination folder, then renamed; a missing or
      unwritable folder raises InputError.
    Returns the written path.
    """
    path = Path(path)
    suffix = _nifti_suffix(path)
    if suffix is None:
        return _write_other(volume, path, like, label_table)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"output folder {folder} {problem}", path)
    ref = like if like is not None else volume
    if ref.spatial_shape != volume.spatial_shape:
        raise InputError(
            f"volume shape {volume.spatial_shape} does not match the reference grid {ref.spatial_shape}", path
        )
    array = np.asarray(volume.array)
    if _is_label_dtype(array.dtype):
        data = as_label_array(array, path)
        is_labels = True
    elif array.dtype.kind == "f":
        data = array.astype(np.float32, copy=False)
        is_labels = False
    else:
        raise InputError(f"cannot write voxels of type {array.dtype}", path)
    if data.ndim == 4:
        data = np.moveaxis(data, 0, -1)
    affine = np.asarray(ref.affine, dtype=np.float64)
    source_header = ref.header if ref.header is not None else volume.header
    if source_header is not None:
        header = source_header.copy()
        sform_code = int(source_header["sform_code"])
        qform_code = int(source_header["qform_code"])
    else:
        header, sform_code, qform_code = None, 1, 1  # 1 = scanner coordinates
    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        img = cls(np.ascontiguousarray(data), affine, header=header)
        img.set_data_dtype(data.dtype)
        img.header.set_sform(affine, code=sform_code)
        img.header.set_qform(affine, code=qform_code)
        img.header.set_slope_inter(1.0, 0.0)
        if is_labels:
            img.header["cal_min"] = 0
            img.header["cal_max"] = 0
    except Exception as exc:
        raise InputError(f"cannot build a NIfTI image ({_why(exc)})", path) from None
    with atomic_output(path, suffix) as tmp:
        nib.save(img, str(tmp))
    return path


def _write_other(volume: Volume, path: Path, like: Volume | None, label_table: LabelTable | None) -> Path:
    """write_volume for the non-NIfTI extensions (the optional libraries are imported inside)."""
    lower = path.name.lower()
    if lower.endswith(".seg.nrrd"):
        from .nrrd import write_seg_nrrd

        return write_seg_nrrd(volume, path, label_table=label_table, like=like)
    if lower.endswith((".nrrd", ".nhdr")):
        from .nrrd import write_nrrd

        return write_nrrd(volume, path, like=like)
    if lower.endswith((".mha", ".mhd")):
        from .metaimage import write_metaimage

        return write_metaimage(volume, path, like=like)
    if lower.endswith(".dcm"):
        if like is None or (like.meta or {}).get("format") != "dicom":
            raise InputError("DICOM-SEG (.dcm) output needs the input read from a DICOM folder or .zip "
                             "(it references that series); write .nii.gz, .nrrd, .seg.nrrd or .mha instead", path)
        from .dicom import write_dicom_seg

        table = label_table if label_table is not None else LabelTable({})
        return write_dicom_seg(volume, path, source=like, label_table=table)
    raise InputError("output must end in .nii, .nii.gz, .nrrd, .seg.nrrd, .mha, .mhd or .dcm (DICOM-SEG)", path)
