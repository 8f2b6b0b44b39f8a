"""Device choice: ``auto`` → CUDA, then MPS where Conv3d works, then CPU."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator

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


class ThreadChooser:
    """Picks torch's intra-op thread count for a loop of similar CPU steps by timing them.

    Why: on a 2-core CPU with other work running (napari drawing, another process), torch's two
    OpenMP threads wait on each other; a fine-tune step of the bundled model took 20 s with 2 threads
    and 4.5 s with 1 (measured, load 5). On a quiet machine 2 threads win. So: the first step runs
    with the current count (warm-up, not timed), then one step with each candidate; the fastest is
    kept and the others are timed again every ``probe_every`` steps (the load changes). Use as a
    context manager: the process-wide count is restored on exit.

    Usage::

        with ThreadChooser() as threads:
            for step in range(n):
                with threads.step():
                    ...
    """

    def __init__(self, candidates: tuple[int, ...] | None = None, probe_every: int = 20) -> None:
        full = torch.get_num_threads()
        self.candidates = tuple(dict.fromkeys(candidates or (full, 1)))
        self.probe_every = max(2, probe_every)
        self.seconds: dict[int, float] = {}
        self.current = self.candidates[0]
        self._steps = 0
        self._saved = full

    def __enter__(self) -> ThreadChooser:
        self._saved = torch.get_num_threads()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._saved)

    def _next(self) -> tuple[int, bool]:
        """(threads for this step, whether to time it)."""
        if self._steps == 0 or len(self.candidates) == 1:
            return self.current, self._steps > 0
        untimed = [c for c in self.candidates if c not in self.seconds]
        if untimed:
            return untimed[0], True
        others = [c for c in self.candidates if c != self.current]
        if self._steps % self.probe_every == 0:
            return others[(self._steps // self.probe_every) % len(others)], True
        return self.current, True

    @contextlib.contextmanager
    def step(self) -> Iterator[int]:
        threads, timed = self._next()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        yield threads
        if timed:
            seconds = time.perf_counter() - t0
            old = self.seconds.get(threads)
            self.seconds[threads] = seconds if old is None else 0.5 * old + 0.5 * seconds
            if len(self.seconds) == len(self.candidates):
                self.current = min(self.seconds, key=self.seconds.__getitem__)
        self._steps += 1
