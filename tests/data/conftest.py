"""Tiny NIfTI files and datasets for the data tests (a few voxels each: the CI box has 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# Anisotropic, x-flipped (negative x spacing), shifted: the geometry that catches axis mix-ups.
FLIPPED = np.array(
    [
        [-0.75, 0.0, 0.0, 40.5],
        [0.0, 1.25, 0.0, -20.0],
        [0.0, 0.0, 3.5, 12.25],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def save_nifti(
    path: Path,
    array: np.ndarray,
    affine: np.ndarray = FLIPPED,
    *,
    sform_code: int = 1,
    qform_code: int = 1,
    dtype: type | None = None,
) -> Path:
    """Write ``array`` with nibabel directly (the reference writer for the tests)."""
    array = np.asarray(array)
    img = nib.Nifti1Image(array, affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_qform(affine, code=qform_code)
    nib.save(img, str(path))
    return path


def blob_labels(shape: tuple[int, int, int], values: tuple[int, ...] = (1, 2)) -> np.ndarray:
    """Axis-aligned boxes of the given label values inside a background volume."""
    lab = np.zeros(shape, np.uint8)
    for k, v in enumerate(values):
        lo = [1 + k, 1, 1]
        hi = [max(lo[0] + 1, s // 2 + k) for s in shape[:1]] + [s - 1 for s in shape[1:]]
        lab[lo[0] : hi[0], lo[1] : hi[1] - k, lo[2] : hi[2]] = v
    return lab


def make_nnunet_folder(
    root: Path,
    *,
    cases: tuple[str, ...] = ("case_a", "case_b"),
    channels: tuple[str, ...] = ("CT",),
    labels: dict | None = None,
    shape: tuple[int, int, int] = (6, 5, 4),
    ending: str = ".nii.gz",
) -> Path:
    """An nnU-Net v2 dataset folder with tiny cases."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for case in cases:
        for c in range(len(channels)):
            save_nifti(
                root / "imagesTr" / f"{case}_{c:04d}{ending}", rng.normal(0, 100, shape).astype(np.float32)
            )
        save_nifti(root / "labelsTr" / f"{case}{ending}", blob_labels(shape))
    meta = {
        "channel_names": {str(i): n for i, n in enumerate(channels)},
        "labels": labels if labels is not None else {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": len(cases),
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def nnunet_folder(tmp_path: Path) -> Path:
    return make_nnunet_folder(tmp_path / "Dataset001_Tiny")
