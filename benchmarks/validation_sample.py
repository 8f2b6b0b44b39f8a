"""What the CPU validation default (a fixed patch sample) loses against the full sliding window.

One training run (the Trainer itself, ``TrainConfig.validation="full"``); at every validation the
same weights are also measured on the patch sample (``validation="patches"``), each timed. Reports
per validation both mean Dice values, their difference, whether both curves pick the same best
epoch, and the time of each. A measurement, not a test. The JSON file is rewritten after every
validation.

    .venv/bin/python benchmarks/validation_sample.py --json docs/validation-sample.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_e2enet.config import DataConfig, SparsityConfig, TrainConfig
from napari_e2enet.training import Trainer


class BothValidations(Trainer):
    """A Trainer that measures every validation both ways (returns the full one, as a full run would)."""

    rows: list[dict]

    def validate(self, model, data, device, mode=None):
        if mode is not None:
            return super().validate(model, data, device, mode)
        t0 = time.perf_counter()
        full = super().validate(model, data, device, "full")
        t1 = time.perf_counter()
        patches = super().validate(model, data, device, "patches")
        t2 = time.perf_counter()
        self.rows.append({"full": full, "patches": patches, "full_seconds": round(t1 - t0, 2),
                          "patches_seconds": round(t2 - t1, 2)})
        return full


def _mean(d: dict) -> float:
    return float(np.mean(list(d.values()))) if d else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="phantom:10")
    parser.add_argument("--num-validation", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=160)
    parser.add_argument("--per-epoch", type=int, default=20)
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 48, 48])
    parser.add_argument("--validation-patches", type=int, default=TrainConfig().validation_patches)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig(model="e2enet_small", sparsity=SparsityConfig(sparsity=0.8),
                         data=DataConfig(source=args.data, patch=tuple(args.patch), batch=2,
                                         num_validation=args.num_validation, foreground_oversample=1.0,
                                         augment=False),
                         iterations=args.iterations, iterations_per_epoch=args.per_epoch, optimizer="adamw",
                         lr=0.01, device="cpu", seed=0, validation="full",
                         validation_patches=args.validation_patches)
    trainer = BothValidations(config, Path(tempfile.mkdtemp()) / "run")
    trainer.rows = []
    out: dict = {"config": config.to_dict(), "machine": {"cpu": platform.processor() or platform.machine(),
                                                         "threads": args.threads, "cores": os.cpu_count()}}
    t_start = time.perf_counter()
    for event in trainer.iter_fit():
        if event.kind != "validation":
            continue
        row = trainer.rows[-1]
        row.update({"iteration": event.iteration, "full_mean": _mean(row["full"]),
                    "patches_mean": _mean(row["patches"])})
        row["difference"] = row["patches_mean"] - row["full_mean"]
        print(f"it {event.iteration:5d}  full {row['full_mean']:.3f} ({row['full_seconds']:.1f} s)  "
              f"patches {row['patches_mean']:.3f} ({row['patches_seconds']:.1f} s)  diff {row['difference']:+.3f}",
              flush=True)
        rows = trainer.rows
        full_curve = [r["full_mean"] for r in rows]
        patch_curve = [r["patches_mean"] for r in rows]
        diffs = np.abs(np.array(patch_curve) - np.array(full_curve))
        out["rows"] = rows
        out["summary"] = {
            "validations": len(rows),
            "mean_abs_difference": float(diffs.mean()),
            "max_abs_difference": float(diffs.max()),
            "best_iteration_full": rows[int(np.argmax(full_curve))]["iteration"],
            "best_iteration_patches": rows[int(np.argmax(patch_curve))]["iteration"],
            "curve_correlation": float(np.corrcoef(full_curve, patch_curve)[0, 1]) if len(rows) > 2 else None,
            "full_seconds_median": float(np.median([r["full_seconds"] for r in rows])),
            "patches_seconds_median": float(np.median([r["patches_seconds"] for r in rows])),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
        }
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out.get("summary"), indent=1))


if __name__ == "__main__":
    main()
