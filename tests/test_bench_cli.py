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
    rows = {r["model"]: r for r in report["results"]}
    assert set(rows) == {"small_dense", "small_fast_s09"}
    assert all(r["median_s"] > 0 for r in rows.values())


def test_bench_unknown_candidate_is_exit_2():
    proc = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "bench", "--models", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_bench_volume_reports_time_and_peak_rss_per_run():
    proc = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "bench", "--parts", "volume", "--volume-shapes",
                           "40x48x48", "--volume-patch", "32", "--volume-models", "small_dense", "small_fast_s09",
                           "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["model"]: r for r in json.loads(proc.stdout)["volume"]}
    assert set(rows) == {"small_dense", "small_fast_s09"}
    for row in rows.values():
        assert row["labels_shape"] == [40, 48, 48]
        assert row["seconds"] > 0 and row["peak_rss_mb"] >= row["rss_before_mb"] > 0
        assert row["ratio_to_plain"] is None  # no plain in this run


def test_bench_training_rows_and_dsff_cost():
    from napari_e2enet.bench import run_training_benchmark
    from napari_e2enet.config import SparsityConfig

    rows = {r["model"]: r for r in run_training_benchmark(["small_s8", "small_s0"], patch=32, batch=1, iterations=2,
                                                           run_length=2000)}
    assert rows["small_s8"]["seconds_per_iteration"] > 0 and rows["small_s0"]["seconds_per_iteration"] > 0
    assert rows["small_s8"]["update_every"] == SparsityConfig(sparsity=0.8).resolved_update_every(2000)
    assert 0 < rows["small_s8"]["dsff_percent"] < 100
    assert "dsff_percent" not in rows["small_s0"]  # dense fusion: no updater, no DSFF cost
    assert rows["small_s8"]["params"] == rows["small_s0"]["params"]


def test_bench_rejects_bad_volume_shape_and_training_model():
    for extra in (["--parts", "volume", "--volume-shapes", "300x512"], ["--parts", "train", "--train-models", "nope"]):
        proc = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "bench", *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-500:]
        assert len(proc.stderr.strip().splitlines()) == 1
