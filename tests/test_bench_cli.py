import json
import subprocess
import sys


def test_bench_json_reports_machine_and_medians():
    proc = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "bench", "--sizes", "32", "--repeats", "1",
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
