"""The CPU fast path's C kernels: ``kernels.c``/``kernels.h`` (package data), their build per CPU
family (:mod:`.build`) and their checked ctypes bindings (:mod:`.bindings`).

Why C: on CPU, for E2ENet's kernel-sparse fusion layers at 80-90 % sparsity, neither oneDNN's
dense or grouped convolutions nor ``torch.sparse`` skip the pruned kernels profitably; a small
kernel library does (2.5-4x faster than dense oneDNN at density 0.1). The measurements and the
design are in ``docs/cpu-fast-path.md``.
"""

from .bindings import KernelBuildError, KernelLibrary, best_library, load
from .build import FAMILIES, cpu_families, find_compiler

__all__ = ["FAMILIES", "KernelBuildError", "KernelLibrary", "best_library", "cpu_families", "find_compiler", "load"]
