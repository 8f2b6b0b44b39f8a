"""Train E2ENet (small, DSFF S = 0.8) and nnU-Net's PlainConvUNet side by side on phantom CT cases.

Same patches (one sampler, same seed), batch, iterations, augmentation, loss (Dice + CE, deep
supervision), optimiser (SGD Nesterov 0.99, poly LR, clip 12); iterations are interleaved (one of
each in turn) so machine noise hits both alike. Reports held-out mean organ Dice, wall time,
seconds per iteration and the DSFF update overhead. A measurement, not a test: it never fails on time.

    .venv/bin/python benchmarks/train_phantoms.py --iterations 400 --train-cases 8 --val-cases 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from napari_e2enet import create_model
from napari_e2enet.config import SparsityConfig
from napari_e2enet.data import PatchSampler, fingerprint, phantom_dataset, preprocess, preprocess_labels
from napari_e2enet.device import resolve_device
from napari_e2enet.inference import sliding_window_argmax
from napari_e2enet.metrics import dice
from napari_e2enet.sparse import DSFFUpdater
from napari_e2enet.training.loop import poly_lr, train_step
from napari_e2enet.training.losses import DeepSupervisionLoss


def plain_conv_unet(in_channels: int, num_classes: int, stages: int) -> torch.nn.Module:
    """nnU-Net's default 3d_fullres network (features 32 .. 320, 3x3x3, two convs per stage)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    features = [min(32 * 2**i, 320) for i in range(stages)]
    return PlainConvUNet(
        in_channels, stages, features, torch.nn.Conv3d, 3, [1] + [2] * (stages - 1), [2] * stages, num_classes,
        [2] * (stages - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=True)


def evaluate(model: torch.nn.Module, cases, patch, num_classes: int, device: torch.device) -> dict[int, float]:
    model.eval()
    scores: dict[int, list[float]] = {}
    with torch.inference_mode():
        for image, label in cases:
            pred = sliding_window_argmax(torch.from_numpy(image), lambda x: _full_res(model(x.to(device))).float().cpu(), patch=patch,
                                         num_classes=num_classes, overlap=0.5)
            for k in range(1, num_classes):
                if (label == k).any():
                    scores.setdefault(k, []).append(dice(pred, label, k))
    model.train()
    return {k: float(np.mean(v)) for k, v in scores.items()}


def _full_res(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--train-cases", type=int, default=8)
    parser.add_argument("--val-cases", type=int, default=4)
    parser.add_argument("--patch", type=int, nargs=3, default=(48, 64, 64))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (the measurement that matters here), cuda, auto")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patch = tuple(args.patch)

    dataset = phantom_dataset(args.train_cases + args.val_cases, seed=args.seed)
    plan = fingerprint(dataset)
    arrays = []
    for case in dataset.cases:
        image, label = case.load()
        arrays.append((preprocess(image, plan)[0], preprocess_labels(label, plan)))
    train, val = arrays[: args.train_cases], arrays[args.train_cases:]
    num_classes = max(dataset.labels) + 1
    sampler = PatchSampler(train, patch=patch, batch=args.batch, seed=args.seed)

    e2e = create_model("e2enet_small", in_channels=1, num_classes=num_classes, sparsity=args.sparsity, seed=args.seed)
    plain = plain_conv_unet(1, num_classes, stages=5)
    device = resolve_device(args.device)
    e2e, plain = e2e.to(device), plain.to(device)
    runs = {}
    for name, model in (("e2enet_small", e2e), ("PlainConvUNet", plain)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, weight_decay=3e-5, nesterov=True)
        updater = DSFFUpdater(model, opt, SparsityConfig(sparsity=args.sparsity), args.iterations, seed=args.seed) \
            if name.startswith("e2enet") else None
        runs[name] = {"model": model, "opt": opt, "updater": updater, "train_s": 0.0, "dsff_s": 0.0,
                      "params": sum(p.numel() for p in model.parameters())}
    loss_fn = DeepSupervisionLoss()
    t_all = time.perf_counter()
    for it in range(args.iterations):
        images, target = sampler.batch(it)
        images, target = images.to(device), target.to(device)
        for run in runs.values():
            lr = poly_lr(0.01, it, args.iterations)
            for group in run["opt"].param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            train_step(run["model"], run["opt"], loss_fn, images, target)
            t1 = time.perf_counter()
            if run["updater"] is not None:
                run["updater"].after_step(it + 1)
            t2 = time.perf_counter()
            run["train_s"] += t2 - t0
            run["dsff_s"] += t2 - t1
        if (it + 1) % 25 == 0:
            print(f"iteration {it + 1}/{args.iterations}  "
                  + "  ".join(f"{n}: {r['train_s'] / (it + 1):.2f} s/it" for n, r in runs.items()), flush=True)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                           "device": str(device),
                           "torch": torch.__version__},
               "setup": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
               "models": {}}
    for name, run in runs.items():
        per_class = evaluate(run["model"], val, patch, num_classes, device)
        results["models"][name] = {
            "params": run["params"], "mean_dice": float(np.mean(list(per_class.values()))),
            "dice": {dataset.labels[k]: round(v, 4) for k, v in per_class.items()},
            "train_seconds": round(run["train_s"], 1), "seconds_per_iteration": round(run["train_s"] / args.iterations, 3),
            "dsff_update_seconds": round(run["dsff_s"], 2),
            "dsff_overhead_percent": round(100 * run["dsff_s"] / run["train_s"], 2)}
    results["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    print(f"{'model':<16}{'params':>10}{'mean Dice':>11}{'s/it':>8}{'train s':>9}{'DSFF %':>8}")
    for name, r in results["models"].items():
        print(f"{name:<16}{r['params'] / 1e6:>9.2f}M{r['mean_dice']:>11.4f}{r['seconds_per_iteration']:>8.2f}"
              f"{r['train_seconds']:>9.0f}{r['dsff_overhead_percent']:>8.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
