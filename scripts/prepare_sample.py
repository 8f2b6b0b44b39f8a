"""Build the project's real sample: the MNI ICBM152 2009 T1 template and a 4-class tissue map.

Not needed at run time: its outputs ship in ``napari_e2enet/resources/sample/``. It reads only files that are
inside the installed ``nilearn`` wheel (``nilearn/datasets/data/``); nothing is downloaded.

    .venv/bin/python scripts/prepare_sample.py                  # writes napari_e2enet/resources/sample/
    .venv/bin/python scripts/prepare_sample.py --out /tmp/s     # anywhere else

Outputs (all deterministic: running twice gives byte-identical files):

- ``mni152_t1_2mm.nii.gz``      T1, int16 with ``scl_slope`` 1/8 (stored value × 0.125 = intensity
                                on the template's original 0..255 scale), shape (X, Y, Z)
- ``mni152_tissue_2mm.nii.gz``  uint8 labels: 0 background, 1 CSF/other, 2 grey matter,
                                3 white matter; same shape and affine as the T1
- ``labels.json``               :data:`napari_e2enet.labels.BRAIN_TISSUE` (names + RGBA colours)
- ``LICENSE-MNI152.txt``        the MNI ICBM152 copyright/permission notice
- ``README.md``                 provenance, command, spacing, shape, class voxel counts

Method
------
The nilearn files hold the 1 mm symmetric ICBM152 2009a template (197×233×189, RAS+, voxel
(0, 0, 0) at (-98, -134, -72) mm) as uint8 0..255: the skull-stripped T1 and the grey- and
white-matter probability maps (255 = probability 1).

*Brain mask.* The T1 in nilearn is already skull-stripped with the ICBM brain mask: ``T1 > 0`` is
one connected component without holes, and every voxel where GM + WM probability reaches 0.5 lies
inside it (the GM map leaks a little low probability outside, which we ignore). So the mask is
``T1 > 0``. At 2 mm a voxel is brain when at least half of its volume was brain (the mask is
resampled as a fraction, then thresholded at 0.5).

*Tissue classes.* Inside the mask the label is the argmax of (P_other, P_GM, P_WM) with
P_other = max(0, 1 - P_GM - P_WM): CSF and any non-GM/WM tissue inside the brain mask (ventricles,
sulcal CSF, vessels, dura remnants). Ties go to the lower class id. Outside the mask: 0.

*Resampling.* Target grid: isotropic ``--spacing`` mm (default 2), covering the 1 mm field of view
(shape = ceil(1 mm shape / factor)). New voxel i's centre sits at old voxel coordinate
(i + 0.5)·f − 0.5 (f = new/old spacing), i.e. at the centre of the block of old voxels it
replaces; the new affine is diag(s, s, s) with its origin moved to that centre, so world
coordinates are preserved exactly. Image, mask fraction and probability maps are resampled with
trilinear interpolation (order 1, outside = 0); for f = 2 sampling at block centres is exactly the
2×2×2 block mean, i.e. a box anti-aliasing filter. Labels come from the resampled probabilities
(never nearest-neighbour on the 1 mm labels), which keeps thin cortex honest.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "napari_e2enet" / "resources" / "sample"


T1_SLOPE = 0.125  # int16 stored value × 1/8 = intensity; exact for the 2 mm block means of uint8 data
NIFTI_XFORM_MNI_152 = 4
NILEARN_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# The standard ICBM 2009 notice as published with the ICBM152 nonlinear 2009 atlases
# (https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009). nilearn ships the images but no
# notice; nibabel's COPYING carries the same wording for its copy of the 2009a template.
LICENSE_TEXT = """\
MNI ICBM152 non-linear 2009 symmetric template (release a)
==========================================================

The files mni152_t1_2mm.nii.gz and mni152_tissue_2mm.nii.gz in this folder are derived
(resampled to 2 mm; tissue classes from the grey/white-matter probability maps) from the
MNI ICBM152 2009a symmetric atlas files distributed inside the nilearn Python package
(nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz).
The original images carry the following notice (where "software" refers to the images):

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.

Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided
that the above copyright notice appear in all copies.  The authors and
McGill University make no representations about the suitability of this
software for any purpose.  It is provided "as is" without express or
implied warranty.  The authors are not responsible for any data loss,
equipment damage, property loss, or injury to subjects or patients
resulting from the use or misuse of this software package.

Source of this wording: the ICBM 2009 atlas distribution
(https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009); the same text is reproduced
for the 2009a template in nibabel's COPYING file. nilearn itself ships the images without a
notice.

Please cite when using the template:
  VS Fonov, AC Evans, K Botteron, CR Almli, RC McKinstry, DL Collins and BDCG.
  Unbiased average age-appropriate atlases for pediatric studies. NeuroImage 54(1), 2011.
  VS Fonov, AC Evans, RC McKinstry, CR Almli and DL Collins. Unbiased nonlinear average
  age-appropriate brain templates from birth to adulthood. NeuroImage 47, S102, 2009.
  DL Collins, AP Zijdenbos, WFC Baare and AC Evans. ANIMAL+INSECT: Improved Cortical
  Structure Segmentation. IPMI 1999, LNCS 1613, 210-223.
"""


def file_names(spacing: float) -> tuple[str, str]:
    """(T1 file, tissue file) for a spacing: ``mni152_t1_2mm.nii.gz``, ``mni152_tissue_2mm.nii.gz``."""
    return f"mni152_t1_{spacing:g}mm.nii.gz", f"mni152_tissue_{spacing:g}mm.nii.gz"


def nilearn_data_dir() -> Path:
    """The folder of data files inside the installed nilearn wheel (no network access)."""
    from importlib.resources import files

    return Path(str(files("nilearn") / "datasets" / "data"))


def load_sources(data_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read the nilearn files as float32 arrays on 0..1 (T1 kept on 0..255); all share one affine."""
    arrays: dict[str, np.ndarray] = {}
    affine = None
    for key, name in NILEARN_FILES.items():
        img = nib.load(data_dir / name)
        if affine is None:
            affine = img.affine
        elif not np.allclose(img.affine, affine):
            raise RuntimeError(f"{name}: affine differs from the T1's")
        data = np.asarray(img.dataobj, dtype=np.float32)
        arrays[key] = data if key == "t1" else data / 255.0
    assert affine is not None
    return arrays, affine


def target_grid(
    shape: tuple[int, ...], affine: np.ndarray, spacing: float
) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """New shape, new affine, and the per-axis scale factor f (new voxel i ↔ old (i + 0.5)·f − 0.5)."""
    old_spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    factor = spacing / old_spacing
    new_shape = tuple(math.ceil(n / f - 1e-9) for n, f in zip(shape, factor, strict=True))
    start = 0.5 * factor - 0.5  # old voxel coordinate of new voxel (0, 0, 0)'s centre
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * factor  # column scaling keeps the orientation
    new_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return new_shape, new_affine, factor


def resample(data: np.ndarray, new_shape: tuple[int, ...], factor: np.ndarray) -> np.ndarray:
    """Trilinear resampling onto the block-centred grid of :func:`target_grid` (outside = 0)."""
    out = ndi.affine_transform(
        data.astype(np.float64),
        matrix=factor,
        offset=0.5 * factor - 0.5,
        output_shape=new_shape,
        order=1,
        mode="constant",
        cval=0.0,
    )
    return out


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, new_shape, factor) -> np.ndarray:
    """uint8 tissue map on the new grid: 0 outside the brain mask, else argmax(other, GM, WM) + 1."""
    brain = resample((t1 > 0).astype(np.float32), new_shape, factor) >= 0.5
    p_gm = resample(gm, new_shape, factor)
    p_wm = resample(wm, new_shape, factor)
    p_other = np.clip(1.0 - p_gm - p_wm, 0.0, None)
    cls = np.argmax(np.stack([p_other, p_gm, p_wm]), axis=0).astype(np.uint8) + 1
    return np.where(brain, cls, 0).astype(np.uint8)


def nifti_bytes(img: nib.Nifti1Image) -> bytes:
    """Gzip-compressed single-file NIfTI with mtime 0 and no file name: byte-reproducible."""
    return gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)


def make_image(data: np.ndarray, affine: np.ndarray, description: str) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_qform(affine, code=NIFTI_XFORM_MNI_152)
    hdr.set_sform(affine, code=NIFTI_XFORM_MNI_152)
    hdr.set_xyzt_units(xyz="mm")
    hdr["descrip"] = description.encode()[:79]
    return img


def write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def build(out: Path, spacing: float = 2.0) -> dict:
    """Write the sample into ``out``; returns a summary (shape, spacing, class counts, file sizes)."""
    from napari_e2enet.labels import BRAIN_TISSUE

    t1_name, tissue_name = file_names(spacing)
    data_dir = nilearn_data_dir()
    src, affine = load_sources(data_dir)
    new_shape, new_affine, factor = target_grid(src["t1"].shape, affine, spacing)

    t1 = resample(src["t1"], new_shape, factor)
    t1_raw = np.clip(np.rint(t1 / T1_SLOPE), 0, np.iinfo(np.int16).max).astype(np.int16)
    t1_img = make_image(t1_raw, new_affine, f"MNI ICBM152 2009a sym T1, {spacing:g} mm")
    # nibabel resets scaling when serialising an int array; set it on the image's own header.
    t1_img.header.set_slope_inter(T1_SLOPE, 0.0)
    t1_img.header["cal_min"] = 0.0
    t1_img.header["cal_max"] = float(t1_raw.max() * T1_SLOPE)

    labels = tissue_labels(src["t1"], src["gm"], src["wm"], new_shape, factor)
    lab_img = make_image(labels, new_affine, f"MNI ICBM152 2009a sym tissue, {spacing:g} mm")
    lab_img.header["cal_min"] = 0.0
    lab_img.header["cal_max"] = 3.0

    counts = np.bincount(labels.ravel(), minlength=4)
    names = BRAIN_TISSUE.names
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / t1_name, nifti_bytes(t1_img))
    write_atomic(out / tissue_name, nifti_bytes(lab_img))
    write_atomic(out / "labels.json", BRAIN_TISSUE.to_json().encode())
    write_atomic(out / "LICENSE-MNI152.txt", LICENSE_TEXT.encode())

    voxel_ml = spacing**3 / 1000.0
    rows = "\n".join(
        f"| {k} | {names[k]} | {int(counts[k])} | {counts[k] / counts.sum():.1%} | {counts[k] * voxel_ml:.1f} |"
        for k in range(4)
    )
    spacing_txt = " × ".join(f"{s:g}" for s in np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0)))
    origin = ", ".join(f"{v:g}" for v in new_affine[:3, 3])
    readme = f"""# Sample: MNI ICBM152 2009a T1 + 4-class tissue map

The project's embedded real sample, used by the README demo, the napari sample-data entry and the
bundled model's training. Generated by `scripts/prepare_sample.py` from the files inside the
installed `nilearn` {_nilearn_version()} wheel (`nilearn/datasets/data/`,
`mni_icbm152_{{t1,gm,wm}}_tal_nlin_sym_09a_converted.nii.gz`: the 1 mm, 197×233×189,
skull-stripped ICBM152 2009a symmetric T1 and its grey/white-matter probability maps). Nothing is
downloaded. Licence: see `LICENSE-MNI152.txt` (MNI ICBM152 notice; keep it with the files).

Command (from the repository root; deterministic, byte-identical on re-run):

    .venv/bin/python scripts/prepare_sample.py --spacing {spacing:g}

| file | content |
|---|---|
| `{t1_name}` | T1, int16 with `scl_slope` {T1_SLOPE} (intensity on the template's 0..255 scale) |
| `{tissue_name}` | uint8 labels, same shape and affine |
| `labels.json` | label names and RGBA colours (`napari_e2enet.labels.BRAIN_TISSUE`) |
| `LICENSE-MNI152.txt` | the MNI ICBM152 copyright and permission notice |

- Spacing: {spacing_txt} mm (isotropic); shape (X, Y, Z): {" × ".join(map(str, new_shape))};
  RAS+ affine diag({spacing:g}, {spacing:g}, {spacing:g}), voxel (0, 0, 0) centred at ({origin}) mm
  (MNI152 world coordinates preserved: each 2 mm voxel sits at the centre of the 1 mm block it
  replaces); qform/sform code 4 (MNI_152).
- Image: trilinear resampling (for 2 mm this is the exact 2×2×2 block mean).
- Labels: brain mask = T1 > 0 in the skull-stripped template (brain if ≥ 50 % of the 2 mm voxel
  was brain); inside it, argmax of the resampled probabilities (CSF/other = 1 − GM − WM, GM, WM).

Class voxel counts ({spacing:g} mm voxels, {voxel_ml:g} mL each):

| id | class | voxels | fraction | volume (mL) |
|---|---|---|---|---|
{rows}

Note: a population-average template is smoother than any single scan, and the tissue map comes
from the template's own probability maps, not from manual annotation.
"""
    write_atomic(out / "README.md", readme.encode())

    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if not p.name.startswith(".")}
    return {
        "shape": new_shape,
        "spacing": spacing,
        "affine": new_affine.tolist(),
        "counts": {names[k]: int(counts[k]) for k in range(4)},
        "sizes": sizes,
    }


def _nilearn_version() -> str:
    from importlib.metadata import version

    return version("nilearn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: napari_e2enet/resources/sample)"
    )
    parser.add_argument(
        "--spacing", type=float, default=2.0, help="isotropic target spacing in mm (default 2)"
    )
    args = parser.parse_args(argv)
    if not args.spacing >= 1.0:
        parser.error("--spacing must be >= 1 mm (the source is 1 mm)")
    summary = build(args.out, args.spacing)
    print(f"shape {summary['shape']}, spacing {summary['spacing']:g} mm")
    for name, n in summary["counts"].items():
        print(f"  {name:>14}: {n} voxels")
    for name, size in summary["sizes"].items():
        print(f"  {name}: {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
