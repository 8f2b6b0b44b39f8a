"""The model-file contract (``napari_e2enet.modelcard``) and the one TrainConfig builder."""

from __future__ import annotations

import argparse
import os
import subprocess

import pytest

from napari_e2enet import modelcard
from napari_e2enet.cli import _train_args, train_config_from_args
from napari_e2enet.config import TrainConfig, train_config
from napari_e2enet.data import IntendedInput, Plan
from napari_e2enet.errors import InputError
from napari_e2enet.labels import LabelTable
from napari_e2enet.modelcard import (
    MODEL_FILE,
    ModelCard,
    holds_model,
    read_card,
    read_metadata,
    resolve_model,
    save_model,
)
from napari_e2enet.models import create_model

PLAN = Plan(target_spacing=(4.0, 2.0, 2.0), modality="CT", ct_clip=(-1000.0, 400.0), ct_mean=0.0, ct_std=300.0)
LABELS = LabelTable({1: "liver", 2: "spleen"})


def _tiny():
    return create_model("e2enet_small", num_classes=3, widths=(4, 8, 8), pools=((2, 2, 2),) * 2, sparsity=0.8)


def test_a_card_round_trips_through_the_model_file(tmp_path):
    model = _tiny()
    train = TrainConfig().replace(data=TrainConfig().data.replace(patch=(16, 32, 32))).to_dict()
    card = ModelCard(PLAN, LABELS, model.config, (16, 32, 32), (1, 2), IntendedInput.from_plan(PLAN), train, 7,
                     {"finetune": {"image": "case"}})
    save_model(model, tmp_path / MODEL_FILE, metadata=card.to_metadata())
    back = read_card(tmp_path)  # the folder resolves to its model file
    assert back == card
    meta = read_metadata(tmp_path / MODEL_FILE)
    assert "patch" not in meta  # the train config holds it: written once, as the Trainer always did
    assert str(meta["format_version"]) == modelcard.FORMAT_VERSION


def test_a_card_without_train_config_keeps_its_patch_and_old_files_get_the_defaults(tmp_path):
    model = _tiny()
    save_model(model, tmp_path / "a.safetensors",
               metadata=ModelCard(PLAN, LABELS, model.config, (8, 16, 16)).to_metadata())
    assert read_card(tmp_path / "a.safetensors").patch == (8, 16, 16)
    save_model(model, tmp_path / "old.safetensors", metadata={"plan": PLAN.to_dict(), "labels": LABELS.to_dict()})
    old = read_card(tmp_path / "old.safetensors")
    assert (old.patch, old.mirror_axes, old.intended, old.train_config) == (modelcard.DEFAULT_PATCH, (0, 1, 2), None, {})


@pytest.mark.parametrize(("metadata", "message"), [
    ({"labels": LABELS.to_dict()}, "lacks its preprocessing plan or label table"),
    ({"plan": PLAN.to_dict(), "labels": LABELS.to_dict(), "mirror_axes": [3]}, r"mirror axes \[3\] are not network"),
    ({"plan": PLAN.to_dict(), "labels": LABELS.to_dict(), "patch": [16, 16]}, r"patch \[16, 16\] is not 3 positive"),
])
def test_an_unusable_card_is_one_line_naming_the_file(tmp_path, metadata, message):
    path = save_model(_tiny(), tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(InputError, match=message) as info:
        read_card(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_model_specs_resolve_to_files(tmp_path):
    default = resolve_model(None)
    assert default.bundled == modelcard.DEFAULT_MODEL and default.path.name == MODEL_FILE and default.sha256
    assert resolve_model(modelcard.DEFAULT_MODEL) == default
    run = tmp_path / "run"
    run.mkdir()
    assert not holds_model(run)
    save_model(_tiny(), run / MODEL_FILE, metadata={"plan": PLAN.to_dict(), "labels": LABELS.to_dict()})
    assert holds_model(run)
    assert resolve_model(run).path == run / MODEL_FILE and resolve_model(run).sha256 is None
    assert resolve_model(str(run / MODEL_FILE)).path == run / MODEL_FILE
    with pytest.raises(InputError, match="no such model file, run folder or bundled model name"):
        resolve_model(tmp_path / "missing")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="a FIFO"):
        resolve_model(fifo)


def test_the_run_file_names_are_spelled_once():
    """Each run file name appears as a string literal in the package only in modelcard.py."""
    root = modelcard.__file__.rsplit("/", 1)[0]
    for name in (modelcard.MODEL_FILE, modelcard.STATE_FILE, modelcard.CONFIG_FILE, modelcard.FINETUNE_FILE,
                 modelcard.CARD_FILE):
        hits = subprocess.run(["grep", "-rlF", "--include=*.py", f'"{name}"', root], capture_output=True,
                              text=True).stdout.split()
        assert [h.rsplit("/", 1)[-1] for h in hits] == ["modelcard.py"], (name, hits)


def _cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _train_args(parser)
    return parser.parse_args(list(argv))


def test_the_cli_and_the_widgets_build_the_same_train_config():
    """The Train widget calls ``train_config`` with its fields' values; the CLI maps its options
    through the same function: the same values give the same TrainConfig."""
    from_cli = train_config_from_args(_cli_args(
        "--data", "phantom:3", "--out", "x", "--model", "e2enet_small", "--iterations", "20", "--sparsity", "0.5",
        "--update-every", "5", "--patch", "32", "48", "48", "--batch", "1", "--lr", "0.02", "--optimizer", "adamw",
        "--no-augment"))
    from_widget = train_config(model="e2enet_small", iterations=20, sparsity=0.5, update_every=5, source="phantom:3",
                               patch=(32, 48, 48), batch=1, lr=0.02, optimizer="adamw", augment=False)
    assert from_cli == from_widget
    assert from_cli.data.patch == (32, 48, 48) and from_cli.sparsity.sparsity == 0.5 and not from_cli.data.augment
    assert train_config(patch=[8, 8, 8]).data.patch == (8, 8, 8)  # lists from JSON become tuples
    assert train_config(TrainConfig(iterations=9), lr=None).iterations == 9  # None keeps the base


@pytest.mark.parametrize(("options", "message"), [
    ({"model": "nope"}, "unknown model 'nope'"),
    ({"sparsity": 1.5}, "sparsity"),
    ({"patchsize": (8, 8, 8)}, "no option 'patchsize'"),
])
def test_a_bad_option_is_one_input_error(options, message):
    with pytest.raises(InputError, match=message):
        train_config(**options)
