"""Data: volumes, NIfTI I/O, datasets, preprocessing, the CT phantom, patch sampling, augmentation.

Axes: ``Volume.array`` is in NIfTI voxel order (X, Y, Z) (optional leading channel axis); the network
sees (C, D, H, W) after ``preprocess`` (D = coarsest axis), and ``Inverse`` brings results back.
"""

from .augment import MIRROR_MODES, AugmentConfig, mirror_axes_for
from .dataset import Case, Dataset, load_dataset, modality_from_channels
from .intended_input import IntendedInput, input_warnings, scan_statistics
from .io import read_geometry, read_image, read_labels, read_volume, write_volume
from .phantom import AMOS_LABELS, make_phantom, phantom_dataset
from .preprocess import Inverse, Plan, axis_order, fingerprint, preprocess, preprocess_case, preprocess_labels
from .sampling import PatchSampler, SampleSpec
from .volume import Volume

__all__ = [
    "AMOS_LABELS",
    "MIRROR_MODES",
    "AugmentConfig",
    "Case",
    "Dataset",
    "IntendedInput",
    "Inverse",
    "PatchSampler",
    "Plan",
    "SampleSpec",
    "Volume",
    "axis_order",
    "fingerprint",
    "input_warnings",
    "load_dataset",
    "make_phantom",
    "mirror_axes_for",
    "modality_from_channels",
    "phantom_dataset",
    "preprocess",
    "preprocess_case",
    "preprocess_labels",
    "read_geometry",
    "read_image",
    "read_labels",
    "read_volume",
    "scan_statistics",
    "write_volume",
]
