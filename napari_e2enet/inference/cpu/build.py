"""Compiling ``kernels.c`` into a shared library: CPU families, flags, compiler, on-disk cache.

The kernels ship as C source (package data) and are compiled on first use with the system C
compiler, once per *family* of CPUs (flags below), and cached on disk under a name that hashes
everything the binary depends on: the source and header bytes, the flags, the compiler's path and
``--version`` text, and the CPU model (the flags tune for it). A family is only ever built and
loaded on a CPU that can run it (:func:`cpu_families`): AVX-512 code on an AVX2 CPU would die of
SIGILL, not raise.

Families (x86-64; any other machine gets ``generic``):

- ``avx512``: AVX-512 F/BW/CD/DQ/VL on top of ``avx2`` (the x86-64-v4 level), 512-bit vectors
  preferred; the convolution uses 8-row tiles;
- ``avx2``: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE (the x86-64-v3 level); 4-row tiles;
- ``generic``: the compiler's baseline for the machine (SSE2 on x86-64, NEON on arm64).

The levels are spelled as ``-m`` feature flags rather than ``-march=x86-64-v3/-v4`` because GCC
< 11 and Clang < 12 do not know those names, and a user with such a compiler would silently get
the 2-4x slower generic build. All families get ``-O3 -ffp-contract=fast -std=gnu11`` and
``-mtune=native`` (x86-64), and ``-fopenmp`` where the compiler has OpenMP (else the library runs
single-threaded).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("kernels.c", "kernels.h", "kernels_train.c")  # kernels_train.c: the training kernels
FAMILIES = ("avx512", "avx2", "generic")

_BASE_FLAGS = ("-O3", "-ffp-contract=fast", "-std=gnu11", "-fPIC", "-shared")
_V3_FLAGS = ("-mavx", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mmovbe")
_V4_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512cd", "-mavx512dq", "-mavx512vl")
_FAMILY_FLAGS = {
    "avx512": (*_V3_FLAGS, *_V4_FLAGS, "-mprefer-vector-width=512", "-mtune=native"),
    "avx2": (*_V3_FLAGS, "-mtune=native"),
    "generic": (),
}
# /proc/cpuinfo flags each family's -march level needs (x86-64-v3 / -v4 as GCC and Clang define them)
_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_NEEDS = {"avx512": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}, "avx2": _V3, "generic": set()}
WARNING_FLAGS = ("-Wall", "-Wextra", "-Werror")
SANITIZER_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g")


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message carries the compiler's last lines."""


@dataclass(frozen=True)
class Build:
    """A compiled kernel library on disk."""

    path: Path
    family: str
    flags: tuple[str, ...]
    compiler: str
    openmp: bool


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_families() -> tuple[str, ...]:
    """The kernel families this CPU can run, fastest first; always ends with ``generic``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("generic",)
    flags = cpu_flags()
    if flags is None:  # no /proc/cpuinfo: ask PyTorch which vector level it dispatched to
        import torch

        capability = str(torch.backends.cpu.get_cpu_capability()).upper()
        level = {"AVX512": 2, "AVX2": 1}.get(capability, 0)
        return FAMILIES[2 - level:]
    return tuple(f for f in FAMILIES if _NEEDS[f] <= flags)


def find_compiler(compiler: str | None = None) -> str | None:
    """Absolute path of the C compiler to use: ``compiler`` if given, else ``$CC``, ``cc``, ``gcc``
    or ``clang`` (the first found); None when there is none."""
    candidates = [compiler] if compiler else [os.environ.get("CC"), "cc", "gcc", "clang"]
    for name in candidates:
        if name:
            found = shutil.which(name)
            if found:
                return found
    return None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/napari-e2enet/kernels`` (``~/.cache/...``); ``$NAPARI_E2ENET_CACHE`` replaces
    ``$XDG_CACHE_HOME/napari-e2enet`` (a test and CI escape hatch; the API takes ``cache_dir``)."""
    root = os.environ.get("NAPARI_E2ENET_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "napari-e2enet"
    return base / "kernels"


def flags_for(family: str, *, openmp: bool = True, warnings_as_errors: bool = False,
              sanitize: bool = False) -> tuple[str, ...]:
    """Compiler flags of a family. ``warnings_as_errors`` adds ``-Wall -Wextra -Werror`` (what the
    test suite builds with; user builds do not, so that a newer compiler's new warning cannot cost
    a user the fast path); ``sanitize`` builds for AddressSanitizer + UBSan (tests only)."""
    if family not in _FAMILY_FLAGS:
        raise ValueError(f"unknown kernel family {family!r}; expected one of {', '.join(FAMILIES)}")
    flags = [*_BASE_FLAGS, *_FAMILY_FLAGS[family]]
    if sanitize:
        flags = [f if f != "-O3" else "-O1" for f in flags] + list(SANITIZER_FLAGS)
    if warnings_as_errors:
        flags += WARNING_FLAGS
    if openmp:
        flags.append("-fopenmp")
    elif warnings_as_errors:
        flags.append("-Wno-unknown-pragmas")  # the omp pragmas are meant to be ignored there
    return tuple(flags)


def compiler_has_openmp(cc: str) -> bool:
    """Whether ``cc -fopenmp`` compiles and links a shared library that calls the OpenMP runtime."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [cc, "-fopenmp", "-fPIC", "-shared", "-o", str(Path(tmp) / "omp.so"), str(SOURCE_DIR / "omp_probe.c")]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120, check=False).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def _compiler_version(cc: str) -> str:
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"{cc} --version failed: {exc}") from None
    return proc.stdout.strip()


def _cpu_model() -> str:
    """What ``-mtune=native`` depends on."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("model name", "CPU part")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(cc: str, flags: tuple[str, ...], source_dir: Path = SOURCE_DIR) -> str:
    """Hex digest of the sources, the flags, the compiler (path and version) and the CPU model."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (source_dir / name).read_bytes() + b"\0")
    for part in (" ".join(flags), cc, _compiler_version(cc), _cpu_model()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:24]


def _compile(cc: str, flags: tuple[str, ...], source_dir: Path, target: Path) -> None:
    """Compile into ``target`` (atomically: concurrent builders end with one complete file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, *flags, "-I", str(source_dir), "-o", str(out),
               *(str(source_dir / name) for name in SOURCES if name.endswith(".c"))]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError(f"{' '.join(cmd)}: {exc}") from None
        if proc.returncode != 0 or not out.exists():
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            errors = [ln for ln in lines if "error" in ln] or lines
            raise KernelBuildError(f"{Path(cc).name} exited {proc.returncode} building the {flags_family(flags)} "
                                   f"kernels: {' | '.join(errors[:4])[:1500]}")
        os.replace(out, target)


def flags_family(flags: tuple[str, ...]) -> str:
    """The family whose vector flags a flag list carries."""
    if "-mavx512f" in flags:
        return "avx512"
    return "avx2" if "-mavx2" in flags else "generic"


def build_library(family: str, *, compiler: str | None = None, cache_dir: Path | None = None,
                  warnings_as_errors: bool = False, sanitize: bool = False,
                  source_dir: Path = SOURCE_DIR, for_this_cpu: bool = True, openmp: bool | None = None) -> Build:
    """The compiled library of ``family`` (compiled now unless cached); raises
    :class:`KernelBuildError` with the compiler's message when it cannot be built.

    OpenMP is tried first; when that build fails and one without ``-fopenmp`` succeeds, the
    compiler has no OpenMP and the library runs single-threaded (``Build.openmp`` False);
    ``openmp`` True or False builds only that variant. A family this CPU cannot run is refused
    (its code would crash the process, not raise) unless ``for_this_cpu`` is False: then it is
    only compiled (the tests check that every family builds with warnings as errors), and must
    not be loaded."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; expected one of {', '.join(FAMILIES)}")
    if for_this_cpu and family not in cpu_families():
        raise KernelBuildError(f"this CPU cannot run {family} code (it can run: {', '.join(cpu_families())})")
    cc = find_compiler(compiler)
    if cc is None:
        raise KernelBuildError(f"no C compiler found ({compiler or '$CC, cc, gcc, clang'})")
    if os.name != "posix":
        raise KernelBuildError(f"the kernels are built on Linux and macOS only, not {os.name}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    first_error: KernelBuildError | None = None
    for with_omp in (True, False) if openmp is None else (openmp,):
        flags = flags_for(family, openmp=with_omp, warnings_as_errors=warnings_as_errors, sanitize=sanitize)
        target = cache / f"e2e_kernels-{family}-{cache_key(cc, flags, source_dir)}.so"
        if target.exists():
            return Build(target, family, flags, cc, with_omp)
        try:
            _compile(cc, flags, source_dir, target)
        except KernelBuildError as exc:
            first_error = first_error or exc
            continue
        except OSError as exc:  # unwritable or full cache folder
            raise KernelBuildError(f"cannot write the kernel cache {cache} ({exc.strerror or exc})") from None
        return Build(target, family, flags, cc, with_omp)
    assert first_error is not None
    raise first_error
