"""``napari-e2enet bench --parts train`` with its default candidates (it once failed on its own default
``e2enet_s08``), and its option checks, which end the run before any measuring starts."""

from __future__ import annotations

import json

import pytest

from napari_e2enet import bench
from napari_e2enet.cli import main


def test_default_training_candidates_parse_and_both_spellings_agree():
    assert [bench.training_candidate(name) for name in bench.TRAIN_MODELS] == [
        ("plain", 0.0), ("e2enet", 0.8), ("e2enet_small", 0.8)]
    assert bench.training_candidate("e2enet_s8") == bench.training_candidate("e2enet_s08")
    assert bench.training_candidate("small_s0") == ("e2enet_small", 0.0)
    for bad in ("e2enet_s10", "e2enet_s", "small_s8x", "unet"):
        with pytest.raises(ValueError, match="unknown training candidate"):
            bench.training_candidate(bad)


@pytest.mark.slow
def test_bench_train_runs_with_its_default_models(capfd):
    """The smallest budget the defaults can train on: one 64³ patch (PlainConvUNet and the paper
    E2ENet downsample by 32), batch 1, one timed step after the warm-up (about 2.5 min here). The
    console code runs in this process: a child would add only its imports."""
    capfd.readouterr()
    code = main(["bench", "--parts", "train", "--train-patch", "64", "--train-batch", "1", "--train-iterations", "1",
                 "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    rows = {r["model"]: r for r in json.loads(out)["training"]}
    assert list(rows) == list(bench.TRAIN_MODELS)
    assert all(r["seconds_per_iteration"] > 0 and r["patch"] == 64 and r["batch"] == 1 for r in rows.values())
    assert rows["plain"]["ratio_to_plain"] == 1.0
    for name in ("e2enet_s08", "small_s08"):  # sparse fusion: its DSFF cost is reported
        assert 0 < rows[name]["dsff_percent"] < 100


@pytest.mark.parametrize("extra", [["--train-patch", "32"], ["--train-models", "small_s8", "e2enet_s10"]])
def test_bench_train_bad_option_is_one_line_before_the_patch_part(extra, capfd, monkeypatch):
    # the patch part (first in the default order) would take minutes: it must not even start
    def patch_part(*args, **kwargs):
        raise AssertionError("the patch part started before the training options were checked")

    monkeypatch.setattr(bench, "run_patch_benchmark", patch_part)
    capfd.readouterr()
    code = main(["bench", "--parts", "patch", "train", *extra])
    out, err = capfd.readouterr()
    assert code == 2, err[-500:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--train-models/--train-patch" in lines[0], lines
    assert "Traceback" not in err and out == ""
