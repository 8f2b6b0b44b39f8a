"""``napari-e2enet bench``: E2ENet against nnU-Net's PlainConvUNet on this machine (README "Speed and memory on a CPU").

Three parts (``--parts patch volume train``):

- **patch**: per-patch latency (below);
- **volume**: whole-volume inference (``run_volume_benchmark``) through the project's sliding window
  (Gaussian, overlap 0.5, float16 accumulation, 128³ tiles by default) on synthetic 128×256×256 and
  300×512×512 volumes, 16 classes; one subprocess per run, so each peak RSS is that run's alone;
- **train**: seconds per training iteration (``run_training_benchmark``: forward, Dice + CE with deep
  supervision, backward, clip, SGD step) and DSFF's cost (mask re-application every step plus one
  topology update every ΔT) as a share of training time.

Per-patch latency: one process, every candidate built once, warmed up once, then timed in interleaved rounds
(round r runs every candidate once, in the same order); the table reports medians and each
median's ratio to nnU-Net's PlainConvUNet (contiguous) at the same size and precision. Batch 1,
1 input channel, 16 classes, random weights.

Candidates (``MODELS``):

- ``plain`` / ``plain_cl``: nnU-Net's default 3d_fullres PlainConvUNet (dynamic-network-
  architectures; 6 stages 32..320, kernel 3, 2 convs per stage, InstanceNorm, LeakyReLU),
  contiguous and ``channels_last_3d``;
- ``segresnet``: MONAI SegResNet(init_filters=16);
- ``e2enet_dense``: the paper E2ENet at S = 0.9 run as built (zeros kept, ``model.eval()``);
- ``e2enet_fast_s08`` / ``e2enet_fast_s09``: ``accelerate(model)`` at S = 0.8 / 0.9;
- ``e2enet_folded_s09``: ``accelerate(model, backend="dense")`` (2-D folding only, zeros kept);
- ``e2enet_fast_s08_b8``, ``e2enet_fast_s09_b4`` / ``_b8`` / ``_b16``: the fast path with b × b
  block masks (``compact.uniform_block_masks``) instead of unstructured ones;
- ``small_dense``, ``small_fast_s08``, ``small_fast_s09``: the same for ``e2enet_small``.

bf16: peers and ``e2enet_dense`` under ``torch.autocast("cpu", torch.bfloat16)``, the fast path
with ``accelerate(model, "bf16")``. Whether the CPU has native bf16 is in the machine line.

Usage::

    python benchmarks/patch_latency.py --sizes 64 128 --repeats 5 --precisions fp32 bf16
    python benchmarks/patch_latency.py --sizes 64 --models plain e2enet_fast_s09 --json out.json

As functions: ``run_patch_benchmark(...) -> list[dict]``, ``run_volume_benchmark(...)``,
``run_training_benchmark(...)``, ``machine_info() -> dict``, ``format_table(results, machine) -> str``.
Training candidates (``TRAIN_MODELS``, ``training_candidate``): ``plain``, ``e2enet_sN``, ``small_sN``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MODELS = (
    "plain", "plain_cl", "segresnet", "e2enet_dense", "e2enet_folded_s09", "e2enet_fast_s08",
    "e2enet_fast_s09", "e2enet_fast_s08_b8", "e2enet_fast_s09_b4", "e2enet_fast_s09_b8", "e2enet_fast_s09_b16",
    "small_dense", "small_fast_s08", "small_fast_s09",
)
DEFAULT_MODELS = (
    "plain", "plain_cl", "segresnet", "e2enet_dense", "e2enet_fast_s08", "e2enet_fast_s09",
    "e2enet_fast_s08_b8", "e2enet_fast_s09_b8", "small_dense", "small_fast_s08", "small_fast_s09",
)
NUM_CLASSES = 16


def machine_info() -> dict[str, Any]:
    """CPU model, threads, torch version, native bf16, kernel build, load average."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from .inference.cpu.compact import load_kernels
    from .inference.fastpath import bf16_native

    kernels = load_kernels()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16_native": bf16_native(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "sparse_kernels": " ".join(kernels.flags) if kernels is not None else None,
        "loadavg": [round(x, 2) for x in load],
    }


def _cpu_flags_and_ghz() -> tuple[set[str], float | None]:
    """The CPU's feature flags and its clock in GHz: the highest "CPU max MHz" (lscpu's source,
    cpufreq) where the kernel exposes it, else the highest "cpu MHz" of /proc/cpuinfo (a VM often
    shows only its nominal clock there). An AMD family-25 CPU with AVX-512 (Zen 4) gets the pseudo-flag
    ``amd_zen4_avx512`` when it has AVX-512: Zen 4 runs 512-bit operations on 256-bit units."""
    flags: set[str] = set()
    mhz: list[float] = []
    vendor, family = "", ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(("flags", "Features")) and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz"):
                with contextlib.suppress(ValueError):
                    mhz.append(float(line.split(":", 1)[1]))
            elif line.startswith("vendor_id") and not vendor:
                vendor = line.split(":", 1)[1].strip()
            elif line.startswith("cpu family") and not family:
                family = line.split(":", 1)[1].strip()
    if vendor == "AuthenticAMD" and family == "25" and "avx512f" in flags:
        flags.add("amd_zen4_avx512")
    with contextlib.suppress(OSError, ValueError), \
            open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", encoding="utf-8") as fh:
        mhz.append(int(fh.read().strip()) / 1000)
    return flags, (max(mhz) / 1000 if mhz else None)


def mac_per_cycle(precision: str, flags: set[str]) -> tuple[int, str]:
    """(MACs per cycle and core, the ISA assumed) for ``precision``: two FMA ports of the widest
    vectors (AVX2+FMA fp32 2 × 8 = 16, AVX-512 32, SSE/NEON 8); bf16 AVX512-BF16 64 (VDPBF16PS, 2
    ports × 16 pairs), AMX-BF16 1024 (one TMUL tile op per 16 cycles = 16 × 16 × 32 / 16). bf16
    without native support is converted and computed in fp32: the fp32 peak. AMD Zen 4 (flag
    ``amd_zen4_avx512``, see :func:`_cpu_flags_and_ghz`) issues one 512-bit FMA or VDPBF16PS per
    cycle (measured 2026-12-07: 3.6 G/s of each on one core at 3.6 GHz): AVX-512 16, bf16 32."""
    half = 2 if "amd_zen4_avx512" in flags else 1
    units = " (Zen 4: 256-bit units)" if half == 2 else ""
    if precision == "bf16":
        if "amx_bf16" in flags:
            return 1024, "AMX-BF16"
        if "avx512_bf16" in flags:
            return 64 // half, "AVX512-BF16" + units
    if "avx512f" in flags:
        return 32 // half, "AVX-512 fp32" + units + (" (bf16 emulated)" if precision == "bf16" else "")
    if "avx2" in flags and "fma" in flags:
        return 16, "AVX2+FMA fp32" + (" (bf16 emulated)" if precision == "bf16" else "")
    return 8, "128-bit fp32"


def peak_gmacs(precision: str, cores: int) -> dict[str, Any]:
    """The machine's peak for ``precision`` on ``cores`` cores: cores × GHz × MAC/cycle, with the
    assumptions (``gmacs`` None where the clock is unknown). An upper bound: all-core turbo, memory
    traffic and the non-conv work of a network are not in it."""
    flags, ghz = _cpu_flags_and_ghz()
    per_cycle, isa = mac_per_cycle(precision, flags)
    return {"gmacs": cores * ghz * per_cycle if ghz else None, "cores": cores, "ghz": ghz,
            "mac_per_cycle": per_cycle, "isa": isa}


def conv_macs(model: nn.Module, shape: Sequence[int]) -> int:
    """Multiply-accumulates of the convolutions of one forward of a (1, C, *shape) input, counted as
    ``models.cost`` does (a ConvTranspose per input voxel), on a meta-device twin (nothing computed)."""
    import copy

    twin = copy.deepcopy(model).to("meta").eval()
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        w = module.weight
        taps = math.prod(w.shape[2:])
        if isinstance(module, nn.ConvTranspose3d | nn.ConvTranspose2d):
            total += inputs[0].numel() * w.shape[1] * taps
        else:
            total += output.numel() * w.shape[1] * taps

    for module in twin.modules():
        if isinstance(module, nn.Conv3d | nn.ConvTranspose3d | nn.Conv2d | nn.ConvTranspose2d):
            module.register_forward_hook(hook)
    first = next(m for m in twin.modules() if isinstance(m, nn.Conv3d | nn.Conv2d))
    with torch.no_grad():
        twin(torch.empty((1, first.in_channels, *shape), device="meta"))
    return total


def _cores(threads: int) -> int:
    """Cores the peak is counted for: the threads used, at most the logical CPUs (one thread per core
    assumed: SMT siblings share the FMA ports)."""
    return max(1, min(threads, os.cpu_count() or threads))


def _rate(macs: int | None, seconds: float | None, peak: dict[str, Any]) -> dict[str, Any]:
    """``gmacs_per_s`` and ``peak_share`` (of ``peak``) for ``macs`` done in ``seconds``."""
    if not macs or not seconds:
        return {"gmacs_per_s": None, "peak_share": None}
    rate = macs / seconds / 1e9
    return {"gmacs_per_s": rate, "peak_share": rate / peak["gmacs"] if peak.get("gmacs") else None}


def _peak_line(peak: dict[str, Any]) -> str:
    clock = f"{peak['ghz']:.2f} GHz" if peak.get("ghz") else "clock unknown"
    value = f"{peak['gmacs']:.0f} GMAC/s" if peak.get("gmacs") else "peak unknown"
    return f"peak {value} = {peak['cores']} core(s) × {clock} × {peak['mac_per_cycle']} MAC/cycle ({peak['isa']})"


def _rate_cells(r: dict[str, Any]) -> str:
    gm = f"{r['gmacs_per_s']:.1f}" if r.get("gmacs_per_s") is not None else "—"
    share = f"{100 * r['peak_share']:.1f} %" if r.get("peak_share") is not None else "—"
    return f"{gm:>8s} {share:>7s}"


@dataclass
class _Candidate:
    name: str
    description: str
    fn: Callable[[torch.Tensor], Any]
    x: torch.Tensor
    macs: Callable[[Sequence[int]], int]


def _plain_unet() -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        input_channels=1, n_stages=6, features_per_stage=(32, 64, 128, 256, 320, 320), conv_op=nn.Conv3d,
        kernel_sizes=3, strides=(1, 2, 2, 2, 2, 2), n_conv_per_stage=(2, 2, 2, 2, 2, 2),
        num_classes=NUM_CLASSES, n_conv_per_stage_decoder=(2, 2, 2, 2, 2), conv_bias=False,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=False,
    ).eval()


def _segresnet() -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, init_filters=16, in_channels=1, out_channels=NUM_CLASSES).eval()


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _predictor(name: str, precision: str, seed: int
               ) -> tuple[Callable[[torch.Tensor], Any], str, Callable[[Sequence[int]], int]]:
    """Candidate ``name`` as a (B, 1, D, H, W) -> (B, 16, D, H, W) callable, its description, and the
    MACs one sample of a given (D, H, W) costs it: the convolutions it computes, so masked kernels
    count for the models run as built and the dense backend (zeros computed), not for the sparse one."""
    from .inference.fastpath import accelerate
    from .models import create_model
    from .models.cost import model_cost

    torch.manual_seed(seed)

    def eager(model: nn.Module, channels_last: bool = False) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> Any:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with _autocast(precision):
                return model(x)

        return run

    if name in ("plain", "plain_cl"):
        model = _plain_unet()
        if name == "plain_cl":
            model = model.to(memory_format=torch.channels_last_3d)
        desc = "nnU-Net PlainConvUNet" + (" (channels_last_3d)" if name == "plain_cl" else "")
        return eager(model, name == "plain_cl"), desc, lambda shape: conv_macs(model, shape)
    if name == "segresnet":
        peer = _segresnet()
        return eager(peer), "MONAI SegResNet(16)", lambda shape: conv_macs(peer, shape)
    arch = "e2enet" if name.startswith("e2enet") else "e2enet_small"
    label = "E2ENet" if arch == "e2enet" else "E2ENet-small"
    if name.endswith("_dense"):
        model = create_model(arch, sparsity=0.9, seed=seed, num_classes=NUM_CLASSES).eval()
        return eager(model), f"{label} S=0.9 dense with zeros", \
            lambda shape: model_cost(model, tuple(shape)).macs_dense
    sparsity = 0.8 if "_s08" in name else 0.9
    model = create_model(arch, sparsity=sparsity, seed=seed, num_classes=NUM_CLASSES)
    blocks = ""
    if "_b" in name:
        from .sparse.compact import uniform_block_masks

        b = int(name.rsplit("_b", 1)[1])
        model.set_masks(uniform_block_masks(model, sparsity, b, seed=seed))
        blocks = f", {b}×{b} blocks"
    backend = "dense" if "_folded_" in name else "auto"
    fast = accelerate(model, precision, backend=backend)
    kind = "folded oneDNN, zeros kept" if backend == "dense" else f"fast ({fast.backend})"
    skips = getattr(fast, "backend", "") == "sparse"  # the dense backend and the fallback compute the zeros

    def macs(shape: Sequence[int]) -> int:
        cost = model_cost(model, tuple(shape))  # type: ignore[arg-type]
        return cost.macs_effective if skips else cost.macs_dense

    return fast, f"{label} S={sparsity} {kind}{blocks}", macs


def _build(name: str, size: int, precision: str, seed: int) -> _Candidate:
    torch.manual_seed(seed)
    x = torch.randn(1, 1, size, size, size)
    fn, desc, macs = _predictor(name, precision, seed)
    return _Candidate(name, desc, fn, x, macs)


def run_patch_benchmark(
    sizes: Sequence[int] = (64, 128),
    repeats: int = 5,
    *,
    precisions: Sequence[str] = ("fp32", "bf16"),
    models: Iterable[str] | None = None,
    threads: int | None = 2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    keep_memory: bool = False,
) -> list[dict[str, Any]]:
    """Time every candidate at every size and precision; interleaved rounds, medians, ratios.
    ``keep_memory``: every candidate runs inside :func:`keep_freed_memory` (the Trainer's setting);
    False (glibc's default, as the Predictor runs) faults every fresh tensor in again: the eager peers
    pay that per call, the fast path pools its buffers (128³, Zen 3 VM, one process per run: plain
    ~16 -> 11 s kept; fast path S=0.9 5.97 / 6.48 -> 7.11 / 6.76 s, peak RSS 1.6 -> 2.0 GB).

    Returns one dict per (size, precision, model): ``size``, ``precision``, ``model``,
    ``description``, ``median_s``, ``min_s``, ``times_s``, ``ratio_to_plain`` (None without
    ``plain``), or ``error`` when the candidate could not be built or run.
    """
    if threads:
        torch.set_num_threads(threads)
    names = list(models) if models is not None else list(DEFAULT_MODELS)
    unknown = set(names) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    say = progress or (lambda _msg: None)
    results: list[dict[str, Any]] = []
    with _freed_memory(keep_memory):
        for size in sizes:
            for precision in precisions:
                results.extend(_patch_runs(names, size, precision, repeats, seed, say))
    return results


def best_of_modes(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Best against best: per (size, precision, model), the row of the allocator mode (``runs``' keys,
    "returned" and "kept") with the lowest median, its ``ratio_to_plain`` recomputed against
    PlainConvUNet's best mode. Rows that failed in every mode are left out."""
    best: dict[tuple[int, str, str], dict[str, Any]] = {}
    for mode, rows in runs.items():
        for row in rows:
            key = (row["size"], row["precision"], row["model"])
            if "error" not in row and (key not in best or row["median_s"] < best[key]["median_s"]):
                best[key] = {**row, "freed_memory": mode}
    for (size, precision, _), row in best.items():
        plain = best.get((size, precision, "plain"))
        row["ratio_to_plain"] = row["median_s"] / plain["median_s"] if plain else None
    return list(best.values())


def format_best_table(rows: list[dict[str, Any]]) -> str:
    """The best-against-best rows: each candidate's fastest allocator mode and its ratio."""
    lines = ["", "best against best: each candidate with the allocator mode it ran fastest in "
                 "(the patch part ran once returned, then once kept, in this process)",
             f"  {'size':>5s} {'precision':9s} {'model':20s} {'mode':9s} {'median s':>9s} {'× plain':>8s}"]
    for r in rows:
        ratio = f"{r['ratio_to_plain']:.2f}" if r["ratio_to_plain"] is not None else "—"
        lines.append(f"  {r['size']:5d} {r['precision']:9s} {r['model']:20s} {r['freed_memory']:9s} "
                     f"{r['median_s']:9.3f} {ratio:>8s}")
    return "\n".join(lines)


def _freed_memory(keep: bool) -> contextlib.AbstractContextManager[Any]:
    from .allocator import keep_freed_memory

    return keep_freed_memory() if keep else contextlib.nullcontext()


def _patch_runs(names: list[str], size: int, precision: str, repeats: int, seed: int,
                say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rows of one (size, precision): every candidate built, warmed up and timed in interleaved rounds."""
    results: list[dict[str, Any]] = []
    cands: list[_Candidate] = []
    for name in names:
        try:
            cands.append(_build(name, size, precision, seed))
        except Exception as exc:  # a missing optional package or an unsupported combination
            results.append({"size": size, "precision": precision, "model": name, "error": repr(exc)})
    with torch.inference_mode():
        ok = []
        for c in cands:  # warm-up: kernel builds, oneDNN primitives, buffer pools
            say(f"{size}^3 {precision}: warm-up {c.name}")
            try:
                c.fn(c.x)
                ok.append(c)
            except Exception as exc:  # e.g. a 1-voxel bottleneck at a small size
                results.append({"size": size, "precision": precision, "model": c.name, "error": repr(exc)})
        cands = ok
        times: dict[str, list[float]] = {c.name: [] for c in cands}
        for r in range(repeats):
            for c in cands:
                t0 = time.perf_counter()
                c.fn(c.x)
                times[c.name].append(time.perf_counter() - t0)
            say(f"{size}^3 {precision}: round {r + 1}/{repeats} done")
    base = statistics.median(times["plain"]) if times.get("plain") else None
    peak = peak_gmacs(precision, _cores(torch.get_num_threads()))
    for c in cands:
        med = statistics.median(times[c.name])
        macs = c.macs((size,) * 3)
        results.append({
            "size": size, "precision": precision, "model": c.name, "description": c.description,
            "median_s": med, "min_s": min(times[c.name]), "times_s": times[c.name],
            "ratio_to_plain": (med / base) if base else None, "macs": macs, **_rate(macs, med, peak),
            "peak": peak,
        })
    return results


VOLUME_SHAPES = ((128, 256, 256), (300, 512, 512))
VOLUME_MODELS = ("plain", "e2enet_fast_s09", "e2enet_fast_s08")
TRAIN_MODELS = ("plain", "e2enet_s08", "small_s08")


def _synthetic_volume(shape: Sequence[int]) -> torch.Tensor:
    """A smooth (1, D, H, W) float32 test volume (content does not change the cost of a forward)."""
    d, h, w = (int(v) for v in shape)
    z = torch.arange(d, dtype=torch.float32).view(d, 1, 1)
    y = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    x = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    return (torch.sin(z / 7.0) + torch.cos(y / 11.0) * torch.sin(x / 13.0))[None].contiguous()


def _volume_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Child process body: one whole-volume sliding window; its own peak RSS is the measurement."""
    import resource

    from .inference.fastpath import borrow_outputs
    from .inference.sliding_window import TileGrid, sliding_window_argmax

    torch.set_num_threads(int(spec["threads"]))
    predictor, desc, macs = _predictor(spec["model"], spec["precision"], int(spec["seed"]))
    borrow_outputs(predictor)  # as the Predictor does: the fast path's logits stay in its arena
    image = _synthetic_volume(spec["shape"])
    with torch.inference_mode():
        predictor(torch.zeros(1, 1, *([int(spec["patch"])] * 3)))  # warm-up (kernel builds) outside the clock
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with _freed_memory(bool(spec.get("keep_memory", False))):
        t0 = time.perf_counter()
        labels = sliding_window_argmax(image, predictor, patch=int(spec["patch"]), num_classes=NUM_CLASSES,
                                       overlap=float(spec["overlap"]))
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    patch = (int(spec["patch"]),) * 3
    tiles = len(TileGrid.plan(tuple(spec["shape"]), patch, (float(spec["overlap"]),) * 3, "nnunet", "auto").tiles())
    pool = getattr(predictor, "_pool", None)  # the fast path's arena, part of the peak (MiB)
    return {"description": desc, "seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": rss_ready,
            "arena_mb": getattr(pool, "nbytes", 0) / 2**20,
            "labels_shape": list(labels.shape), "tiles": tiles, "macs": tiles * macs(patch),
            **_rate(tiles * macs(patch), seconds, peak_gmacs(spec["precision"], _cores(int(spec["threads"]))))}


def run_volume_benchmark(
    shapes: Sequence[Sequence[int]] = VOLUME_SHAPES,
    models: Iterable[str] = VOLUME_MODELS,
    *,
    patch: int = 128,
    overlap: float = 0.5,
    precision: str = "fp32",
    threads: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    keep_memory: bool = False,
) -> list[dict[str, Any]]:
    """Whole-volume inference through the project's sliding window (Gaussian, ``overlap``, float16
    accumulation), one subprocess per (shape, model) so that each peak RSS is that run's alone;
    ``keep_memory`` as in :func:`run_patch_benchmark`.

    Returns one dict per run: ``shape``, ``model``, ``description``, ``seconds``, ``peak_rss_mb``
    (the process's maximum resident set, MiB, model and input included), ``rss_before_mb`` (after
    building the model and the input), ``arena_mb`` (the fast path's planned buffers, 0 for other
    models), ``ratio_to_plain`` (time), or ``error``.
    """
    import subprocess

    say = progress or (lambda _msg: None)
    names = list(models)
    results: list[dict[str, Any]] = []
    for shape in shapes:
        rows = []
        for name in names:
            spec: dict[str, Any] = {"model": name, "shape": [int(v) for v in shape], "patch": patch, "overlap": overlap,
                    "precision": precision, "threads": threads, "seed": seed,
                    "keep_memory": keep_memory}
            say(f"volume {'x'.join(map(str, spec['shape']))}: {name}")
            proc = subprocess.run([sys.executable, "-m", "napari_e2enet.bench", "--volume-worker", json.dumps(spec)],
                                  capture_output=True, text=True, check=False)
            row: dict[str, Any] = {"shape": spec["shape"], "model": name, "patch": patch, "overlap": overlap,
                                   "precision": precision, "threads": threads}
            if proc.returncode == 0 and proc.stdout.strip():
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                row["error"] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            say(f"volume {'x'.join(map(str, spec['shape']))}: {name}: " + (
                f"{row['seconds']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MiB" if "seconds" in row else row["error"]))
            rows.append(row)
        base = next((r["seconds"] for r in rows if r["model"] == "plain" and "seconds" in r), None)
        for r in rows:
            r["ratio_to_plain"] = r["seconds"] / base if base and "seconds" in r else None
        results.extend(rows)
    return results


def training_candidate(name: str) -> tuple[str, float]:
    """(architecture, sparsity) of a training candidate: ``plain``, ``e2enet_sN`` or ``small_sN`` with
    S = N/10, N = 0..9; a leading zero is allowed (``e2enet_s08``), the spelling of the patch
    candidates (``e2enet_fast_s08``). A ``_dense`` suffix (``e2enet_s08_dense``) trains the same
    network without the sparse kernels (``training.sparse_conv``), all kernels computed as before.
    ValueError names the candidate and the accepted forms."""
    import re

    if name == "plain":
        return "plain", 0.0
    match = re.fullmatch(r"(e2enet|small)_s0?(\d)(?:_dense)?", name)
    if match is None:
        raise ValueError(f"unknown training candidate {name!r}: plain, e2enet_sN or small_sN "
                         "(S = N/10, N = 0..9, e.g. e2enet_s8 or e2enet_s08; _dense: without the sparse kernels)")
    return ("e2enet" if match[1] == "e2enet" else "e2enet_small"), int(match[2]) / 10


_PLAIN_STRIDE = 32  # PlainConvUNet above: 5 stride-2 stages


def check_training_candidates(models: Iterable[str], patch: int) -> None:
    """ValueError (one line) for an unknown candidate or a patch a candidate cannot train on: the
    deepest level must hold more than one voxel (InstanceNorm in training mode refuses 1×1×1) and the
    skip connections must line up, so the patch is a multiple of the total stride and at least twice it.
    Checked before any model is built, so a bad option ends the run in a second, not after the patch part."""
    from .models import model_config

    for name in models:
        arch, _ = training_candidate(name)
        if arch == "plain":
            stride = _PLAIN_STRIDE
        else:
            pools = model_config(arch, in_channels=1, num_classes=NUM_CLASSES).pools
            stride = max(math.prod(axis) for axis in zip(*pools))  # the patch is a cube
        if patch % stride or patch < 2 * stride:
            raise ValueError(f"patch {patch}: {name} downsamples by {stride}, so the training patch must be a "
                             f"multiple of {stride} and at least {2 * stride}")


def _train_model(name: str, seed: int) -> tuple[nn.Module, float]:
    from .models import create_model

    arch, sparsity = training_candidate(name)
    torch.manual_seed(seed)
    if arch == "plain":
        model = _plain_unet()
        model.decoder.deep_supervision = True
        return model.train(), 0.0
    return create_model(arch, sparsity=sparsity, seed=seed, num_classes=NUM_CLASSES).train(), sparsity


def run_training_benchmark(
    models: Iterable[str] = TRAIN_MODELS,
    *,
    patch: int = 64,
    batch: int = 2,
    iterations: int = 6,
    run_length: int = 1000,
    threads: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    keep_memory: bool = True,
) -> list[dict[str, Any]]:
    """Seconds per training iteration (forward, Dice + CE with deep supervision, backward, clip, SGD
    step, mask re-application) on random (batch, 1, patch³) data, interleaved, median over
    ``iterations`` after one warm-up; and the DSFF cost: re-applying the masks after every step plus
    one topology update (prune + regrow) every ΔT iterations, ΔT being the default for a
    ``run_length``-iteration run (``SparsityConfig.resolved_update_every``), as a % of training time.
    ``keep_memory``: every step inside :func:`keep_freed_memory`, as the Trainer does.
    """
    from .config import SparsityConfig
    from .sparse import DSFFUpdater
    from .training.losses import DeepSupervisionLoss
    from .training.sparse_conv import install_sparse_training

    models = list(models)
    check_training_candidates(models, patch)
    torch.set_num_threads(threads)
    say = progress or (lambda _msg: None)
    loss_fn = DeepSupervisionLoss()
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, patch, patch, patch, generator=gen)
    target = torch.randint(0, NUM_CLASSES, (batch, 1, patch, patch, patch), generator=gen)
    runs = []
    for name in models:
        model, sparsity = _train_model(name, seed)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)
        updater = None
        if sparsity > 0:
            # ΔT = 1 here so every timed call of the updater is a full topology update.
            updater = DSFFUpdater(model, opt, SparsityConfig(sparsity=sparsity, update_every=1), 10 * iterations,
                                  seed=seed)
        # as the Trainer does on the CPU: the masked fusion units skip their pruned kernels
        sparse = install_sparse_training(model) if updater is not None and not name.endswith("_dense") else None
        runs.append({"name": name, "model": model, "opt": opt, "updater": updater, "sparsity": sparsity,
                     "sparse_units": len(sparse.units) if sparse is not None else 0,
                     "step": [], "update": [], "apply": []})
    with _freed_memory(keep_memory):  # the Trainer and fine-tuning keep it
        for it in range(iterations + 1):
            _training_round(runs, it, loss_fn, images, target)
            say(f"training {patch}^3 b{batch}: iteration {it}/{iterations} done" + (" (warm-up)" if not it else ""))
    results = [_training_row(run, patch=patch, batch=batch, threads=threads, run_length=run_length, seed=seed)
               for run in runs]
    base = next((row["seconds_per_iteration"] for row in results if row["model"] == "plain"), None)
    for row in results:
        row["ratio_to_plain"] = row["seconds_per_iteration"] / base if base else None
    return results


def _training_round(runs: list[dict[str, Any]], it: int, loss_fn: nn.Module, images: torch.Tensor,
                    target: torch.Tensor) -> None:
    """One timed step of every candidate (iteration 0 is the warm-up), with its DSFF mask work."""
    from .training.loop import train_step

    for run in runs:
        t0 = time.perf_counter()
        train_step(run["model"], run["opt"], loss_fn, images, target)
        t1 = time.perf_counter()
        if run["updater"] is not None:
            run["updater"].apply()
            t2 = time.perf_counter()
            run["updater"].after_step(it + 1)  # re-applies the masks, then prunes and regrows
            t3 = time.perf_counter()
            if it:
                run["apply"].append(t2 - t1)
                run["update"].append(max(0.0, (t3 - t2) - (t2 - t1)))
        if it:
            run["step"].append(t1 - t0)


def _training_row(run: dict[str, Any], *, patch: int, batch: int, threads: int, run_length: int,
                  seed: int) -> dict[str, Any]:
    """One row of the training table from a candidate's timings (median step, DSFF cost, GMAC/s)."""
    from .config import SparsityConfig

    step = statistics.median(run["step"])
    row: dict[str, Any] = {"model": run["name"], "patch": patch, "batch": batch, "seconds_per_iteration": step,
                           "times_s": list(run["step"]),  # every timed step: the spread behind the median
                           "params": sum(p.numel() for p in run["model"].parameters()),
                           "sparse_units": run["sparse_units"]}
    if run["updater"] is not None:
        every = SparsityConfig(sparsity=run["sparsity"]).resolved_update_every(run_length)
        apply_s, update_s = statistics.median(run["apply"]), statistics.median(run["update"])
        row.update({"mask_apply_s": apply_s, "topology_update_s": update_s, "update_every": every,
                    "run_length": run_length,
                    "dsff_percent": 100 * (apply_s + update_s / every) / (step + apply_s + update_s / every)})
    row["threads"] = threads
    row["macs"] = _training_macs(run["name"], seed, patch, batch, skips=run.get("sparse_units", 0) > 0)
    row.update(_rate(row["macs"], step, peak_gmacs("fp32", _cores(threads))))
    return row


def format_table(results: list[dict[str, Any]], machine: dict[str, Any] | None = None) -> str:
    """A plain-text table (one block per size and precision) and the machine line."""
    lines = []
    if machine:
        lines.append(
            f"machine: {machine['cpu']} | {machine['threads']} threads of {machine['logical_cpus']} | "
            f"torch {machine['torch']} ({machine['cpu_capability']}) | bf16 native: {machine['bf16_native']} | "
            f"sparse kernels: {machine['sparse_kernels'] or 'not built'} | load avg {machine['loadavg']}"
            + (f" | freed memory {machine['freed_memory']}" if "freed_memory" in machine else "")
        )
    keys = sorted({(r["size"], r["precision"]) for r in results}, key=lambda k: (k[0], k[1] != "fp32", k[1]))
    for size, precision in keys:
        lines.append("")
        peak = next((r["peak"] for r in results if (r["size"], r["precision"]) == (size, precision) and "peak" in r),
                    None)
        lines.append(f"{size}^3, {precision}, batch 1, {NUM_CLASSES} classes — median of interleaved rounds"
                     + (f"; GMAC/s of the convs each path computes (the sparse path skips masked kernels), "
                        f"% of the {_peak_line(peak)}" if peak else ""))
        block = [r for r in results if (r["size"], r["precision"]) == (size, precision)]
        # --freed-memory best: each row names its pass; its ratio is against plain in the same pass
        names = [r["model"] + (f" {r['freed_memory']}" if "freed_memory" in r else "") for r in block]
        width = max([20, *map(len, names)])
        lines.append(f"  {'model':{width}s} {'description':44s} {'median s':>9s} {'min s':>8s} {'× plain':>8s} "
                     f"{'GMAC/s':>8s} {'% peak':>7s}")
        for name, r in zip(names, block, strict=True):
            if "error" in r:
                lines.append(f"  {name:{width}s} error: {r['error'][:80]}")
                continue
            ratio = f"{r['ratio_to_plain']:.2f}" if r["ratio_to_plain"] is not None else "—"
            lines.append(f"  {name:{width}s} {r['description'][:44]:44s} {r['median_s']:9.3f} {r['min_s']:8.3f} "
                         f"{ratio:>8s} {_rate_cells(r)}")
    return "\n".join(lines)


def format_volume_table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r:
            lines.append(f"  {shape:12s} {r['model']:18s} error: {r['error'][:80]}")
            continue
        ratio = f"{r['ratio_to_plain']:.2f}" if r.get("ratio_to_plain") is not None else "—"
        lines.append(f"  {shape:12s} {r['model']:18s} {r['seconds']:9.1f} s {r['peak_rss_mb']:9.0f} MiB {ratio:>8s} "
                     f"{_rate_cells(r)}")
    head = (f"whole volume, sliding window {results[0]['patch']}^3, overlap {results[0]['overlap']}, "
            f"{NUM_CLASSES} classes, {results[0]['precision']}" if results else "whole volume")
    if results:
        peak = peak_gmacs(results[0]["precision"], _cores(int(results[0].get("threads", 1))))
        head += f"; GMAC/s = tiles × MACs per tile / wall time (blending included), % of the {_peak_line(peak)}"
    return "\n".join(["", head, f"  {'shape':12s} {'model':18s} {'time':>11s} {'peak RSS':>13s} {'× plain':>8s} "
                                 f"{'GMAC/s':>8s} {'% peak':>7s}", *lines])


def _training_macs(name: str, seed: int, patch: int, batch: int, *, skips: bool) -> int:
    """MACs of one training step: 3 × the forward's (forward, input gradients, weight gradients; the
    first conv's input gradient is counted too) × batch; the masked kernels are left out where the
    sparse training kernels skip them. Counted on a fresh copy of candidate ``name`` (same seed, same
    masks): the trained one holds the training kernels' ctypes handles, which cannot be copied."""
    from .models import E2ENet
    from .models.cost import model_cost

    model, _ = _train_model(name, seed)
    if isinstance(model, E2ENet):
        cost = model_cost(model, (patch,) * 3)
        forward = cost.macs_effective if skips else cost.macs_dense
    else:
        forward = conv_macs(model, (patch,) * 3)
    return 3 * batch * forward


def format_training_table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        dsff = (f"{r['dsff_percent']:.2f} % (apply {r['mask_apply_s'] * 1e3:.1f} ms/it, update "
                f"{r['topology_update_s'] * 1e3:.0f} ms every {r['update_every']} it)") if "dsff_percent" in r else "—"
        ratio = f"{r['ratio_to_plain']:.2f}" if r.get("ratio_to_plain") is not None else "—"
        lines.append(f"  {r['model']:17s} {r['params'] / 1e6:7.2f} M {r['seconds_per_iteration']:9.2f} {ratio:>8s} "
                     f"{_rate_cells(r)}   {dsff}")
    head = (f"training step, {results[0]['patch']}^3 batch {results[0]['batch']}, fp32 (median)" if results else "training")
    if results:
        peak = peak_gmacs("fp32", _cores(int(results[0].get("threads", 1))))
        head += (f"; GMAC/s = 3 × forward MACs × batch per step (masked kernels left out where the sparse "
                 f"training kernels skip them), % of the {_peak_line(peak)}")
    return "\n".join(["", head, f"  {'model':17s} {'params':>9s} {'s/it':>9s} {'× plain':>8s} {'GMAC/s':>8s} "
                                 f"{'% peak':>7s}   DSFF cost", *lines])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default=None, help="also write the results to this file")
    parser.add_argument("--volume-worker", help=argparse.SUPPRESS)  # internal: one whole-volume run (JSON spec)
    args = parser.parse_args(argv)
    if args.volume_worker:
        print(json.dumps(_volume_worker(json.loads(args.volume_worker))))
        return 0
    torch.set_num_threads(args.threads)
    machine = machine_info()
    results = run_patch_benchmark(args.sizes, args.repeats, precisions=args.precisions, models=args.models,
                                  threads=args.threads, progress=lambda m: print(m, file=sys.stderr, flush=True))
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    print(format_table(results, machine))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine, "results": results, "command": " ".join(sys.argv)}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
