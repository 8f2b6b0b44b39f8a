"""A CT stored with an intensity offset (raw scanner values: air near 0 instead of −1000 HU): it is
recognised (``ScanStatistics.ct_offset``), the CT model's warning names the fix, and
``predict --intensity-offset auto|N`` (``Predictor.iter_predict(..., intensity_offset=...)``) gives
the Dice of the scan in HU back. MR images, however scaled, are not taken for one."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_e2enet.bundled import DEFAULT_MODEL, bundled_model, sample_files
from napari_e2enet.cli import main
from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import Volume, make_phantom, read_volume
from napari_e2enet.data.intended_input import input_warnings, looks_like_ct, scan_statistics, stored_ct_offset
from napari_e2enet.inference import InputWarning, Prediction, Predictor, PredictProgress, fastpath
from napari_e2enet.labels import AMOS
from napari_e2enet.metrics import dice

CT_MODEL = "phantom-abdomen-ct"
MARGIN = 12  # voxels of zero padding around the offset phantom (0 = -1024 HU once corrected)
# the sparse kernels where they build: "auto" would time dense against them on the first tile first
# (10.7 s instead of 4.4 s for the phantom's 8 tiles on a busy 2-core CPU)
BACKEND = "sparse" if fastpath.kernel_status()[0] is not None else "auto"


@pytest.fixture(scope="module")
def phantom() -> tuple[Volume, Volume]:
    return make_phantom(0)  # the CT model's sample: its card records the Dice in HU


@pytest.fixture(scope="module")
def ct_predictor() -> Predictor:
    return Predictor.from_bundled(CT_MODEL, InferenceConfig(device="cpu", precision="fp32", backend=BACKEND))


@pytest.fixture(scope="module")
def mri() -> Volume:
    return read_volume(sample_files()["image"])


def _padded(volume: Volume, array: np.ndarray) -> Volume:
    """``array`` with a zero margin of MARGIN voxels, on ``volume``'s grid grown by that margin."""
    affine = volume.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, MARGIN)
    return Volume(np.pad(array, MARGIN), affine, name=volume.name)


def _mean_dice(labels: np.ndarray, ref: np.ndarray) -> float:
    present = [k for k in AMOS.names if k and (ref == k).any()]
    return float(np.mean([dice(labels, ref, k) for k in present]))


def _sample_dice() -> float:
    """The CT model's mean organ Dice on make_phantom(0) in HU, as its card records it (0.9296)."""
    return float(bundled_model(CT_MODEL).card["sample_dice"]["mean"])


# ---- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_an_offset_ct_with_zero_padding_is_found_with_its_offset(phantom, dtype):
    image = phantom[0]
    stored = _padded(image, np.round(image.array + 1024).astype(dtype))
    stats = scan_statistics(stored)
    assert stats.air_share == 0.0 and stats.ct_offset == 1024.0
    assert looks_like_ct(stats)


@pytest.mark.parametrize("offset", [1000, 2048])
def test_other_usual_offsets_are_estimated_from_the_air_peak(phantom, offset):
    image = phantom[0]
    assert scan_statistics(image.with_array(image.array + offset)).ct_offset == float(offset)


def test_a_ct_in_hu_has_no_offset(phantom):
    stats = scan_statistics(phantom[0])
    assert stats.air_share > 0.5 and stats.ct_offset == 0.0


def test_mr_images_are_not_taken_for_an_offset_ct(mri):
    """The sample as it is, and scaled so its tissue sits where offset-CT soft tissue sits (×6.2 and
    ×6.6 pass the tissue-mode test: they are refused by the bone and peak tests), with a noisy
    background and a bright scalp shell, and a T1-like abdomen drawn from the phantom."""
    brain = mri.array > 0
    shell = ndi.binary_dilation(brain, iterations=4) & ~brain
    scalp = mri.array.copy()
    scalp[shell] = np.percentile(mri.array[brain], 99) * 1.2
    noisy = scalp + np.random.default_rng(1).normal(20, 4, mri.array.shape).clip(1)
    hu = make_phantom(1)[0].array
    t1 = np.interp(hu, [-1024, -600, -150, -60, 0, 60, 200, 600], [0, 50, 1700, 1600, 700, 800, 900, 300])
    for name, array in [("sample", mri.array), ("x6.2", mri.array * 6.2), ("x6.6", mri.array * 6.6),
                        ("scalp x5.5", noisy * 5.5), ("T1 abdomen", t1), ("T1 abdomen x0.6", t1 * 0.6)]:
        assert stored_ct_offset(np.asarray(array, np.float32)) == 0.0, name
    stats = scan_statistics(mri)
    assert stats.ct_offset == 0.0 and not looks_like_ct(stats)


# ---- what the warnings say -----------------------------------------------------------------------


def test_the_ct_model_warning_says_what_is_wrong_and_names_the_option(phantom, mri):
    image = phantom[0]
    stats = scan_statistics(image.with_array(image.array + 1024))
    (warning,) = input_warnings(bundled_model(CT_MODEL).intended, stats)
    assert "looks like a CT stored with a +1024 offset" in warning and "instead of -1000 HU" in warning
    assert "--intensity-offset -1024" in warning and "'CT offset'" in warning
    (mri_warning,) = input_warnings(bundled_model(CT_MODEL).intended, scan_statistics(mri))
    assert "does not look like a CT" in mri_warning and "--intensity-offset" not in mri_warning


def test_the_brain_model_calls_it_a_ct_and_points_at_the_ct_model_with_the_offset(phantom):
    image = phantom[0]
    brain = Predictor.from_bundled(DEFAULT_MODEL, InferenceConfig(device="cpu"))
    (warning,) = brain.check_input(image.with_array(image.array + 1024))
    assert "looks like a CT (stored with a +1024 offset" in warning
    assert f"--model {CT_MODEL} --intensity-offset auto" in warning


# ---- the fix ------------------------------------------------------------------------------------


def test_predict_intensity_offset_auto_restores_the_dice_of_the_scan_in_hu(tmp_path, phantom, capsys):
    """The CLI on the uint16 phantom stored with +1024: the warning without the option is replaced by
    a note, the JSON reports the offset, and the mean organ Dice is the one in HU (0.93; 0.02
    without the option)."""
    image, ref = phantom
    stored = tmp_path / "ct_raw.nii.gz"
    nib.save(nib.Nifti1Image(np.round(image.array + 1024).astype(np.uint16), image.affine), stored)
    out = tmp_path / "labels.nii.gz"
    code = main(["predict", "-i", str(stored), "-o", str(out), "--model", CT_MODEL, "--device", "cpu",
                 "--precision", "fp32", "--backend", BACKEND, "--intensity-offset", "auto", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["intensity_offset"] == "auto"
    (case,) = report["cases"]
    assert case["intensity_offset"] == -1024.0
    assert len(case["warnings"]) == 1 and "added -1024 to the voxel values" in case["warnings"][0]
    labels = np.asarray(nib.load(out).dataobj)
    assert _mean_dice(labels, ref.array) == pytest.approx(_sample_dice(), abs=0.01)


def test_an_explicit_offset_gives_the_dice_in_hu(phantom, ct_predictor):
    """Predictor level, float voxels with +1024 (without the offset: mean Dice 0.02, and a warning)."""
    image, ref = phantom
    stored = image.with_array(image.array + 1024)
    assert "--intensity-offset -1024" in ct_predictor.check_input(stored)[0]
    events = list(ct_predictor.iter_predict(stored, intensity_offset=-1024))
    prediction = events[-1]
    assert isinstance(prediction, Prediction) and prediction.intensity_offset == -1024.0
    assert not [e for e in events if isinstance(e, InputWarning)]
    assert _mean_dice(prediction.labels.array, ref.array) == pytest.approx(_sample_dice(), abs=0.01)
    assert prediction.labels.array.dtype == np.uint8 and np.array_equal(prediction.labels.affine, image.affine)


def test_the_offset_copy_counts_in_the_memory_check(phantom, ct_predictor, monkeypatch):
    """The corrected scan is a float32 copy that lives beside the caller's: the memory check counts
    it, so a scan that would fit only without the copy is refused (one line) before any tile runs."""
    from napari_e2enet import memory
    from napari_e2enet.errors import InputError
    from napari_e2enet.inference import predictor as predictor_module

    image, _ = phantom
    stored = Volume((np.round(image.array) + 1024).astype(np.int16), image.affine, name="offset_ct")
    in_hu = Volume(stored.array.astype(np.float32) - 1024, image.affine, name="offset_ct")  # what the copy holds
    copy_bytes = in_hu.array.nbytes
    needs: list[float] = []

    class Checked(Exception):
        pass

    def record(need, what, path):
        needs.append(need)
        raise Checked

    monkeypatch.setattr(predictor_module, "check_memory", record)
    for volume, offset in ((in_hu, None), (stored, -1024)):
        with pytest.raises(Checked):
            next(iter(ct_predictor.iter_predict(volume, intensity_offset=offset)))
    assert needs[1] - needs[0] == copy_bytes  # the same crop and grid, plus the copy
    monkeypatch.undo()

    monkeypatch.setattr(memory, "available_memory", lambda: (int(needs[0] + copy_bytes / 2), "a test limit"))
    events = ct_predictor.iter_predict(in_hu)
    assert isinstance(next(events), (InputWarning, Prediction, PredictProgress))  # past the check
    events.close()
    with pytest.raises(InputError, match=r"needs about [\d.]+ GiB of memory, but only [\d.]+ GiB is available "
                                         r"\(a test limit\)"):
        next(iter(ct_predictor.iter_predict(stored, intensity_offset=-1024)))


def test_auto_leaves_scans_alone_that_are_not_offset_cts(phantom, mri, ct_predictor):
    ct = ct_predictor
    assert ct.apply_intensity_offset(phantom[0], "auto") == (phantom[0], 0.0, [])
    assert ct.apply_intensity_offset(mri, "auto") == (mri, 0.0, [])
    brain = Predictor.from_bundled(DEFAULT_MODEL, InferenceConfig(device="cpu"))
    raw = phantom[0].with_array(phantom[0].array + 1024)
    assert brain.apply_intensity_offset(raw, "auto")[1] == 0.0  # not a CT model: nothing to correct to


def test_an_offset_given_to_a_scan_already_in_hu_is_warned_about(phantom, ct_predictor):
    shifted, offset, (note,) = ct_predictor.apply_intensity_offset(phantom[0], -1024)
    assert offset == -1024.0 and float(shifted.array.min()) == pytest.approx(-2048.0)
    assert "already reads in HU" in note and "leave the offset out" in note
    with pytest.raises(ValueError, match="'auto'"):
        ct_predictor.apply_intensity_offset(phantom[0], "-1024")


@pytest.mark.parametrize("value", ["abc", "1.5", "1e3"])
def test_a_bad_intensity_offset_is_one_line_and_exit_2(tmp_path, capsys, value):
    image = Path(sample_files()["image"])
    with pytest.raises(SystemExit) as exc:  # argparse refuses before predict starts
        main(["predict", "-i", str(image), "-o", str(tmp_path / "o.nii.gz"), "--intensity-offset", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith("napari-e2enet predict: error: argument --intensity-offset: must be a whole number")
    assert not list(tmp_path.iterdir())


# ---- fine-tuning ---------------------------------------------------------------------------------


def test_finetune_learns_from_the_offset_ct_as_it_was_segmented(phantom, tmp_path):
    """Fine-tuning with the same ``intensity_offset="auto"`` as the segmentation sees the scan in HU:
    its first loss is the model's loss on a CT it knows, not on a scan 1024 brighter than any it saw."""
    from napari_e2enet.training.finetune import FinetuneConfig, iter_finetune

    image, labels = phantom
    stored = image.with_array(np.round(image.array + 1024).astype(np.uint16))
    config = FinetuneConfig(iterations=1, device="cpu", seed=0)
    model = bundled_model(CT_MODEL).weights

    def first_loss(offset: str | None, out: str) -> tuple[float, str]:
        events = list(iter_finetune(model, stored, labels, tmp_path / out, config=config, intensity_offset=offset))
        return next(e.loss for e in events if e.kind == "iteration"), events[0].message

    corrected, message = first_loss("auto", "auto")
    raw, raw_message = first_loss(None, "raw")
    assert "added -1024" in message and "added" not in raw_message
    assert corrected < 0.5 * raw
