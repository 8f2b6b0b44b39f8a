"""Untrusted model files: weights only through safetensors, training state only through
``torch.load(weights_only=True)``, bundled weights checksum-verified before they are used.

Every payload here is live: the control at the start of each test shows that an unsafe loader
(``torch.load(weights_only=False)``) really runs it, so "the marker file is absent" means something.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from pathlib import Path

import pytest
import torch

from napari_e2enet import bundled, modelcard
from napari_e2enet.cli import main
from napari_e2enet.errors import InputError
from napari_e2enet.inference import Predictor
from napari_e2enet.modelcard import sha256_of
from napari_e2enet.training import load_model, load_state

from .conftest import screen_lines

PACKAGE = Path(__file__).resolve().parents[2] / "napari_e2enet"


class Touch:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


class Shell:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [Touch, Shell])
def test_code_carrying_training_state_is_refused_and_never_runs(tmp_path, payload, assets, capfd):
    control = tmp_path / "control.pt"
    torch.save({"iteration": 3, "x": payload(tmp_path / "CONTROL_RAN")}, control)
    torch.load(control, weights_only=False)  # an unsafe loader runs it: the payload is real
    assert (tmp_path / "CONTROL_RAN").exists()

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"source": str(assets.dataset)}}))
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"iteration": 3, "model": payload(marker)}, run / "training_state.pt")
    with pytest.raises(InputError, match=r"refused to load training state .*no code runs"):
        load_state(run / "training_state.pt")
    assert not marker.exists()

    capfd.readouterr()
    assert main(["train", "--resume", "--out", str(run)]) == 2
    lines = screen_lines(capfd.readouterr().err)
    assert len(lines) == 1 and str(run / "training_state.pt") in lines[0] and "no code runs" in lines[0], lines
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "training_state.pt"]


def test_a_pickle_named_model_safetensors_is_refused_and_never_runs(tmp_path, assets, capfd):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Shell(marker)}, run / "model.safetensors")
    for call in (lambda: load_model(run / "model.safetensors"), lambda: Predictor.from_checkpoint(run)):
        with pytest.raises(InputError, match="not a safetensors model file"):
            call()
    capfd.readouterr()
    assert main(["predict", "-i", str(assets.image), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(run)]) == 2
    assert len(screen_lines(capfd.readouterr().err)) == 1
    assert main(["train", "--config", str(assets.train_config), "--out", str(tmp_path / "tuned"),
                 "--init-from", str(run)]) == 2
    assert not marker.exists()
    assert not (tmp_path / "seg.nii.gz").exists() and not (tmp_path / "tuned").exists()
    control = Path(shutil.copy(run / "model.safetensors", tmp_path / "control.pt"))  # torch.load reads
    torch.load(control, weights_only=False)  # *.safetensors names as safetensors; control: the payload is real
    assert marker.exists()


def test_load_model_verifies_the_checksum(tmp_path, assets):
    copy = Path(shutil.copy(assets.model3, tmp_path / "model.safetensors"))
    digest = sha256_of(copy)
    model, _ = load_model(copy, expected_sha256=digest)
    assert model.config.num_classes == 3
    raw = bytearray(copy.read_bytes())
    raw[-5] ^= 0x01  # one bit of one weight: still a perfectly loadable file
    copy.write_bytes(bytes(raw))
    load_model(copy)  # without a checksum nothing can tell
    with pytest.raises(InputError, match="checksum mismatch") as info:
        load_model(copy, expected_sha256=digest)
    assert str(copy) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError, match="checksum mismatch"):
        load_model(tmp_path / "gone.safetensors", expected_sha256=digest)


@pytest.fixture
def fake_bundle(tmp_path, assets, monkeypatch):
    """resources/models/tiny/ with a model card holding the weights' sha256 (a temp copy)."""
    folder = tmp_path / "resources" / "models" / "tiny"
    folder.mkdir(parents=True)
    weights = Path(shutil.copy(assets.model3, folder / "model.safetensors"))
    (folder / "model_card.json").write_text(json.dumps({"name": "tiny", "sha256": sha256_of(weights)}))
    monkeypatch.setattr(modelcard, "resources_dir", lambda: tmp_path / "resources")
    return weights


def test_bundled_weights_are_checksum_verified(tmp_path, assets, fake_bundle, capfd):
    assert Predictor.from_bundled("tiny").model.config.num_classes == 3
    raw = bytearray(fake_bundle.read_bytes())
    raw[-5] ^= 0x01
    fake_bundle.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="checksum mismatch"):
        Predictor.from_bundled("tiny")
    with pytest.raises(InputError, match="checksum mismatch"):
        Predictor.from_any("tiny")
    capfd.readouterr()
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "-i", str(assets.image), "-o", str(out), "--model", "tiny", "--device", "cpu"]) == 2
    lines = screen_lines(capfd.readouterr().err)
    assert len(lines) == 1 and "checksum mismatch" in lines[0] and str(fake_bundle) in lines[0], lines
    assert not out.exists()


def test_shipped_bundled_models_match_their_cards():
    names = bundled.list_bundled_models()
    if not names:
        pytest.skip("no bundled model in resources/models yet")
    for name in names:
        model = bundled.bundled_model(name)
        assert sha256_of(model.weights) == model.sha256, name


def test_the_package_never_unpickles_without_weights_only():
    """Static guard: every torch.load passes weights_only=True; no pickle/joblib/np allow_pickle loads."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start(): text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(PACKAGE)}: {call}")
        for bad in ("pickle.load", "pickle.loads", "joblib.load", "allow_pickle=True", "dill.load"):
            if bad in text:
                offenders.append(f"{path.relative_to(PACKAGE)}: {bad}")
    assert not offenders, offenders
