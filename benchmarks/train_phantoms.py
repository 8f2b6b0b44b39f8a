"""Train E2ENet (small, DSFF S = 0.8) and nnU-Net's PlainConvUNet side by side on phantom CT cases.

Same patches (one sampler, same seed), batch, iterations, augmentation, loss (Dice + CE, deep
supervision), optimiser (SGD Nesterov 0.99 or AdamW, poly LR, clip 12); iterations are interleaved
(one of each in turn) so machine noise hits both alike. Reports held-out mean organ Dice (full-volume
sliding window on cases never trained on), wall time, seconds per iteration and the DSFF update
overhead; ``--eval-every`` adds a learning curve. The JSON file is rewritten after every evaluation,
so a run that is cut off still leaves its numbers. A measurement, not a test: it never fails on time.

    .venv/bin/python benchmarks/train_phantoms.py --iterations 800 --eval-every 200 --json out.json

The 20-minute CPU recipe of docs/phantom-benchmark.md:

    .venv/bin/python benchmarks/train_phantoms.py --iterations 680 --eval-every 85 --train-cases 32 \
        --foreground-oversample 1.0 --optimizer adamw --lr 0.01 --no-augment --json cpu20.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from napari_e2enet import create_model
from napari_e2enet.config import SparsityConfig, TrainConfig
from napari_e2enet.data import (
    AugmentConfig,
    PatchSampler,
    fingerprint,
    phantom_dataset,
    preprocess,
    preprocess_labels,
)
from napari_e2enet.device import resolve_device
from napari_e2enet.inference import sliding_window_argmax
from napari_e2enet.metrics import dice
from napari_e2enet.sparse import DSFFUpdater
from napari_e2enet.training.loop import make_optimizer, poly_lr, train_step
from napari_e2enet.training.losses import DeepSupervisionLoss
from napari_e2enet.training.sparse_conv import install_sparse_training


def plain_conv_unet(in_channels: int, num_classes: int, stages: int,
                    features: list[int] | None = None) -> torch.nn.Module:
    """nnU-Net's default 3d_fullres network (features 32 .. 320 unless given, 3x3x3, two convs per stage)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    features = features or [min(32 * 2**i, 320) for i in range(stages)]
    return PlainConvUNet(
        in_channels, stages, features, torch.nn.Conv3d, 3, [1] + [2] * (stages - 1), [2] * stages, num_classes,
        [2] * (stages - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=True)  # fmt: skip


def evaluate(model: torch.nn.Module, cases, patch, num_classes: int, device: torch.device) -> dict[int, float]:
    """Mean Dice per organ over the held-out cases (organs absent from a reference are skipped)."""
    model.eval()
    scores: dict[int, list[float]] = {}
    with torch.inference_mode():
        for image, label in cases:
            pred = sliding_window_argmax(
                torch.from_numpy(image), lambda x: _full_res(model(x.to(device))).float().cpu(), patch=patch,
                num_classes=num_classes, overlap=0.5)  # fmt: skip
            for k in range(1, num_classes):
                if (label == k).any():
                    scores.setdefault(k, []).append(dice(pred, label, k))
    model.train()
    return {k: float(np.mean(v)) for k, v in scores.items()}


def _full_res(out):
    return out[0] if isinstance(out, list | tuple) else out


def _build(name: str, num_classes: int, sparsity: float, seed: int) -> torch.nn.Module:
    if name == "PlainConvUNet":
        torch.manual_seed(seed)
        return plain_conv_unet(1, num_classes, stages=5)
    return create_model(name, in_channels=1, num_classes=num_classes, sparsity=sparsity, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--train-cases", type=int, default=8)
    parser.add_argument("--val-cases", type=int, default=4)
    parser.add_argument("--patch", type=int, nargs=3, default=(48, 64, 64))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--models", nargs="+", default=["e2enet_small", "PlainConvUNet"],
                        help="registry names and/or PlainConvUNet")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="sgd: nnU-Net's SGD Nesterov 0.99; adamw: AdamW (betas 0.9, 0.999)")
    parser.add_argument("--lr", type=float, default=0.01, help="initial learning rate (poly decay)")
    parser.add_argument("--weight-decay", type=float, default=3e-5)
    parser.add_argument("--mirror-axes", type=int, nargs="*", default=[0, 1, 2],
                        help="spatial axes (0=D, 1=H, 2=W) mirrored by augmentation; the phantom's W is left-right")
    parser.add_argument("--foreground-oversample", type=float, default=0.33)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=(96, 96, 64), help="X Y Z voxels")
    parser.add_argument("--phantom-spacing", type=float, nargs=3, default=(1.5, 1.5, 3.0), help="mm")
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense-training", action="store_true",
                        help="run the masked E2ENet densely (zeros computed) instead of the sparse training kernels")
    parser.add_argument("--device", default="cpu", help="cpu (the measurement that matters here), cuda, auto")
    parser.add_argument("--json", help="write the results to this file (rewritten after every evaluation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patch = tuple(args.patch)

    dataset = phantom_dataset(args.train_cases + args.val_cases, seed=args.seed,
                              shape=tuple(args.phantom_shape), spacing=tuple(args.phantom_spacing))
    plan = fingerprint(dataset)
    arrays = []
    for case in dataset.cases:
        image, label = case.load()
        arrays.append((preprocess(image, plan)[0], preprocess_labels(label, plan)))
    train, val = arrays[: args.train_cases], arrays[args.train_cases :]
    num_classes = max(dataset.labels) + 1
    augment_config = AugmentConfig.for_patch(patch, mirror_axes=tuple(args.mirror_axes))
    sampler = PatchSampler(train, patch=patch, batch=args.batch, seed=args.seed, augment_config=augment_config,
                           foreground_oversample=args.foreground_oversample, augment=not args.no_augment)

    device = resolve_device(args.device)
    runs = {}
    for name in args.models:
        model = _build(name, num_classes, args.sparsity, args.seed).to(device)
        opt = make_optimizer(model, TrainConfig(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay))
        updater = (DSFFUpdater(model, opt, SparsityConfig(sparsity=args.sparsity), args.iterations, seed=args.seed)
                   if name.startswith("e2enet") and args.sparsity > 0 else None)
        # Training skips the pruned kernels on the CPU as the Trainer does (training.sparse_conv)
        # unless --dense-training asks for the masked model run densely (the before of issue 18).
        sparse = (install_sparse_training(model, device)
                  if updater is not None and not args.dense_training else None)
        runs[name] = {"model": model, "opt": opt, "updater": updater, "sparse": sparse, "train_s": 0.0, "dsff_s": 0.0,
                      "params": sum(p.numel() for p in model.parameters()), "curve": []}
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "device": str(device), "torch": torch.__version__, "load": os.getloadavg()[0]},
        "setup": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "plan": {"spacing": list(plan.spacing) if hasattr(plan, "spacing") else None},
        "models": {},
    }

    def record(iteration: int, final: bool) -> None:
        for name, run in runs.items():
            per_class = evaluate(run["model"], val, patch, num_classes, device)
            mean = float(np.mean(list(per_class.values())))
            run["curve"].append({"iteration": iteration, "train_seconds": round(run["train_s"], 1),
                                 "mean_dice": round(mean, 4)})
            print(f"  eval @ {iteration}: {name} mean Dice {mean:.4f}  "
                  + " ".join(f"{dataset.labels[k][:6]}={v:.2f}" for k, v in per_class.items()), flush=True)
            results["models"][name] = {
                "params": run["params"], "iterations": iteration, "mean_dice": round(mean, 4),
                "dice": {dataset.labels[k]: round(v, 4) for k, v in per_class.items()},
                "train_seconds": round(run["train_s"], 1),
                "seconds_per_iteration": round(run["train_s"] / max(iteration, 1), 3),
                "dsff_update_seconds": round(run["dsff_s"], 2),
                "dsff_overhead_percent": round(100 * run["dsff_s"] / max(run["train_s"], 1e-9), 2),
                "curve": run["curve"], "final": final}
        results["wall_seconds"] = round(time.perf_counter() - t_all, 1)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(results, fh, indent=2)
            os.replace(tmp, args.json)

    loss_fn = DeepSupervisionLoss()
    t_all = time.perf_counter()
    sample_s = 0.0
    for it in range(args.iterations):
        t_s = time.perf_counter()
        images, target = sampler.batch(it)
        images, target = images.to(device), target.to(device)
        sample_s += time.perf_counter() - t_s
        for run in runs.values():
            lr = poly_lr(args.lr, it, args.iterations)
            for group in run["opt"].param_groups:
                group["lr"] = lr
            if run["sparse"] is not None:
                run["sparse"].dense_weight_grads(run["updater"].needs_dense_grads(it + 1))
            t0 = time.perf_counter()
            train_step(run["model"], run["opt"], loss_fn, images, target)
            if device.type == "cuda":
                torch.cuda.synchronize()  # so the step's queued kernels are not billed to DSFF
            t1 = time.perf_counter()
            if run["updater"] is not None:
                run["updater"].after_step(it + 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            run["train_s"] += t2 - t0
            run["dsff_s"] += t2 - t1
        if (it + 1) % 25 == 0:
            print(f"iteration {it + 1}/{args.iterations}  sampling {sample_s / (it + 1):.3f} s/it  "
                  + "  ".join(f"{n}: {r['train_s'] / (it + 1):.3f} s/it" for n, r in runs.items()), flush=True)
        if args.eval_every and (it + 1) % args.eval_every == 0 and it + 1 < args.iterations:
            record(it + 1, final=False)
    results["sampling_seconds_per_iteration"] = round(sample_s / args.iterations, 4)
    record(args.iterations, final=True)
    print(f"{'model':<16}{'params':>10}{'mean Dice':>11}{'s/it':>8}{'train s':>9}{'DSFF %':>8}")
    for name, r in results["models"].items():
        print(f"{name:<16}{r['params'] / 1e6:>9.2f}M{r['mean_dice']:>11.4f}{r['seconds_per_iteration']:>8.2f}"
              f"{r['train_seconds']:>9.0f}{r['dsff_overhead_percent']:>8.2f}")


if __name__ == "__main__":
    main()
