"""Early learning speed of several networks on the same phantom batches (training loss curve).

Separates "design" from "width" for issue 3: E2ENet-small against a PlainConvUNet of the same
widths, and E2ENet-small with 3×3×3 kernels instead of (1,3,3) + depth shift. Every model sees the
same batches in the same order (one sampler), iterations interleaved; the mean training loss
(Dice + CE, deep supervision) is printed every 50 iterations, then Dice on one training case and
on the held-out cases. A measurement, not a test.

    .venv/bin/python benchmarks/learning_speed.py --iterations 100 --models small plain16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from train_phantoms import evaluate, plain_conv_unet  # same folder

from napari_e2enet import create_model
from napari_e2enet.data import PatchSampler, fingerprint, phantom_dataset, preprocess, preprocess_labels
from napari_e2enet.training.loop import poly_lr, train_step
from napari_e2enet.training.losses import DeepSupervisionLoss


def build(name: str, num_classes: int) -> torch.nn.Module:
    """``small`` (E2ENet-small, dense fusion), ``small_k333`` (3×3×3, no shift), ``plain16``
    (PlainConvUNet, widths 16..192 like E2ENet-small), ``plain32`` (nnU-Net's 32..320, 5 stages)."""
    torch.manual_seed(0)
    if name == "small":
        return create_model("e2enet_small", num_classes=num_classes, sparsity=0)
    if name == "small_k333":
        return create_model("e2enet_small", num_classes=num_classes, sparsity=0, kernel=(3, 3, 3), depth_shift=False)
    if name == "plain16":
        return plain_conv_unet(1, num_classes, 5, [16, 32, 64, 128, 192])
    if name == "plain32":
        return plain_conv_unet(1, num_classes, 5)
    raise SystemExit(f"unknown model {name!r} (small, small_k333, plain16, plain32)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--models", nargs="+", default=["small", "plain16"])
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patch = tuple(args.patch)
    dataset = phantom_dataset(6, seed=0)
    plan = fingerprint(dataset)
    arrays = [(preprocess(im, plan)[0], preprocess_labels(lb, plan)) for im, lb in (c.load() for c in dataset.cases)]
    train, val = arrays[:4], arrays[4:]
    num_classes = max(dataset.labels) + 1
    sampler = PatchSampler(train, patch=patch, batch=2, seed=0, foreground_oversample=0.67,
                           augment=not args.no_augment)
    runs = {}
    for name in args.models:
        model = build(name, num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.99, weight_decay=3e-5, nesterov=True)
        runs[name] = {"model": model, "opt": opt, "loss": [], "seconds": 0.0}
    loss_fn = DeepSupervisionLoss()
    for it in range(args.iterations):
        images, target = sampler.batch(it)
        for run in runs.values():
            for group in run["opt"].param_groups:
                group["lr"] = poly_lr(args.lr, it, args.iterations)
            t0 = time.perf_counter()
            run["loss"].append(float(train_step(run["model"], run["opt"], loss_fn, images, target)))
            run["seconds"] += time.perf_counter() - t0
        if (it + 1) % 50 == 0:
            print(f"iterations {it - 48}-{it + 1}: mean loss  " + "  ".join(
                f"{n} {np.mean(r['loss'][-50:]):.3f} ({r['seconds'] / (it + 1):.2f} s/it)" for n, r in runs.items()),
                flush=True)
    for name, run in runs.items():
        seen = evaluate(run["model"], train[:1], patch, num_classes, torch.device("cpu"))
        held = evaluate(run["model"], val, patch, num_classes, torch.device("cpu"))
        print(f"{name}: Dice on a training case {np.mean(list(seen.values())):.3f}, "
              f"held-out {np.mean(list(held.values())):.3f}", flush=True)


if __name__ == "__main__":
    main()
