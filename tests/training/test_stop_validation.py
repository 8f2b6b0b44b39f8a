"""Stop means stop: a stop during validation abandons it within one tile and saves; resume finishes
that epoch end first and ends exactly where an uninterrupted run ends. On CPU, validation is a
bounded, fixed patch sample by default."""

import csv
import math
import threading

import pytest
import torch

from napari_e2enet.config import TrainConfig
from napari_e2enet.training import Trainer, load_state


def _rows(path):
    rows = list(csv.DictReader(path.open()))
    for row in rows:
        row.pop("seconds")
    return rows


def _count_eval_forwards(trainer, counter, stop=None, stop_after=None):
    """Count the model's eval-mode forward passes (validation); set ``stop`` during the N-th one."""

    def hook(module, inputs, output):
        if not module.training:
            counter.append(tuple(inputs[0].shape))
            if stop is not None and len(counter) == stop_after:
                stop.set()

    return trainer.model.register_forward_hook(hook)


@pytest.mark.parametrize("mode", ["full", "patches"])
def test_a_stop_during_validation_abandons_it_and_resume_equals_an_uninterrupted_run(
        tmp_path, tiny_train_config, tiny_phantoms, mode):
    config = tiny_train_config.replace(validation=mode, validation_patches=6)
    full = Trainer(config, tmp_path / "full", dataset=tiny_phantoms)
    full_events = list(full.iter_fit())
    assert [e.iteration for e in full_events if e.kind == "validation"] == [4, 8]

    stop = threading.Event()
    trainer = Trainer(config, tmp_path / "split", dataset=tiny_phantoms, stop=stop)
    forwards: list = []
    events = []
    for event in trainer.iter_fit():
        events.append(event)
        if event.kind == "start":  # the model exists now: stop during the 2nd validation forward pass
            _count_eval_forwards(trainer, forwards, stop, stop_after=2)
    kinds = [e.kind for e in events]
    assert "validation" not in kinds and "checkpoint" not in kinds  # abandoned, not reported
    assert kinds.count("iteration") == 4 and kinds[-1] == "stopped" and events[-1].iteration == 4
    assert len(forwards) == 2  # nothing ran after the tile / patch batch during which Stop came
    state = load_state(tmp_path / "split" / "training_state.pt")
    assert state["iteration"] == 4 and len(state["epoch_losses"]) == 4  # saved as it stood
    assert _rows(tmp_path / "split" / "metrics.csv") == []

    resumed = Trainer(config, tmp_path / "split", dataset=tiny_phantoms, resume=True)
    again = list(resumed.iter_fit())
    assert [e.kind for e in again[:3]] == ["start", "validation", "checkpoint"]  # the abandoned epoch end first
    assert again[1].iteration == 4 and again[1].dice == full_events[[e.kind for e in full_events].index(
        "validation")].dice
    assert again[-1].kind == "done" and again[-1].iteration == 8
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _rows(tmp_path / "split" / "metrics.csv") == _rows(tmp_path / "full" / "metrics.csv")
    assert (tmp_path / "split" / "connectivity.json").read_text().count('"kind": "epoch"') == (
        tmp_path / "full" / "connectivity.json").read_text().count('"kind": "epoch"')


def test_on_cpu_validation_is_a_fixed_bounded_patch_sample(tmp_path, tiny_train_config, tiny_phantoms):
    config = tiny_train_config.replace(iterations=4, validation_patches=5)  # validation "auto" by default
    assert config.validation == "auto"
    trainer = Trainer(config, tmp_path, dataset=tiny_phantoms)
    forwards: list = []
    dice = []
    for event in trainer.iter_fit():
        if event.kind == "start":
            _count_eval_forwards(trainer, forwards)
        if event.kind == "validation":
            dice.append(event.dice)
    assert trainer.validation_mode(torch.device("cpu")) == "patches"
    batch = config.data.batch
    assert len(forwards) == math.ceil(5 / batch)  # one validation, ceil(patches / batch) forward passes
    assert sum(shape[0] for shape in forwards) == 5
    assert all(shape[2:] == config.data.patch for shape in forwards)  # patches, not whole volumes
    assert dice and all(0.0 <= v <= 1.0 for v in dice[0].values())
    # the sample is the same every time: validating the same weights again gives the same numbers
    data = trainer._prepare_data(None)
    assert trainer.validate(trainer.model, data, torch.device("cpu")) == trainer.validate(
        trainer.model, data, torch.device("cpu"))
    assert trainer.validation_mode(torch.device("cuda")) == "full"


def test_validation_options_are_checked():
    with pytest.raises(ValueError, match="validation must be one of"):
        TrainConfig(validation="sometimes")
    with pytest.raises(ValueError, match="validation_patches"):
        TrainConfig(validation_patches=0)


def test_train_cli_chooses_the_validation():
    import argparse

    from napari_e2enet.cli import _train_args, train_config_from_args

    parser = argparse.ArgumentParser()
    _train_args(parser)
    cfg = train_config_from_args(parser.parse_args(["--out", "run", "--validation", "full",
                                                    "--validation-patches", "4"]))
    assert (cfg.validation, cfg.validation_patches) == ("full", 4)
    cfg = train_config_from_args(parser.parse_args(["--out", "run"]))
    assert (cfg.validation, cfg.validation_patches) == ("auto", 16)
