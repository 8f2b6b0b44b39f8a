"""Turn the bundled MNI152 sample into a two-case nnU-Net dataset with a spatially held-out region.

The anterior 30 % of the head (y >= 70 % of the Y axis: frontal lobes) becomes the case
``mni152_heldout``; the rest becomes ``mni152_train``. The bundled model trains on the first and is
evaluated on the second, so its reported Dice is on anatomy it never saw. Reproducible; not needed
at run time. Usage::

    .venv/bin/python scripts/make_sample_dataset.py build/mni152_dataset
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from napari_e2enet.bundled import sample_files
from napari_e2enet.data import Volume, read_labels, read_volume, write_volume
from napari_e2enet.labels import BRAIN_TISSUE

HELDOUT_FROM = 0.70  # fraction of the Y (posterior -> anterior) axis where the held-out region starts


def heldout_start(shape_y: int) -> int:
    return round(shape_y * HELDOUT_FROM)


def crop(volume: Volume, y0: int, y1: int) -> Volume:
    """Crop along Y and shift the affine's origin so world coordinates are unchanged."""
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, 1] * y0
    return Volume(np.ascontiguousarray(volume.array[:, y0:y1]), affine, header=volume.header, name=volume.name)


def main(out: Path) -> None:
    files = sample_files()
    image, labels = read_volume(files["image"]), read_labels(files["labels"])
    y = heldout_start(image.array.shape[1])
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    for name, (y0, y1) in {"mni152_train": (0, y), "mni152_heldout": (y, image.array.shape[1])}.items():
        write_volume(crop(image, y0, y1), out / "imagesTr" / f"{name}_0000.nii.gz")
        write_volume(crop(labels, y0, y1), out / "labelsTr" / f"{name}.nii.gz")
    table = {name: int(k) for k, name in BRAIN_TISSUE.names.items()}
    (out / "dataset.json").write_text(json.dumps({
        "name": "MNI152 tissue (held-out anterior region)", "channel_names": {"0": "T1"},
        "labels": table, "numTraining": 2, "file_ending": ".nii.gz",
        "heldout": {"case": "mni152_heldout", "axis": "y", "from_voxel": y}}, indent=2))
    print(f"wrote {out}: train y < {y}, held-out y >= {y} of {image.array.shape[1]}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/mni152_dataset"))
