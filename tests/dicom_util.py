"""Test helper: write a ``Volume`` as a synthetic classic DICOM series (one file per slice).

Usage::

    from tests.dicom_util import write_dicom_series

    paths = write_dicom_series(volume, tmp_path / "series")           # CT, slices along axis 2
    vol = read_dicom_series(tmp_path / "series")

Pixel data is int16 with RescaleSlope/RescaleIntercept, so the values read back equal the volume's
values when those are integers (quantise first, e.g. ``np.round``). Geometry comes from the RAS
affine: ImageOrientationPatient / ImagePositionPatient / PixelSpacing in DICOM's LPS patient space
(x and y negated). File names and InstanceNumbers are shuffled by default, so only the positions
can give the slice order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from napari_e2enet.data.volume import Volume

__all__ = ["lps_geometry", "write_dicom_series"]

_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


def _ds(values: np.ndarray | list[float]) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def lps_geometry(affine: np.ndarray, axis: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row cosine, column cosine, (row spacing, column spacing), slice step) in LPS for slices
    along ``axis``: columns follow the lower remaining array axis, rows the higher one."""
    lps = np.asarray(affine, np.float64).copy()
    lps[:2] *= -1
    col_axis, row_axis = (a for a in range(3) if a != axis)
    across_row = lps[:3, col_axis]  # moving along a row = increasing column index
    down_col = lps[:3, row_axis]
    spacing = np.array([np.linalg.norm(down_col), np.linalg.norm(across_row)])
    return across_row / spacing[1], down_col / spacing[0], spacing, lps[:3, axis]


def write_dicom_series(
    volume: Volume,
    folder: Path,
    *,
    modality: str = "CT",
    series_uid: str | None = None,
    shuffle_names: bool = True,
    study_uid: str | None = None,
    axis: int = 2,
    rescale: tuple[float, float] | None = None,
    description: str = "synthetic series",
    frame_of_reference_uid: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write ``volume`` (a 3D (X, Y, Z) Volume) as one single-frame DICOM file per slice along ``axis``.

    Slice k along ``axis`` becomes a (rows, columns) image whose columns run along the lower
    remaining array axis and rows along the higher one (for ``axis=2``: columns = X, rows = Y).
    ``rescale`` = (slope, intercept) stores ``round((value - intercept) / slope)``; by default
    slope 1 with intercept -1024 for CT when the values fit (as scanners do), else 0 or whatever
    brings the range into int16. Values must then be integers (ValueError otherwise).
    ``series_uid`` / ``study_uid`` / ``frame_of_reference_uid`` default to new UIDs.
    Returns the written paths in slice (array index) order; their names are random when
    ``shuffle_names`` (and the InstanceNumbers a permutation), else ``slice_0000.dcm``, ...
    """
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    array = np.asarray(volume.array, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"write_dicom_series needs a 3D volume, got shape {array.shape}")
    if rescale is None:
        if not np.array_equal(array, np.round(array)):
            raise ValueError("volume holds non-integer values: quantise it (np.round) or pass rescale=")
        lo, hi = float(array.min()), float(array.max())
        intercept = -1024.0 if modality == "CT" and lo >= -1024 and hi - (-1024) <= 32767 else 0.0
        if lo - intercept < -32768 or hi - intercept > 32767:
            intercept = lo + 32768
        slope = 1.0
    else:
        slope, intercept = float(rescale[0]), float(rescale[1])
    stored = np.round((array - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError(f"values {array.min():g}..{array.max():g} do not fit int16 with slope {slope:g}")
    stored = stored.astype(np.int16)

    row_cos, col_cos, spacing, step = lps_geometry(volume.affine, axis)
    if abs(float(row_cos @ col_cos)) > 1e-6:
        raise ValueError("the in-plane axes of the affine are not perpendicular (DICOM cannot store that)")
    origin = volume.affine[:3, 3] * np.array([-1.0, -1.0, 1.0])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    count = array.shape[axis]
    rng = np.random.default_rng(seed)
    order = rng.permutation(count) if shuffle_names else np.arange(count)
    paths = []
    for k in range(count):
        plane = np.take(stored, k, axis=axis).T  # (rows = higher axis, columns = lower axis)
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = _SOP_CLASS[modality]
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality = modality
        ds.PatientName = "Phantom^Synthetic"
        ds.PatientID = "E2E-0001"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = 1
        ds.SeriesDescription = description
        ds.Manufacturer = "napari-e2enet tests"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImageOrientationPatient = _ds([*row_cos, *col_cos])
        ds.ImagePositionPatient = _ds(origin + k * step)
        ds.PixelSpacing = _ds(spacing)
        ds.SliceThickness = format_number_as_ds(float(np.linalg.norm(step)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = format_number_as_ds(slope)
        ds.RescaleIntercept = format_number_as_ds(intercept)
        if modality == "CT":
            ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        name = f"{rng.integers(0, 16**8):08x}" if shuffle_names else f"slice_{k:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
