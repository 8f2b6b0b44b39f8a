"""Bad inputs through the CLI (predict / train / evaluate) and the Python API: one table, every case.

Each case must end with exit code 2 and ONE line on stderr — as a terminal shows it — of the form
``napari-e2enet CMD: error: <file>: <problem>``, no traceback, no warning, and no file written or
changed anywhere under the test's folder (a new or altered file fails the snapshot comparison).
The same case through the Python API raises ``InputError`` with one line naming the same file.

The table runs in-process (``napari_e2enet.cli.main`` with fd-level capture: warnings and log
records count as extra stderr output); ``test_console_script`` re-runs a few cases through the real
console entry point in a child process, and the disk-full cases run in children under a file-size
limit. Fuzzing of the NIfTI reader and of dataset.json lives in tests/data/test_data_fuzz.py.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pathlib
import re
import resource
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_e2enet.cli import main
from napari_e2enet.config import TrainConfig, load_config
from napari_e2enet.data import load_dataset, read_image, read_labels, read_volume, write_volume
from napari_e2enet.errors import InputError
from napari_e2enet.inference import Predictor
from napari_e2enet.training import Trainer, load_model, load_state

from .conftest import (
    PHANTOM_SHAPE,
    Assets,
    child_env,
    file_snapshot,
    run_child,
    screen_lines,
    write_train_config,
)


@dataclass
class Ctx:
    tmp: Path
    assets: Assets
    run: Path  # a finished 2-iteration run folder (read-only: copy it)


@dataclass
class Row:
    argv: list[str]
    named: Path | str  # the file the message must name
    problem: str  # regex the message must match
    api: Callable[[], object] | None = None
    extra_checks: list[Callable[[], None]] = field(default_factory=list)
    api_problem: str | None = None  # when the API words it differently (it sees a Volume, not a file)


# ------------------------------------------------------------------ builders of bad files


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    affine = np.diag([3.0, 3.0, 6.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def _image_array(c: Ctx) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(c.assets.image))
    return np.asanyarray(img.dataobj).astype(np.float32), img.affine


def _copy_dataset(c: Ctx) -> Path:
    return Path(shutil.copytree(c.assets.dataset, c.tmp / "ds"))


def _edit_json(folder: Path, **changes) -> None:
    meta = json.loads((folder / "dataset.json").read_text())
    meta.update(changes)
    (folder / "dataset.json").write_text(json.dumps(meta))


def _edit_label(folder: Path, edit: Callable[[np.ndarray], np.ndarray], affine_shift: float = 0.0) -> Path:
    path = folder / "labelsTr" / "c1.nii.gz"
    img = nib.load(str(path))
    affine = img.affine.copy()
    affine[0, 3] += affine_shift
    nib.save(nib.Nifti1Image(edit(np.asanyarray(img.dataobj).copy()), affine), str(path))
    return path


def _copy_run(c: Ctx) -> Path:
    return Path(shutil.copytree(c.run, c.tmp / "run"))


class _Payload:
    """Unpickling this would create the file ``target`` (a stand-in for any code an attacker picks)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


class _SystemPayload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _tampered_model(c: Ctx, name: str, *, tensors=None, metadata=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = c.assets.model3
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors_ = load_file(str(src))
    if tensors is not None:
        tensors(tensors_)
    if metadata is not None:
        metadata(meta)
    path = c.tmp / name
    save_file(tensors_, str(path), metadata=meta)
    return path


FIRST_CONV = "backbone.stages.0.0.conv.weight"


def _widen(t):
    t[FIRST_CONV] = torch.zeros(*t[FIRST_CONV].shape[:-1], t[FIRST_CONV].shape[-1] + 1)


def _nan(t):
    t[FIRST_CONV] = torch.full_like(t[FIRST_CONV], float("nan"))


def _config(**changes):
    def edit(meta):
        config = json.loads(meta["model_config"])
        config.update(changes)
        meta["model_config"] = json.dumps(config)

    return edit


# ------------------------------------------------------------------ API mirrors of the commands


def _predict_api(c: Ctx, image: Path | None = None, model: Path | None = None) -> Callable[[], object]:
    def call():
        predictor = Predictor.from_checkpoint(model or c.assets.model3)
        return predictor.predict(read_image(image or c.assets.image))

    return call


def _train_api(c: Ctx, out: Path, data: Path | None = None, **kwargs) -> Callable[[], object]:
    def call():
        config = load_config(c.assets.train_config, TrainConfig)
        if data is not None:
            config = config.replace(data=config.data.replace(source=str(data)))
        return Trainer(config, out, **kwargs).fit()

    return call


# ------------------------------------------------------------------ the table

def _predict(c: Ctx, image: Path, *, model: Path | None = None, out: Path | None = None) -> list[str]:
    return ["predict", "-i", str(image), "-o", str(out or c.tmp / "out.nii.gz"),
            "--model", str(model or c.assets.model3), "--device", "cpu"]


def _train(c: Ctx, *extra: str, data: Path | None = None, out: Path | None = None) -> list[str]:
    argv = ["train", "--config", str(c.assets.train_config), "--out", str(out or c.tmp / "run_out")]
    if data is not None:
        argv += ["--data", str(data)]
    return [*argv, *extra]


def _evaluate(pred: Path, ref: Path, *extra: str) -> list[str]:
    return ["evaluate", "--pred", str(pred), "--ref", str(ref), *extra]


def p_missing(c):
    path = c.tmp / "missing.nii.gz"
    return Row(_predict(c, path), path, "no such file", _predict_api(c, path), api_problem="file not found")


def p_empty(c):
    path = c.tmp / "empty.nii.gz"
    path.write_bytes(b"")
    return Row(_predict(c, path), path, "empty file", _predict_api(c, path))


def p_truncated_gz(c):
    path = c.tmp / "truncated.nii.gz"
    raw = c.assets.image.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return Row(_predict(c, path), path, "truncated", _predict_api(c, path))


def p_text_named_nii(c):
    path = c.tmp / "notes.nii"
    path.write_text("patient 12: scan postponed\n" * 40)
    return Row(_predict(c, path), path, "not a readable NIfTI", _predict_api(c, path))


def p_png_named_nii(c):
    path = c.tmp / "screenshot.nii"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 3)
    return Row(_predict(c, path), path, "not a readable NIfTI", _predict_api(c, path))


def p_2d(c):
    path = _nifti(c.tmp / "slice.nii.gz", np.zeros((32, 32), np.float32))
    return Row(_predict(c, path), path, "2D image", _predict_api(c, path))


def p_4d(c):
    array, affine = _image_array(c)
    path = _nifti(c.tmp / "series.nii.gz", np.stack([array, array], axis=-1), affine)
    return Row(_predict(c, path), path, "2 channel.*model expects 1", lambda: read_volume(path),
               api_problem="4D image with 2 volumes")


def p_nan(c):
    array, affine = _image_array(c)
    array[3, 4, 5] = np.nan
    path = _nifti(c.tmp / "nan.nii.gz", array, affine)
    return Row(_predict(c, path), path, "NaN or Inf", _predict_api(c, path))


def p_inf(c):
    array, affine = _image_array(c)
    array[0, 0, 0] = -np.inf
    path = _nifti(c.tmp / "inf.nii.gz", array, affine)
    return Row(_predict(c, path), path, "NaN or Inf", _predict_api(c, path))


def p_header_lies_nii(c):
    array, affine = _image_array(c)
    path = _nifti(c.tmp / "short.nii", array, affine)
    raw = path.read_bytes()
    path.write_bytes(raw[:-4096])  # the header still promises 32×32×16 float32
    return Row(_predict(c, path), path, "header declares .* only", _predict_api(c, path))


def p_header_lies_gz(c):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_data_shape((4000, 4000, 4000))  # a 256 GB promise in a few hundred bytes
    path = c.tmp / "bomb.nii.gz"
    path.write_bytes(gzip.compress(img.header.binaryblock + b"\x00" * 4 + bytes(256)))
    return Row(_predict(c, path), path, "header declares .* far more", _predict_api(c, path))


def p_out_under_file(c):
    image = Path(shutil.copy(c.assets.image, c.tmp / "in.nii.gz"))
    out = image / "seg.nii.gz"  # its "folder" is a regular file (root ignores chmod, not this)
    return Row(_predict(c, image, out=out), out, "in.nii.gz is not a folder",
               lambda: write_volume(read_labels(c.assets.labels), out))


def p_out_folder_under_file(c):
    inputs = c.tmp / "inputs"
    inputs.mkdir()
    shutil.copy(c.assets.image, inputs / "a_0000.nii.gz")
    blocker = c.tmp / "blocker"
    blocker.write_text("a regular file where the output folder should go")
    out = blocker / "segs"
    return Row(_predict(c, inputs, out=out), out, "cannot create output folder")


def p_model_missing(c):
    model = c.tmp / "nowhere.safetensors"
    return Row(_predict(c, c.assets.image, model=model), model, "no such model",
               lambda: Predictor.from_any(str(model)))


def p_model_is_pickle(c):
    model = c.tmp / "model.safetensors"
    torch.save({"weights": torch.zeros(3), "x": _Payload(c.tmp / "PAYLOAD_RAN")}, model)
    return Row(_predict(c, c.assets.image, model=model), model, "not a safetensors model file",
               _predict_api(c, model=model), [lambda: _assert_absent(c.tmp / "PAYLOAD_RAN")])


def p_model_without_metadata(c):
    from safetensors.torch import load_file, save_file

    model = c.tmp / "foreign.safetensors"
    save_file(load_file(str(c.assets.model3)), str(model))
    return Row(_predict(c, c.assets.image, model=model), model, "not a napari-e2enet model file",
               _predict_api(c, model=model))


def p_model_tensor_tampered(c):
    model = _tampered_model(c, "tampered.safetensors", tensors=_widen)
    return Row(_predict(c, c.assets.image, model=model), model, f"tensor {FIRST_CONV} has shape",
               _predict_api(c, model=model))


def p_model_class_count_lies(c):
    model = _tampered_model(c, "classes.safetensors", metadata=_config(num_classes=16))
    return Row(_predict(c, c.assets.image, model=model), model, r"heads\.0\.weight has shape \[3, .* needs \[16,",
               _predict_api(c, model=model))


def p_model_metadata_huge_architecture(c):
    # Materialising this network would need terabytes; it must be refused before any allocation.
    model = _tampered_model(c, "huge.safetensors", metadata=_config(widths=[65536, 131072, 131072]))
    return Row(_predict(c, c.assets.image, model=model), model, "has shape .* needs",
               _predict_api(c, model=model))


def p_model_nan_weights(c):
    model = _tampered_model(c, "nan.safetensors", tensors=_nan)
    return Row(_predict(c, c.assets.image, model=model), model, "NaN or Inf",
               _predict_api(c, model=model))


def p_model_plan_garbage(c):
    def edit(meta):
        meta["plan"] = json.dumps({"target_spacing": "fine"})

    model = _tampered_model(c, "plan.safetensors", metadata=edit)
    return Row(_predict(c, c.assets.image, model=model), model, "unusable metadata",
               _predict_api(c, model=model))


def p_model_truncated(c):
    model = c.tmp / "cut.safetensors"
    raw = c.assets.model3.read_bytes()
    model.write_bytes(raw[: len(raw) // 3])
    return Row(_predict(c, c.assets.image, model=model), model, "safetensors",
               _predict_api(c, model=model))


def t_data_missing(c):
    data = c.tmp / "no_such_dataset"
    return Row(_train(c, data=data), data, "dataset folder not found", lambda: load_dataset(data))


def t_json_malformed(c):
    ds = _copy_dataset(c)
    (ds / "dataset.json").write_text('{"labels": {"background": 0,')
    return Row(_train(c, data=ds), ds / "dataset.json", "not valid JSON", _train_api(c, c.tmp / "r", ds))


def t_json_labels_wrong_type(c):
    ds = _copy_dataset(c)
    _edit_json(ds, labels=["background", "liver"])
    return Row(_train(c, data=ds), ds / "dataset.json", "'labels' mapping", _train_api(c, c.tmp / "r", ds))


def t_json_path_escapes(c):
    ds = _copy_dataset(c)
    _edit_json(ds, training=[{"image": "imagesTr/c0_0000.nii.gz", "label": "../../../etc/passwd"}])
    return Row(_train(c, data=ds), ds / "dataset.json", "points outside the dataset folder",
               _train_api(c, c.tmp / "r", ds))


def t_json_absolute_path(c):
    ds = _copy_dataset(c)
    _edit_json(ds, training=[{"image": "/etc/hostname", "label": "labelsTr/c0.nii.gz"}])
    return Row(_train(c, data=ds), ds / "dataset.json", "absolute path", _train_api(c, c.tmp / "r", ds))


def t_symlink_escapes(c):
    ds = _copy_dataset(c)
    outside = Path(shutil.copy(ds / "labelsTr" / "c1.nii.gz", c.tmp / "outside.nii.gz"))
    (ds / "labelsTr" / "c1.nii.gz").unlink()
    (ds / "labelsTr" / "c1.nii.gz").symlink_to(outside)
    return Row(_train(c, data=ds), ds / "labelsTr" / "c1.nii.gz", "points outside the dataset folder",
               _train_api(c, c.tmp / "r", ds))


def t_shape_mismatch(c):
    ds = _copy_dataset(c)
    label = _edit_label(ds, lambda a: a[:30])
    return Row(_train(c, data=ds), label, r"label shape \(30, 32, 16\) does not match",
               _train_api(c, c.tmp / "r", ds))


def t_affine_mismatch(c):
    ds = _copy_dataset(c)
    label = _edit_label(ds, lambda a: a, affine_shift=7.5)
    return Row(_train(c, data=ds), label, "affine does not match", _train_api(c, c.tmp / "r", ds))


def t_label_fractional(c):
    ds = _copy_dataset(c)
    label = _edit_label(ds, lambda a: a.astype(np.float32) + 0.5)
    return Row(_train(c, data=ds), label, "must be integers", _train_api(c, c.tmp / "r", ds))


def t_label_unexpected(c):
    ds = _copy_dataset(c)
    label = _edit_label(ds, lambda a: np.where(a > 0, 40, 0).astype(np.uint8))
    return Row(_train(c, data=ds), label, "label values 40 are not in the dataset's labels",
               _train_api(c, c.tmp / "r", ds))


def t_label_unexpected_when_fine_tuning(c):
    # With --init-from the plan comes from the model, so no fingerprint pass reads the labels first.
    ds = _copy_dataset(c)
    label = _edit_label(ds, lambda a: np.where(a > 0, 40, 0).astype(np.uint8))
    return Row(_train(c, "--init-from", str(c.assets.model16), data=ds), label, "label values 40",
               _train_api(c, c.tmp / "r", ds, init_from=c.assets.model16))


def t_init_from_other_class_count(c):
    return Row(_train(c, "--init-from", str(c.assets.model3)), c.assets.model3, "3 classes but the data has 1 / 16",
               _train_api(c, c.tmp / "r", init_from=c.assets.model3))


def t_init_from_pickle(c):
    model = c.tmp / "model.safetensors"
    torch.save({"x": _SystemPayload(c.tmp / "PAYLOAD_RAN")}, model)
    return Row(_train(c, "--init-from", str(c.tmp)), model, "not a safetensors model file",
               _train_api(c, c.tmp / "r", init_from=model), [lambda: _assert_absent(c.tmp / "PAYLOAD_RAN")])


def t_config_malformed(c):
    config = c.tmp / "train.yaml"
    config.write_text("iterations: [unclosed\n")
    return Row(["train", "--config", str(config), "--out", str(c.tmp / "run_out")], config, "not valid yaml")


def t_out_under_file(c):
    blocker = c.tmp / "blocker"
    blocker.write_text("a regular file")
    out = blocker / "run"
    return Row(_train(c, out=out), out, "cannot create the run folder", _train_api(c, out))


def t_resume_payload_pickle(c):
    run = _copy_run(c)
    marker = c.tmp / "PAYLOAD_RAN"
    torch.save({"iteration": 1, "model": _Payload(marker)}, run / "training_state.pt")
    return Row(["train", "--resume", "--out", str(run)], run / "training_state.pt", "refused .* no code runs",
               lambda: Trainer(TrainConfig(), run, resume=True).fit(), [lambda: _assert_absent(marker)])


def t_resume_system_pickle(c):
    run = _copy_run(c)
    marker = c.tmp / "PAYLOAD_RAN"
    torch.save(_SystemPayload(marker), run / "training_state.pt")
    return Row(["train", "--resume", "--out", str(run)], run / "training_state.pt", "posix.system.* no code runs",
               lambda: load_state(run / "training_state.pt"), [lambda: _assert_absent(marker)])


def t_resume_other_architecture(c):
    run = _copy_run(c)
    config = json.loads((run / "config.json").read_text())
    config["model_overrides"]["widths"] = [4, 8, 16]
    (run / "config.json").write_text(json.dumps(config))
    return Row(["train", "--resume", "--out", str(run)], run / "training_state.pt", "unusable training state",
               lambda: Trainer(TrainConfig(), run, resume=True).fit())


def t_resume_state_missing_entries(c):
    run = _copy_run(c)
    torch.save({"iteration": 1}, run / "training_state.pt")
    return Row(["train", "--resume", "--out", str(run)], run / "training_state.pt", "missing entry: 'plan'",
               lambda: Trainer(TrainConfig(), run, resume=True).fit())


def t_resume_state_truncated(c):
    run = _copy_run(c)
    raw = (run / "training_state.pt").read_bytes()
    (run / "training_state.pt").write_bytes(raw[: len(raw) // 2])
    return Row(["train", "--resume", "--out", str(run)], run / "training_state.pt", "not a valid training-state file",
               lambda: load_state(run / "training_state.pt"))


def t_resume_config_malformed(c):
    run = _copy_run(c)
    (run / "config.json").write_text('{"iterations": ')
    return Row(["train", "--resume", "--out", str(run)], run / "config.json", "not valid json",
               lambda: Trainer(TrainConfig(), run, resume=True))


def t_resume_without_state(c):
    run = c.tmp / "empty_run"
    run.mkdir()
    return Row(["train", "--resume", "--out", str(run)], run / "training_state.pt", "no training state",
               lambda: Trainer(TrainConfig(), run, resume=True))


def _labels_copy(c: Ctx, name: str, edit=None, *, dtype=None, affine_shift: float = 0.0) -> Path:
    img = nib.load(str(c.assets.labels))
    array = np.asanyarray(img.dataobj).copy()
    if edit is not None:
        array = edit(array)
    affine = img.affine.copy()
    affine[0, 3] += affine_shift
    return _nifti(c.tmp / name, array.astype(dtype or array.dtype), affine)


def e_missing(c):
    pred = c.tmp / "pred.nii.gz"
    return Row(_evaluate(pred, c.assets.labels), pred, "no such file", lambda: read_labels(pred),
               api_problem="file not found")


def e_truncated(c):
    pred = c.tmp / "pred.nii.gz"
    raw = c.assets.labels.read_bytes()
    pred.write_bytes(raw[: len(raw) // 2])
    return Row(_evaluate(pred, c.assets.labels), pred, "truncated", lambda: read_labels(pred))


def e_fractional(c):
    pred = _labels_copy(c, "pred.nii.gz", lambda a: a.astype(np.float32) * 0.5)
    return Row(_evaluate(pred, c.assets.labels), pred, "must be integers", lambda: read_labels(pred))


def e_negative(c):
    pred = _labels_copy(c, "pred.nii.gz", lambda a: a.astype(np.int16) - 1)
    return Row(_evaluate(pred, c.assets.labels), pred, "negative label value", lambda: read_labels(pred))


def e_4d(c):
    pred = _labels_copy(c, "pred.nii.gz", lambda a: np.stack([a, a], axis=-1))
    return Row(_evaluate(pred, c.assets.labels), pred, "4D image", lambda: read_labels(pred))


def e_shape_mismatch(c):
    pred = _labels_copy(c, "pred.nii.gz", lambda a: a[:, :, :12])
    return Row(_evaluate(pred, c.assets.labels), pred, r"shape \(32, 32, 12\) differs from the reference")


def e_affine_mismatch(c):
    pred = _labels_copy(c, "pred.nii.gz", affine_shift=4.0)
    return Row(_evaluate(pred, c.assets.labels), pred, "affine differs")


def e_folder_missing_case(c):
    preds, refs = c.tmp / "preds", c.tmp / "refs"
    preds.mkdir()
    refs.mkdir()
    shutil.copy(c.assets.labels, refs / "case_a.nii.gz")
    shutil.copy(c.assets.labels, preds / "case_b.nii.gz")
    return Row(_evaluate(preds, refs), preds, "no prediction for reference case 'case_a'")


def e_labels_table_malformed(c):
    table = c.tmp / "labels.json"
    table.write_text("{1: liver}")
    return Row(_evaluate(c.assets.labels, c.assets.labels, "--labels", str(table)), table, "not valid JSON")


CASES: dict[str, Callable[[Ctx], Row]] = {
    f.__name__: f for f in (
        p_missing, p_empty, p_truncated_gz, p_text_named_nii, p_png_named_nii, p_2d, p_4d, p_nan, p_inf,
        p_header_lies_nii, p_header_lies_gz, p_out_under_file, p_out_folder_under_file,
        p_model_missing, p_model_is_pickle, p_model_without_metadata, p_model_tensor_tampered,
        p_model_class_count_lies, p_model_metadata_huge_architecture, p_model_nan_weights,
        p_model_plan_garbage, p_model_truncated,
        t_data_missing, t_json_malformed, t_json_labels_wrong_type, t_json_path_escapes, t_json_absolute_path,
        t_symlink_escapes, t_shape_mismatch, t_affine_mismatch, t_label_fractional, t_label_unexpected,
        t_label_unexpected_when_fine_tuning, t_init_from_other_class_count, t_init_from_pickle,
        t_config_malformed, t_out_under_file, t_resume_payload_pickle, t_resume_system_pickle,
        t_resume_other_architecture, t_resume_state_missing_entries, t_resume_state_truncated,
        t_resume_config_malformed, t_resume_without_state,
        e_missing, e_truncated, e_fractional, e_negative, e_4d, e_shape_mismatch, e_affine_mismatch,
        e_folder_missing_case, e_labels_table_malformed,
    )
}
API_CASES = ["p_missing", "p_empty", "p_truncated_gz", "p_text_named_nii", "p_png_named_nii", "p_2d", "p_4d",
             "p_nan", "p_inf", "p_header_lies_nii", "p_header_lies_gz", "p_out_under_file", "p_model_missing",
             "p_model_is_pickle", "p_model_without_metadata", "p_model_tensor_tampered", "p_model_class_count_lies",
             "p_model_metadata_huge_architecture", "p_model_nan_weights", "p_model_plan_garbage",
             "p_model_truncated", "t_data_missing", "t_json_malformed", "t_json_labels_wrong_type",
             "t_json_path_escapes", "t_json_absolute_path", "t_symlink_escapes", "t_shape_mismatch",
             "t_affine_mismatch", "t_label_fractional", "t_label_unexpected", "t_label_unexpected_when_fine_tuning",
             "t_init_from_other_class_count", "t_init_from_pickle", "t_out_under_file", "t_resume_payload_pickle",
             "t_resume_system_pickle", "t_resume_other_architecture", "t_resume_state_missing_entries",
             "t_resume_state_truncated", "t_resume_config_malformed", "t_resume_without_state", "e_missing",
             "e_truncated", "e_fractional", "e_negative", "e_4d"]


def _assert_absent(path: Path) -> None:
    assert not path.exists(), f"{path} exists: the pickle payload ran"


# ------------------------------------------------------------------ fixtures and checks


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, assets) -> Path:
    """A 2-iteration training run folder (config.json, model, state, metrics, connectivity)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    config = load_config(write_train_config(out.parent / "c.json", assets.dataset, iterations=2), TrainConfig)
    Trainer(config, out).fit()
    return out


@pytest.fixture(scope="module", autouse=True)
def _assets_never_change(assets):
    before = file_snapshot(assets.root)
    yield
    assert file_snapshot(assets.root) == before, "a bad-input case modified the shared test assets"


def _check_line(line: str, command: str, row: Row) -> None:
    assert line.startswith(f"napari-e2enet {command}: error: "), line
    assert str(row.named) in line, f"the message does not name {row.named}: {line}"
    assert re.search(row.problem, line), f"{row.problem!r} not in: {line}"


@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_input(case, tmp_path, assets, finished_run, capfd, caplog):
    c = Ctx(tmp_path, assets, finished_run)
    row = CASES[case](c)
    before = file_snapshot(tmp_path)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(row.argv)  # anything escaping here would be a traceback for the user
    out, err = capfd.readouterr()
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = screen_lines(err)
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    _check_line(lines[0], row.argv[0], row)
    assert out == ""
    assert not [str(w.message) for w in caught], "warnings would reach the user's stderr"
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert file_snapshot(tmp_path) == before, "a file was written or changed"
    for check in row.extra_checks:
        check()


@pytest.mark.parametrize("case", API_CASES)
def test_api_bad_input(case, tmp_path, assets, finished_run):
    c = Ctx(tmp_path, assets, finished_run)
    row = CASES[case](c)
    assert row.api is not None
    before = file_snapshot(tmp_path)
    with pytest.raises(InputError) as info:
        row.api()
    message = str(info.value)
    assert "\n" not in message
    assert str(row.named) in message, message
    assert re.search(row.api_problem or row.problem, message), message
    assert file_snapshot(tmp_path) == before
    for check in row.extra_checks:
        check()


def test_every_case_has_an_api_mirror_or_is_cli_only():
    cli_only = {"p_out_folder_under_file", "t_config_malformed", "e_shape_mismatch", "e_affine_mismatch",
                "e_folder_missing_case", "e_labels_table_malformed"}
    assert set(API_CASES) | cli_only == set(CASES)
    assert not set(API_CASES) & cli_only


# ------------------------------------------------------------------ real console script, real disks


@pytest.mark.slow
@pytest.mark.parametrize("case", ["p_truncated_gz", "t_resume_payload_pickle", "e_fractional"])
def test_console_script(case, tmp_path, assets, finished_run):
    """The same cases through ``python -m napari_e2enet.cli`` in a fresh process: raw stderr is one line."""
    c = Ctx(tmp_path, assets, finished_run)
    row = CASES[case](c)
    before = file_snapshot(tmp_path)
    child = run_child(row.argv)
    assert child.proc.returncode == 2, child.text_err
    assert child.text_err.count("\n") == 1 and child.text_err.endswith("\n"), repr(child.text_err)
    _check_line(child.text_err.strip(), row.argv[0], row)
    assert child.text_out == ""
    assert file_snapshot(tmp_path) == before
    for check in row.extra_checks:
        check()


def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_disk_full_while_writing_a_prediction(tmp_path, assets):
    """The disk fills up mid-write (file-size limit): exit 2, one line naming the output, nothing left."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "seg.nii.gz"
    child = run_child(["predict", "-i", str(assets.image), "-o", str(target), "--model", str(assets.model3),
                       "--device", "cpu"], env=child_env(tmp_path / "scratch"), preexec_fn=_file_size_limit(200))
    assert child.proc.returncode == 2, child.text_err
    lines = screen_lines(child.text_err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("napari-e2enet predict: error: ") and str(target) in lines[0]
    assert "File too large" in lines[0]
    assert list(out.iterdir()) == []  # neither the output nor a temporary file


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint(tmp_path, assets):
    """Checkpoint writes go through torch.save and safetensors, which report a full disk as
    RuntimeError / SafetensorError: still one line, exit 2, no half file."""
    run = tmp_path / "run"
    child = run_child(["train", "--config", str(assets.train_config), "--out", str(run)],
                      env=child_env(tmp_path / "scratch"), preexec_fn=_file_size_limit(8192))
    assert child.proc.returncode == 2, child.text_err
    last = screen_lines(child.text_err)[-1]  # after the progress bar of the iterations that ran
    assert last.startswith(f"napari-e2enet train: error: {run / 'model.safetensors'}: cannot write ("), last
    assert "File too large" in last, last
    assert "Traceback" not in child.text_err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # complete; no half model, no temp
    assert load_config(run / "config.json", TrainConfig).iterations == 4


def test_loading_a_valid_copy_still_works(tmp_path, assets):
    """Control: the fixtures the table damages are fine when left alone."""
    model, meta = load_model(assets.model3)
    assert model.config.num_classes == 3 and "plan" in meta
    prediction = Predictor.from_checkpoint(assets.model3).predict(read_image(assets.image))
    assert prediction.array.shape == PHANTOM_SHAPE
    assert len(load_dataset(assets.dataset)) == 3
