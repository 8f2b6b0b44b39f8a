"""Peak RSS of the bench's whole-volume run, stopped after N tiles (minutes instead of half an hour).

Same setup as ``napari-e2enet bench --parts volume`` (``napari_e2enet.bench._volume_worker``): the
candidate, the synthetic volume, a warm-up forward, then the sliding window at 128³ tiles, overlap
0.5. The fast path's arena, the encoder's transients and the first open cells are all live after
a few tiles; the open cells reach their peak only in the second tile row along D, so use at least
one row of tiles (49 at 512×512) plus a few to include it. A measurement, not a test.

    .venv/bin/python benchmarks/volume_memory_probe.py e2enet_fast_s09 300x512x512 6
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from napari_e2enet.bench import NUM_CLASSES, _predictor, _synthetic_volume
from napari_e2enet.inference.sliding_window import TileProgress, iter_sliding_window


def main() -> None:
    if len(sys.argv) != 4:
        raise SystemExit("usage: volume_memory_probe.py MODEL DxHxW TILES")
    model, shape, tiles = sys.argv[1], [int(v) for v in sys.argv[2].split("x")], int(sys.argv[3])
    torch.set_num_threads(2)
    predictor, description = _predictor(model, "fp32", 0)
    image = _synthetic_volume(shape)
    with torch.inference_mode():
        predictor(torch.zeros(1, 1, 128, 128, 128))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    for event in iter_sliding_window(image, predictor, patch=128, num_classes=NUM_CLASSES, overlap=0.5):
        if isinstance(event, TileProgress) and event.done >= tiles:
            break
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{description} {shape}: {tiles} tiles in {time.perf_counter() - t0:.1f} s, "
          f"RSS after warm-up {before:.0f} MiB, peak {peak:.0f} MiB")


if __name__ == "__main__":
    main()
