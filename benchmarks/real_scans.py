"""The bundled model on the bundled sample stored and prepared the ways users' scans come.

    .venv/bin/python benchmarks/real_scans.py --repeats 3 --json real_scans.json

Reports, against the sample as shipped (one process; the timed runs interleaved so that machine
noise hits both sides alike):

- eight storage orders (permutations and flips, data and affine changed together): the worst voxel
  agreement of the labels after mapping back, and the same with the orientation rule switched off
  (what model files from before it get);
- the sample padded with a 40 mm zero margin: labels in the margin (mL), mean Dice inside against
  the unpadded run, and the time ratio (median of ``--repeats`` interleaved runs);
- an all-zero volume of the padded size: time and labelled voxels;
- a background offset of 50 (int16, scl_slope 0.1, scl_inter 50): mean Dice against the same
  voxels without the offset;
- the intended-input warnings for a CT phantom, the sample with a bright scalp shell, and the sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from scipy import ndimage as ndi

from napari_e2enet.bench import machine_info
from napari_e2enet.bundled import sample_files
from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import Volume, make_phantom, read_labels, read_volume
from napari_e2enet.inference import Predictor
from napari_e2enet.metrics import dice

VARIANTS = [((0, 1, 2), (True, False, False)), ((0, 1, 2), (True, True, False)), ((1, 0, 2), (False,) * 3),
            ((2, 1, 0), (False, False, True)), ((2, 0, 1), (True, False, True)), ((1, 2, 0), (False, True, False)),
            ((0, 2, 1), (True, True, True)), ((2, 1, 0), (True, True, True))]


def stored(volume: Volume, perm, flips) -> Volume:
    array, affine = volume.array, volume.affine.copy()
    for k, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis=k)
            affine[:3, 3] += affine[:3, k] * (array.shape[k] - 1)
            affine[:3, k] *= -1
    affine[:, :3] = affine[:, list(perm)]
    return Volume(np.ascontiguousarray(array.transpose(perm)), affine, name=volume.name)


def back(labels: np.ndarray, perm, flips) -> np.ndarray:
    out = labels.transpose(np.argsort(perm))
    for k, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=k)
    return out


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([dice(a, b, k) for k in (1, 2, 3)]))


def timed(predictor: Predictor, volume: Volume) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    labels = predictor.predict(volume).array
    return labels, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    files = sample_files()
    sample, reference = read_volume(files["image"]), read_labels(files["labels"]).array
    predictor = Predictor.from_bundled(config=InferenceConfig(device="cpu"))
    base = predictor.predict(sample).array
    out: dict = {"machine": machine_info(), "sample_mean_dice": mean_dice(base, reference)}

    agreement = {}
    for use_rule in (True, False):
        plan = predictor.plan
        predictor.plan = plan if use_rule else plan.replace(orientation=None)
        worst = min(float(np.mean(back(predictor.predict(stored(sample, p, f)).array, p, f) == base))
                    for p, f in VARIANTS)
        predictor.plan = plan
        agreement["RAS" if use_rule else "storage order (old files)"] = worst
    out["orientations_worst_voxel_agreement"] = agreement

    margin = 20  # 2 mm voxels: 40 mm
    affine = sample.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, margin)
    padded = Volume(np.pad(sample.array, margin), affine, name="padded")
    inside = tuple(slice(margin, margin + n) for n in sample.spatial_shape)
    times: dict[str, list[float]] = {"sample": [], "padded": []}
    for _ in range(args.repeats):
        _, t = timed(predictor, sample)
        times["sample"].append(t)
        padded_labels, t = timed(predictor, padded)
        times["padded"].append(t)
    margin_mask = np.ones(padded.spatial_shape, bool)
    margin_mask[inside] = False
    voxel_ml = float(np.prod(sample.spacing)) / 1000
    median = {k: statistics.median(v) for k, v in times.items()}
    out["padded_40mm"] = {
        "margin_labels_ml": float((padded_labels[margin_mask] > 0).sum()) * voxel_ml,
        "mean_dice_inside": mean_dice(padded_labels[inside], reference),
        "mean_dice_unpadded": mean_dice(base, reference),
        "seconds_median": median, "time_ratio": median["padded"] / median["sample"],
    }
    zeros, t = timed(predictor, Volume(np.zeros(padded.spatial_shape, np.float32), affine))
    out["all_zero"] = {"seconds": t, "labelled_voxels": int((zeros > 0).sum())}

    q = np.round(sample.array * 10) / 10  # what int16 with scl_slope 0.1 holds
    plain, _ = timed(predictor, sample.with_array(q.astype(np.float32)))
    offset, _ = timed(predictor, sample.with_array((q + 50).astype(np.float32)))
    out["offset_50"] = {"mean_dice_plain": mean_dice(plain, reference), "mean_dice_offset": mean_dice(offset, reference)}

    brain = sample.array > 0
    shell = ndi.binary_dilation(brain, iterations=4) & ~brain
    scalp = sample.array.copy()
    scalp[shell] = np.percentile(sample.array[brain], 99) * 1.2
    out["warnings"] = {"ct_phantom": predictor.check_input(make_phantom(0)[0]),
                       "sample_with_scalp": predictor.check_input(sample.with_array(scalp)),
                       "sample": predictor.check_input(sample)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
