"""``train`` interrupted by ``kill -9`` or Ctrl-C loses nothing: every file stays whole, and
``--resume`` ends with exactly the weights and masks of an uninterrupted run with the same seed.

Signals are placed with ``_driver.py``: the child stops before its k-th optimisation step and
waits on stdin, the test sends the real signal (SIGKILL / SIGINT) and then lets it go on. So the
signal lands at a known iteration without sleeps, however loaded the machine is.
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from napari_e2enet.config import TrainConfig, load_config
from napari_e2enet.sparse import ConnectivityRecord
from napari_e2enet.training import load_model, load_state

from .conftest import Child, resume_here, screen_lines, write_train_config

pytestmark = pytest.mark.slow

RUN_FILES = ["config.json", "connectivity.json", "metrics.csv", "model.safetensors", "training_state.pt"]
ITERATIONS = 8  # 4 epochs of 2 iterations, a checkpoint after each: a kill, a crash in a save, then the end


@pytest.fixture(scope="module")
def train_config(tmp_path_factory, assets) -> Path:
    folder = tmp_path_factory.mktemp("train-config")
    return write_train_config(folder / "train.json", assets.dataset, iterations=ITERATIONS)


def assert_run_folder_whole(run: Path, iteration: int, *, allow_temp: tuple[str, ...] = (),
                            killed: bool = False) -> None:
    """Every file in the run folder is complete and loadable; the state is at ``iteration``. After a
    ``kill -9`` the dead process's ``train.lock`` is there too (the next run takes it over)."""
    names = sorted(p.name for p in run.iterdir() if not (killed and p.name == "train.lock"))
    temps = [n for n in names if n.startswith(".")]
    assert [n for n in names if not n.startswith(".")] == RUN_FILES, names
    for name in temps:  # only a temporary sibling of a file whose write was cut short
        assert name.startswith(tuple(f".{f}." for f in allow_temp)) and name.endswith(".tmp"), name
    assert load_config(run / "config.json", TrainConfig).iterations == ITERATIONS
    model, meta = load_model(run / "model.safetensors")
    assert model.masks() and meta["iterations"] >= iteration
    state = load_state(run / "training_state.pt")
    assert state["iteration"] == iteration
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert all(row["loss"] for row in rows)
    assert ConnectivityRecord.from_json(run / "connectivity.json").select("epoch")


def assert_same_result(run: Path, reference: Path) -> None:
    """Weights and DSFF masks bit-identical; the same epochs, iterations, losses and learning rates."""
    a, b = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys()
    assert any(k.endswith("kernel_mask") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert load_state(run / "training_state.pt")["iteration"] == ITERATIONS

    def table(path):
        return [{k: r[k] for k in ("epoch", "iteration", "loss", "lr")} for r in csv.DictReader(path.open())]

    assert table(run / "metrics.csv") == table(reference / "metrics.csv")
    updates = [json.dumps(e, sort_keys=True) for e in
               ConnectivityRecord.from_json(run / "connectivity.json").to_dict()["entries"]]
    reference_updates = [json.dumps(e, sort_keys=True) for e in
                         ConnectivityRecord.from_json(reference / "connectivity.json").to_dict()["entries"]]
    assert updates == reference_updates


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, train_config, reference_run, capfd):
    reference = reference_run(train_config)
    run = tmp_path / "run"
    # 1. kill -9 while the 5th step is about to run: checkpoints of iterations 2 and 4 exist.
    child = Child(["train", "--config", str(train_config), "--out", str(run)], driver=True,
                  hooks={"E2E_GATE_ITER": "5"})
    child.wait_for(r"GATE iteration 5")
    child.proc.send_signal(signal.SIGKILL)
    assert child.finish() == -signal.SIGKILL
    assert_run_folder_whole(run, 4, killed=True)

    # 2. resume, and kill -9 again in the middle of writing a checkpoint (iteration 8's state, the last).
    child = Child(["train", "--resume", "--out", str(run)], driver=True, hooks={"E2E_CRASH_WRITE": "state:2"})
    assert child.finish() == -signal.SIGKILL
    assert "CRASH writing" in child.text_err and ".training_state.pt." in child.text_err
    assert_run_folder_whole(run, 6, allow_temp=("training_state.pt",), killed=True)  # the previous state, whole

    # 3. resume to the end: the same weights, masks, losses and topology history as without crashes.
    assert "took over train.lock from pid" in resume_here(run, capfd)  # the note about the dead holder
    assert_same_result(run, reference)
    assert sorted(p.name for p in run.iterdir()) == RUN_FILES  # its lock and the half temporary are gone


def test_ctrl_c_stops_at_the_next_iteration_saves_and_resumes_exactly(tmp_path, train_config, reference_run,
                                                                       capfd):
    reference = reference_run(train_config)
    run = tmp_path / "run"
    child = Child(["train", "--config", str(train_config), "--out", str(run)], driver=True,
                  hooks={"E2E_GATE_ITER": "3"})
    child.wait_for(r"GATE iteration 3")  # iterations 1 and 2 reported, epoch 1 checkpointed
    child.proc.send_signal(signal.SIGINT)
    child.release_gate()
    assert child.finish() == 130, child.text_err
    last = screen_lines(child.text_err)[-1]
    assert last.startswith("train stopped (resume with --resume): 3 iterations"), last
    assert "Traceback" not in child.text_err
    assert_run_folder_whole(run, 3)  # mid-epoch: the step in flight finished, nothing after it

    resume_here(run, capfd)
    assert_same_result(run, reference)
