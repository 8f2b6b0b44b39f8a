"""`napari-e2enet train` under torchrun with 2 CPU processes (gloo)."""

import json
import subprocess
import sys

import pytest

from napari_e2enet.data import phantom_dataset, write_volume
from napari_e2enet.training import load_model, load_state


def write_nnunet_folder(root, n=3):
    dataset = phantom_dataset(n, seed=11, shape=(32, 32, 16), spacing=(3.0, 3.0, 6.0))
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in dataset.cases:
        image, label = case.load()
        write_volume(image, root / "imagesTr" / f"{case.name}_0000.nii.gz")
        write_volume(label, root / "labelsTr" / f"{case.name}.nii.gz")
    labels = {name: int(k) for k, name in dataset.labels.items()}
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": n, "file_ending": ".nii.gz"}))
    return root


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_with_identical_masks(tmp_path):
    data = write_nnunet_folder(tmp_path / "Dataset001_Phantom")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model": "e2enet_small", "model_overrides": {"widths": [4, 8, 8], "pools": [[2, 2, 2]] * 2},
        "iterations": 6, "iterations_per_epoch": 3, "device": "cpu", "seed": 3,
        "sparsity": {"sparsity": 0.8, "update_every": 2},
        "data": {"patch": [16, 16, 16], "batch": 1, "num_validation": 1},
    }))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "napari_e2enet.cli", "train", "--data", str(data), "--out", str(out),
           "--config", str(config), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # only rank 0 prints
    assert summary["iterations"] == 6
    # The trainer all-gathers a mask fingerprint after every topology update and fails on divergence;
    # the saved state is rank 0's and must hold the configured density.
    model, _ = load_model(out / "model.safetensors")
    assert model.sparsity == pytest.approx(0.8, abs=0.02)
    state = load_state(out / "training_state.pt")
    assert state["iteration"] == 6 and len(state["updater"]) > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "connectivity.json", "metrics.csv", "model.safetensors", "training_state.pt"])
