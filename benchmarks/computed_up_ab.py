"""A/B of one level-0 fusion node, paper network shapes: the ConvT into a buffer then the (1,3,3)
conv reading it, against the conv computing its up-sampled channels itself (``e2e_sconv133_up``),
interleaved rounds, medians, outputs compared (a measurement, not a test).

    .venv/bin/python benchmarks/computed_up_ab.py --threads 2 --depth 16 --rounds 15

``--depth`` output slices (a level-0 depth piece at 128³ is 16); 96 deep channels up-sampled to 48
beside 48 forward channels (lazy norm), 48 outputs at 128 × 128; ``--density`` of the fusion conv
and ``--up-density`` of the ConvT (0.1 each at S = 0.9).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from napari_e2enet.inference.cpu.compact import (
    ComputedUp,
    LazyNorm,
    PaddedPlanar,
    conv_csc,
    convt_csr,
    depth_offsets,
    load_kernels,
)

_STREAM_BYTES = 16 << 20  # as fastpath: larger outputs are written with streaming stores


def _lazy(channels: int, gen: torch.Generator) -> LazyNorm:
    return LazyNorm(torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen),
                    torch.full((channels,), 0.01))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--up-density", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = load_kernels()
    gen = torch.Generator().manual_seed(0)
    deep_c, up_c, fwd_c, out_c, size, depth = 96, 48, 48, 48, 128, args.depth
    deep = PaddedPlanar.from_dense(torch.randn(deep_c, depth // 2, size // 2, size // 2, generator=gen))
    convt = convt_csr(torch.randn(deep_c, up_c, 2, 2, 2, generator=gen)
                      * (torch.rand(deep_c, up_c, 1, 1, 1, generator=gen) < args.up_density))
    deep_norm = _lazy(deep_c, gen)
    up = PaddedPlanar(up_c, depth, size, size)
    fwd = PaddedPlanar.from_dense(torch.randn(fwd_c, depth, size, size, generator=gen))
    weight = torch.randn(out_c, fwd_c + up_c, 1, 3, 3, generator=gen)
    csc = conv_csc(weight * (torch.rand(out_c, fwd_c + up_c, 1, 1, 1, generator=gen) < args.density))
    shift = depth_offsets(fwd_c + up_c)
    ptrs = torch.cat([fwd.channel_ptrs(), up.channel_ptrs()])
    norm = LazyNorm.cat([_lazy(fwd_c, gen), LazyNorm.identity(up_c)])
    computed_up = ComputedUp(fwd_c, torch.arange(up_c, dtype=torch.int32), convt, deep, deep_norm)
    outs = [PaddedPlanar(out_c, depth, size, size) for _ in range(2)]
    streaming = outs[0].cstride * out_c * 4 > _STREAM_BYTES

    def stored() -> None:
        k.convt(convt, deep, up, norm=deep_norm, streaming=up.cstride * up_c * 4 > _STREAM_BYTES)
        k.sconv133(csc, ptrs, shift, outs[0], torch.zeros(2 * out_c, dtype=torch.float64), norm=norm,
                   streaming=streaming)

    def computed() -> None:
        k.sconv133(csc, ptrs, shift, outs[1], torch.zeros(2 * out_c, dtype=torch.float64), norm=norm,
                   streaming=streaming, up=computed_up)

    stored()
    computed()
    diff = float((outs[0].interior - outs[1].interior).abs().max())
    times: dict[str, list[float]] = {"stored": [], "computed": []}
    for r in range(args.rounds):  # alternate which goes first
        order = [("stored", stored), ("computed", computed)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    a, b = (statistics.median(times[n]) for n in ("stored", "computed"))
    print(f"{depth} x {size}^2, density {args.density}, ConvT density {args.up_density}, {args.threads} threads: "
          f"max |diff| {diff:.2g}; ConvT then conv {a * 1e3:.1f} ms, computed inside {b * 1e3:.1f} ms, ratio {b / a:.3f}")


if __name__ == "__main__":
    main()
