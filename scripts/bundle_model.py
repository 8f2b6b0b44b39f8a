"""Package a training run as a bundled model: weights, training log, connectivity, checksum, model card.

    .venv/bin/python scripts/bundle_model.py RUN_DIR NAME --hardware "..." --command "..."

Copies ``model.safetensors``, ``metrics.csv``, ``connectivity.json`` and ``config.json`` from the run
into ``napari_e2enet/resources/models/NAME/``, evaluates the model where it never trained — the bundled MRI sample's
held-out region (``--heldout-axis/--heldout-from``), or phantoms beyond the training and validation
cases of a ``phantom:N`` run (``--heldout-phantoms FIRST COUNT``: ``phantom_dataset`` cases FIRST …
FIRST + COUNT - 1 of the run's phantom seed, plus the napari/demo CT sample ``make_phantom(0)``) — and
writes ``model_card.json`` with the sha256 that ``Predictor.from_bundled`` verifies before loading.
Not needed at run time.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np

from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import Plan, read_labels, read_volume
from napari_e2enet.data.intended_input import IntendedInput
from napari_e2enet.inference import Predictor
from napari_e2enet.metrics import evaluate
from napari_e2enet.modelcard import update_metadata
from napari_e2enet.training import read_metadata, sha256_of

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
    parser.add_argument("--heldout-phantoms", type=int, nargs=2, metavar=("FIRST", "COUNT"), default=None,
                        help="phantom:N run: evaluate on phantom_dataset cases FIRST..FIRST+COUNT-1 (FIRST >= N)")
    parser.add_argument("--intended-use", default="demonstration of the napari-e2enet workflow; not for clinical use")
    parser.add_argument("--orientation", default=None,
                        help="set the plan's orientation (e.g. RAS) of a run trained before the option, when its "
                             "training data was stored in that orientation (the network then saw the same arrays)")
    args = parser.parse_args()

    out = ROOT / "napari_e2enet" / "resources" / "models" / args.name
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
        "intended_use": args.intended_use,
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
    if args.heldout_phantoms is not None:
        card.update(phantom_heldout(out / "model.safetensors", json.loads((out / "config.json").read_text()),
                                    *args.heldout_phantoms))
    card = json.loads(json.dumps(card, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({k: card[k] for k in card if "dice" in k or k in ("sha256", "iterations")}, indent=2))


def phantom_heldout(weights: Path, config: dict, first: int, count: int) -> dict:
    """Dice and NSD of the model on ``count`` phantoms it never saw, and on the CT sample ``make_phantom(0)``.

    Per organ: the mean over the cases whose reference has that organ (the convention of
    ``benchmarks/train_phantoms.py``); ``mean``: the mean over organs. Full pipeline (``Predictor``:
    resampling, sliding window with 50 % overlap, no TTA), as users get it.
    """
    from napari_e2enet.data.dataset import _phantom_case_seed as _case_seed
    from napari_e2enet.data.dataset import phantom_dataset
    from napari_e2enet.data.phantom import make_phantom

    source = str(config["data"]["source"])
    match = re.fullmatch(r"phantom:(\d+)(?::(\d+))?", source)
    if match is None:
        raise SystemExit(f"--heldout-phantoms needs a phantom:N run, not {source!r}")
    n_run, seed = int(match.group(1)), int(match.group(2) or 0)
    if first < n_run:
        raise SystemExit(f"--heldout-phantoms: case {first} is one of the run's {n_run} cases")
    order = np.random.default_rng(int(config["seed"])).permutation(n_run)  # the Trainer's split
    n_val = min(max(int(config["data"]["num_validation"] or 0), 0), n_run - 1)
    validation = [f"phantom_{i:03d}" for i in sorted(order[:n_val])]
    predictor = Predictor.from_checkpoint(weights, InferenceConfig(device="cpu"))
    names = {k: v for k, v in predictor.labels.names.items() if k != 0}

    def score(image, ref, per_dice: dict, per_nsd: dict) -> float:
        labels = predictor.predict(image).array
        result = evaluate(labels, ref.array, names, ref.spacing)
        for name in names.values():
            if result["present"][name][1]:  # organs absent from the reference are skipped
                per_dice.setdefault(name, []).append(result["dice"]["per_class"][name])
                per_nsd.setdefault(name, []).append(result["nsd"]["per_class"][name])
        return float(np.mean([result["dice"]["per_class"][n] for n in names.values() if result["present"][n][1]]))

    dice: dict[str, list[float]] = {}
    nsd: dict[str, list[float]] = {}
    case_means = {}
    cases = phantom_dataset(first + count, seed=seed, lazy=True).cases[first:]
    t0 = time.perf_counter()
    for case in cases:
        image, ref = case.load()
        case_means[case.name] = round(score(image, ref, dice, nsd), 4)
    seconds = (time.perf_counter() - t0) / len(cases)

    def summary(per: dict[str, list[float]]) -> dict[str, float]:
        organs = {name: float(np.mean(v)) for name, v in per.items()}
        return {"mean": float(np.mean(list(organs.values()))), **organs}

    training_seeds = {_case_seed(seed, i) for i in range(n_run)}
    assert 0 not in training_seeds, "the CT sample make_phantom(0) is a training case"
    sample_dice: dict[str, list[float]] = {}
    image, ref = make_phantom(0)
    t0 = time.perf_counter()
    score(image, ref, sample_dice, {})
    sample_seconds = time.perf_counter() - t0
    return {
        "training_cases": f"phantom_dataset({n_run}, seed={seed}) minus its validation cases",
        "validation_cases": validation,
        "heldout_cases": (f"phantom_dataset({first + count}, seed={seed}) cases {cases[0].name} .. {cases[-1].name} "
                          f"({count} phantoms never trained or validated on; organs absent from a case are skipped; "
                          "Predictor on the CPU, overlap 0.5, no TTA)"),
        "heldout_dice": summary(dice),
        "heldout_nsd_1mm": summary(nsd),
        "heldout_case_mean_dice": case_means,
        "sample_dice": summary(sample_dice),
        "sample": "make_phantom(0): the napari sample 'abdomen_phantom' and `napari-e2enet demo --sample ct` "
                  "(not a training case)",
        "cpu_inference_seconds_sample": round(sample_seconds, 1),
        "cpu_inference_seconds_per_heldout_case": round(seconds, 1),
    }


if __name__ == "__main__":
    main()
