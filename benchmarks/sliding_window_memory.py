"""Peak memory and time of whole-volume sliding-window inference: ours vs MONAI.

Each configuration runs in its own subprocess (peak RSS = ``ru_maxrss`` of that process), with
``torch.set_num_threads(2)``. The stand-in predictor is a fixed random Conv3d (1 -> K channels,
kernel 3 by default, ``--kernel 1`` for a 1×1 conv) in eval mode; the input is a smooth synthetic
volume, float32, one channel. Labels of every run are compared with ours in float32.

    .venv/bin/python benchmarks/sliding_window_memory.py                      # 300×512×512, K=16
    .venv/bin/python benchmarks/sliding_window_memory.py --shape 128 256 256 --runs ours-fp16 monai

MONAI's run gets an address-space limit (``--monai-limit-gb``, default 14) so that it fails with
a MemoryError instead of pushing a shared machine into the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

RUNS = ("ours-fp16", "ours-bf16", "ours-fp32", "monai")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    if args.run == "monai":
        limit = int(args.monai_limit_gb * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    D, H, W = args.shape
    K = args.classes
    z = torch.arange(D, dtype=torch.float32).view(D, 1, 1)
    y = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    x = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    image = torch.sin(z / 7.0) + torch.cos(y / 11.0) * torch.sin(x / 13.0) + torch.sin((x + y + z) / 17.0)
    image = image[None].contiguous()  # (1, D, H, W) float32
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, K, args.kernel, padding=args.kernel // 2).eval()
    rss_setup = _rss_mb()
    t0 = time.perf_counter()
    if args.run == "monai":
        from monai.inferers import sliding_window_inference

        with torch.inference_mode():
            out = sliding_window_inference(
                image[None],
                args.patch,
                args.batch,
                net,
                overlap=args.overlap,
                mode="gaussian",
                sigma_scale=0.125,
            )
            labels = out[0].argmax(0).to(torch.uint8).numpy()
            del out
    else:
        from napari_e2enet.inference.sliding_window import sliding_window_argmax

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.run.split("-")[1]]
        labels = sliding_window_argmax(
            image,
            net,
            patch=args.patch,
            num_classes=K,
            overlap=args.overlap,
            tiles_per_batch=args.batch,
            accumulate_dtype=dtype,
            placement=args.placement,
            sweep="auto" if args.sweep == "auto" else (0, 1, 2),
        )
    seconds = time.perf_counter() - t0
    np.save(args.save, labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"run": args.run, "seconds": seconds, "peak_rss_mb": peak, "setup_rss_mb": rss_setup}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("D", "H", "W"))
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=1, help="tiles per forward call")
    p.add_argument("--kernel", type=int, default=3, help="stand-in conv kernel size (1 or 3)")
    p.add_argument(
        "--placement",
        default="monai",
        choices=["monai", "nnunet"],
        help="tile placement of our runs (monai: same tiles as MONAI, labels comparable)",
    )
    p.add_argument("--sweep", default="auto", choices=["auto", "d-major"],
                   help="tile order of our runs: the window's choice, or D-major (the order before 2026-11-27)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--monai-limit-gb", type=float, default=14.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        child(args)
        return

    import numpy as np

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            save = os.path.join(tmp, f"{run}.npy")
            cmd = [
                sys.executable,
                __file__,
                "--run",
                run,
                "--save",
                save,
                "--shape",
                *map(str, args.shape),
                "--classes",
                str(args.classes),
                "--patch",
                *map(str, args.patch),
                "--overlap",
                str(args.overlap),
                "--batch",
                str(args.batch),
                "--kernel",
                str(args.kernel),
                "--placement",
                args.placement,
                "--sweep",
                args.sweep,
                "--threads",
                str(args.threads),
                "--monai-limit-gb",
                str(args.monai_limit_gb),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                results.append({"run": run, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            rec["labels"] = save
            results.append(rec)
        ref_path = next((r["labels"] for r in results if r.get("run") == "ours-fp32" and "labels" in r), None)
        ref = np.load(ref_path) if ref_path else None
        for r in results:
            path = r.pop("labels", None)
            if ref is not None and path:
                r["agreement_vs_ours_fp32"] = float((np.load(path) == ref).mean())
    summary = {
        "shape": args.shape,
        "classes": args.classes,
        "patch": args.patch,
        "overlap": args.overlap,
        "tiles_per_batch": args.batch,
        "kernel": args.kernel,
        "placement": args.placement,
        "sweep": args.sweep,
        "input_mb": float(np.prod(args.shape) * 4 / 2**20),
        "results": results,
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(
        f"volume {args.shape}, {args.classes} classes, patch {args.patch}, overlap {args.overlap}, "
        f"input {summary['input_mb']:.0f} MB float32, stand-in Conv3d k={args.kernel}"
    )
    for r in results:
        if "error" in r:
            print(f"  {r['run']:10s} FAILED: {r['error']}")
            continue
        agree = r.get("agreement_vs_ours_fp32")
        print(
            f"  {r['run']:10s} peak RSS {r['peak_rss_mb']:7.0f} MB (after setup {r['setup_rss_mb']:5.0f} MB)  "
            f"time {r['seconds']:6.1f} s"
            + (f"  label agreement vs ours-fp32 {agree:.6f}" if agree is not None else "")
        )


if __name__ == "__main__":
    main()
