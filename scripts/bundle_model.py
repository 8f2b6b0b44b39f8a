"""Package a training run as a bundled model: weights, training log, connectivity, checksum, model card.

    .venv/bin/python scripts/bundle_model.py RUN_DIR NAME --hardware "..." --command "..."

Copies ``model.safetensors``, ``metrics.csv``, ``connectivity.json`` and ``config.json`` from the run
into ``resources/models/NAME/``, evaluates the model on the bundled sample (whole volume and the
held-out region, when NAME is the sample model) and writes ``model_card.json`` with the sha256 that
``Predictor.from_bundled`` verifies before loading. Not needed at run time.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np

from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import Plan, read_labels, read_volume
from napari_e2enet.data.intended_input import IntendedInput
from napari_e2enet.inference import Predictor
from napari_e2enet.metrics import evaluate
from napari_e2enet.training import read_metadata, sha256_of
from napari_e2enet.training.checkpoint import update_metadata

ROOT = Path(__file__).resolve().parents[1]
FILES = ("model.safetensors", "metrics.csv", "connectivity.json", "config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--hardware", required=True, help="where it was trained, e.g. 'one NVIDIA H100'")
    parser.add_argument("--command", required=True, help="the exact training command")
    parser.add_argument("--trained-on", required=True, help="what data, in words")
    parser.add_argument("--heldout-axis", default=None, help="sample model: axis of the held-out region (x/y/z)")
    parser.add_argument("--heldout-from", type=int, default=None, help="sample model: first held-out voxel")
    parser.add_argument("--intended-input", type=json.loads, default=None,
                        help="JSON of IntendedInput fields to replace the run's own (e.g. body_region, description)")
    parser.add_argument("--orientation", default=None,
                        help="set the plan's orientation (e.g. RAS) of a run trained before the option, when its "
                             "training data was stored in that orientation (the network then saw the same arrays)")
    args = parser.parse_args()

    out = ROOT / "resources" / "models" / args.name
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(args.run_dir / name, out / name)
    meta = read_metadata(out / "model.safetensors")
    changes = {}
    if args.orientation is not None:
        changes["plan"] = {**meta["plan"], "orientation": args.orientation}
    if args.intended_input is not None:
        base = meta.get("intended_input") or IntendedInput.from_plan(Plan.from_dict(meta["plan"])).to_dict()
        changes["intended_input"] = IntendedInput.from_dict({**base, **args.intended_input}).to_dict()
    if changes:
        update_metadata(out / "model.safetensors", changes)
        meta = read_metadata(out / "model.safetensors")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    last = rows[-1]
    card = {
        "name": args.name,
        "architecture": meta["model_config"],
        "sparsity": float(last["sparsity"]),
        "classes": meta["labels"],
        "trained_on": args.trained_on,
        "training_command": args.command,
        "hardware": args.hardware,
        "iterations": int(last["iteration"]),
        "training_seconds": float(last["seconds"]),
        "final_validation_dice": {k[5:]: float(v) for k, v in last.items() if k.startswith("dice_") and v},
        "final_validation_dice_mean": float(last["val_dice_mean"]),
        "sha256": sha256_of(out / "model.safetensors"),
        "created": time.strftime("%Y-%m-%d"),
        "intended_use": "demonstration of the napari-e2enet workflow; not for clinical use",
        "intended_input": meta.get("intended_input"),
        "orientation": meta["plan"].get("orientation") or "storage order",
    }
    if args.heldout_axis is not None:
        card["heldout_region"] = {"axis": args.heldout_axis, "from_voxel": args.heldout_from}
        from napari_e2enet.bundled import sample_files

        files = sample_files()
        image, ref = read_volume(files["image"]), read_labels(files["labels"])
        predictor = Predictor.from_checkpoint(out / "model.safetensors", InferenceConfig(device="cpu"))
        t0 = time.perf_counter()
        labels = predictor.predict(image).array
        card["cpu_inference_seconds_sample"] = round(time.perf_counter() - t0, 1)
        names = {k: v for k, v in predictor.labels.names.items() if k != 0}
        axis = "xyz".index(args.heldout_axis)
        region = [slice(None)] * 3
        region[axis] = slice(args.heldout_from, None)
        held = evaluate(labels[tuple(region)], ref.array[tuple(region)], names, ref.spacing)
        whole = evaluate(labels, ref.array, names, ref.spacing)
        card["heldout_dice"] = {"mean": held["dice"]["mean"], **held["dice"]["per_class"]}
        card["heldout_nsd_1mm"] = {"mean": held["nsd"]["mean"], **held["nsd"]["per_class"]}
        card["whole_sample_dice"] = {"mean": whole["dice"]["mean"], **whole["dice"]["per_class"]}
    card = json.loads(json.dumps(card, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({k: card[k] for k in card if "dice" in k or k in ("sha256", "iterations")}, indent=2))


if __name__ == "__main__":
    main()
