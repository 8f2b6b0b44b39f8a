"""Data: volumes, I/O (NIfTI, NRRD/.seg.nrrd, MetaImage, DICOM series and DICOM-SEG), datasets, preprocessing, the CT phantom, patch sampling, augmentation.

Axes: ``Volume.array`` is in NIfTI voxel order (X, Y, Z) (optional leading channel axis); the network
sees (C, D, H, W) after ``preprocess`` (D = coarsest axis), and ``Inverse`` brings results back.
"""

from .augment import MIRROR_MODES, AugmentConfig, mirror_axes_for
from .dataset import Case, Dataset, load_dataset, modality_from_channels, phantom_dataset
from .dicom import DicomSeries, is_dicom_source, list_dicom_series, read_dicom_series, write_dicom_seg
from .intended_input import IntendedInput, input_warnings, scan_statistics
from .io import case_name, read_geometry, read_image, read_labels, read_volume, volume_format, write_volume
from .metaimage import read_metaimage, write_metaimage
from .nrrd import read_nrrd, read_seg_nrrd, write_nrrd, write_seg_nrrd
from .phantom import AMOS_LABELS, make_phantom
from .preprocess import Inverse, Plan, axis_order, fingerprint, preprocess, preprocess_case, preprocess_labels
from .sampling import PatchSampler, SampleSpec
from .volume import Volume

__all__ = [
    "AMOS_LABELS",
    "MIRROR_MODES",
    "AugmentConfig",
    "Case",
    "Dataset",
    "DicomSeries",
    "IntendedInput",
    "Inverse",
    "PatchSampler",
    "Plan",
    "SampleSpec",
    "Volume",
    "axis_order",
    "case_name",
    "fingerprint",
    "input_warnings",
    "is_dicom_source",
    "list_dicom_series",
    "load_dataset",
    "make_phantom",
    "mirror_axes_for",
    "modality_from_channels",
    "phantom_dataset",
    "preprocess",
    "preprocess_case",
    "preprocess_labels",
    "read_dicom_series",
    "read_geometry",
    "read_image",
    "read_labels",
    "read_metaimage",
    "read_nrrd",
    "read_seg_nrrd",
    "read_volume",
    "scan_statistics",
    "volume_format",
    "write_dicom_seg",
    "write_metaimage",
    "write_nrrd",
    "write_seg_nrrd",
    "write_volume",
]
