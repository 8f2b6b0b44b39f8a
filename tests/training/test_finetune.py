"""Fine-tuning on corrections (training/finetune.py and `napari-e2enet finetune`): what it learns
from, what it keeps, how it stops, what it writes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_e2enet import create_model
from napari_e2enet.cli import main
from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import Plan, Volume, make_phantom, preprocess, preprocess_labels, write_volume
from napari_e2enet.inference import Predictor
from napari_e2enet.labels import LabelTable
from napari_e2enet.training import load_model, read_metadata, save_model
from napari_e2enet.training.finetune import (
    FinetuneConfig,
    _RegionSampler,
    correction_region,
    iter_finetune,
    masked_dice_ce,
)

TABLE = LabelTable({1: "spleen", 2: "right kidney"})


@pytest.fixture(scope="module")
def case() -> tuple[Volume, Volume]:
    image, labels = make_phantom(4, shape=(40, 36, 20), spacing=(2.0, 2.0, 4.0))
    labels = labels.with_array(np.where(labels.array > 2, 0, labels.array).astype(np.uint8))
    return image, labels


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> tuple:
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    model = create_model("e2enet_small", num_classes=3, widths=(4, 8, 8), pools=((2, 2, 2),) * 2, sparsity=0.8)
    plan = Plan((4.0, 2.0, 2.0), "CT", (-1000.0, 400.0), 0.0, 300.0, orientation="RAS")
    meta = {"plan": plan.to_dict(), "labels": TABLE.to_dict(), "mirror_axes": [0, 1],
            "train_config": {"data": {"patch": [16, 16, 16]}, "sparsity": {"sparsity": 0.8}},
            "intended_input": {"modality": "CT", "intensity": "HU"}}
    save_model(model, path, metadata=meta)
    return path, plan


def test_the_loss_region_is_the_planes_the_user_corrected():
    edited = np.zeros((30, 20, 10), bool)
    edited[5:9, 3:12, 4] = True  # a stroke on axial slice 4
    edited[10:12, 2:5, 7] = True  # and one on slice 7
    region = correction_region(edited)
    assert region[:, :, [4, 7]].all() and not region[:, :, [0, 1, 2, 3, 5, 6, 8, 9]].any()
    assert not correction_region(np.zeros((4, 4, 4), bool)).any()


def test_voxels_outside_the_mask_do_not_move_the_loss():
    torch.manual_seed(0)
    logits = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4)]
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    mask = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    mask[:, :, 2:6] = True
    other = target.clone()
    other[~mask] = (other[~mask] + 1) % 3
    assert float(masked_dice_ce(logits, target, mask)) == pytest.approx(float(masked_dice_ce(logits, other, mask)))
    changed = target.clone()
    changed[mask] = (changed[mask] + 1) % 3
    assert float(masked_dice_ce(logits, changed, mask)) != pytest.approx(float(masked_dice_ce(logits, target, mask)))


def test_finetune_learns_the_corrected_planes_keeps_the_encoder_and_the_topology(tmp_path, case, base_model):
    image, labels = case
    path, plan = base_model
    edited = np.zeros(labels.spatial_shape, bool)
    edited[:, :, [6, 10, 14]] = labels.array[:, :, [6, 10, 14]] > 0
    config = FinetuneConfig(iterations=20, lr=3e-3, batch=2, device="cpu")
    # the masked loss on a fixed batch of corrected patches, before and after
    net_image, _ = preprocess(image, plan)
    grid = Volume(labels.array, image.affine)
    sampler = _RegionSampler(net_image, preprocess_labels(grid, plan),
                             preprocess_labels(grid.with_array(correction_region(edited).astype(np.uint8)), plan) > 0,
                             (16, 16, 16), seed=7)
    batch = sampler.batch(6)

    def loss_of(model_file) -> float:
        model, _ = load_model(model_file)
        model.train()
        with torch.no_grad():
            return float(masked_dice_ce(model(batch[0]), batch[1], batch[2]))

    learn = list(iter_finetune(path, image, labels, tmp_path / "all", edited=edited,
                               config=config.replace(train="all", lr=1e-2)))
    assert loss_of(tmp_path / "all" / "model.safetensors") < 0.8 * loss_of(path)
    events = list(iter_finetune(path, image, labels, tmp_path / "run", edited=edited,
                                config=config.replace(train="decoder")))
    for run in (learn, events):
        assert run[0].kind == "start" and run[-1].kind == "done"
        assert [e.iteration for e in run if e.kind == "iteration"] == list(range(1, config.iterations + 1))

    base, _ = load_model(path)
    tuned, meta = load_model(tmp_path / "run" / "model.safetensors")
    for (name, a), b in zip(base.backbone.state_dict().items(), tuned.backbone.state_dict().values()):
        assert torch.equal(a, b), name  # encoder frozen
    assert any(not torch.equal(a, b) for a, b in zip(base.decoder.parameters(), tuned.decoder.parameters()))
    assert all(torch.equal(base.masks()[k], tuned.masks()[k]) for k in base.masks())  # no topology update in 20 steps
    for mw in tuned.maskable():
        assert (mw.weight[~mw.module.kernel_mask] == 0).all()  # DSFF on: pruned kernels stay zero
    base_meta = read_metadata(path)
    for key in ("plan", "labels", "mirror_axes", "intended_input"):
        assert meta[key] == base_meta[key], key
    assert meta["finetune"]["region_voxels"] == int(correction_region(edited).sum())
    predicted = Predictor.from_checkpoint(tmp_path / "run", InferenceConfig(device="cpu")).predict(image)
    assert predicted.array.shape == image.spatial_shape


def test_stop_ends_at_the_next_iteration_and_writes_nothing(tmp_path, case, base_model):
    image, labels = case
    stop = threading.Event()
    events = []
    for event in iter_finetune(base_model[0], image, labels, tmp_path / "run", stop=stop,
                               config=FinetuneConfig(iterations=50, device="cpu")):
        events.append(event)
        if event.kind == "iteration" and event.iteration == 2:
            stop.set()
    assert events[-1].kind == "stopped" and events[-1].iteration == 2
    assert not (tmp_path / "run").exists()


def test_finetune_skips_pruned_kernels_on_the_cpu_and_unhooks_after(tmp_path, case, base_model, monkeypatch):
    """The bundled models are DSFF-sparse: fine-tune trains their masked fusion convs through the
    sparse kernels (training.sparse_conv), not dense convs over zeros, and leaves no hook behind."""
    import napari_e2enet.training.finetune as ft
    from napari_e2enet.inference.cpu import find_compiler
    from napari_e2enet.inference.cpu.compact import load_kernels

    if load_kernels() is None and find_compiler() is None:
        pytest.skip("no C compiler here: fine-tune trains dense")
    installed = []
    install = ft.install_sparse_training

    def spy(model, device):
        sparse = install(model, device)
        installed.append(list(sparse.units.values()) if sparse is not None else None)
        return sparse

    monkeypatch.setattr(ft, "install_sparse_training", spy)
    image, labels = case
    events = list(ft.iter_finetune(base_model[0], image, labels, tmp_path / "run",
                                   config=FinetuneConfig(iterations=3, device="cpu")))
    assert events[-1].kind == "done"
    (hooks,) = installed
    assert hooks and sum(hook.calls for hook in hooks) >= 3 * len(hooks)  # every masked unit, every step
    assert all(hook.unit.fused_conv is None for hook in hooks)  # unhooked: a plain E2ENet again


def test_the_cli_fine_tunes_and_refuses_what_it_cannot_use(tmp_path, case, base_model, capsys):
    image, labels = case
    write_volume(image, tmp_path / "ct.nii.gz")
    write_volume(labels, tmp_path / "ct_seg.nii.gz")
    edited = np.zeros(labels.spatial_shape, np.uint8)
    edited[:, :, 8] = 1
    write_volume(image.with_array(edited), tmp_path / "edited.nii.gz")
    args = ["finetune", "--model", str(base_model[0]), "--image", str(tmp_path / "ct.nii.gz"),
            "--labels", str(tmp_path / "ct_seg.nii.gz"), "--edited", str(tmp_path / "edited.nii.gz"),
            "--iterations", "2", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "run"), "--json"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "finetune.json").is_file()
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "run")]) == 2  # a model is there already
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a model" in err[0] and "--overwrite" in err[0]
    write_volume(image.with_array(np.where(labels.array > 0, 7, 0).astype(np.uint8)), tmp_path / "bad_seg.nii.gz")
    bad = [a if a != str(tmp_path / "ct_seg.nii.gz") else str(tmp_path / "bad_seg.nii.gz") for a in args]
    assert main([*bad, "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not classes of the model" in err[0]
    assert not (tmp_path / "run2").exists()


def test_patches_lie_inside_the_volume_and_hold_a_corrected_voxel():
    """As the sliding window's tiles: no zero padding at the volume's edge (a picture the network never
    sees at inference), and every patch teaches at least one corrected voxel."""
    rng = np.random.default_rng(0)
    image = rng.random((1, 40, 30, 24), dtype=np.float32) + 1.0  # no zeros anywhere: padding would show
    labels = rng.integers(0, 3, (40, 30, 24)).astype(np.int64)
    region = np.zeros((40, 30, 24), bool)
    region[0, :, :] = True  # the first plane: a centred patch would be half padding
    region[39, 29, 23] = True  # and one corner voxel
    sampler = _RegionSampler(image, labels, region, (16, 16, 16), seed=3)
    images, patch_labels, weights = sampler.batch(64)
    assert images.shape == (64, 1, 16, 16, 16) and patch_labels.shape == (64, 1, 16, 16, 16)
    assert float(images.min()) >= 1.0  # nothing but image voxels
    assert all(float(w.sum()) > 0 for w in weights)
    # a volume smaller than the patch is padded symmetrically, as the sliding window pads it
    small = _RegionSampler(image[:, :10, :30, :24], labels[:10], region[:10], (16, 16, 16), seed=3)
    images, _, _ = small.batch(4)
    assert (images[:, :, :3] == 0).all() and (images[:, :, 3:13] >= 1.0).all() and (images[:, :, 13:] == 0).all()


def test_corrections_outside_the_foreground_are_refused_in_one_line(tmp_path, base_model):
    image, labels = make_phantom(4, shape=(40, 36, 20), spacing=(2.0, 2.0, 4.0))
    labels = labels.with_array(np.where(labels.array > 2, 0, labels.array).astype(np.uint8))
    path, plan = base_model
    meta = read_metadata(path)
    model, _ = load_model(path)
    fg_plan = Plan(plan.target_spacing, "MRI", norm_nonzero=True, orientation="RAS")
    save_model(model, tmp_path / "mri.safetensors", metadata={**meta, "plan": fg_plan.to_dict()})
    array = image.array.astype(np.float32) + 1100.0  # HU -> positive, then a zero border around it
    array[:4], array[-4:] = 0, 0
    mri = image.with_array(array)
    edited = np.zeros(labels.spatial_shape, bool)
    edited[:2, 5:10, 5:10] = True  # edits on two sagittal planes of the zero border: the model never predicts there
    with pytest.raises(Exception, match="outside the image's foreground"):
        list(iter_finetune(tmp_path / "mri.safetensors", mri, labels, tmp_path / "run", edited=edited,
                           config=FinetuneConfig(iterations=1, device="cpu")))
    assert not (tmp_path / "run").exists()
