"""Predict every ``*_0000.nii.gz`` of a folder in one process and record the RSS after each case.

Usage: ``python _rss_driver.py MODEL INPUT_DIR OUTPUT_DIR`` → one JSON object on stdout:
``{"rss": [bytes after case 1, ...], "cases": N}``. Each case goes the way ``predict`` takes it:
read → preprocess → sliding window → labels on the source grid → atomic NIfTI write.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil

from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import read_image, write_volume
from napari_e2enet.inference import Predictor


def main(model: str, inputs: str, outputs: str) -> None:
    predictor = Predictor.from_checkpoint(model, InferenceConfig(device="cpu"))
    process = psutil.Process()
    rss = []
    for path in sorted(Path(inputs).glob("*_0000.nii.gz")):
        volume = read_image(path)
        labels = predictor.predict(volume)
        write_volume(labels, Path(outputs) / path.name.replace("_0000", ""), like=volume)
        rss.append(process.memory_info().rss)
    sys.stdout.write(json.dumps({"rss": rss, "cases": len(rss)}) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
