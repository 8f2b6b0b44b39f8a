"""The README's main job: segment a sample with the bundled model that fits it, show and report it.

``run_demo(out_dir)`` (``sample="mri"``: the MNI152 T1 with the tissue model) writes to ``out_dir``:

- ``mni152_t1_2mm_labels.nii.gz``  the predicted tissue labels with the sample's exact geometry
- ``overlay.png``                  three orthogonal slices, labels over the image, with a legend
- ``connectivity.png``             the DSFF connectivity the bundled model learned
- ``report.json``                  Dice against the reference labels (whole volume and the region
                                   the model never trained on), NSD, time, device, model, and the
                                   image and labels files (``image``, ``labels``)
- ``labels.json``                  the model's label names and colours, beside the labels, where
                                   napari's reader (and ``demo --gui``) looks for them

``run_demo(out_dir, sample="ct")`` segments the synthetic abdominal CT phantom (``make_phantom(0)``,
napari's "abdomen_phantom" sample; no training case of the bundled CT model) with the organ model and
writes ``phantom_ct.nii.gz`` (the image), ``phantom_ct_labels.nii.gz`` and the same pictures and
report (Dice per organ against the phantom's own labels).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ._json import json_safe
from .bundled import best_bundled_model, bundled_model, sample_files
from .config import InferenceConfig
from .data import Volume, read_labels, read_volume, write_volume
from .data.preprocess import canonical_orientation
from .errors import InputError
from .inference import Prediction, Predictor, PredictProgress
from .labels import LabelTable
from .metrics import evaluate
from .modelcard import CONNECTIVITY_FILE
from .plots import _atomic_write, connectivity_figure, save_figure_png


def overlay_figure(image: np.ndarray, labels: np.ndarray, table: LabelTable, spacing: tuple[float, ...], *,
                   title: str = "", alpha: float = 0.45, window: tuple[float, float] | None = None) -> Figure:
    """Axial, coronal and sagittal slices that show the most structures, nearest the labels' centre of
    mass; (X, Y, Z) arrays in RAS voxel order (:func:`~napari_e2enet.data.preprocess.canonical_orientation`).

    Displayed in radiological-agnostic anatomical orientation (superior / anterior up) with the
    true voxel aspect ratio from ``spacing`` (mm). ``window``: grey-value range (default: the 1st to
    99.5th percentile).
    """
    fg = np.argwhere(labels > 0)
    centre = fg.mean(axis=0).round().astype(int) if len(fg) else np.array(labels.shape) // 2
    cx, cy, cz = (_richest_slice(labels, axis, int(centre[axis])) for axis in range(3))
    sx, sy, sz = spacing[:3]
    views = [("axial", image[:, :, cz].T, labels[:, :, cz].T, sy / sx),
             ("coronal", image[:, cy, :].T, labels[:, cy, :].T, sz / sx),
             ("sagittal", image[cx, :, :].T, labels[cx, :, :].T, sz / sy)]
    lo, hi = window if window is not None else np.percentile(image, [1, 99.5])
    lut = np.zeros((max(table.ids) + 1, 4))
    for k in table.ids:
        lut[k] = table.color_of(k)
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (name, img, lab, aspect) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect, interpolation="nearest")
        rgba = lut[np.clip(lab, 0, len(lut) - 1)]
        rgba[..., 3] = np.where(lab > 0, alpha, 0.0)
        ax.imshow(rgba, origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    handles = [Patch(color=table.color_of(k)[:3], label=table.name_of(k)) for k in table.ids if k != 0]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _richest_slice(labels: np.ndarray, axis: int, centre: int) -> int:
    """The slice along ``axis`` that shows the most structures; of those, the one nearest ``centre``
    (the labels' centre of mass: a brain's centre slices show every tissue, an abdomen's do not)."""
    counts = np.array([len(np.unique(np.take(labels, i, axis=axis))) for i in range(labels.shape[axis])])
    best = np.flatnonzero(counts == counts.max())
    return int(best[np.argmin(np.abs(best - centre))])


def heldout_mask(shape: tuple[int, int, int], card: dict[str, Any]) -> np.ndarray | None:
    """The voxels of the region the bundled model never trained on (from its model card)."""
    region = card.get("heldout_region")
    if not region:
        return None
    mask = np.zeros(shape, bool)
    axis = "xyz".index(region["axis"])
    index = [slice(None)] * 3
    index[axis] = slice(int(region["from_voxel"]), None)
    mask[tuple(index)] = True
    return mask


SAMPLES = ("mri", "ct")
CT_WINDOW = (-160.0, 240.0)  # soft tissue, HU (as napari's phantom sample)


def demo_sample(sample: str = "mri") -> tuple[Volume, Volume, str]:
    """(image, reference labels, what it is in words) of a demo sample: "mri" or "ct"."""
    if sample == "mri":
        files = sample_files()
        return read_volume(files["image"]), read_labels(files["labels"]), "the MNI152 T1 sample"
    if sample == "ct":
        from .data.phantom import make_phantom

        image, reference = make_phantom(0)
        image.name, reference.name = "phantom_ct", "phantom_ct_reference"
        return image, reference, "the synthetic abdominal CT phantom (seed 0)"
    raise InputError(f"unknown demo sample {sample!r} (choose from {', '.join(SAMPLES)})")


def run_demo(out_dir: str | Path, *, model: str | None = None, sample: str = "mri", device: str = "auto",
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Segment a sample ("mri" or "ct") with ``model`` (default: the bundled model that fits it);
    write labels, pictures and ``report.json``; return the report."""
    image, reference, what = demo_sample(sample)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder ({exc.strerror})", out) from None
    model = model or best_bundled_model(image)
    bundled = bundled_model(model)
    predictor = Predictor.from_bundled(model, InferenceConfig(device=device))
    prediction: Prediction | None = None
    t0 = time.perf_counter()
    for item in predictor.iter_predict(image):
        if isinstance(item, PredictProgress) and progress is not None:
            progress(item.done, item.total)
        elif isinstance(item, Prediction):
            prediction = item
    assert prediction is not None
    seconds = time.perf_counter() - t0
    labels: Volume = prediction.labels
    if sample == "mri":
        image_path = sample_files()["image"]
        labels_path = write_volume(labels, out / "mni152_t1_2mm_labels.nii.gz", like=image)
    else:  # the phantom exists only in memory: write it beside its labels
        image_path = write_volume(image, out / f"{image.name}.nii.gz")
        labels_path = write_volume(labels, out / f"{image.name}_labels.nii.gz", like=image)

    table = predictor.labels
    _atomic_write(out / "labels.json", table.to_json().encode())
    names = {k: v for k, v in table.names.items() if k != 0}
    whole = evaluate(labels.array, reference.array, names, reference.spacing)
    report: dict[str, Any] = {
        "sample": sample_files()["image"].name if sample == "mri" else f"{image.name}.nii.gz (make_phantom(0))",
        "model": model, "model_expects": (bundled.card.get("intended_input") or {}).get("description", ""),
        "device": prediction.device,
        "seconds": round(seconds, 2), "tiles": prediction.tiles, "shape": list(image.spatial_shape),
        "spacing_mm": [round(s, 4) for s in image.spacing],
        "dice": {"mean": whole["dice"]["mean"], **whole["dice"]["per_class"]},
        "nsd_1mm": {"mean": whole["nsd"]["mean"], **whole["nsd"]["per_class"]},
        "labels": str(labels_path.name),
        # relative to the output folder when it is there (the CT phantom), else where it is installed
        "image": str(image_path.name if image_path.parent == out else image_path),
        "warnings": list(prediction.warnings),
    }
    region = heldout_mask(image.spatial_shape, bundled.card) if sample == "mri" else None
    if sample == "ct":
        report["note"] = ("'dice': against the phantom's own labels; the phantom (seed 0) is none of the model's "
                          "training cases (its model card's heldout_dice is measured on other unseen phantoms)")
    if region is not None:
        held = evaluate(np.where(region, labels.array, 0), np.where(region, reference.array, 0), names,
                        reference.spacing)
        report["dice_heldout_region"] = {"mean": held["dice"]["mean"], **held["dice"]["per_class"]}
        report["note"] = ("'dice' covers the whole sample, most of which the bundled model was trained on; "
                          "'dice_heldout_region' covers only the region it never saw.")

    volumes_ml = {name: round(float((labels.array == k).sum() * np.prod(image.spacing) / 1000), 1)
                  for k, name in names.items()}
    report["volumes_ml"] = volumes_ml
    title = (f"E2ENet ({model}) on {what} - mean Dice {report['dice']['mean']:.3f}, "
             f"{seconds:.1f} s on {prediction.device}")
    shown, _ = canonical_orientation(image, "RAS")
    shown_labels, _ = canonical_orientation(labels, "RAS")
    save_figure_png(overlay_figure(shown.array, shown_labels.array, table, shown.spacing, title=title,
                                   window=CT_WINDOW if sample == "ct" else None), out / "overlay.png")
    connectivity = bundled.folder / CONNECTIVITY_FILE
    if connectivity.is_file():
        from .sparse import ConnectivityRecord

        save_figure_png(connectivity_figure(ConnectivityRecord.from_json(connectivity)), out / "connectivity.png")
    _atomic_write(out / "report.json", (json.dumps(json_safe(report), indent=2) + "\n").encode())
    return report
