"""Issue 16, classes 2 and 5 (and two of class 3): no lost runs, no lost inputs, signals and crashes.

- One run per folder: a new run refuses a folder that holds a run (``--overwrite`` moves it aside
  first, byte for byte); the run holds ``train.lock`` for its lifetime and a second process is
  refused with one line naming the holder; a lock left by a killed run is taken over.
- ``predict`` never writes over one of its inputs, however the output path names it.
- SIGTERM is a clean stop (saved, one line, exit 143) for train and predict.
- The training state is saved by wall time as well as per epoch (first after the first iteration);
  ``kill -9`` at random moments (ten of them, during saves too) never loses more than that, and the
  resumed run ends bit-identical to an uninterrupted one.
- Temporaries a killed writer left are deleted by the next run (only those of dead processes).
- ``training_state.pt`` carries the SHA-256 of its content: single-byte damage is refused; a run
  whose ``model.safetensors`` was deleted gets it back from the state on ``--resume``.

Children are placed with ``_driver.py`` gates (no sleeps, bounded waits), like the Ctrl-C tests.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from napari_e2enet import fileio
from napari_e2enet.cli import main
from napari_e2enet.config import TrainConfig, load_config
from napari_e2enet.errors import InputError
from napari_e2enet.fileio import FolderLock, remove_stale_temporaries, temporary_prefix
from napari_e2enet.sparse import ConnectivityRecord
from napari_e2enet.training import Trainer, load_model, load_state
from napari_e2enet.training import loop as loop_module
from napari_e2enet.training.checkpoint import save_state

from .conftest import Child, file_snapshot, resume_here, screen_lines, write_phantom_cases, write_train_config

RESULT_FILES = ["connectivity.json", "metrics.csv", "model.safetensors", "training_state.pt"]
RUN_FILES = sorted(["config.json", *RESULT_FILES])


# ------------------------------------------------------------------ helpers


def _config(tmp: Path, assets, name: str, **changes) -> Path:
    return write_train_config(tmp / f"{name}.json", assets.dataset, **changes)


@pytest.fixture(scope="module")
def finished_template(tmp_path_factory, assets) -> Path:
    """A finished 2-iteration run, trained once for the module; tests get a copy (``_finished_run``)."""
    tmp = tmp_path_factory.mktemp("finished")
    config = load_config(_config(tmp, assets, "run-config", iterations=2), TrainConfig)
    Trainer(config, tmp / "run").fit()
    return tmp / "run"


def _finished_run(tmp: Path, template: Path, name: str = "run") -> Path:
    """A copy of the finished run: every file byte for byte (a run folder holds no path of its own)."""
    out = tmp / name
    shutil.copytree(template, out)
    return out


def _one_line(capfd, code: int, expected: int = 2) -> str:
    out, err = capfd.readouterr()
    assert code == expected, err
    assert out == ""
    assert "Traceback" not in err
    lines = screen_lines(err)
    assert len(lines) == 1, lines
    return lines[0]


def assert_same_result(run: Path, reference: Path, iterations: int) -> None:
    """Weights and DSFF masks bit-identical; same epochs/iterations/losses/LR; same connectivity history."""
    a, b = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith("kernel_mask") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert load_state(run / "training_state.pt")["iteration"] == iterations

    def table(path):
        return [{k: r[k] for k in ("epoch", "iteration", "loss", "lr")} for r in csv.DictReader(path.open())]

    assert table(run / "metrics.csv") == table(reference / "metrics.csv")

    def entries(path):
        return [json.dumps(e, sort_keys=True) for e in ConnectivityRecord.from_json(path).to_dict()["entries"]]

    assert entries(run / "connectivity.json") == entries(reference / "connectivity.json")


# ------------------------------------------------------------------ class 2: lost runs


@pytest.mark.parametrize("present", RESULT_FILES)
def test_a_new_run_refuses_a_folder_that_holds_a_run(present, tmp_path, assets, finished_template, capfd):
    run = _finished_run(tmp_path, finished_template)
    for name in RESULT_FILES:  # a run folder holding only `present` (plus its config.json)
        if name != present:
            (run / name).unlink()
    before = file_snapshot(tmp_path)
    capfd.readouterr()
    line = _one_line(capfd, main(["train", "--config", str(assets.train_config), "--out", str(run)]))
    assert line.startswith(f"napari-e2enet train: error: {run}: already holds a training run ({present})"), line
    assert "--resume" in line and "--overwrite" in line
    assert file_snapshot(tmp_path) == before  # nothing replaced, no lock file left


def test_a_folder_with_only_the_config_of_a_run_that_never_saved_is_reused(tmp_path, assets, capfd):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a new run killed before its first save leaves only this
    capfd.readouterr()
    assert main(["train", "--config", str(assets.train_config), "--out", str(run)]) == 0
    assert sorted(p.name for p in run.iterdir()) == RUN_FILES


@pytest.mark.parametrize("init_from_itself", [False, True], ids=["new-config", "init-from-the-old-run"])
def test_overwrite_moves_the_old_run_aside_byte_for_byte(init_from_itself, tmp_path, assets, finished_template,
                                                        capfd):
    run = _finished_run(tmp_path, finished_template)
    old = file_snapshot(run)
    argv = ["train", "--config", str(_config(tmp_path, assets, "new", iterations=4)), "--out", str(run), "--overwrite"]
    if init_from_itself:  # fine-tune from the run being replaced: it is read from where it moved
        argv += ["--init-from", str(run)]
    capfd.readouterr()
    assert main(argv) == 0, capfd.readouterr().err
    err = capfd.readouterr().err
    aside = [p for p in run.iterdir() if p.is_dir()]
    assert len(aside) == 1 and re.fullmatch(r"replaced-\d{8}-\d{6}", aside[0].name), aside
    assert f"the previous run was moved to {aside[0]}" in err
    assert file_snapshot(aside[0]) == old  # every file of the old run, unchanged
    assert load_state(aside[0] / "training_state.pt")["iteration"] == 2  # still resumable where it is
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == RUN_FILES
    assert load_state(run / "training_state.pt")["iteration"] == 4


@pytest.mark.slow
def test_a_second_process_is_refused_while_a_run_holds_the_folder(tmp_path, assets, capfd):
    """One holder (a child gated at its 3rd step), refused three ways: a new run, ``--overwrite`` and
    ``--resume``, each through the console code in this process (a process other than the holder)."""
    run = tmp_path / "run"
    config = _config(tmp_path, assets, "c", iterations=4, checkpoint_every_s=0.0)
    first = Child(["train", "--config", str(config), "--out", str(run)], driver=True, hooks={"E2E_GATE_ITER": "3"})
    try:
        first.wait_for(r"GATE iteration 3")  # epoch 1 saved; the first process holds the lock
        before = file_snapshot(run)
        pattern = (rf"napari-e2enet train: error: {re.escape(str(run / 'train.lock'))}: the folder is in use by "
                   rf"another run: pid {first.proc.pid} on {re.escape(fileio._HOST)} since "
                   r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(napari-e2enet train --config .*\)")
        for second in (["train", "--config", str(config), "--out", str(run)],
                       ["train", "--config", str(config), "--out", str(run), "--overwrite"],
                       ["train", "--resume", "--out", str(run)]):
            capfd.readouterr()
            line = _one_line(capfd, main(second))
            assert re.match(pattern, line), (second, line)
            assert file_snapshot(run) == before, second  # nothing moved, nothing written
    finally:
        first.release_gate()
    assert first.finish() == 0, first.text_err
    assert sorted(p.name for p in run.iterdir()) == RUN_FILES  # the lock went with its holder
    assert load_state(run / "training_state.pt")["iteration"] == 4


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, finished_template):
    run = _finished_run(tmp_path, finished_template)
    dead = _dead_pid()
    (run / "train.lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "then",
                                                "command": "napari-e2enet train"}))
    events = Trainer(TrainConfig(), run, resume=True, command="test").iter_fit()
    start = next(events)
    assert f"took over train.lock from pid {dead}" in start.message and "which no longer runs" in start.message
    assert json.loads((run / "train.lock").read_text())["pid"] == os.getpid()  # held by this process now
    assert [e.kind for e in events] == ["done"]
    assert not (run / "train.lock").exists()


def test_the_lock_is_exclusive_between_descriptors_and_says_who_holds_it(tmp_path):
    holder = FolderLock(tmp_path, command="napari-e2enet train --out x").acquire()
    try:
        with pytest.raises(InputError, match=rf"in use by another run: pid {os.getpid()} on .* \(napari-e2enet train"):
            FolderLock(tmp_path).acquire()
    finally:
        holder.release()
    with FolderLock(tmp_path) as again:  # free once released
        assert again.held and again.took_over is None
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    pid = 4_000_000  # above the usual pid_max; checked, not assumed
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


# ------------------------------------------------------------------ class 2: lost inputs


def _predict_inputs(tmp: Path, how: str) -> tuple[list[str], Path]:
    """argv whose output names an input, and that input."""
    images = tmp / "images"
    (path,) = write_phantom_cases(images, [0], suffix="")  # case000.nii.gz: its labels' name in a folder run
    if how == "same-file":
        return ["-i", str(path), "-o", str(path)], path
    if how == "relative-path":
        return ["-i", str(path), "-o", str(images / "." / ".." / "images" / path.name)], path
    if how == "symlink-to-input":
        link = tmp / "link.nii.gz"
        link.symlink_to(path)
        return ["-i", str(path), "-o", str(link)], path
    if how == "hardlink-to-input":
        link = tmp / "hard.nii.gz"
        os.link(path, link)
        return ["-i", str(path), "-o", str(link)], path
    if how == "folder-into-itself":
        return ["-i", str(images), "-o", str(images)], path
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["same-file", "relative-path", "symlink-to-input", "hardlink-to-input",
                                 "folder-into-itself"])
def test_predict_never_writes_over_an_input(how, tmp_path, assets, capfd):
    argv, image = _predict_inputs(tmp_path, how)
    before = file_snapshot(tmp_path)
    capfd.readouterr()
    line = _one_line(capfd, main(["predict", *argv, "--model", str(assets.model3), "--device", "cpu", "--overwrite"]))
    assert line.startswith("napari-e2enet predict: error: "), line
    assert f"the output would replace the input image {image}" in line, line
    assert file_snapshot(tmp_path) == before


# ------------------------------------------------------------------ class 5: signals


@pytest.mark.slow
def test_sigterm_stops_training_saves_and_resumes_exactly(tmp_path, assets, reference_run, capfd):
    config = _config(tmp_path, assets, "c", iterations=8, checkpoint_every_s=0.0)
    reference = reference_run(config)  # the same training as test_interrupted_training's: one reference
    run = tmp_path / "run"
    child = Child(["train", "--config", str(config), "--out", str(run)], driver=True, hooks={"E2E_GATE_ITER": "3"})
    child.wait_for(r"GATE iteration 3")
    child.proc.send_signal(signal.SIGTERM)  # what a scheduler, docker stop or a closing terminal sends
    child.release_gate()
    assert child.finish() == 143, child.text_err
    last = screen_lines(child.text_err)[-1]
    assert last.startswith("train stopped (resume with --resume): 3 iterations"), last
    assert "Traceback" not in child.text_err
    assert load_state(run / "training_state.pt")["iteration"] == 3  # the step in flight finished, then saved
    assert sorted(p.name for p in run.iterdir()) == RUN_FILES
    resume_here(run, capfd)
    assert_same_result(run, reference, 8)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_stops_predict_within_a_tile_with_no_partial_output(signum, code, tmp_path, assets):
    inputs, out = tmp_path / "images", tmp_path / "segs"
    write_phantom_cases(inputs, range(3))
    child = Child(["predict", "-i", str(inputs), "-o", str(out), "--model", str(assets.model3), "--device", "cpu"],
                  driver=True, hooks={"E2E_GATE_TILE": "2", "E2E_LOG_TILES": "1"})
    child.wait_for(r"GATE tile 2")
    child.proc.send_signal(signum)  # SIGHUP: what a closing terminal sends
    child.release_gate()
    assert child.finish() == code, child.text_err
    last = screen_lines(child.text_err)[-1]
    assert last == "napari-e2enet predict: terminated; 0 case(s) written, no partial output", last
    assert not out.exists()  # the run made the folder and, having written nothing, takes it away again


@pytest.mark.parametrize("command", ["info", "evaluate"])
def test_sigterm_in_a_command_without_a_clean_stop_is_one_line_and_143(command, tmp_path, assets, capfd, monkeypatch):
    from napari_e2enet import cli

    def killed(args):  # the signal lands in the middle of the command's work
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    add, _, help_text = cli._COMMANDS[command]
    monkeypatch.setitem(cli._COMMANDS, command, (add, killed, help_text))
    argv = {"info": ["info"], "evaluate": ["evaluate", "--pred", str(assets.labels), "--ref", str(assets.labels)]}
    before = signal.getsignal(signal.SIGTERM)
    capfd.readouterr()
    assert _one_line(capfd, main(argv[command]), 143) == f"napari-e2enet {command}: terminated"
    assert signal.getsignal(signal.SIGTERM) == before  # restored


# ------------------------------------------------------------------ class 5: timed saves, kill -9


def test_the_state_is_saved_by_wall_time_at_iteration_boundaries(tmp_path, assets, monkeypatch):
    """A fake clock that advances 20 s per training step: with checkpoint_every_s=60 the state is saved
    after the first iteration, then every third, and at the end (epochs are longer than the run)."""
    clock = {"now": 1000.0}
    monkeypatch.setattr(loop_module, "_clock", lambda: clock["now"])
    original_step = loop_module.train_step

    def step(*args, **kwargs):
        clock["now"] += 20.0
        return original_step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", step)
    saved = []
    original_save = loop_module.save_state
    monkeypatch.setattr(loop_module, "save_state", lambda state, path: (saved.append(state["iteration"]),
                                                                        original_save(state, path))[1])
    config = load_config(_config(tmp_path, assets, "c", iterations=10, iterations_per_epoch=100,
                                 checkpoint_every_s=60.0), TrainConfig)
    Trainer(config, tmp_path / "run").fit()
    assert saved == [1, 4, 7, 10]

    saved.clear()  # 0 switches the timed saves off: only the epoch (here: final) checkpoint
    Trainer(config.replace(checkpoint_every_s=0.0), tmp_path / "run0").fit()
    assert saved == [10]


@pytest.mark.slow
def test_kill_9_in_the_first_minute_after_the_first_iterations_finds_a_saved_state(tmp_path, assets,
                                                                                   reference_run, capfd):
    config = _config(tmp_path, assets, "c", iterations=4, iterations_per_epoch=100)  # default checkpoint_every_s
    assert load_config(config, TrainConfig).checkpoint_every_s == 60.0
    reference = reference_run(config)
    run = tmp_path / "run"
    child = Child(["train", "--config", str(config), "--out", str(run)], driver=True, hooks={"E2E_GATE_ITER": "3"})
    child.wait_for(r"GATE iteration 3")  # seconds into the run: no epoch has ended
    child.proc.send_signal(signal.SIGKILL)
    assert child.finish() == -signal.SIGKILL
    assert load_state(run / "training_state.pt")["iteration"] == 1  # the save after the first iteration
    load_model(run / "model.safetensors")
    resume_here(run, capfd)
    assert_same_result(run, reference, 4)


KILL_ITERATIONS = 20  # six kills advance the run by at most 18 iterations; the last resume trains the rest


@pytest.mark.slow
def test_six_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path, assets, reference_run, capfd):
    """Six kill -9, each at a random point: before a random step, or halfway through writing the
    state or the model file of a random save. The state is saved after every iteration here
    (checkpoint_every_s tiny), so each kill must leave exactly the last completed iteration's state.
    The seed draws each kind twice, and cuts the first save after a resume of both files (six, not
    the ten of before: each kill is a CLI start, ~11 s; the kinds and cut points are all still here)."""
    config = _config(tmp_path, assets, "c", iterations=KILL_ITERATIONS, iterations_per_epoch=4,
                     checkpoint_every_s=1e-6)
    reference_config = _config(tmp_path, assets, "r", iterations=KILL_ITERATIONS, iterations_per_epoch=4,
                               checkpoint_every_s=0.0)  # saved per epoch only: saves must not change a run
    reference = reference_run(reference_config)
    run = tmp_path / "run"
    rng = random.Random(22)
    at = 0  # the iteration of the saved state
    kinds = []
    for kill in range(6):
        if at == 0:  # the first save must survive: a kill before it leaves no run to resume
            kind, k = rng.choice(["step", "state", "model"]), rng.randint(2, 3)
        else:
            kind, k = rng.choice(["step", "state", "model"]), rng.randint(1, 3)
        kinds.append(kind)
        hooks = {"step": {"E2E_GATE_ITER": str(k + 1)}, "state": {"E2E_CRASH_WRITE": f"state:{k}"},
                 "model": {"E2E_CRASH_WRITE": f"model:{k}"}}[kind]
        argv = ["train", "--resume", "--out", str(run)] if at else ["train", "--config", str(config), "--out", str(run)]
        child = Child(argv, driver=True, hooks=hooks)
        if kind == "step":
            child.wait_for(rf"GATE iteration {k + 1}")
            child.proc.send_signal(signal.SIGKILL)
        assert child.finish() == -signal.SIGKILL, child.text_err
        # k iterations completed and saved (step), or the k-th save was cut short (state/model)
        at += k if kind == "step" else k - 1
        state = load_state(run / "training_state.pt")  # whole, checksum verified
        assert state["iteration"] == at, (kill, kind, k, state["iteration"])
        load_model(run / "model.safetensors")
    assert sorted(kinds) == ["model", "model", "state", "state", "step", "step"]
    assert "took over train.lock" in resume_here(run, capfd)
    assert_same_result(run, reference, KILL_ITERATIONS)
    assert sorted(p.name for p in run.iterdir()) == RUN_FILES  # no lock, no temporaries left


# ------------------------------------------------------------------ class 5: leftovers of killed writers


def test_stale_temporaries_of_dead_writers_are_deleted_and_live_ones_kept(tmp_path, assets, capfd):
    out = tmp_path / "segs"
    out.mkdir()
    host = temporary_prefix("x").split("-", 1)[1].rstrip(".")
    dead = _dead_pid()
    stale = [out / f".case000.nii.gz.{dead}-{host}.abcd1234.tmp.nii.gz", out / f".case000.nii.gz.{dead}-{host}.zz99yy88.tmp"]
    kept = [out / f"{temporary_prefix('case000.nii.gz')}qwer5678.tmp.nii.gz",  # this (live) process's
            out / f".case000.nii.gz.{dead}-otherhost.abcd1234.tmp.nii.gz",  # another machine's: cannot tell
            out / ".case000.nii.gz.abcd1234.tmp.nii.gz",  # an old name without its owner
            out / "notes.tmp"]
    for p in stale + kept:
        p.write_bytes(b"half")
    write_phantom_cases(tmp_path / "images", [0])
    capfd.readouterr()
    assert main(["predict", "-i", str(tmp_path / "images"), "-o", str(out), "--model", str(assets.model3),
                 "--device", "cpu"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["case000.nii.gz", *(p.name for p in kept)]), names
    assert remove_stale_temporaries(out) == []


def test_a_run_deletes_the_temporaries_a_killed_run_left_in_its_folder(tmp_path, finished_template):
    run = _finished_run(tmp_path, finished_template)
    leftovers = [run / ".training_state.pt.abcd1234.tmp", run / ".model.safetensors.1-somehost.x1y2z3w4.tmp"]
    for p in leftovers:
        p.write_bytes(b"half")
    (run / "mine.tmp").write_bytes(b"user file")  # not a temporary of a run file: kept
    events = Trainer(TrainConfig(), run, resume=True).iter_fit()
    start = next(events)
    assert "deleted 2 temporary file(s) a killed run left" in start.message
    assert [e.kind for e in events] == ["done"]
    assert sorted(p.name for p in run.iterdir()) == sorted([*RUN_FILES, "mine.tmp"])


# ------------------------------------------------------------------ class 3 (part): state checksum, lost model


def _state_file(tmp_path, template: Path) -> Path:
    return _finished_run(tmp_path, template) / "training_state.pt"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory, finished_template) -> tuple[Path, dict]:
    path = _state_file(tmp_path_factory.mktemp("state"), finished_template)
    return path, load_state(path)


@pytest.mark.parametrize("seed", range(24))
def test_single_byte_damage_in_the_training_state_never_goes_unnoticed(seed, saved_state, tmp_path):
    """Any one byte changed: refused (one line naming the file), or — when the byte carries no content
    (zip padding, a name field) — the loaded state is exactly what was saved."""
    path, original = saved_state
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    where = rng.randrange(len(data)) if seed % 3 else rng.randrange(len(data) // 2, len(data) - 200)  # tensors
    data[where] ^= 1 << rng.randrange(8)
    damaged = tmp_path / "training_state.pt"
    damaged.write_bytes(bytes(data))
    try:
        state = load_state(damaged)
    except InputError as exc:
        assert str(exc).startswith(f"{damaged}: ") and "\n" not in str(exc)
        return
    assert _same(state, original), f"byte {where} changed the content without being noticed"


def test_resume_refuses_a_state_whose_tensor_bytes_changed(tmp_path, finished_template, capfd):
    run = _finished_run(tmp_path, finished_template)
    state = torch.load(run / "training_state.pt", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 4)
    state["model"][name].view(-1)[3] += 1.0  # a flipped value, the stored checksum kept
    torch.save(state, run / "training_state.pt")
    before = file_snapshot(run)
    capfd.readouterr()
    line = _one_line(capfd, main(["train", "--resume", "--out", str(run)]))
    assert line.startswith(f"napari-e2enet train: error: {run / 'training_state.pt'}: checksum mismatch"), line
    assert file_snapshot(run) == before


def test_a_state_saved_before_checksums_still_loads(tmp_path, finished_template):
    path = _state_file(tmp_path, finished_template)
    state = torch.load(path, weights_only=True)
    del state["content_sha256"]
    torch.save(state, path)
    assert load_state(path)["iteration"] == 2
    save_state(state, path)  # and is saved with one from then on
    assert "content_sha256" in torch.load(path, weights_only=True)


@pytest.mark.parametrize("finished", [True, False], ids=["finished-run", "stopped-run"])
def test_resume_restores_a_deleted_model_file_from_the_state(finished, tmp_path, assets, capfd):
    import threading

    run = tmp_path / "run"
    stop = threading.Event()
    config = load_config(_config(tmp_path, assets, "c", iterations=4, checkpoint_every_s=0.0), TrainConfig)
    for event in Trainer(config, run, stop=stop).iter_fit():
        if not finished and event.kind == "iteration" and event.iteration == 2:
            stop.set()  # a run stopped half way (Ctrl-C)
    state = load_state(run / "training_state.pt")
    assert state["iteration"] == (4 if finished else 2)
    (run / "model.safetensors").unlink()
    capfd.readouterr()
    assert main(["train", "--resume", "--out", str(run)]) == 0
    err = capfd.readouterr().err
    assert "model.safetensors was missing; rewritten from training_state.pt (iteration" in err
    assert "loss nan" not in err
    model, meta = load_model(run / "model.safetensors")
    assert meta["iterations"] == 4
    if finished:
        assert "the run had already finished (4 iterations)" in err
        for key, value in model.state_dict().items():
            assert torch.equal(value, state["model"][key]), key
