"""The accuracy gate's data (issue 18 step 1): mean Dice of each bundled model on its sample at bf16
against fp32, per fast-path backend that runs bf16.

Samples: the MNI152 T1 with its tissue map (``mni152-tissue``), ``make_phantom(0)`` with its labels
(``phantom-abdomen-ct``); Predictor, overlap 0.5, no TTA, one thread. Where the CPU has no native
bf16, oneDNN emulates it (about 6x slower than fp32 on an AVX2 EPYC; the result is what matters).
The deltas go into ``napari_e2enet.inference.fastpath.PRECISION_DICE_DELTA``;
``tests/inference/test_backend_choice.py`` recomputes them on a crop.

    .venv/bin/python benchmarks/precision_gate.py [out.json]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from napari_e2enet.bundled import sample_files
from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import Volume
from napari_e2enet.data.io import read_volume
from napari_e2enet.data.phantom import make_phantom
from napari_e2enet.inference import Predictor
from napari_e2enet.metrics import dice


def case(name: str) -> tuple[Volume, Volume]:
    if name == "mni152-tissue":
        files = sample_files()
        return read_volume(files["image"]), read_volume(files["labels"])
    return make_phantom(0)


def main() -> None:
    torch.set_num_threads(1)
    out: dict[str, dict[str, float]] = {}
    for name in ("phantom-abdomen-ct", "mni152-tissue"):
        image, ref = case(name)
        classes = [int(c) for c in np.unique(ref.array) if c != 0]
        for backend in ("dense", "sparse"):
            scores: dict[str, tuple[float, np.ndarray]] = {}
            for precision in ("fp32", "bf16"):
                predictor = Predictor.from_bundled(name, InferenceConfig(precision=precision, backend=backend))
                t0 = time.perf_counter()
                labels = predictor.predict(image).array
                seconds = time.perf_counter() - t0
                scores[precision] = (float(np.mean([dice(labels, ref.array, c) for c in classes])), labels)
                print(f"{name} {backend} {precision}: Dice {scores[precision][0]:.5f}, {seconds:.1f} s", flush=True)
            (d32, l32), (d16, l16) = scores["fp32"], scores["bf16"]
            out[f"{name}/{backend}"] = {"dice_fp32": d32, "dice_bf16": d16, "delta": d16 - d32,
                                        "voxel_agreement": float(np.mean(l32 == l16))}
            print(json.dumps(out[f"{name}/{backend}"]), flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
