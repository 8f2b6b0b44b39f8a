"""Shared pieces of the reliability suite (issue 7: prove nothing is lost).

Everything here is tiny on purpose (the CI box has 2 cores shared with other work): a 3-level
E2ENet with widths (4, 8, 8), phantoms of 32×32×16 voxels, training runs of a dozen iterations.

- ``assets`` (session): a 3-class model file (plan + labels metadata, like a training run writes),
  a 16-class one, three phantom cases as an nnU-Net v2 dataset folder, one image and its labels,
  and a TrainConfig JSON for tiny CLI training runs. Tests copy before they modify anything.
- ``screen_lines``: what a terminal shows of a stderr stream (``\\r`` redraws and ANSI codes applied),
  so "one line on stderr" is judged the way a user sees it.
- ``cli_process``: start the real console code in a child process (``python -m napari_e2enet.cli``,
  or ``_driver.py`` for the hooks used to place signals and crashes deterministically).
- ``reference_run``: the uninterrupted run an interrupted one must reproduce bit for bit, trained in
  this process once per training configuration for the whole session (a child costs seconds of imports).
- Torch uses one thread in this process during these tests, as the children do (OMP_NUM_THREADS=1):
  the tiny models gain nothing from a second thread, which only contends with the children, and the
  float sums of a training run depend on the thread count, so references match children bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "_driver.py"
CLI = [sys.executable, "-B", "-m", "napari_e2enet.cli"]
PHANTOM_SHAPE = (32, 32, 16)
PHANTOM_SPACING = (3.0, 3.0, 6.0)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def screen_lines(text: str) -> list[str]:
    """The non-blank lines a terminal would show: ANSI codes dropped, each ``\\r`` redraws the line."""
    shown = []
    for line in _ANSI.sub("", text).split("\n"):
        visible = line.rsplit("\r", 1)[-1].strip()
        if visible:
            shown.append(visible)
    return shown


def child_env(tmp: Path | None = None) -> dict[str, str]:
    """Environment for child processes: one torch thread each (the box is shared), no .pyc writes,
    caches under ``tmp`` (a child under a file-size limit must not truncate anything shared)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "E2E_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    if tmp is not None:  # isolated: nothing shared may be (re)built by a child under a file-size limit
        tmp.mkdir(parents=True, exist_ok=True)
        for key in ("HOME", "XDG_CACHE_HOME", "TMPDIR", "TORCHINDUCTOR_CACHE_DIR"):
            env[key] = str(tmp)
        env["NAPARI_E2ENET_NO_KERNELS"] = "1"  # no compile of the sparse CPU kernels into a fresh cache
        env["MPLCONFIGDIR"] = str(_matplotlib_cache_copy(tmp / "matplotlib"))  # monai imports matplotlib
    return env


def _matplotlib_cache_copy(folder: Path) -> Path:
    """A private MPLCONFIGDIR holding a copy of the font cache, so matplotlib does not rebuild it."""
    import shutil

    import matplotlib

    folder.mkdir(parents=True, exist_ok=True)
    for cached in Path(matplotlib.get_cachedir()).glob("fontlist-*.json"):
        shutil.copy(cached, folder / cached.name)
    return folder


class Child:
    """A CLI child process whose stderr is read incrementally with bounded waits."""

    def __init__(self, argv: list[str], *, driver: bool = False, hooks: dict[str, str] | None = None,
                 env: dict[str, str] | None = None, preexec_fn=None) -> None:
        env = dict(env or child_env())
        env.update(hooks or {})
        cmd = [sys.executable, "-B", str(DRIVER), *argv] if driver else [*CLI, *argv]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, preexec_fn=preexec_fn)
        self.err = b""
        self.out = b""

    def wait_for(self, pattern: str, timeout: float = 180.0) -> re.Match:
        """Read stderr until ``pattern`` (regex over everything read so far) matches; bounded."""
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        fd = self.proc.stderr.fileno()
        while True:
            match = regex.search(self.err)
            if match:
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                self.proc.kill()
                raise AssertionError(f"no {pattern!r} on stderr within {timeout} s:\n{self.text_err[-2000:]}")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait(timeout=30)
                    raise AssertionError(f"exited ({self.proc.returncode}) before {pattern!r}:\n"
                                         f"{self.text_err[-3000:]}")
                self.err += chunk

    def release_gate(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 300.0) -> int:
        out, err = self.proc.communicate(timeout=timeout)
        self.out += out
        self.err += err
        return self.proc.returncode

    @property
    def text_err(self) -> str:
        return self.err.decode("utf-8", "replace")

    @property
    def text_out(self) -> str:
        return self.out.decode("utf-8", "replace")


def run_child(argv: list[str], timeout: float = 300.0, **kwargs) -> Child:
    child = Child(argv, **kwargs)
    child.finish(timeout)
    return child


@dataclass(frozen=True)
class Assets:
    root: Path
    model3: Path          # 3-class tiny model (liver, spleen), plan = the phantom grid
    model16: Path         # 16-class tiny model (AMOS ids), same plan
    dataset: Path         # nnU-Net v2 folder: 3 phantom cases, AMOS labels
    image: Path           # one phantom image (.nii.gz)
    labels: Path          # its reference labels (.nii.gz)
    train_config: Path    # TrainConfig JSON for tiny CLI runs on ``dataset``


def tiny_model(num_classes: int):
    from napari_e2enet import create_model

    return create_model("e2enet_small", num_classes=num_classes, widths=(4, 8, 8), pools=((2, 2, 2),) * 2,
                        sparsity=0.8)


def save_tiny_model(path: Path, num_classes: int, labels: dict[int, str]) -> Path:
    """Saved like a training run saves it: weights + masks + plan + label table + patch."""
    from napari_e2enet.data import Plan
    from napari_e2enet.labels import LabelTable
    from napari_e2enet.training import save_model

    plan = Plan(target_spacing=(6.0, 3.0, 3.0), modality="CT", ct_clip=(-1000.0, 400.0), ct_mean=0.0, ct_std=300.0)
    return save_model(tiny_model(num_classes), path, metadata={
        "plan": plan.to_dict(), "labels": LabelTable(labels).to_dict(),
        "train_config": {"data": {"patch": [16, 16, 16]}}})


def write_train_config(path: Path, source: Path | str, **changes) -> Path:
    config = {
        "model": "e2enet_small",
        "model_overrides": {"widths": [4, 8, 8], "pools": [[2, 2, 2], [2, 2, 2]]},
        "sparsity": {"sparsity": 0.8, "update_every": 2},
        "data": {"source": str(source), "patch": [16, 16, 16], "batch": 2, "num_validation": 1},
        "iterations": 4, "iterations_per_epoch": 2, "checkpoint_every_epochs": 1,
        "validation_every_epochs": 100, "seed": 7, "device": "cpu",
    }
    config.update(changes)
    path.write_text(json.dumps(config, indent=1))
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def resume_here(run: Path, capfd: pytest.CaptureFixture[str]) -> str:
    """``train --resume`` through the console code in this process (one torch thread, as in the children;
    the children are for the interruptions, a resume needs no fresh interpreter); its stderr."""
    from napari_e2enet.cli import main

    capfd.readouterr()
    code = main(["train", "--resume", "--out", str(run)])
    err = capfd.readouterr().err
    assert code == 0, err
    return err


SAVE_ONLY_KEYS = ("checkpoint_every_s", "checkpoint_every_epochs")  # when the state is saved, not what is trained


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Callable[[Path], Path]:
    """``reference_run(config)``: the folder of an uninterrupted ``train`` run of that config file.

    Trained in this process with one torch thread (the children's count: the thread count changes the
    float sums) and shared by every test whose config trains the same: the keys that only decide when
    the state is saved are left out of the comparison key, since a run must not depend on them either."""
    from napari_e2enet.config import TrainConfig, load_config
    from napari_e2enet.training import Trainer

    done: dict[str, Path] = {}

    def run(config: Path) -> Path:
        trained = {k: v for k, v in json.loads(config.read_text()).items() if k not in SAVE_ONLY_KEYS}
        key = json.dumps(trained, sort_keys=True)
        if key not in done:
            import torch

            out = tmp_path_factory.mktemp("reference") / "run"
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                Trainer(load_config(config, TrainConfig), out).fit()
            finally:
                torch.set_num_threads(before)
            done[key] = out
        return done[key]

    return run


def write_phantom_cases(folder: Path, seeds, *, suffix: str = "_0000") -> list[Path]:
    from napari_e2enet.data import make_phantom, write_volume

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        image, _ = make_phantom(seed, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
        paths.append(write_volume(image, folder / f"case{seed:03d}{suffix}.nii.gz"))
    return paths


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    from napari_e2enet.data import AMOS_LABELS, make_phantom, write_volume

    root = tmp_path_factory.mktemp("reliability-assets")
    model3 = save_tiny_model(root / "model3.safetensors", 3, {1: "liver", 2: "spleen"})
    model16 = save_tiny_model(root / "model16.safetensors", 16, dict(AMOS_LABELS))
    dataset = root / "Dataset001_Phantom"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for seed in range(3):
        image, label = make_phantom(seed, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
        write_volume(image, dataset / "imagesTr" / f"c{seed}_0000.nii.gz")
        write_volume(label, dataset / "labelsTr" / f"c{seed}.nii.gz")
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {name: ident for ident, name in AMOS_LABELS.items()},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    image, label = make_phantom(11, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    image_path = write_volume(image, root / "image.nii.gz")
    labels_path = write_volume(label, root / "labels.nii.gz")
    config = write_train_config(root / "tiny_train.json", dataset)
    return Assets(root, model3, model16, dataset, image_path, labels_path, config)


def file_snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_valid_labels_file(path: Path, like: Path) -> None:
    """A complete NIfTI label file on the grid of ``like``: every voxel readable, same shape and affine."""
    import gzip

    import nibabel as nib

    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        # gzip.decompress inflates every member to its end and checks its CRC-32 and length (and
        # refuses trailing garbage); nibabel alone stops at the declared size and checks nothing.
        raw = gzip.decompress(raw)
    img, ref = nib.Nifti1Image.from_bytes(raw), nib.load(str(like))
    data = np.asanyarray(img.dataobj)
    assert data.shape == ref.shape[:3], path
    np.testing.assert_array_equal(img.affine, ref.affine)
    assert data.dtype.kind in "iu" and data.min() >= 0, path
