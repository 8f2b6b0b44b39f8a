"""Load: 50 phantom volumes, sharded over two concurrent ``predict`` processes, and memory that stays
flat across 50 cases in one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import HERE, Child, assert_valid_labels_file, child_env, write_phantom_cases

pytestmark = pytest.mark.slow

N = 50
MB = 1 << 20


@pytest.fixture(scope="module")
def fifty(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fifty") / "images"
    return folder, write_phantom_cases(folder, range(N))


def test_fifty_volumes_over_two_concurrent_shards(tmp_path, assets, fifty):
    inputs, images = fifty
    out = tmp_path / "segs"
    children = [Child(["predict", "-i", str(inputs), "-o", str(out), "--model", str(assets.model3), "--device", "cpu",
                       "--num-parts", "2", "--part-id", str(part), "--json"]) for part in (0, 1)]
    parts = []
    for child in children:  # both run at the same time; wait for both
        assert child.finish(timeout=600) == 0, child.text_err
        report = json.loads(child.text_out)
        assert {c["status"] for c in report["cases"]} == {"ok"}
        parts.append({c["case"] for c in report["cases"]})
    assert not parts[0] & parts[1]
    assert parts[0] | parts[1] == {f"case{i:03d}" for i in range(N)}
    assert len(parts[0]) == len(parts[1]) == N // 2
    assert sorted(p.name for p in out.iterdir()) == [f"case{i:03d}.nii.gz" for i in range(N)]  # no temporaries
    for i, image in enumerate(images):
        assert_valid_labels_file(out / f"case{i:03d}.nii.gz", image)


def test_memory_is_flat_from_the_5th_to_the_50th_volume(tmp_path, assets, fifty):
    inputs, _ = fifty
    out = tmp_path / "segs"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-B", str(HERE / "_rss_driver.py"), str(assets.model3), str(inputs),
                           str(out)], capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout)["rss"]
    assert len(rss) == N
    growth = rss[-1] - rss[4]
    peak = max(rss[4:]) - rss[4]
    print(f"\nRSS after case 1: {rss[0] / MB:.1f} MB, case 5: {rss[4] / MB:.1f} MB, case 50: {rss[-1] / MB:.1f} MB; "
          f"growth 5->50: {growth / MB:+.1f} MB, peak above case 5: {peak / MB:.1f} MB")
    assert growth < 50 * MB, [round(r / MB, 1) for r in rss]
    assert len(list(out.iterdir())) == N
