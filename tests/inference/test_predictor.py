"""Predictor and the predict/evaluate CLI: labels land on the source grid with the source header."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_e2enet import create_model
from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import Plan, Volume, make_phantom, read_volume, write_volume
from napari_e2enet.errors import InputError
from napari_e2enet.inference import PredictionCancelled, Predictor, PredictProgress
from napari_e2enet.labels import LabelTable
from napari_e2enet.training import save_model

CLI = [sys.executable, "-m", "napari_e2enet.cli"]


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory):
    """A tiny untrained 3-class model with a CT plan, saved like a training run saves it."""
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    model = create_model("e2enet_small", num_classes=3, widths=(4, 8, 8), pools=((2, 2, 2),) * 2, sparsity=0.8)
    plan = Plan(target_spacing=(4.0, 2.0, 2.0), modality="CT", ct_clip=(-1000.0, 400.0), ct_mean=0.0, ct_std=300.0)
    save_model(model, path, metadata={"plan": plan.to_dict(), "labels": LabelTable({1: "liver", 2: "spleen"}).to_dict(),
                                      "train_config": {"data": {"patch": [16, 16, 16]}}})
    return path


def anisotropic_flipped_volume(tmp_path):
    image, _ = make_phantom(1, shape=(40, 36, 14), spacing=(1.7, 1.7, 3.5))
    affine = image.affine.copy()
    affine[:, 0] *= -1  # flip the x axis
    affine[0, 3] = 25.0
    vol = Volume(image.array, affine, name="case")
    path = write_volume(vol, tmp_path / "case_0000.nii.gz")
    return path


def test_labels_have_the_source_shape_affine_and_header(tmp_path, tiny_model_file):
    path = anisotropic_flipped_volume(tmp_path)
    source = read_volume(path)
    predictor = Predictor.from_checkpoint(tiny_model_file, InferenceConfig(device="cpu"))
    events = list(predictor.iter_predict(source))
    progress = [e for e in events if isinstance(e, PredictProgress)]
    assert progress and progress[-1].done == progress[-1].total
    labels = events[-1].labels
    assert labels.array.shape == source.array.shape
    np.testing.assert_array_equal(labels.affine, source.affine)
    assert set(np.unique(labels.array)) <= {0, 1, 2}
    write_volume(labels, tmp_path / "out.nii.gz", like=source)
    reread = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(reread.affine, nib.load(path).affine)
    assert reread.shape == nib.load(path).shape
    assert nib.aff2axcodes(reread.affine) == nib.aff2axcodes(nib.load(path).affine)


def test_tta_and_accelerate_off_still_give_source_grid_labels(tmp_path, tiny_model_file):
    source = read_volume(anisotropic_flipped_volume(tmp_path))
    predictor = Predictor.from_checkpoint(tiny_model_file, InferenceConfig(device="cpu", tta=True, accelerate=False))
    assert predictor.predict(source).array.shape == source.array.shape


def test_tta_flips_only_the_axes_the_model_was_trained_to_mirror(tmp_path):
    from napari_e2enet.inference.predictor import MIRROR_AXES, tta_flips

    assert tta_flips((0, 1, 2)) == MIRROR_AXES
    assert tta_flips((0, 1)) == ((), (2,), (3,), (2, 3))  # never W (tensor dim 4), the left-right axis
    assert tta_flips(()) == ((),)
    model = create_model("e2enet_small", num_classes=3, widths=(4, 8, 8), pools=((2, 2, 2),) * 2, sparsity=0.8)
    plan = Plan(target_spacing=(4.0, 2.0, 2.0), modality="CT", ct_clip=(-1000.0, 400.0), ct_mean=0.0, ct_std=300.0)
    meta = {"plan": plan.to_dict(), "labels": LabelTable({1: "left kidney", 2: "right kidney"}).to_dict(),
            "train_config": {"data": {"patch": [16, 16, 16]}}, "mirror_axes": [0, 1]}
    save_model(model, tmp_path / "lateral.safetensors", metadata=meta)
    predictor = Predictor.from_checkpoint(tmp_path / "lateral.safetensors", InferenceConfig(device="cpu", tta=True))
    assert predictor.mirror_axes == (0, 1)
    # the prediction is the mean over exactly those four flips
    x = torch.randn(1, 1, 16, 16, 16)
    net = predictor.network
    with torch.inference_mode():
        expected = sum(torch.flip(net(torch.flip(x, f)), f) if f else net(x) for f in tta_flips((0, 1))) / 4
        got = predictor._tile_predictor()(x)
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)
    save_model(model, tmp_path / "bad.safetensors", metadata={**meta, "mirror_axes": [3]})
    with pytest.raises(InputError, match="mirror axes"):
        Predictor.from_checkpoint(tmp_path / "bad.safetensors")


def test_stop_cancels_within_one_tile(tmp_path, tiny_model_file):
    import threading

    source = read_volume(anisotropic_flipped_volume(tmp_path))
    predictor = Predictor.from_checkpoint(tiny_model_file, InferenceConfig(device="cpu", accelerate=False))
    stop = threading.Event()
    seen = []
    for event in predictor.iter_predict(source, stop=stop):
        seen.append(event)
        stop.set()
    assert len(seen) == 1 and isinstance(seen[0], PredictProgress) and seen[0].total > 1
    with pytest.raises(PredictionCancelled):
        predictor.predict(source, stop=stop)


def test_wrong_channel_count_is_an_input_error(tiny_model_file):
    from napari_e2enet.errors import InputError

    predictor = Predictor.from_checkpoint(tiny_model_file, InferenceConfig(device="cpu"))
    with pytest.raises(InputError, match="channel"):
        predictor.predict(Volume(np.zeros((2, 20, 20, 20), np.float32), np.eye(4), name="two.nii.gz"))


def test_cli_predict_folder_sharded_then_evaluate(tmp_path, tiny_model_file):
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        image, label = make_phantom(seed, shape=(32, 32, 12), spacing=(2.0, 2.0, 4.0))
        write_volume(image, images / f"case{seed}_0000.nii.gz")
        write_volume(Volume((label.array > 0).astype(np.uint8), label.affine), tmp_path / f"ref{seed}.nii.gz")
    out = tmp_path / "out"
    parts = []
    for part in (0, 1):
        proc = subprocess.run([*CLI, "predict", "-i", str(images), "-o", str(out), "--model", str(tiny_model_file),
                               "--device", "cpu", "--num-parts", "2", "--part-id", str(part), "--json"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        parts.append({c["case"] for c in json.loads(proc.stdout)["cases"]})
    assert parts == [{"case0", "case2"}, {"case1"}]
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    # existing outputs are skipped, not overwritten
    proc = subprocess.run([*CLI, "predict", "-i", str(images), "-o", str(out), "--model", str(tiny_model_file),
                           "--device", "cpu", "--json"], capture_output=True, text=True)
    assert {c["status"] for c in json.loads(proc.stdout)["cases"]} == {"skipped (exists)"}

    proc = subprocess.run([*CLI, "evaluate", "--pred", str(out / "case0.nii.gz"), "--ref", str(tmp_path / "ref0.nii.gz"),
                           "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) >= {"dice", "nsd", "hd95"}
    assert report["dice"]["mean"] is None or 0.0 <= report["dice"]["mean"] <= 1.0


def test_cli_predict_missing_input_is_one_line_exit_2(tmp_path, tiny_model_file):
    proc = subprocess.run([*CLI, "predict", "-i", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                           "--model", str(tiny_model_file)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "nope.nii.gz" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "o.nii.gz").exists()
