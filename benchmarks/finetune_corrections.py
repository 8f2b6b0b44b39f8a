"""Does correcting a few slices and fine-tuning improve the rest of the volume?

    .venv/bin/python benchmarks/finetune_corrections.py --k 1 3 6 --json finetune.json

A case the bundled model gets wrong: the MNI152 sample as another scanner might give it (a smooth
multiplicative bias field, a contrast change, noise inside the brain). A simulated user corrects k
axial slices to the reference (the edit mask = the voxels that changed), then
``napari_e2enet.training.finetune`` runs with its defaults and the volume is segmented again. Reported
per k: mean Dice on the slices *not* corrected, before and after, and the wall time (fine-tune +
re-segmentation); and the same slices used to train E2ENet-small from scratch for the same
number of iterations, all layers, for comparison.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_e2enet import create_model
from napari_e2enet.bench import machine_info
from napari_e2enet.bundled import bundled_model, sample_files
from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import Volume, augment, read_labels, read_volume
from napari_e2enet.inference import Predictor
from napari_e2enet.metrics import dice
from napari_e2enet.training import read_metadata, save_model
from napari_e2enet.training.finetune import FinetuneConfig, iter_finetune


def scanner_shift(image: Volume, seed: int = 0) -> Volume:
    return image.with_array(augment.scanner_shift(image.array, seed))


def mean_dice(pred: np.ndarray, ref: np.ndarray, keep: np.ndarray) -> float:
    return float(np.mean([dice(np.where(keep, pred, 0), np.where(keep, ref, 0), k) for k in (1, 2, 3)]))


def corrected_slices(ref: np.ndarray, k: int) -> list[int]:
    zs = np.flatnonzero(ref.any(axis=(0, 1)))
    return [int(z) for z in np.linspace(zs[0], zs[-1], k + 2)[1:-1].round()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--train", choices=("decoder", "all"), default=None)
    parser.add_argument("--patch", type=int, nargs=3, default=None)
    parser.add_argument("--no-scratch", action="store_true", help="skip the from-scratch comparison")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    config = FinetuneConfig(device="cpu")
    config = config.replace(**{k: v for k, v in (("iterations", args.iterations), ("lr", args.lr),
                                                 ("train", args.train),
                                                 ("patch", tuple(args.patch) if args.patch else None)) if v is not None})
    files = sample_files()
    image, ref = scanner_shift(read_volume(files["image"])), read_labels(files["labels"]).array
    base_file = bundled_model().weights
    predictor = Predictor.from_bundled(config=InferenceConfig(device="cpu"))
    before = predictor.predict(image).array
    out: dict = {"machine": machine_info(), "config": {k: v for k, v in vars(config).items()},
                 "bundled_on_original": mean_dice(predictor.predict(read_volume(files["image"])).array, ref,
                                                  np.ones(ref.shape, bool)),
                 "bundled_on_shifted": mean_dice(before, ref, np.ones(ref.shape, bool)), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        scratch_file = Path(tmp) / "scratch.safetensors"
        meta = read_metadata(base_file)
        sparsity = float(meta["train_config"]["sparsity"]["sparsity"])
        model = create_model(predictor.model.config, sparsity=sparsity, seed=0)
        save_model(model, scratch_file, metadata={k: meta[k] for k in ("plan", "labels", "train_config",
                                                                       "intended_input") if k in meta})
        for k in args.k:
            zs = corrected_slices(ref, k)
            labels = before.copy()
            labels[:, :, zs] = ref[:, :, zs]
            edited = labels != before
            keep = np.ones(ref.shape, bool)
            keep[:, :, zs] = False
            row = {"k": k, "slices": zs, "edited_voxels": int(edited.sum()),
                   "dice_uncorrected_before": mean_dice(before, ref, keep)}
            for name, source, cfg in (("finetune", base_file, config),
                                      ("scratch", scratch_file, config.replace(train="all", lr=3e-3))):
                if name == "scratch" and args.no_scratch:
                    continue
                t0 = time.perf_counter()
                run, first = None, None
                for event in iter_finetune(source, image, image.with_array(labels), Path(tmp) / f"{name}{k}",
                                           edited=edited, config=cfg):
                    if event.kind == "iteration" and first is None:
                        first = time.perf_counter() - t0  # what the user waits for after the click
                    run = event.run_dir or run
                t1 = time.perf_counter()
                tuned = Predictor.from_checkpoint(run, InferenceConfig(device="cpu")).predict(image).array
                row[f"{name}_first_iteration_seconds"] = round(first or 0.0, 1)
                row[f"{name}_train_seconds"] = round(t1 - t0, 1)
                row[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
                row[f"dice_uncorrected_{name}"] = mean_dice(tuned, ref, keep)
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
