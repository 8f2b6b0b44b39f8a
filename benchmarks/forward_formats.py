"""Forward time of E2ENet (dense fp32, as built) and e2enet_small next to nnU-Net's PlainConvUNet,
contiguous and ``channels_last_3d``, at 64³ and 128³: one process, interleaved rounds, medians.

    .venv/bin/python benchmarks/forward_formats.py --sizes 64 128 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from napari_e2enet import create_model
from napari_e2enet.bench import _plain_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    nets = {"PlainConvUNet": _plain_unet().eval(), "e2enet": create_model("e2enet", sparsity=0).eval(),
            "e2enet_small": create_model("e2enet_small", sparsity=0).eval()}
    for size in args.sizes:
        x = torch.randn(1, 1, size, size, size)
        cands = {}
        for name, net in nets.items():
            cands[(name, "contiguous")] = (net, x)
            cl = torch.nn.Module.to(net, memory_format=torch.channels_last_3d)  # same module, converted weights
            cands[(name, "channels_last_3d")] = (cl, x.contiguous(memory_format=torch.channels_last_3d))
        times: dict = {k: [] for k in cands}
        with torch.inference_mode():
            for _ in range(args.repeats + 1):  # first round is the warm-up
                for key, (net, inp) in cands.items():
                    if key[1] == "contiguous":
                        net.to(memory_format=torch.contiguous_format)
                    else:
                        net.to(memory_format=torch.channels_last_3d)
                    t0 = time.perf_counter()
                    net(inp)
                    times[key].append(time.perf_counter() - t0)
        base = statistics.median(times[("PlainConvUNet", "contiguous")][1:])
        for key, ts in times.items():
            med = statistics.median(ts[1:])
            print(f"{size}^3  {key[0]:<14} {key[1]:<17} {med:7.3f} s  x{med / base:5.2f} of PlainConvUNet")


if __name__ == "__main__":
    main()
