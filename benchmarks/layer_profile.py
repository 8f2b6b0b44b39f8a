"""Per-layer fp32 profile of the sparse fast path against oneDNN (issue 18 step 2).

For each masked layer of a model (the fusion decoder's (1,3,3) convs and its up ConvTranspose3d,
at the resolution one tile gives them), one thread, interleaved rounds, medians:

- ``e2e_sconv133`` (the sparse kernel, active kernels only) vs oneDNN ``conv2d`` on folded
  (D, C, H, W) channels_last features (all kernels, zeros included): seconds and GMAC/s, the sparse
  one counted on its active kernels, the dense one on all;
- ``e2e_convt`` (CSR by output) vs a dense matmul of the same ConvTranspose3d (kernel == stride).

    .venv/bin/python benchmarks/layer_profile.py mni152-tissue phantom-abdomen-ct paper-s0.9@128 paper-s0.8@128
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_e2enet.inference.cpu.compact import (
    PaddedPlanar,
    conv_csc,
    convt_csr,
    depth_offsets,
    kernel_status,
)
from napari_e2enet.modelcard import bundled_model, load_model
from napari_e2enet.models import create_model
from napari_e2enet.sparse.compact import effective_mask


def _model(spec: str) -> tuple[nn.Module, tuple[int, int, int]]:
    if spec.startswith("paper-s"):
        sparsity, size = spec[len("paper-s"):].split("@")
        return create_model("e2enet", sparsity=float(sparsity), seed=0, num_classes=16), (int(size),) * 3
    bundled = bundled_model(spec)
    model, meta = load_model(bundled.weights)
    patch = tuple(meta["train_config"]["data"]["patch"])
    return model, patch  # type: ignore[return-value]


def _input_shapes(model: nn.Module, patch: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    twin = __import__("copy").deepcopy(model).to("meta").eval()
    for name, module in twin.named_modules():
        if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
            module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(i[0].shape)))
    with torch.no_grad():
        twin(torch.empty((1, model.config.in_channels, *patch), device="meta"))
    return shapes


def _median(fn: Callable[[], Any], rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(spec: str) -> None:
    k, reason = kernel_status()
    assert k is not None, reason
    model, patch = _model(spec)
    shapes = _input_shapes(model, patch)
    names = {id(m): n for n, m in model.named_modules()}
    tot = {"sparse": 0.0, "dense": 0.0, "macs_eff": 0, "macs_dense": 0}
    print(f"\n{spec} (patch {patch}), fp32, 1 thread, median of 5 interleaved")
    print(f"  {'layer':44s} {'I→O':>9s} {'DxHxW':>12s} {'dens':>5s} {'sparse ms':>9s} {'GMAC/s':>7s} "
          f"{'dense ms':>9s} {'GMAC/s':>7s} {'sp/dn':>6s}")
    for mw in model.maskable():
        m = mw.module
        name = names[id(m)]
        mask = effective_mask(mw.weight, m.kernel_mask)
        w = mw.weight.detach().float() * mask[:, :, None, None, None]
        _, c, d, h, wd = shapes[name]
        x = torch.randn(c, d, h, wd)
        if isinstance(m, nn.Conv3d):
            o = w.shape[0]
            csc = conv_csc(w, mask)
            src = PaddedPlanar.from_dense(x)
            out = PaddedPlanar(o, d, h, wd)
            stats = torch.zeros(2 * o, dtype=torch.float64)
            ptrs, shift = src.channel_ptrs(), depth_offsets(c)
            xf = x.permute(1, 0, 2, 3).contiguous(memory_format=torch.channels_last)
            wf = w[:, :, 0].contiguous(memory_format=torch.channels_last)
            sparse: Callable[[], Any] = partial(k.sconv133, csc, ptrs, shift, out, stats)
            dense: Callable[[], Any] = partial(F.conv2d, xf, wf, padding=1)
            macs = d * h * wd * o * c * 9
        else:  # ConvTranspose3d, kernel == stride
            o, kern = w.shape[1], tuple(w.shape[2:])
            csr = convt_csr(w, mask)
            src = PaddedPlanar.from_dense(x)
            out = PaddedPlanar(o, d * kern[0], h * kern[1], wd * kern[2])
            xl = x.reshape(c, -1).t().contiguous()
            wl = w.reshape(c, -1).contiguous()
            sparse = partial(k.convt, csr, src, out)
            dense = partial(torch.mm, xl, wl)
            macs = d * h * wd * c * o * kern[0] * kern[1] * kern[2]
        dens = float(mask.float().mean())
        sparse(), dense()
        ts, td = [], []
        for _ in range(5):
            ts.append(_median(sparse, 1))
            td.append(_median(dense, 1))
        s, dn = statistics.median(ts), statistics.median(td)
        eff = macs * dens
        tot["sparse"] += s
        tot["dense"] += dn
        tot["macs_eff"] += eff
        tot["macs_dense"] += macs
        kind = "convT" if isinstance(m, nn.ConvTranspose3d) else "conv"
        print(f"  {kind + ' ' + name[-38:]:44s} {c:>4d}→{o:<4d} {d:>3d}x{h}x{wd:<4d} {dens:5.2f} {s * 1e3:9.2f} "
              f"{eff / s / 1e9:7.2f} {dn * 1e3:9.2f} {macs / dn / 1e9:7.2f} {s / dn:6.2f}")
    print(f"  {'all masked layers':44s} {'':>9s} {'':>12s} {tot['macs_eff'] / tot['macs_dense']:5.2f} "
          f"{tot['sparse'] * 1e3:9.1f} {tot['macs_eff'] / tot['sparse'] / 1e9:7.2f} {tot['dense'] * 1e3:9.1f} "
          f"{tot['macs_dense'] / tot['dense'] / 1e9:7.2f} {tot['sparse'] / tot['dense']:6.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for spec in sys.argv[1:] or ["mni152-tissue", "phantom-abdomen-ct"]:
        profile(spec)
