"""A/B of two kernel sources in one process: a copy of ``inference/cpu`` from before a change
against the working tree's, interleaved rounds, medians, outputs compared (a measurement, not a test).

Machines this size are too noisy for two separate runs; both libraries are built into a temporary
cache and run alternately. ``sconv`` times ``e2e_sconv133`` alone (half the input channels through
the lazy norm, as in a forward); ``forward`` times the paper network's whole fast forward.

    cp -r napari_e2enet/inference/cpu /tmp/old_cpu    # before editing kernels.c
    .venv/bin/python benchmarks/kernel_ab.py /tmp/old_cpu sconv 96 48 32 128 128 0.1
    .venv/bin/python benchmarks/kernel_ab.py /tmp/old_cpu forward 0.9 128 --threads 2
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from napari_e2enet.inference import accelerate
from napari_e2enet.inference.cpu.bindings import load
from napari_e2enet.inference.cpu.compact import Kernels, LazyNorm, PaddedPlanar, conv_csc, depth_offsets
from napari_e2enet.models import create_model

ROUNDS = 5


def _interleaved(a: Callable[[], object], b: Callable[[], object]) -> tuple[float, float]:
    ta, tb = [], []
    for r in range(ROUNDS):  # alternate which goes first
        for fn, times in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def sconv(old: Kernels, new: Kernels, i: int, o: int, d: int, h: int, w: int, density: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(i, d, h, w, generator=gen)
    weight = torch.randn(o, i, 1, 3, 3, generator=gen) * (torch.rand(o, i, generator=gen) < density)[:, :, None, None, None]
    lazy = torch.arange(i) % 2 == 1
    norm = LazyNorm(torch.where(lazy, torch.rand(i, generator=gen) + 0.5, torch.ones(i)),
                    torch.where(lazy, torch.randn(i, generator=gen), torch.zeros(i)),
                    torch.where(lazy, torch.full((i,), 0.01), torch.ones(i)))
    src, csc, shift = PaddedPlanar.from_dense(x), conv_csc(weight), depth_offsets(i)
    ptrs = src.channel_ptrs()  # once: only the kernel call is timed
    outs = {id(old): PaddedPlanar(o, d, h, w), id(new): PaddedPlanar(o, d, h, w)}
    for k in (old, new):
        k.sconv133(csc, ptrs, shift, outs[id(k)], None, norm=norm)
    diff = float((outs[id(old)].interior - outs[id(new)].interior).abs().max())
    ta, tb = _interleaved(*(lambda k=k: k.sconv133(csc, ptrs, shift, outs[id(k)], None, norm=norm)
                            for k in (old, new)))
    macs = float((weight != 0).any(2).any(2).any(2).sum()) * 9 * d * h * w
    print(f"sconv {i}->{o} {d}x{h}x{w} density {density}: max |diff| {diff:.2g}; old {ta * 1e3:.1f} ms "
          f"({macs / ta / 1e9:.1f} GMAC/s), new {tb * 1e3:.1f} ms ({macs / tb / 1e9:.1f}), new/old {tb / ta:.3f}")


def forward(old: Kernels, new: Kernels, sparsity: float, size: int) -> None:
    model = create_model("e2enet", sparsity=sparsity, seed=0, num_classes=16).eval()
    fast = []
    for k in (old, new):
        f = accelerate(model, "fp32", backend="sparse")
        f._kernels = k  # the same network on the other library
        for unit in f._dense_units():
            unit.kernels = k
        fast.append(f)
    x = torch.randn(1, 1, size, size, size)
    with torch.no_grad():
        diff = float((fast[0](x) - fast[1](x)).abs().max())
        ta, tb = _interleaved(lambda: fast[0](x), lambda: fast[1](x))
    print(f"forward S={sparsity} {size}^3: max |dlogit| {diff:.2g}; old {ta:.2f} s, new {tb:.2f} s, new/old {tb / ta:.3f}")


def main() -> None:
    threads = 1
    if "--threads" in sys.argv:  # both libraries on N threads (default 1: the per-core rate)
        at = sys.argv.index("--threads")
        threads = int(sys.argv[at + 1])
        del sys.argv[at:at + 2]
    if len(sys.argv) < 3 or sys.argv[2] not in ("sconv", "forward"):
        raise SystemExit(__doc__)
    torch.set_num_threads(threads)
    cache = Path(tempfile.mkdtemp())
    old, new = Kernels(load(source_dir=Path(sys.argv[1]), cache_dir=cache)), Kernels(load(cache_dir=cache))
    if sys.argv[2] == "sconv":
        i, o, d, h, w = (int(v) for v in sys.argv[3:8])
        sconv(old, new, i, o, d, h, w, float(sys.argv[8]))
    else:
        forward(old, new, float(sys.argv[3]), int(sys.argv[4]))


if __name__ == "__main__":
    main()
