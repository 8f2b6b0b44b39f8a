import json
import subprocess
import sys


def test_bench_json_reports_machine_and_medians():
    proc = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "bench", "--parts", "patch", "--sizes", "32", "--repeats", "1",
                           "--precisions", "fp32", "--models", "small_dense", "small_fast_s09", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert {"cpu", "threads", "torch", "bf16_native"} <= set(report["machine"])
    assert report["machine"]["freed_memory"] == "returned in inference, kept in training"  # as predict, train run
    rows = {r["model"]: r for r in report["results"]}
    assert set(rows) == {"small_dense", "small_fast_s09"}
    assert all(r["median_s"] > 0 for r in rows.values())
    # achieved GMAC/s of the convs each path computes: the sparse path skips ~90 % of the fusion MACs
    assert rows["small_fast_s09"]["macs"] < rows["small_dense"]["macs"]
    for r in rows.values():
        assert abs(r["gmacs_per_s"] - r["macs"] / r["median_s"] / 1e9) < 1e-6 * r["gmacs_per_s"]
        assert 0 < r["peak_share"] < 1 and r["peak"]["mac_per_cycle"] in (8, 16, 32)


def test_bench_best_compares_each_candidate_in_its_faster_allocator_mode():
    """--freed-memory best: the patch part once with freed memory returned, once kept, in one process;
    each candidate's best row is the faster of its two, and its ratio is against plain's best."""
    proc = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "bench", "--parts", "patch", "--sizes", "64",
                           "--repeats", "1", "--precisions", "fp32", "--models", "plain", "small_fast_s09",
                           "--freed-memory", "best", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["machine"]["freed_memory"] == "best"
    runs = {(r["model"], r["freed_memory"]): r for r in report["results"] if "error" not in r}
    assert set(runs) == {(m, mode) for m in ("plain", "small_fast_s09") for mode in ("returned", "kept")}
    best = {r["model"]: r for r in report["best"]}
    for model, row in best.items():
        assert row["median_s"] == min(runs[(model, mode)]["median_s"] for mode in ("returned", "kept"))
        assert row["freed_memory"] in ("returned", "kept")
    assert best["plain"]["ratio_to_plain"] == 1.0
    assert best["small_fast_s09"]["ratio_to_plain"] == best["small_fast_s09"]["median_s"] / best["plain"]["median_s"]


def test_bench_unknown_candidate_is_exit_2():
    proc = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "bench", "--models", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_bench_volume_reports_time_and_peak_rss_per_run():
    # two fast-path candidates: the eager small_dense in bf16 took 52 s of this test's 78 on an AVX2
    # CPU (bf16 emulated by oneDNN), the fast ones 0.6 s each
    proc = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "bench", "--parts", "volume", "--volume-shapes",
                           "40x48x48", "--volume-patch", "32", "--volume-models", "small_fast_s08", "small_fast_s09",
                           "--volume-precision", "bf16", "--freed-memory", "kept", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["machine"]["freed_memory"] == "kept"
    rows = {r["model"]: r for r in report["volume"]}
    assert set(rows) == {"small_fast_s08", "small_fast_s09"}
    for row in rows.values():
        assert row["precision"] == "bf16"  # --volume-precision reaches the worker
        assert row["labels_shape"] == [40, 48, 48]
        assert row["seconds"] > 0 and row["peak_rss_mb"] >= row["rss_before_mb"] > 0
        assert row["ratio_to_plain"] is None  # no plain in this run
        assert row["tiles"] == 8 and 0 < row["peak_share"] < 1  # 40x48x48 in 32³ tiles at overlap 0.5: 2 × 2 × 2


def test_bench_training_rows_and_dsff_cost():
    from napari_e2enet.bench import run_training_benchmark
    from napari_e2enet.config import SparsityConfig

    rows = {r["model"]: r for r in run_training_benchmark(["small_s8", "small_s0"], patch=32, batch=1, iterations=2,
                                                           run_length=2000)}
    assert rows["small_s8"]["seconds_per_iteration"] > 0 and rows["small_s0"]["seconds_per_iteration"] > 0
    for row in rows.values():  # every timed step is reported, the median is one of them
        assert len(row["times_s"]) == 2 and min(row["times_s"]) <= row["seconds_per_iteration"] <= max(row["times_s"])
    assert rows["small_s8"]["update_every"] == SparsityConfig(sparsity=0.8).resolved_update_every(2000)
    assert 0 < rows["small_s8"]["dsff_percent"] < 100
    assert "dsff_percent" not in rows["small_s0"]  # dense fusion: no updater, no DSFF cost
    assert rows["small_s8"]["params"] == rows["small_s0"]["params"]
    assert rows["small_s0"]["gmacs_per_s"] > 0 and rows["small_s8"]["macs"] <= rows["small_s0"]["macs"]


def test_bench_rejects_bad_volume_shape_and_training_model():
    for extra in (["--parts", "volume", "--volume-shapes", "300x512"], ["--parts", "train", "--train-models", "nope"]):
        proc = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "bench", *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-500:]
        assert len(proc.stderr.strip().splitlines()) == 1


def test_peak_and_mac_counts_follow_the_isa_and_the_conv_shapes():
    import torch

    from napari_e2enet.bench import conv_macs, mac_per_cycle, peak_gmacs

    assert mac_per_cycle("fp32", {"avx2", "fma"}) == (16, "AVX2+FMA fp32")
    assert mac_per_cycle("fp32", {"avx2", "fma", "avx512f"})[0] == 32
    assert mac_per_cycle("bf16", {"avx2", "fma"}) == (16, "AVX2+FMA fp32 (bf16 emulated)")
    assert mac_per_cycle("bf16", {"avx512f", "avx512_bf16"})[0] == 64
    assert mac_per_cycle("bf16", {"avx512f", "avx512_bf16", "amx_bf16"})[0] == 1024
    zen4 = {"avx2", "fma", "avx512f", "avx512_bf16", "amd_zen4_avx512"}  # 512-bit ops on 256-bit units
    assert mac_per_cycle("fp32", zen4) == (16, "AVX-512 fp32 (Zen 4: 256-bit units)")
    assert mac_per_cycle("bf16", zen4) == (32, "AVX512-BF16 (Zen 4: 256-bit units)")
    peak = peak_gmacs("fp32", 2)
    assert peak["gmacs"] is None or abs(peak["gmacs"] - 2 * peak["ghz"] * peak["mac_per_cycle"]) < 1e-9
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ConvTranspose3d(4, 3, 2, stride=2))
    # conv: 8³ outputs × 4 × 2 × 27; transposed: 8³ inputs × 4 × 3 × 8 (per input voxel)
    assert conv_macs(net, (8, 8, 8)) == 512 * 4 * 2 * 27 + 512 * 4 * 3 * 8
