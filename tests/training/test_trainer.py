import csv
import threading

import numpy as np
import pytest
import torch

from napari_e2enet.sparse import ConnectivityRecord
from napari_e2enet.training import Trainer, load_model, load_state
from napari_e2enet.training.loop import poly_lr


def run(config, run_dir, dataset, **kwargs):
    trainer = Trainer(config, run_dir, dataset=dataset, **kwargs)
    events = list(trainer.iter_fit())
    return trainer, events


def test_a_run_writes_everything_a_user_and_napari_read(tmp_path, tiny_train_config, tiny_phantoms):
    _, events = run(tiny_train_config, tmp_path, tiny_phantoms)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("iteration") == 8
    assert kinds.count("validation") == 2 and kinds.count("checkpoint") == 2
    assert kinds.count("topology") == 3  # updates at 2, 4, 6 (never at the last iteration)
    for name in ("config.json", "model.safetensors", "training_state.pt", "metrics.csv", "connectivity.json"):
        assert (tmp_path / name).is_file(), name

    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [4, 8]
    assert all(0.0 <= float(r["val_dice_mean"]) <= 1.0 for r in rows)

    record = ConnectivityRecord.from_json(tmp_path / "connectivity.json")
    assert len(record.select("update")) == 3
    assert [e["iteration"] for e in record.select("epoch")] == [0, 4, 8]

    model, meta = load_model(tmp_path / "model.safetensors")
    assert {"plan", "labels", "train_config"} <= set(meta)
    assert meta["mirror_axes"] == [0, 1]  # AMOS names a side: no left-right (network W) flips, nor in TTA
    assert meta["plan"]["orientation"] == "RAS"  # every case reaches the network in one anatomical order
    intended = meta["intended_input"]  # phantoms: CT in HU, voxel sizes of the training cases
    assert intended["modality"] == "CT" and intended["intensity"] == "HU" and not intended["skull_stripped"]
    spacings = [v for i in range(len(tiny_phantoms.cases)) for v in tiny_phantoms.load(i)[0].spacing]
    assert intended["spacing_mm"] == pytest.approx([min(spacings), max(spacings)], abs=1e-3)
    assert model.masks()
    for mw in model.maskable():  # pruned kernels are exactly zero in the shipped weights
        dead = ~mw.module.kernel_mask
        assert (mw.weight[dead] == 0).all()
    assert model.sparsity == pytest.approx(0.8, abs=0.02)
    state = load_state(tmp_path / "training_state.pt")
    assert state["iteration"] == 8


def test_learning_rate_follows_the_poly_schedule():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_train_config, tiny_phantoms, optimizer):
    tiny_train_config = tiny_train_config.replace(optimizer=optimizer, lr=0.003 if optimizer == "adamw" else 0.01)
    full, _ = run(tiny_train_config, tmp_path / "full", tiny_phantoms)

    stop = threading.Event()
    trainer = Trainer(tiny_train_config, tmp_path / "split", dataset=tiny_phantoms, stop=stop)
    for event in trainer.iter_fit():
        if event.kind == "iteration" and event.iteration == 3:  # mid-epoch, after a topology update
            stop.set()
    assert trainer.summary.stopped and trainer.summary.iterations == 3
    assert load_state(tmp_path / "split" / "training_state.pt")["iteration"] == 3

    resumed, events = run(tiny_train_config, tmp_path / "split", tiny_phantoms, resume=True)
    assert events[0].iteration == 3 and events[-1].kind == "done"
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    np.testing.assert_array_equal(
        np.genfromtxt(tmp_path / "full" / "metrics.csv", delimiter=",", skip_header=1)[:, :3],
        np.genfromtxt(tmp_path / "split" / "metrics.csv", delimiter=",", skip_header=1)[:, :3],
    )


def test_a_run_from_before_the_mirror_option_resumes_mirroring_every_axis(tmp_path, tiny_train_config, tiny_phantoms):
    import json

    stop = threading.Event()
    trainer = Trainer(tiny_train_config, tmp_path, dataset=tiny_phantoms, stop=stop)
    for event in trainer.iter_fit():
        if event.kind == "iteration" and event.iteration == 2:
            stop.set()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["data"].pop("mirror") == "auto"
    (tmp_path / "config.json").write_text(json.dumps(config))  # as an older version wrote it
    resumed, _ = run(tiny_train_config, tmp_path, tiny_phantoms, resume=True)
    assert resumed.config.data.mirror == "all"
    assert load_model(tmp_path / "model.safetensors")[1]["mirror_axes"] == [0, 1, 2]


def test_closing_the_generator_saves_the_last_completed_iteration(tmp_path, tiny_train_config, tiny_phantoms):
    trainer = Trainer(tiny_train_config, tmp_path, dataset=tiny_phantoms)
    gen = trainer.iter_fit()
    for event in gen:
        if event.kind == "iteration" and event.iteration == 2:
            break
    gen.close()
    assert load_state(tmp_path / "training_state.pt")["iteration"] == 2


def test_resume_without_state_is_a_clear_error(tmp_path, tiny_train_config):
    from napari_e2enet.errors import InputError

    with pytest.raises(InputError, match="no training state"):
        Trainer(tiny_train_config, tmp_path, resume=True)


def test_an_unlabelled_case_is_a_one_line_error(tiny_train_config):
    """An in-memory Dataset may hold a case without labels; training refuses it by name (it was an
    AttributeError from deep in preprocessing, found by mypy)."""
    from napari_e2enet.data import Dataset
    from napari_e2enet.errors import InputError

    rng = np.random.default_rng(0)
    images = [rng.normal(size=(16, 16, 16)).astype(np.float32) for _ in range(2)]
    dataset = Dataset.from_arrays(images, [(images[0] > 0).astype(np.uint8), None], names=["a", "b"])
    with pytest.raises(InputError, match="case b has no label map"):
        list(Trainer(tiny_train_config, None, dataset=dataset).iter_fit())


def test_fine_tuning_starts_from_a_model_file_and_keeps_its_plan(tmp_path, tiny_train_config, tiny_phantoms):
    run(tiny_train_config.replace(iterations=4), tmp_path / "base", tiny_phantoms)
    base, base_meta = load_model(tmp_path / "base" / "model.safetensors")
    tuned, _ = run(tiny_train_config.replace(iterations=4), tmp_path / "tuned", tiny_phantoms,
                   init_from=tmp_path / "base" / "model.safetensors")
    _, meta = load_model(tmp_path / "tuned" / "model.safetensors")
    assert meta["plan"] == base_meta["plan"]
    assert tuned.model.config == base.config


def test_train_cli_options_reach_the_config():
    import argparse

    from napari_e2enet.cli import _train_args, train_config_from_args
    from napari_e2enet.config import DataConfig, TrainConfig

    parser = argparse.ArgumentParser()
    _train_args(parser)
    cfg = train_config_from_args(parser.parse_args(
        ["--out", "run", "--optimizer", "adamw", "--lr", "0.003", "--mirror", "none", "--foreground-oversample", "0.67"]))
    assert (cfg.optimizer, cfg.lr, cfg.data.mirror, cfg.data.foreground_oversample) == ("adamw", 0.003, "none", 0.67)
    assert (TrainConfig().optimizer, DataConfig().mirror) == ("sgd", "auto")  # the paper's recipe stays the default
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="mirror must be one of"):
        DataConfig(mirror="sideways")


def test_a_foreground_share_outside_0_1_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "train", "--data", "phantom:2", "--out",
                          str(tmp_path / "run"), "--foreground-oversample", "2"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "--foreground-oversample: must be a finite number in [0, 1], got 2" in out.stderr
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()
