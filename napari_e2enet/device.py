"""Device choice: ``auto`` → CUDA, then MPS where Conv3d works, then CPU."""

from __future__ import annotations

import warnings

import torch

from .errors import InputError


def _mps_conv3d_works() -> bool:
    try:
        conv = torch.nn.Conv3d(1, 1, 3).to("mps")
        conv(torch.zeros(1, 1, 4, 4, 4, device="mps"))
        return True
    except Exception:
        return False


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; an unavailable explicit device is an InputError."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            if _mps_conv3d_works():
                return torch.device("mps")
            warnings.warn("MPS is available but Conv3d does not run on it; using the CPU", stacklevel=2)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise InputError("device 'mps' requested but MPS is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX (bf16 then runs ~2x faster than fp32)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
