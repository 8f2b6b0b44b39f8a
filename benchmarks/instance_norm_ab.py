"""Training step with the units' norm as ``models.blocks.InstanceNorm3d`` (group-norm form) against
``nn.InstanceNorm3d``, same weights, one process, interleaved (a measurement, not a test).

The second model is a deep copy whose norms are switched back to ``nn.InstanceNorm3d``; both train
on the same random 64³ batch of 2 with the sparse training kernels, as ``bench --parts train`` does.

    .venv/bin/python benchmarks/instance_norm_ab.py e2enet 3
    .venv/bin/python benchmarks/instance_norm_ab.py e2enet_small 4
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
from torch import nn

from napari_e2enet.bench import NUM_CLASSES
from napari_e2enet.models import create_model
from napari_e2enet.models.blocks import InstanceNorm3d
from napari_e2enet.training.loop import train_step
from napari_e2enet.training.losses import DeepSupervisionLoss
from napari_e2enet.training.sparse_conv import install_sparse_training


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    arch, rounds = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(2)
    new = create_model(arch, sparsity=0.8, seed=0, num_classes=NUM_CLASSES).train()
    old = copy.deepcopy(new)
    for m in old.modules():
        if type(m) is InstanceNorm3d:
            m.__class__ = nn.InstanceNorm3d  # same parameters, ATen's instance norm
    runs = []
    for model in (old, new):
        install_sparse_training(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)
        runs.append((model, opt, []))
    loss_fn = DeepSupervisionLoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 64, 64, 64, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (2, 1, 64, 64, 64), generator=gen)
    for model, opt, _ in runs:  # warm-up
        train_step(model, opt, loss_fn, x, y)
    for r in range(rounds):
        for model, opt, times in runs if r % 2 == 0 else runs[::-1]:
            t0 = time.perf_counter()
            train_step(model, opt, loss_fn, x, y)
            times.append(time.perf_counter() - t0)
    ta, tb = statistics.median(runs[0][2]), statistics.median(runs[1][2])
    diff = max(float((p - q).abs().max()) for p, q in zip(old.parameters(), new.parameters(), strict=True))
    print(f"{arch}: nn.InstanceNorm3d {ta:.2f} s/step, group-norm form {tb:.2f} s/step, new/old {tb / ta:.3f}; "
          f"max parameter difference after {rounds + 1} steps {diff:.2g}")


if __name__ == "__main__":
    main()
