"""The bundled model that fits a scan (``best_bundled_model``), the CT organ model's card, and the
hint a warning gives when another bundled model would fit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from napari_e2enet import bundled, modelcard
from napari_e2enet.bundled import DEFAULT_MODEL, best_bundled_model, bundled_model, rank_bundled_models
from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import Volume, make_phantom, phantom_dataset, read_volume
from napari_e2enet.data.intended_input import IntendedInput
from napari_e2enet.inference import Predictor
from napari_e2enet.labels import AMOS
from napari_e2enet.metrics import dice

CT_MODEL = "phantom-abdomen-ct"
SAMPLE = Path(bundled.__file__).resolve().parent / "resources" / "sample" / "mni152_t1_2mm.nii.gz"


@pytest.fixture(scope="module")
def ct() -> Volume:
    return make_phantom(0)[0]


@pytest.fixture(scope="module")
def mri() -> Volume:
    return read_volume(SAMPLE)


# ---- choosing among model cards (no weights) ---------------------------------------------------


def _fake_bundle(root: Path, cards: dict[str, IntendedInput | None]) -> None:
    for name, intended in cards.items():
        folder = root / "models" / name
        folder.mkdir(parents=True)
        card = {"name": name, "sha256": "0" * 64}
        if intended is not None:
            card["intended_input"] = intended.to_dict()
        (folder / "model_card.json").write_text(json.dumps(card))


BRAIN = IntendedInput("MR", skull_stripped=True, spacing_mm=(1.0, 2.0), body_region="brain")
ABDOMEN_CT = IntendedInput("CT", intensity="HU", spacing_mm=(1.5, 3.0), body_region="abdomen")


def test_the_choice_reads_only_the_cards_and_follows_the_modality(tmp_path, monkeypatch, ct, mri):
    """Cards without weights: the choice never loads a model."""
    _fake_bundle(tmp_path, {DEFAULT_MODEL: BRAIN, "ct-model": ABDOMEN_CT, "no-card-input": None})
    monkeypatch.setattr(modelcard, "resources_dir", lambda: tmp_path)
    assert best_bundled_model(ct) == "ct-model"
    assert best_bundled_model(mri) == DEFAULT_MODEL
    ranked = rank_bundled_models(ct)
    assert [name for name, _ in ranked] == ["ct-model", DEFAULT_MODEL, "no-card-input"]
    assert ranked[0][1] == [] and "looks like a CT" in ranked[1][1][0]


def test_a_thin_slice_ct_still_goes_to_the_ct_model(tmp_path, monkeypatch, ct):
    """0.6 mm voxels draw a voxel-size warning from the CT model too; the modality decides first."""
    _fake_bundle(tmp_path, {DEFAULT_MODEL: BRAIN, "ct-model": ABDOMEN_CT})
    monkeypatch.setattr(modelcard, "resources_dir", lambda: tmp_path)
    thin = Volume(ct.array, np.diag([0.6, 0.6, 0.6, 1.0]))
    ranked = dict(rank_bundled_models(thin))
    assert len(ranked["ct-model"]) == 1 and "voxels of" in ranked["ct-model"][0]
    assert best_bundled_model(thin) == "ct-model"


def test_ties_go_to_the_default_model(tmp_path, monkeypatch, ct):
    _fake_bundle(tmp_path, {"a-ct-model": ABDOMEN_CT, DEFAULT_MODEL: ABDOMEN_CT})
    monkeypatch.setattr(modelcard, "resources_dir", lambda: tmp_path)
    assert best_bundled_model(ct) == DEFAULT_MODEL
    empty = Volume(np.zeros((20, 20, 20), np.float32), np.eye(4))
    assert best_bundled_model(empty) == DEFAULT_MODEL  # every model warns: nothing to segment


# ---- the real bundle ---------------------------------------------------------------------------


def test_the_bundled_models_fit_their_samples(ct, mri):
    assert CT_MODEL in bundled.list_bundled_models()
    assert best_bundled_model(ct) == CT_MODEL
    assert best_bundled_model(mri) == DEFAULT_MODEL


def test_the_ct_model_card_says_synthetic_and_verifies():
    model = bundled_model(CT_MODEL)
    card = model.card
    assert hashlib.sha256(model.weights.read_bytes()).hexdigest() == card["sha256"]
    assert "synthetic" in card["trained_on"] and "phantom" in card["trained_on"]
    assert "not for real CT" in card["intended_use"] and "not for clinical use" in card["intended_use"]
    intended = model.intended
    assert intended is not None and intended.is_ct and intended.intensity == "HU"
    assert intended.body_region == "abdomen" and "synthetic" in intended.summary()
    assert card["classes"]["labels"] == {str(k): v for k, v in AMOS.names.items()}
    held = card["heldout_dice"]
    organs = [v for k, v in held.items() if k != "mean"]
    assert len(organs) == 15 and held["mean"] == pytest.approx(np.mean(organs))
    assert held["mean"] > 0.85  # the issue-3 target on phantoms never trained on
    assert "CPU" in card["hardware"] and "shared" in card["hardware"]
    # held-out cases lie beyond the run's phantoms (training and validation)
    assert card["training_command"].count("phantom:36") == 1
    assert all(int(name.split("_")[1]) >= 36 for name in card["heldout_case_mean_dice"])
    assert all(int(name.split("_")[1]) < 36 for name in card["validation_cases"])


def test_the_card_heldout_dice_is_what_the_model_gives():
    """Recompute one held-out phantom's mean organ Dice with the bundled weights."""
    card = bundled_model(CT_MODEL).card
    name = sorted(card["heldout_case_mean_dice"])[0]
    index = int(name.split("_")[1])
    case = phantom_dataset(index + 1, lazy=True).cases[index]
    assert case.name == name
    image, ref = case.load()
    predictor = Predictor.from_bundled(CT_MODEL, InferenceConfig(device="cpu"))
    labels = predictor.predict(image).array
    present = [k for k in AMOS.names if k and (ref.array == k).any()]
    mean = float(np.mean([dice(labels, ref.array, k) for k in present]))
    assert mean == pytest.approx(card["heldout_case_mean_dice"][name], abs=2e-3)


def test_a_warning_names_the_bundled_model_that_fits(ct, mri):
    brain = Predictor.from_bundled(DEFAULT_MODEL, InferenceConfig(device="cpu"))
    (warning,) = brain.check_input(ct)
    assert "looks like a CT" in warning and f"the bundled model '{CT_MODEL}'" in warning
    assert f"--model {CT_MODEL}" in warning
    organs = Predictor.from_bundled(CT_MODEL, InferenceConfig(device="cpu"))
    assert organs.check_input(ct) == []
    (warning,) = organs.check_input(mri)
    assert "does not look like a CT" in warning and f"the bundled model '{DEFAULT_MODEL}'" in warning
