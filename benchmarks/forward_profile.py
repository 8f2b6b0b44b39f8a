"""Where one fast forward spends its time: every ``Kernels`` call and every oneDNN ``F.conv2d``
timed in place, grouped by kernel and layer shape (a measurement, not a test).

    .venv/bin/python benchmarks/forward_profile.py 0.9 128 --threads 2

Prints, per (kernel, input channels, output channels, height), the calls per forward and seconds
per forward (the mean of two forwards after a warm-up), then the total and what the timed calls
leave (Python, copies, allocation).
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from napari_e2enet.inference import accelerate
from napari_e2enet.inference.cpu import compact
from napari_e2enet.models import create_model

_Key = tuple[Any, ...]


def _timed(table: dict[_Key, list[float]], name: str, fn: Callable[..., Any],
           key: Callable[[tuple[Any, ...]], tuple[Any, ...]]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        entry = table[(name, *key(args))]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        return out

    return run


def _instrument(table: dict[_Key, list[float]]) -> None:
    kernels = compact.Kernels
    shapes: dict[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]] = {
        "sconv133": lambda a: (a[1].in_channels, a[1].out_channels, a[4].H),
        "convt": lambda a: (a[1].in_channels, a[1].out_channels, a[3].H),
        "maxpool": lambda a: (a[1].C, a[1].H),
    }
    for name in ("sconv133", "convt", "maxpool", "head", "cl_stats", "cl_to_pp", "cl_shift", "cl_norm_act"):
        setattr(kernels, name, _timed(table, name, getattr(kernels, name), shapes.get(name, lambda a: ())))
    F.conv2d = _timed(table, "F.conv2d (oneDNN)", F.conv2d, lambda a: ())  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sparsity", type=float)
    parser.add_argument("size", type=int)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table: dict[_Key, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    _instrument(table)
    net = accelerate(create_model("e2enet", sparsity=args.sparsity, seed=0, num_classes=16).eval(), "fp32",
                     backend="sparse")
    x = torch.randn(1, 1, args.size, args.size, args.size)
    net(x)  # warm-up: buffers, the library
    table.clear()
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        net(x)
    total = (time.perf_counter() - t0) / args.rounds
    timed = 0.0
    for key, (calls, seconds) in sorted(table.items(), key=lambda kv: -kv[1][1]):
        per = seconds / args.rounds
        timed += per
        print(f"{' '.join(str(k) for k in key):40s} {int(calls) // args.rounds:5d} calls {per:7.3f} s")
    print(f"total {total:.3f} s; timed calls {timed:.3f} s; the rest {total - timed:.3f} s "
          f"(S={args.sparsity}, {args.size}^3, {args.threads} threads)")


if __name__ == "__main__":
    main()
