"""Issue 16, class 4: no tracebacks. Every option is validated at the boundary, a model file (or a
volume) may not ask for more memory than there is, and whatever still goes wrong unexpectedly is one
line naming the exception and a log file with its traceback (exit 1).

- Option errors (``--patch 0 0 0``, ``--batch 0``, ``--lr nan``, ``info --in-channels -1`` …): exit 2,
  one line naming the option, nothing written. The same values in a ``--config`` file are refused
  naming the file, and through the API ``TrainConfig``/``ModelConfig`` raise ``ValueError`` (the
  napari widgets build the same configs, so they get the same checks).
- Memory: a plan whose voxel size asks for terabytes, a batch that cannot fit, a large volume under
  an address-space limit: one line with the GiB needed and available, before allocating. Label ids
  of 2·10⁹ in ``evaluate`` cost what the labels present cost.
- The catch-all: ``napari-e2enet CMD: error: unexpected <Type>: <message> (traceback in <log>)``.
"""

from __future__ import annotations

import json
import re
import resource
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_e2enet import cli
from napari_e2enet.cli import main
from napari_e2enet.config import DataConfig, ModelConfig, SparsityConfig, TrainConfig

from .conftest import child_env, file_snapshot, run_child, screen_lines, write_train_config


def _one_line(capfd, code: int, expected: int = 2) -> str:
    out, err = capfd.readouterr()
    assert code == expected, err
    assert out == "" and "Traceback" not in err
    lines = screen_lines(err)
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------ options on the command line

TRAIN = ["train", "--data", "{dataset}", "--out", "{tmp}/run", "--device", "cpu"]
OPTION_CASES = {
    # name: (argv, expected message after "napari-e2enet CMD: error: ")
    "train_patch_0": ([*TRAIN, "--patch", "0", "0", "0"], r"argument --patch: must be >= 1, got 0"),
    "train_patch_7": ([*TRAIN, "--patch", "7", "7", "7"],
                      r"patch 7x7x7 does not fit the e2enet_small network: each size must be a multiple of "
                      r"16x16x16 .* e\.g\. 32x16x16"),
    "train_patch_bottleneck_1": ([*TRAIN, "--patch", "16", "16", "16"], r"one at least twice that; e\.g\. 32x16x16"),
    "train_batch_0": ([*TRAIN, "--batch", "0"], r"argument --batch: must be >= 1, got 0"),
    "train_iterations_negative": ([*TRAIN, "--iterations", "-5"], r"argument --iterations: must be >= 1, got -5"),
    "train_iterations_fraction": ([*TRAIN, "--iterations", "1.5"],
                                  r"argument --iterations: must be a whole number, got '1.5'"),
    "train_iterations_per_epoch_0": ([*TRAIN, "--iterations-per-epoch", "0"], r"--iterations-per-epoch: must be >= 1"),
    "train_model_unknown": ([*TRAIN, "--model", "resnet9000"], r"unknown model 'resnet9000'; choose from .*e2enet_small"),
    "train_lr_nan": ([*TRAIN, "--lr", "nan"], r"argument --lr: must be a finite number in \(0, inf\), got nan"),
    "train_lr_inf": ([*TRAIN, "--lr", "inf"], r"argument --lr: must be a finite number"),
    "train_lr_0": ([*TRAIN, "--lr", "0"], r"argument --lr: must be a finite number in \(0, inf\), got 0"),
    "train_lr_text": ([*TRAIN, "--lr", "fast"], r"argument --lr: must be a number, got 'fast'"),
    "train_sparsity_1": ([*TRAIN, "--sparsity", "1"], r"argument --sparsity: must be a finite number in \[0, 1\)"),
    "train_foreground_negative": ([*TRAIN, "--foreground-oversample", "-0.1"], r"--foreground-oversample: must be"),
    "train_seed_negative": ([*TRAIN, "--seed", "-1"], r"argument --seed: must be in 0\.\.\d+, got -1"),
    "train_num_validation_negative": ([*TRAIN, "--num-validation", "-1"], r"--num-validation: must be >= 0"),
    "train_validation_patches_0": ([*TRAIN, "--validation-patches", "0"], r"--validation-patches: must be >= 1"),
    "train_update_every_negative": ([*TRAIN, "--update-every", "-1"], r"--update-every: must be >= 0"),
    "train_checkpoint_every_negative": ([*TRAIN, "--checkpoint-every", "-1"], r"--checkpoint-every: must be a finite"),
    "train_checkpoint_every_nan": ([*TRAIN, "--checkpoint-every", "nan"], r"--checkpoint-every: must be a finite"),
    "train_resume_and_overwrite": (["train", "--out", "{tmp}/run", "--resume", "--overwrite"],
                                   r"--resume continues the run in --out and --overwrite replaces it: choose one"),
    "train_missing_out": (["train", "--data", "{dataset}"],
                          r"the following arguments are required: --out \(see napari-e2enet train --help\)"),
    "train_unknown_option": ([*TRAIN, "--epochs", "3"], r"unrecognized arguments: --epochs 3"),
    "info_in_channels_negative": (["info", "--in-channels", "-1"], r"argument --in-channels: must be in 1\.\.4096"),
    "info_classes_0": (["info", "--classes", "0"], r"argument --classes: must be in 1\.\.32767, got 0"),
    "info_sparsity_nan": (["info", "--sparsity", "nan"], r"argument --sparsity: must be a finite number"),
    "info_patch_0": (["info", "--patch", "0", "1", "1"], r"argument --patch: must be >= 1, got 0"),
    "info_pools_0": (["info", "--pools", "0", "2", "2"], r"argument --pools: must be >= 1, got 0"),
    "info_patch_7": (["info", "--model", "e2enet_small", "--patch", "7", "7", "7"], r"not a multiple of"),
    "info_model_unknown": (["info", "--model", "resnet9000"], r"unknown model 'resnet9000'"),
    "predict_overlap_1": (["predict", "-i", "{image}", "-o", "{tmp}/o.nii.gz", "--overlap", "1"],
                          r"argument --overlap: must be a finite number in \[0, 1\), got 1"),
    "predict_overlap_nan": (["predict", "-i", "{image}", "-o", "{tmp}/o.nii.gz", "--overlap", "nan"],
                            r"argument --overlap: must be a finite number"),
    "predict_intensity_offset_text": (["predict", "-i", "{image}", "-o", "{tmp}/o.nii.gz", "--intensity-offset",
                                       "minus"], r"argument --intensity-offset: must be a whole number \(e\.g\. "
                                                 r"-1024\) or auto, got 'minus'"),
    "predict_intensity_offset_fraction": (["predict", "-i", "{image}", "-o", "{tmp}/o.nii.gz", "--intensity-offset",
                                           "-1024.5"], r"argument --intensity-offset: must be a whole number"),
    "predict_intensity_offset_huge": (["predict", "-i", "{image}", "-o", "{tmp}/o.nii.gz", "--intensity-offset",
                                       "1e9"], r"argument --intensity-offset: must be a whole number"),
    "finetune_intensity_offset_text": (["finetune", "--image", "{image}", "--labels", "{labels}", "--out", "{tmp}/ft",
                                        "--intensity-offset", "minus"],
                                       r"argument --intensity-offset: must be a whole number \(e\.g\. -1024\) or auto"),
    "finetune_iterations_0": (["finetune", "--image", "{image}", "--labels", "{labels}", "--out", "{tmp}/ft",
                               "--iterations", "0"], r"argument --iterations: must be >= 1"),
    "finetune_lr_negative": (["finetune", "--image", "{image}", "--labels", "{labels}", "--out", "{tmp}/ft",
                              "--lr", "-1"], r"argument --lr: must be a finite number in \(0, inf\)"),
    "bench_repeats_0": (["bench", "--repeats", "0"], r"argument --repeats: must be >= 1"),
    "bench_threads_0": (["bench", "--threads", "0"], r"argument --threads: must be >= 1"),
    "bench_volume_overlap_1": (["bench", "--volume-overlap", "1"], r"argument --volume-overlap: must be"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_a_bad_option_is_one_line_naming_it(case, tmp_path, assets, capfd):
    argv, problem = OPTION_CASES[case]
    argv = [a.format(dataset=assets.dataset, tmp=tmp_path, image=assets.image, labels=assets.labels) for a in argv]
    before = file_snapshot(tmp_path)
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses before main's try block, with the same one line
        code = exc.code
    line = _one_line(capfd, code)
    # argparse's top level reports what no subcommand took
    prefix = "napari-e2enet: error: " if case == "train_unknown_option" else f"napari-e2enet {argv[0]}: error: "
    assert line.startswith(prefix), line
    assert re.search(problem, line), f"{problem!r} not in: {line}"
    assert file_snapshot(tmp_path) == before  # no run folder, no output


# ------------------------------------------------------------------ the same values in a config file

CONFIG_CASES = {
    # name: (changes to the tiny config, expected problem)
    "iterations_negative": ({"iterations": -5}, r"TrainConfig: iterations must be >= 1, got -5"),
    "iterations_text": ({"iterations": "10"}, r"TrainConfig: iterations must be a whole number, got '10'"),
    "lr_nan": ({"lr": float("nan")}, r"TrainConfig: lr must be a finite number, got nan"),
    "lr_negative": ({"lr": -0.01}, r"TrainConfig: lr must be in \(0, inf\), got -0\.01"),
    "momentum_1": ({"momentum": 1.0}, r"TrainConfig: momentum must be in \[0, 1\), got 1"),
    "seed_negative": ({"seed": -1}, r"TrainConfig: seed must be in 0\.\.\d+, got -1"),
    "model_unknown": ({"model": "resnet9000"}, r"TrainConfig: unknown model 'resnet9000'"),
    "precision_unknown": ({"precision": "fp8"}, r"TrainConfig: precision must be one of fp32, bf16, amp"),
    "checkpoint_every_negative": ({"checkpoint_every_s": -1}, r"TrainConfig: checkpoint_every_s must be in \[0, inf\)"),
    "batch_0": ({"data": {"source": "phantom:2", "batch": 0}}, r"DataConfig: batch must be >= 1, got 0"),
    "patch_two_numbers": ({"data": {"source": "phantom:2", "patch": [16, 16]}}, r"DataConfig: patch must be three"),
    "target_spacing_0": ({"data": {"source": "phantom:2", "target_spacing": [0, 1, 1]}},
                         r"DataConfig: target_spacing must be in \(0, inf\), got 0"),
    "update_every_negative": ({"sparsity": {"update_every": -3}}, r"SparsityConfig: update_every must be >= 0"),
    "nested_too_deeply": ({"validation_cases": "DEEP"}, r"not valid json \(maximum recursion depth exceeded|nested too deeply"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_bad_value_in_a_config_file_is_one_line_naming_the_file(case, tmp_path, assets, capfd):
    changes, problem = CONFIG_CASES[case]
    config = write_train_config(tmp_path / "config.json", assets.dataset, **changes)
    if changes.get("validation_cases") == "DEEP":
        config.write_text(config.read_text().replace('"DEEP"', "[" * 5000 + "]" * 5000))
    before = file_snapshot(tmp_path)
    capfd.readouterr()
    line = _one_line(capfd, main(["train", "--config", str(config), "--out", str(tmp_path / "run")]))
    assert line.startswith(f"napari-e2enet train: error: {config}: "), line
    assert re.search(problem, line), f"{problem!r} not in: {line}"
    assert file_snapshot(tmp_path) == before


@pytest.mark.parametrize("overrides, problem", [
    ({"widths": [-1, 8, 8], "pools": [[2, 2, 2], [2, 2, 2]]}, r"ModelConfig: widths must be >= 1, got -1"),
    ({"colour": "red"}, r"model_overrides: .*colour"),
], ids=["negative-width", "unknown-field"])
def test_bad_model_overrides_are_one_line(overrides, problem, tmp_path, assets, capfd):
    config = write_train_config(tmp_path / "config.json", assets.dataset, model_overrides=overrides)
    capfd.readouterr()
    line = _one_line(capfd, main(["train", "--config", str(config), "--out", str(tmp_path / "run")]))
    assert re.search(problem, line), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cls, changes, problem", [
    (TrainConfig, {"iterations": 0}, "iterations must be >= 1"),
    (TrainConfig, {"iterations_per_epoch": -1}, "iterations_per_epoch must be >= 1"),
    (TrainConfig, {"lr": float("inf")}, "lr must be a finite number"),
    (TrainConfig, {"grad_clip": 0.0}, r"grad_clip must be in \(0, inf\)"),
    (TrainConfig, {"weight_decay": -1e-5}, "weight_decay must be in"),
    (TrainConfig, {"validation_every_epochs": 0}, "validation_every_epochs must be >= 1"),
    (TrainConfig, {"checkpoint_every_epochs": 0}, "checkpoint_every_epochs must be >= 1"),
    (TrainConfig, {"checkpoint_every_s": float("nan")}, "checkpoint_every_s must be a finite number"),
    (TrainConfig, {"model": "resnet9000"}, "unknown model"),
    (TrainConfig, {"iterations": True}, "iterations must be a whole number"),
    (DataConfig, {"patch": (0, 16, 16)}, "patch must be >= 1"),
    (DataConfig, {"batch": 0}, "batch must be >= 1"),
    (DataConfig, {"validation_fraction": 1.0}, r"validation_fraction must be in \[0, 1\)"),
    (DataConfig, {"num_validation": -2}, "num_validation must be >= 0"),
    (SparsityConfig, {"stop_updates_at": 2.0}, r"stop_updates_at must be in \[0, 1\]"),
    (ModelConfig, {"in_channels": -1}, "in_channels must be >= 1"),
    (ModelConfig, {"num_classes": 0}, r"num_classes must be in 1\.\.32767"),
    (ModelConfig, {"kernel": (1, 0, 3)}, "kernel must be >= 1"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_the_api_configs_refuse_the_same_values(cls, changes, problem):
    with pytest.raises(ValueError, match=problem):
        cls(**changes)


# ------------------------------------------------------------------ memory bounds


def _model_with_spacing(tmp: Path, assets, spacing) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(assets.model3), framework="pt") as fh:
        meta = dict(fh.metadata())
    plan = json.loads(meta["plan"])
    plan["target_spacing"] = list(spacing)
    meta["plan"] = json.dumps(plan)
    path = tmp / "tampered.safetensors"
    save_file(load_file(str(assets.model3)), str(path), metadata=meta)
    return path


def test_a_plan_asking_for_terabytes_is_refused_before_allocating(tmp_path, assets, capfd):
    model = _model_with_spacing(tmp_path, assets, (0.001, 0.001, 0.001))  # 32x32x16 at 3-6 mm -> 10^15 voxels
    before = file_snapshot(tmp_path)
    capfd.readouterr()
    line = _one_line(capfd, main(["predict", "-i", str(assets.image), "-o", str(tmp_path / "out.nii.gz"),
                                  "--model", str(model), "--device", "cpu"]))
    assert line.startswith(f"napari-e2enet predict: error: {model}: segmenting image (32x32x16 voxels) at this "
                           "model's voxel size of 0.001x0.001x0.001 mm ("), line
    match = re.search(r"needs about ([\d,.]+) GiB of memory, but only ([\d,.]+) GiB is available", line)
    assert match and float(match[1].replace(",", "")) > 1e5, line  # hundreds of TiB
    assert file_snapshot(tmp_path) == before


def test_training_from_a_model_whose_plan_asks_for_terabytes_is_refused(tmp_path, assets, capfd):
    model = _model_with_spacing(tmp_path, assets, (0.001, 0.001, 0.001))
    capfd.readouterr()
    line = _one_line(capfd, main(["train", "--config", str(assets.train_config), "--out", str(tmp_path / "run"),
                                  "--init-from", str(model)]))
    assert re.match(rf"napari-e2enet train: error: {re.escape(str(model))}: preparing training case c\d at the voxel "
                    r"size 0\.001x0\.001x0\.001 mm \(.*\) needs about [\d,.]+ GiB of memory", line), line
    assert not (tmp_path / "run").exists()


def test_a_batch_that_cannot_fit_is_refused(tmp_path, assets, capfd):
    capfd.readouterr()
    line = _one_line(capfd, main(["train", "--config", str(assets.train_config), "--out", str(tmp_path / "run"),
                                  "--patch", "4096", "4096", "4096", "--batch", "64"]))
    assert re.match(r"napari-e2enet train: error: a training batch of 64 patch\(es\) of 4096x4096x4096 voxels "
                    r"needs about [\d,.]+ GiB of memory, but only", line), line
    assert not (tmp_path / "run").exists()


def _limited(gib: float):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_AS, (int(gib * 2**30), resource.RLIM_INFINITY))
    return set_limit


def test_a_large_volume_under_a_memory_limit_is_one_line(tmp_path, assets):
    """512x512x400 CT voxels under ``ulimit -v`` 2.5 GiB: refused with the GiB it needs, no output."""
    array = np.full((512, 512, 400), -1000, np.int16)
    array[100:300, 100:300, 100:300] = 40
    image = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(array, np.diag([3.0, 3.0, 6.0, 1.0])), str(image))
    del array
    child = run_child(["predict", "-i", str(image), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(assets.model3),
                       "--device", "cpu"], env=child_env(tmp_path / "home"), preexec_fn=_limited(2.5))
    assert child.proc.returncode == 2, child.text_err
    lines = screen_lines(child.text_err)
    assert len(lines) == 1 and "Traceback" not in child.text_err, lines
    assert re.match(rf"napari-e2enet predict: error: {re.escape(str(assets.model3))}: segmenting big \(512x512x400 "
                    r"voxels\) .* needs about [\d.]+ GiB of memory, but only [\d.]+ GiB is available \(the "
                    r"address-space limit \(ulimit -v\)\)", lines[0]), lines[0]
    assert not (tmp_path / "seg.nii.gz").exists()


def test_evaluate_with_a_label_id_of_two_billion_under_a_memory_limit(tmp_path):
    pred, ref = np.zeros((16, 16, 8), np.int32), np.zeros((16, 16, 8), np.int32)
    pred[2:5, 2:5, 2:4] = 2_000_000_000
    ref[3:6, 2:5, 2:4] = 2_000_000_000
    for name, array in (("p", pred), ("r", ref)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    child = run_child(["evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--ref", str(tmp_path / "r.nii.gz"),
                       "--json"], env=child_env(tmp_path / "home"), preexec_fn=_limited(4.0))
    assert child.proc.returncode == 0, child.text_err
    result = json.loads(child.text_out)
    assert result["dice"]["per_class"] == {"2000000000": pytest.approx(2 * 12 / 36)}


def test_deeply_nested_labels_json_is_one_line(tmp_path, assets, capfd):
    deep = tmp_path / "labels.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    capfd.readouterr()
    line = _one_line(capfd, main(["evaluate", "--pred", str(assets.labels), "--ref", str(assets.labels),
                                  "--labels", str(deep)]))
    assert line == f"napari-e2enet evaluate: error: {deep}: not valid JSON (nested too deeply)"


# ------------------------------------------------------------------ the catch-all


@pytest.mark.parametrize("error, shown", [
    (RuntimeError("boom\nsecond line"), "unexpected RuntimeError: boom second line"),
    (MemoryError(), "unexpected MemoryError: out of memory"),
    (RecursionError("maximum recursion depth exceeded"), "unexpected RecursionError: maximum recursion depth exceeded"),
    (KeyError("plan"), "unexpected KeyError: 'plan'"),
    (ZeroDivisionError("division by zero"), "unexpected ZeroDivisionError: division by zero"),
], ids=["RuntimeError", "MemoryError", "RecursionError", "KeyError", "ZeroDivisionError"])
def test_an_unexpected_error_is_one_line_and_a_log(error, shown, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    add, _, help_text = cli._COMMANDS["info"]

    def fails(args):
        raise error

    monkeypatch.setitem(cli._COMMANDS, "info", (add, fails, help_text))
    capfd.readouterr()
    line = _one_line(capfd, main(["info"]), 1)
    match = re.fullmatch(rf"napari-e2enet info: error: {re.escape(shown)} \(traceback in (.+)\)", line)
    assert match, line
    log = Path(match[1])
    assert log.parent == tmp_path / "cache" / "napari-e2enet" / "logs" and log.name.startswith("info-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and type(error).__name__ in text and "in fails" in text


def test_the_log_falls_back_to_the_temporary_folder(tmp_path, capfd, monkeypatch):
    (tmp_path / "cache").write_text("not a folder")  # the cache folder cannot be made
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    add, _, help_text = cli._COMMANDS["info"]
    monkeypatch.setitem(cli._COMMANDS, "info", (add, lambda args: 1 / 0, help_text))
    capfd.readouterr()
    line = _one_line(capfd, main(["info"]), 1)
    assert f"(traceback in {tmp_path / 'tmp' / 'napari-e2enet-logs'}/info-" in line, line


def test_an_unexpected_error_in_training_logs_into_the_run_folder(tmp_path, assets, capfd, monkeypatch):
    from napari_e2enet.training import loop

    def out_of_memory(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(loop, "train_step", out_of_memory)
    run = tmp_path / "run"
    capfd.readouterr()
    code = main(["train", "--config", str(assets.train_config), "--out", str(run)])
    out, err = capfd.readouterr()
    assert code == 1 and out == "" and "Traceback" not in err, err
    line = screen_lines(err)[-1]  # after the start line and the progress bar, like any error mid-run
    assert line == f"napari-e2enet train: error: unexpected MemoryError: out of memory (traceback in {run / 'error.log'})"
    assert "MemoryError" in (run / "error.log").read_text()
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "error.log"]  # the lock went with the run
    monkeypatch.undo()
    capfd.readouterr()  # the folder holds no run (nothing was saved): a new one may start there
    assert main(["train", "--config", str(assets.train_config), "--out", str(run)]) == 0
