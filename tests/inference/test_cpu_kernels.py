"""The C kernels of ``napari_e2enet.inference.cpu``: build, bindings and equivalence to PyTorch.

Every family is compiled with ``-Wall -Wextra -Werror`` (the ones this CPU cannot run are only
compiled), and every family it can run is loaded and checked against PyTorch reference
convolutions, pools and norms. Where a C compiler exists a failed build FAILS these tests; they
skip only on a machine without any compiler, whose path (the dense fallback, reported as such) is
tested here too. One test reruns the equivalence tests in a subprocess on sanitizer builds
(AddressSanitizer + UBSan, ``LD_PRELOAD`` of libasan), and one shows that a deliberately broken
kernel is caught. Shapes stay tiny (2 shared cores).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from napari_e2enet.inference.cpu import bindings, build
from napari_e2enet.inference.cpu.compact import (
    ComputedUp,
    Kernels,
    LazyNorm,
    PaddedPlanar,
    conv_csc,
    convt_csr,
    depth_offsets,
    kernel_status,
)
from napari_e2enet.inference.fastpath import AcceleratedE2ENet, accelerate, backend_info
from napari_e2enet.models import create_model

ROOT = Path(__file__).resolve().parents[2]
CC = build.find_compiler()
HAS_OPENMP = CC is not None and build.compiler_has_openmp(CC)
SANITIZE = os.environ.get("NAPARI_E2ENET_TEST_SANITIZE") == "1"  # set by test_sanitizers_find_nothing
needs_compiler = pytest.mark.skipif(CC is None, reason="no C compiler here (the no-compiler path is tested below)")
X86 = platform.machine().lower() in ("x86_64", "amd64")
COMPILED_FAMILIES = build.FAMILIES if X86 else ("generic",)


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture(scope="module", params=build.cpu_families())
def kernels(request: pytest.FixtureRequest, kernel_cache: Path) -> Kernels:
    """The kernels of one family this CPU runs, built with warnings as errors (a failed build
    fails the test: only a machine without a compiler skips)."""
    if CC is None:
        pytest.skip("no C compiler here")
    lib = bindings.load(request.param, cache_dir=kernel_cache, warnings_as_errors=True, sanitize=SANITIZE,
                        **({"openmp": True} if HAS_OPENMP else {}))
    assert lib.family == request.param and lib.openmp == HAS_OPENMP
    return Kernels(lib)


# -- the table, the header and the build -------------------------------------------------------


def _header_signatures(text: str) -> dict[str, tuple[str, tuple[tuple[str, str], ...]]]:
    """The exported functions declared in kernels.h, in the form of bindings.SIGNATURES."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    found = {}
    for declaration in text.split(";"):
        match = re.fullmatch(r"\s*(.*?)\b(e2e_\w+)\s*\((.*)\)\s*", declaration, re.S)
        if match is None:
            continue
        ret, name, params = match.groups()
        parsed = []
        for param in params.split(","):
            param = " ".join(param.split())
            if param in ("void", ""):
                continue
            ptype, pname = re.fullmatch(r"(.*?)\s*(\w+)", param).groups()  # type: ignore[union-attr]
            parsed.append((re.sub(r"\s*\*", " *", ptype).strip(), pname))
        found[name] = (" ".join(ret.split()), tuple(parsed))
    return found


def test_signature_table_matches_the_header():
    header = _header_signatures((build.SOURCE_DIR / "kernels.h").read_text())
    assert len(header) == len(bindings.SIGNATURES) >= 10
    for name, signature in header.items():
        assert bindings.SIGNATURES.get(name) == signature, name
    sources = "".join((build.SOURCE_DIR / name).read_text() for name in build.SOURCES if name.endswith(".c"))
    defined = set(re.findall(r"^(?:int|void) (e2e_\w+)\(", sources, re.M))
    assert defined == set(header)
    abi = re.search(r"#define E2E_ABI_VERSION (\d+)", (build.SOURCE_DIR / "kernels.h").read_text())
    pad = re.search(r"#define E2E_PAD_FLOATS (\d+)", (build.SOURCE_DIR / "kernels.h").read_text())
    assert abi and int(abi.group(1)) == bindings.ABI_VERSION
    assert pad and int(pad.group(1)) == bindings.PAD_FLOATS


def test_no_c_source_in_python_files():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "napari_e2enet").rglob("*.py")
                 if re.search(r"^\s*#\s*include\s*[<\"]", p.read_text(encoding="utf-8"), re.M)]
    assert offenders == []


@needs_compiler
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "single-thread"])
@pytest.mark.parametrize("family", COMPILED_FAMILIES)
def test_every_family_compiles_with_warnings_as_errors(family, openmp, kernel_cache):
    if openmp and not HAS_OPENMP:
        pytest.skip(f"{CC} has no OpenMP")
    built = build.build_library(family, cache_dir=kernel_cache, warnings_as_errors=True, for_this_cpu=False,
                                openmp=openmp)
    assert built.path.is_file() and built.openmp == openmp
    assert "-Werror" in built.flags and ("-fopenmp" in built.flags) == openmp
    assert build.flags_family(built.flags) == family


def test_cpu_families_are_ordered_and_end_with_generic():
    families = build.cpu_families()
    assert families[-1] == "generic"
    assert list(families) == [f for f in build.FAMILIES if f in families]
    if X86 and build.cpu_flags() is not None:
        flags = build.cpu_flags() or set()
        assert ("avx2" in families) == ("avx2" in flags and "fma" in flags)
        assert ("avx512" in families) == ({"avx512f", "avx512bw", "avx512vl"} <= flags)


@needs_compiler
def test_cache_key_covers_source_flags_and_compiler(tmp_path, kernel_cache):
    flags = build.flags_for("generic")
    key = build.cache_key(CC, flags)
    assert key == build.cache_key(CC, flags)
    copy = tmp_path / "src"
    shutil.copytree(build.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (copy / "kernels.c").write_text((copy / "kernels.c").read_text() + "\n/* changed */\n")
    assert build.cache_key(CC, flags, copy) != key
    assert build.cache_key(CC, build.flags_for("generic", openmp=False)) != key
    wrapper = tmp_path / "cc-wrapper"
    wrapper.symlink_to(CC)
    assert build.cache_key(str(wrapper), flags) != key
    first = build.build_library("generic", cache_dir=tmp_path / "cache")
    stamp = first.path.stat().st_mtime_ns
    again = build.build_library("generic", cache_dir=tmp_path / "cache")
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # cached, not rebuilt


def test_build_refuses_what_cannot_run_or_build(tmp_path):
    with pytest.raises(ValueError, match="unknown kernel family"):
        build.build_library("sse9", cache_dir=tmp_path)
    foreign = [f for f in build.FAMILIES if f not in build.cpu_families()]
    for family in foreign:  # its code would die of SIGILL here, so it is never loaded
        with pytest.raises(build.KernelBuildError, match="cannot run"):
            build.build_library(family, cache_dir=tmp_path)
    with pytest.raises(build.KernelBuildError, match="no C compiler"):
        build.build_library("generic", compiler=str(tmp_path / "no-such-cc"), cache_dir=tmp_path)


@needs_compiler
def test_a_compile_error_is_one_message_with_the_compiler_output(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(build.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    text = (copy / "kernels.c").read_text()
    # an unused variable: a warning, which the tests' -Werror turns into a failed build
    (copy / "kernels.c").write_text(text.replace("int e2e_row_block(void) { return RB; }",
                                                 "int e2e_row_block(void) { int unused_here = 1; return RB; }"))
    with pytest.raises(build.KernelBuildError, match="unused_here") as info:
        build.build_library("generic", cache_dir=tmp_path / "cache", warnings_as_errors=True, source_dir=copy,
                            openmp=False)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache").glob("*.so"))  # no half-written library left behind


# -- the kernels against PyTorch, under every family this CPU runs ---------------------------


def _sconv_reference(x: torch.Tensor, weight: torch.Tensor, norm: LazyNorm, shift: torch.Tensor) -> torch.Tensor:
    xin = norm.apply(x)
    d = x.shape[1]
    shifted = torch.zeros_like(xin)
    for c in range(x.shape[0]):
        s = int(shift[c])
        lo, hi = max(0, -s), min(d, d - s)
        shifted[c, lo:hi] = xin[c, lo + s:hi + s]
    return F.conv2d(shifted.transpose(0, 1), weight[:, :, 0], padding=1).transpose(0, 1)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _sconv_error(k: Kernels, shape: tuple[int, int, int, int, int], seed: int, *, bf16: bool = False) -> float:
    """Max |kernel - PyTorch| of one sparse (1,3,3) conv with lazy norm and depth shift. ``bf16``:
    the bf16 kernel, on bf16 inputs and weights through a norm that is exact in bf16 (scales and
    slope powers of two, no offset), so that its products are the fp32 reference's."""
    i, o, d, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(i, d, h, w, generator=gen)
    weight = torch.randn(o, i, 1, 3, 3, generator=gen) * (torch.rand(o, i, generator=gen) < 0.5)[:, :, None, None, None]
    norm = LazyNorm(torch.rand(i, generator=gen) + 0.5, torch.randn(i, generator=gen), torch.full((i,), 0.01))
    if bf16:
        x, weight = _bf16(x), _bf16(weight)
        norm = LazyNorm(2.0 ** torch.randint(-2, 3, (i,), generator=gen).float(), torch.zeros(i), torch.full((i,), 0.25))
    shift = depth_offsets(i)
    ref = _sconv_reference(x, weight, norm, shift)
    src = PaddedPlanar.from_dense(x)
    out = PaddedPlanar(o, d, h, w)
    stats = torch.zeros(2 * o, dtype=torch.float64)
    conv = conv_csc(weight)
    k.sconv133(conv.in_bf16() if bf16 else conv, src.channel_ptrs(), shift, out, stats, norm=norm)
    halo = max(float(out.planes[:, :, 0].abs().max()), float(out.planes[:, :, :, w:].abs().max()))
    assert halo == 0.0  # halo rows and padding columns stay zero
    sums = float((stats[:o] - ref.double().sum((1, 2, 3))).abs().max()) / max(1.0, float(ref.abs().sum()) / o)
    squares = float((stats[o:] - (ref.double() ** 2).sum((1, 2, 3))).abs().max()) / max(1.0, float((ref ** 2).sum()) / o)
    return max(float((out.interior - ref).abs().max()), sums, squares)


def test_kernels_match_torch_on_odd_shapes(kernels):
    """Each PP kernel on shapes that exercise partial tiles, lazy norm and the halo."""
    k = kernels
    # widths at and around whole 16-column tiles; up to 50 output channels
    shapes = [(7, 5, 3, 5, 9), (12, 4, 2, 17, 33), (5, 3, 1, 1, 1), (9, 6, 4, 9, 20), (4, 8, 2, 6, 16),
              (4, 8, 2, 6, 48), (5, 48, 2, 5, 64), (6, 50, 2, 5, 40), (3, 49, 1, 3, 17)]
    for n, shape in enumerate(shapes):
        assert _sconv_error(k, shape, 14 + n) < 1e-4, shape
    torch.manual_seed(14)
    for kernel in [(2, 2, 2), (1, 2, 2), (1, 1, 1)]:
        u = torch.randn(6, 2, 3, 5)
        wt = torch.randn(6, 4, *kernel) * (torch.rand(6, 4) < 0.6)[:, :, None, None, None]
        norm = LazyNorm(torch.rand(6) + 0.5, torch.randn(6), torch.full((6,), 0.01))
        ref = F.conv_transpose3d(norm.apply(u)[None], wt, stride=kernel)[0]
        out = PaddedPlanar(4, *ref.shape[1:])
        k.convt(convt_csr(wt), PaddedPlanar.from_dense(u), out, norm=norm)
        assert float((out.interior - ref).abs().max()) < 1e-5, kernel
        pooled = PaddedPlanar(4, *u.shape[1:])
        k.maxpool(PaddedPlanar.from_dense(ref), kernel, pooled)
        assert torch.equal(pooled.interior, F.max_pool3d(ref[None], kernel, kernel)[0]), kernel
        normed = PaddedPlanar(4, *u.shape[1:])
        k.maxpool(PaddedPlanar.from_dense(ref), kernel, normed, norm=LazyNorm(torch.full((4,), 2.0),
                                                                              torch.full((4,), -0.5),
                                                                              torch.full((4,), 0.1)))
        expect = F.max_pool3d(F.leaky_relu(2 * ref - 0.5, 0.1)[None], kernel, kernel)[0]
        assert torch.allclose(normed.interior, expect, atol=1e-6), kernel
    x = torch.randn(5, 2, 3, 20)
    head_w = torch.randn(3, 5)
    norm = LazyNorm(torch.rand(5) + 0.5, torch.randn(5), torch.full((5,), 0.01))
    out = torch.empty(3, 2, 3, 20)
    k.head(PaddedPlanar.from_dense(x), head_w, out, norm=norm)
    ref = torch.einsum("kc,cdhw->kdhw", head_w, norm.apply(x))
    assert float((out - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("low", [(5, 6, 16), (3, 7, 24), (2, 3, 8)], ids=["full-tiles", "odd-rows", "one-tile"])
def test_up_channels_computed_in_the_fusion_conv_equals_convt_then_conv(kernels, low):
    """e2e_sconv133_up: the up-sampled channels made row block by row block inside the conv give the
    same output and statistics as the ConvT into a buffer and the conv reading it (depth shifts at
    both ends, lazy norms on both inputs, an up channel no kernel reads, rows not a multiple of RB)."""
    k = kernels
    g = torch.Generator().manual_seed(sum(low))
    deep_c, up_c, fwd_c, out_c = 12, 6, 5, 7
    depth, height, width = (2 * n for n in low)
    deep = PaddedPlanar.from_dense(torch.randn(deep_c, *low, generator=g))
    read = torch.tensor([0, 2, 3, 5])  # the up channels with kernels; 1 and 4 unread
    convt = convt_csr((torch.randn(deep_c, up_c, 2, 2, 2, generator=g)
                       * (torch.rand(deep_c, up_c, 1, 1, 1, generator=g) < 0.5))[:, read])
    deep_norm = LazyNorm(torch.rand(deep_c, generator=g) + 0.5, torch.randn(deep_c, generator=g),
                         torch.full((deep_c,), 0.01))
    up = PaddedPlanar(len(read), depth, height, width)
    k.convt(convt, deep, up, norm=deep_norm)
    fwd = PaddedPlanar.from_dense(torch.randn(fwd_c, depth, height, width, generator=g))
    up_map = torch.full((up_c,), -1, dtype=torch.int32)
    up_map[read] = torch.arange(len(read), dtype=torch.int32)
    weight = torch.randn(out_c, fwd_c + up_c, 1, 3, 3, generator=g) * (torch.rand(out_c, fwd_c + up_c, 1, 1, 1,
                                                                                  generator=g) < 0.6)
    weight[:, fwd_c:][:, up_map < 0] = 0
    csc, shift = conv_csc(weight), depth_offsets(fwd_c + up_c)
    norm = LazyNorm.cat([LazyNorm(torch.rand(fwd_c, generator=g) + 0.5, torch.randn(fwd_c, generator=g),
                                  torch.full((fwd_c,), 0.01)), LazyNorm.identity(up_c)])
    ptrs = torch.zeros(fwd_c + up_c, dtype=torch.int64)
    ptrs[:fwd_c] = fwd.channel_ptrs()
    ptrs[fwd_c + read] = up.channel_ptrs()
    stored, computed = PaddedPlanar(out_c, depth, height, width), PaddedPlanar(out_c, depth, height, width)
    stats_stored, stats_computed = torch.zeros(2 * out_c, dtype=torch.float64), torch.zeros(2 * out_c, dtype=torch.float64)
    k.sconv133(csc, ptrs, shift, stored, stats_stored, norm=norm)
    ptrs[fwd_c:] = 0  # not read: the kernel computes these channels
    k.sconv133(csc, ptrs, shift, computed, stats_computed, norm=norm,
               up=ComputedUp(fwd_c, up_map, convt, deep, deep_norm))
    assert float(stored.interior.abs().max()) > 0
    assert torch.allclose(computed.buffer, stored.buffer, rtol=1e-6, atol=1e-6)
    assert torch.allclose(stats_computed, stats_stored, rtol=1e-9)
    unread = up_map.clone()
    unread[read[0]] = -1  # an up channel the conv reads, given no ConvT output
    with pytest.raises(ValueError, match="no ConvT output"):
        k.sconv133(csc, ptrs, shift, computed, None, up=ComputedUp(fwd_c, unread, convt, deep, deep_norm))
    with pytest.raises(ValueError, match="W a multiple of 16"):
        odd = PaddedPlanar.from_dense(torch.randn(deep_c, low[0], low[1], 5, generator=g))
        k.sconv133(csc, ptrs, shift, PaddedPlanar(out_c, depth, height, 10), None,
                   up=ComputedUp(fwd_c, up_map, convt, odd, None))


def test_bf16_conv_matches_torch_on_bf16_values(kernels):
    """The bf16 (1,3,3) conv (AVX512-BF16 dot products, taps paired across rows) on values that
    bf16 holds exactly equals the fp32 reference: every tap, partial tile, halo and statistic.
    Families or CPUs without it refuse the call instead of crashing."""
    conv = conv_csc(torch.randn(2, 2, 1, 3, 3)).in_bf16()
    if not kernels.bf16:
        src, out = PaddedPlanar.from_dense(torch.randn(2, 1, 3, 3)), PaddedPlanar(2, 1, 3, 3)
        with pytest.raises(ValueError, match="AVX512-BF16"):
            kernels.sconv133(conv, src.channel_ptrs(), depth_offsets(2), out, None)
        return
    shapes = [(7, 5, 3, 5, 9), (12, 4, 2, 17, 33), (5, 3, 1, 1, 1), (9, 6, 4, 9, 20), (5, 48, 2, 5, 64),
              (6, 50, 2, 5, 40), (3, 49, 1, 3, 17), (4, 8, 2, 16, 16), (4, 8, 1, 19, 16)]
    for n, shape in enumerate(shapes):
        assert _sconv_error(kernels, shape, 40 + n, bf16=True) < 1e-4, shape


def test_bf16_weight_pairs_hold_the_taps_in_kernel_order():
    """(nnz, 9) taps → 12 bf16 pairs per kernel, low half first: (q0,q3) (q1,q4) (q2,q5) (q6,0)
    (q7,0) (q8,0) (0,q0) (0,q1) (0,q2) (q3,q6) (q4,q7) (q5,q8); values rounded to bf16."""
    taps = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1.0 + 2.0 ** -10]])
    words = bindings.bf16_weight_pairs(taps)
    assert words.dtype == torch.int32 and tuple(words.shape) == (1, 12)
    halves = words.view(torch.int16).view(torch.bfloat16).float().view(12, 2)  # little-endian: low half first
    expect = [(1, 4), (2, 5), (3, 6), (7, 0), (8, 0), (1, 0), (0, 1), (0, 2), (0, 3), (4, 7), (5, 8), (6, 1)]
    assert halves.tolist() == [[float(a), float(b)] for a, b in expect]  # 1 + 2^-10 rounds to 1
    negative = bindings.bf16_weight_pairs(torch.full((2, 9), -0.5)).view(torch.int16).view(torch.bfloat16).float()
    pattern = [[-0.5, -0.5]] * 3 + [[-0.5, 0.0]] * 3 + [[0.0, -0.5]] * 3 + [[-0.5, -0.5]] * 3
    assert negative.view(2, 12, 2).tolist() == [pattern, pattern]  # sign bits stay in their half


def test_channels_last_kernels_match_torch(kernels):
    """Shift (with depth stride and fused norm), statistics, norm + activation, CL → PP."""
    k = kernels
    torch.manual_seed(15)
    x = torch.randn(6, 7, 5, 9).contiguous(memory_format=torch.channels_last)  # (D, C, H, W)
    runs = torch.tensor([[0, 3, 1], [3, 5, 0], [5, 7, -1]], dtype=torch.int32)
    scale, shift = torch.rand(7) + 0.5, torch.randn(7)
    for stride in (1, 2):
        d_out = (6 - 1) // stride + 1
        act = F.leaky_relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), 0.01)
        for fused in (True, False):
            out = k.cl_shift(x, runs, d_out, stride, scale, shift, 0.01) if fused else k.cl_shift(x, runs, d_out, stride)
            src = act if fused else x
            ref = torch.zeros(d_out, 7, 5, 9)
            for c0, c1, delta in runs.tolist():
                for d in range(d_out):
                    if 0 <= stride * d + delta < 6:
                        ref[d, c0:c1] = src[stride * d + delta, c0:c1]
            assert torch.allclose(out, ref, atol=1e-6), (stride, fused)
    stats = k.cl_stats(x)
    assert torch.allclose(stats[:7], x.double().sum((0, 2, 3)), atol=1e-4)
    assert torch.allclose(stats[7:], (x.double() ** 2).sum((0, 2, 3)), atol=1e-4)
    y = x.clone()
    k.cl_norm_act(y, scale, shift, 0.01)
    assert torch.allclose(y, F.leaky_relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), 0.01), atol=1e-6)
    pp = k.cl_to_pp(x)
    assert torch.equal(pp.interior, x.permute(1, 0, 2, 3))
    assert float(pp.planes[:, :, 0].abs().max()) == 0.0 and float(pp.planes[:, :, :, 9:].abs().max()) == 0.0


def test_channels_last_kernels_match_torch_in_bf16(kernels):
    """The bf16 encoder's copies (issue 18): shift, statistics and CL → PP read bfloat16 and the
    shift writes it, rounded to nearest even like torch; 16 channels take the vector transposes."""
    k = kernels
    torch.manual_seed(18)
    runs = torch.tensor([[0, 5, 1], [5, 11, 0], [11, 16, -1]], dtype=torch.int32)
    x32 = (torch.randn(5, 16, 4, 11) * 3).contiguous(memory_format=torch.channels_last)
    x16 = x32.to(torch.bfloat16)
    scale, shift = torch.rand(16) + 0.5, torch.randn(16)

    def shifted(src: torch.Tensor, stride: int) -> torch.Tensor:
        d_out = (5 - 1) // stride + 1
        ref = torch.zeros(d_out, 16, 4, 11, dtype=src.dtype)
        for c0, c1, delta in runs.tolist():
            for d in range(d_out):
                if 0 <= stride * d + delta < 5:
                    ref[d, c0:c1] = src[stride * d + delta, c0:c1]
        return ref

    for stride in (1, 2):
        d_out = (5 - 1) // stride + 1
        for src in (x16, x32):
            for dtype in (torch.bfloat16, torch.float32):
                if src.dtype == dtype == torch.float32:
                    continue  # the float32 kernels: test above
                out = k.cl_shift(src, runs, d_out, stride, dtype=dtype)
                assert out.dtype == dtype and torch.equal(out, shifted(src, stride).to(dtype)), (src.dtype, dtype)
                fused = k.cl_shift(src, runs, d_out, stride, scale, shift, 0.01, dtype=dtype)
                act = F.leaky_relu(src.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), 0.01)
                # one bf16 step at most: the kernel's fused multiply-add may round differently
                assert torch.allclose(fused.float(), shifted(act, stride).to(dtype).float(), rtol=2 ** -7, atol=1e-6)
    stats = k.cl_stats(x16)
    assert torch.allclose(stats[:16], x16.double().sum((0, 2, 3)), atol=1e-3)
    assert torch.allclose(stats[16:], (x16.double() ** 2).sum((0, 2, 3)), atol=1e-3)
    for c in (16, 7):
        pp = k.cl_to_pp(x16[:, :c].contiguous(memory_format=torch.channels_last))
        assert torch.equal(pp.interior, x16[:, :c].float().permute(1, 0, 2, 3)), c
        assert float(pp.planes[:, :, 0].abs().max()) == 0.0 and float(pp.planes[:, :, :, 11:].abs().max()) == 0.0
    nan = torch.full((1, 16, 1, 2), float("nan")).contiguous(memory_format=torch.channels_last)
    whole = torch.tensor([[0, 16, 0]], dtype=torch.int32)
    assert k.cl_shift(nan, whole, 1, dtype=torch.bfloat16).isnan().all()  # a NaN stays a NaN


def test_sparse_network_matches_torch(kernels):
    """The whole accelerated sparse forward on this family's kernels equals ``model.eval()``."""
    torch.manual_seed(16)
    model = create_model("e2enet_small", sparsity=0.9, seed=16).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        ref = model(x)
    fast = AcceleratedE2ENet(model, "fp32", "sparse", kernels, "test").eval()
    assert fast.backend_name == f"sparse-{kernels.family}"
    assert float((fast(x) - ref).abs().max()) <= 1e-4


def test_library_reports_its_build(kernels):
    lib = kernels.library
    assert lib.row_block == (8 if lib.family == "avx512" else 4)
    assert lib.family in lib.describe() and ("OpenMP" in lib.describe()) == lib.openmp
    assert kernels.backend == f"sparse-{lib.family}"


# -- the bindings refuse what would crash ----------------------------------------------------


def test_bindings_refuse_bad_arguments_before_calling_c(kernels):
    lib = kernels.library
    x = PaddedPlanar.from_dense(torch.randn(4, 2, 5, 9))
    out = PaddedPlanar(3, 2, 5, 9)
    csc = conv_csc(torch.randn(3, 4, 1, 3, 3))
    good = dict(chan=x.channel_ptrs(), dshift=depth_offsets(4), colptr=csc.colptr, rowidx=csc.rowidx,
                weights=csc.weights, out=out, depth_range=(0, 2))
    lib.sconv133(**good)  # the reference call works

    def refused(match: str, **changes) -> None:
        with pytest.raises(ValueError, match=match):
            lib.sconv133(**{**good, **changes})

    refused("must be torch.float32", weights=csc.weights.double())
    refused("shape", weights=csc.weights[:-1])
    refused("contiguous", weights=torch.randn(9, csc.nnz).t())
    refused("must be torch.int64", chan=x.channel_ptrs().int())
    refused("null or unaligned", chan=torch.zeros(4, dtype=torch.int64))
    refused("null or unaligned", chan=x.channel_ptrs() + 4)
    refused("rowidx holds indices outside", rowidx=csc.rowidx + 3)
    bad_colptr = csc.colptr.clone()
    bad_colptr[1], bad_colptr[2] = bad_colptr[2], bad_colptr[1] - 1
    refused("must rise", colptr=bad_colptr)
    refused("-1, 0 or 1", dshift=torch.full((4,), 2, dtype=torch.int32))
    refused("depth range", depth_range=(0, 3))
    refused("norm a", norm=(torch.ones(3), torch.zeros(4), torch.ones(4)))
    refused("stats", stats=torch.zeros(6))
    refused("threads", threads=0)
    small = PaddedPlanar(3, 2, 5, 9)
    small.buffer = small.buffer[: small.buffer.numel() - 200]
    refused("the layout needs", out=small)
    shifted = PaddedPlanar(3, 2, 5, 9)
    shifted.buffer = torch.zeros(shifted.buffer.numel() + 16)[1:shifted.buffer.numel() + 1]
    refused("aligned", out=shifted)
    released = PaddedPlanar(3, 2, 5, 9)
    released.buffer = None  # type: ignore[assignment]
    refused("released", out=released)
    refused("not a padded planar", out=object())
    with pytest.raises(ValueError, match="3 factors of 1 or 2"):
        lib.convt(x=x, rowptr=torch.zeros(2, dtype=torch.int32), colidx=torch.zeros(0, dtype=torch.int32),
                  weights=torch.zeros(0, 27), kernel=(3, 3, 3), out=PaddedPlanar(1, 6, 15, 27))
    with pytest.raises(ValueError, match="expected 4"):
        lib.maxpool(x=x, kernel=(1, 1, 1), out=PaddedPlanar(3, 2, 5, 9))
    with pytest.raises(ValueError, match="channels_last"):
        lib.cl_norm_act(x=torch.randn(2, 3, 4, 5), scale=torch.ones(3), shift=torch.zeros(3), slope=0.1)
    cl = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="scale"):
        lib.cl_norm_act(x=cl, scale=torch.ones(4), shift=torch.zeros(3), slope=0.1)
    with pytest.raises(ValueError, match="starts must rise"):
        lib.cl_shift(x=cl, out=torch.empty_like(cl), starts=torch.tensor([0, 2], dtype=torch.int32),
                     deltas=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="out"):
        lib.head(x=x, weight=torch.randn(2, 4), out=torch.empty(2, 2, 5, 8))
    with pytest.raises(ValueError, match="a 4 → 3 conv got 3 input channels"):
        kernels.sconv133(csc, x.channel_ptrs()[:3], depth_offsets(3), out, None)


# -- no compiler: the dense path, and it says so --------------------------------------------


def test_without_a_compiler_the_dense_path_runs_and_says_why(monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("NAPARI_E2ENET_NO_KERNELS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang on it
    monkeypatch.setenv("NAPARI_E2ENET_CACHE", str(tmp_path / "cache"))
    kernels_now, reason = kernel_status()
    assert kernels_now is None and reason.startswith("no C compiler")
    model = create_model("e2enet_small", sparsity=0.9, seed=17).eval()
    fast = accelerate(model)
    assert backend_info(fast) == {"backend": "dense", "backend_reason": reason}
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert float((fast(x) - model(x)).abs().max()) <= 1e-4
    with pytest.raises(RuntimeError, match="no C compiler"):
        accelerate(model, backend="sparse")
    assert not (tmp_path / "cache").exists()


def test_predictor_describe_names_the_backend(monkeypatch, tmp_path):
    from napari_e2enet.config import InferenceConfig
    from napari_e2enet.inference import Predictor

    predictor = Predictor.from_bundled("mni152-tissue", InferenceConfig(device="cpu"))
    info = predictor.describe()
    expected = backend_info(predictor.network)
    assert info["backend"] == expected["backend"] and info["backend_reason"] == expected["backend_reason"]
    assert re.fullmatch(r"sparse-(avx512|avx2|generic)|dense", info["backend"])
    off = Predictor.from_bundled("mni152-tissue", InferenceConfig(device="cpu", accelerate=False)).describe()
    assert off["backend"] == "dense" and "accelerate is off" in off["backend_reason"]
    monkeypatch.setenv("NAPARI_E2ENET_NO_KERNELS", "1")
    without = Predictor.from_bundled("mni152-tissue", InferenceConfig(device="cpu")).describe()
    assert without["backend"] == "dense" and "NAPARI_E2ENET_NO_KERNELS" in without["backend_reason"]


# -- sanitizers and a broken kernel ---------------------------------------------------------


@needs_compiler
@pytest.mark.skipif(SANITIZE, reason="this is the sanitizer run itself")
def test_sanitizers_find_nothing(tmp_path):
    """The equivalence tests again, on AddressSanitizer + UBSan builds of every family this CPU
    runs (and the training kernels' on the best family), in a subprocess with libasan preloaded
    (Python itself is not instrumented)."""
    libasan = subprocess.run([CC, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not libasan or not Path(libasan).is_file():
        pytest.skip(f"{CC} has no libasan.so")
    env = {**os.environ, "NAPARI_E2ENET_TEST_SANITIZE": "1", "LD_PRELOAD": str(Path(libasan).resolve()),
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=86",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87"}
    # -s: a sanitizer report goes to fd 2 and ends the process, so pytest must not capture it
    # this file's equivalence tests (kernels.c, every family) and the training kernels' (kernels_train.c)
    training = ROOT / "tests" / "training" / "test_sparse_conv.py"
    cmd = [sys.executable, "-m", "pytest", __file__, str(training), "-q", "-s", "-p", "no:randomly",
           "-p", "no:cacheprovider", "-k", "match or refuse or equals", "-x", "-rA", f"--basetemp={tmp_path / 'run'}"]
    if "xdist" in sys.modules:
        cmd += ["-n", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "AddressSanitizer" not in tail and "runtime error" not in tail, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 3 * len(build.cpu_families()), tail
    for test in ("test_sparse_conv_equals_the_dense_masked_conv", "test_sparse_up_conv_equals_the_dense_masked"):
        assert f"PASSED tests/training/test_sparse_conv.py::{test}" in proc.stdout, tail


@needs_compiler
def test_a_broken_kernel_is_caught(tmp_path):
    """Proof that the equivalence check can fail: one tap of the convolution read from the wrong
    weight, built from a copy of the sources, must be reported."""
    copy = tmp_path / "src"
    shutil.copytree(build.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    text = (copy / "kernels.c").read_text()
    assert text.count("if (j < RB) A[j] += q1 * xc;") == 1
    (copy / "kernels.c").write_text(text.replace("if (j < RB) A[j] += q1 * xc;", "if (j < RB) A[j] += q2 * xc;"))
    broken = Kernels(bindings.load("generic", cache_dir=tmp_path / "cache", source_dir=copy))
    assert _sconv_error(broken, (7, 5, 3, 5, 9), 14) > 1e-2
