"""The training loop: a generator of events you can read in one sitting.

``Trainer(config, run_dir).iter_fit()`` yields :class:`TrainEvent` objects (iteration, topology
update, validation, checkpoint, stop) and stops cleanly when ``stop`` is set or the consumer closes
the generator; the state is then saved at the last completed iteration so ``resume=True`` continues
exactly (same weights and masks as an uninterrupted run on the same CPU, because every source of
randomness is a pure function of (seed, rank, iteration)).

Stop means stop: ``stop`` is checked before every iteration and between validation tiles or
patches. A stop during a validation abandons it (no half-measured Dice is reported) and saves the
iteration as it stands, without that epoch's row; ``resume=True`` then runs the abandoned epoch end
(validation, metrics row, checkpoint) first, so a stopped and resumed run writes the same files as
an uninterrupted one. On CPU validation measures a fixed patch sample by default
(``TrainConfig.validation``), not a whole-volume sliding window.

Run directory (written by rank 0 only, every file atomically):

- ``config.json``        the resolved TrainConfig
- ``model.safetensors``  latest weights (pruned kernels exactly zero), masks, plan, labels
- ``training_state.pt``  optimizer, DSFF updater, iteration, history (``weights_only`` loadable)
- ``metrics.csv``        one row per epoch: loss, LR, validation Dice per class, time
- ``connectivity.json``  DSFF connectivity at every topology update and epoch end (docs/connectivity.md)
- ``train.lock``         while a process trains here: its pid, host, start time and command line

One run per folder: the run holds ``train.lock`` (an OS lock the kernel drops even on ``kill -9``) for
its lifetime, so a second process is refused with one line naming the holder; a new run refuses a
folder that holds a run unless ``overwrite=True``, which first moves the old run's files into
``replaced-<time>/`` in the folder. Besides the epoch checkpoints the state is saved by wall time
(``TrainConfig.checkpoint_every_s``, first after the first iteration), so a ``kill -9`` loses at most
that much work; saving never changes the result. Temporaries a killed run left are deleted.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..allocator import keep_freed_memory
from ..config import ModelConfig, TrainConfig, load_config, save_config
from ..data import (
    AugmentConfig,
    Dataset,
    PatchSampler,
    Plan,
    fingerprint,
    load_dataset,
    mirror_axes_for,
    preprocess,
    preprocess_labels,
)
from ..data.intended_input import IntendedInput
from ..device import resolve_device
from ..errors import InputError
from ..fileio import FolderLock, atomic_write_text, describe_holder, remove_stale_temporaries
from ..inference.sliding_window import SlidingWindowCancelled, sliding_window_argmax
from ..labels import LabelTable
from ..metrics import dice
from ..modelcard import (  # the run folder's file names are the model-file contract's
    CONFIG_FILE,
    CONNECTIVITY_FILE,
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILE,
    RESULT_FILES,
    RUN_FILES,
    STATE_FILE,
    ModelCard,
    load_model,
    read_metadata,
    save_model,
)
from ..models import E2ENet, create_model
from ..sparse import ConnectivityRecord, DSFFUpdater, TopologyUpdate
from .checkpoint import load_state, save_state
from .losses import DeepSupervisionLoss
from .sparse_conv import SparseTraining, install_sparse_training

_VALIDATION_STREAM = 0x7A11  # the PatchSampler "rank" of the validation patches (apart from training's)
_clock = time.monotonic  # the wall clock of the timed saves (tests replace it)


class _ValidationStopped(Exception):
    """``stop`` was set during a validation (raised between tiles / patches)."""


@dataclass(frozen=True)
class TrainEvent:
    """One thing that happened. ``kind``: start, iteration, topology, validation, checkpoint,
    stopped, done. ``iteration`` counts completed iterations (1-based)."""

    kind: str
    iteration: int
    total: int
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    dice: dict[str, float] | None = None
    update: TopologyUpdate | None = None
    seconds: float = 0.0
    message: str = ""


@dataclass
class TrainSummary:
    run_dir: Path | None
    iterations: int
    seconds: float
    final_loss: float | None
    dice: dict[str, float] = field(default_factory=dict)
    stopped: bool = False

    @property
    def mean_dice(self) -> float | None:
        return float(np.mean(list(self.dice.values()))) if self.dice else None


def poly_lr(base: float, iteration: int, total: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly schedule (1 - t/T)^0.9."""
    return base * (1.0 - iteration / total) ** exponent


@dataclass
class _Prepared:
    """Dataset preprocessed once: arrays on the network grid, split into train and validation."""

    plan: Plan
    labels: LabelTable
    in_channels: int
    train: list[tuple[np.ndarray, np.ndarray]]
    val: list[tuple[np.ndarray, np.ndarray]]
    val_names: list[str]
    mirror_axes: tuple[int, ...]  # network axes that augmentation (and TTA) may mirror
    intended: IntendedInput  # what the trained model expects (modality, skull-stripped, voxel sizes)


@dataclass
class _Run:
    """What one ``iter_fit`` works on: the data, model and optimiser state, the counters a resume
    restores, and what was last saved (so a stop saves only unsaved work)."""

    data: _Prepared
    model: E2ENet
    device: torch.device
    optimizer: torch.optim.Optimizer
    updater: DSFFUpdater | None
    record: ConnectivityRecord
    t_start: float
    history: list[dict[str, Any]] = field(default_factory=list)
    start: int = 0  # the first iteration this process runs
    completed: int = 0  # iterations done (the state a stop saves)
    epoch_losses: list[float] = field(default_factory=list)
    last_dice: dict[str, float] = field(default_factory=dict)
    loss_value: float | None = None
    saved_iteration: int = -1  # the last save (-1: none yet in a new run)
    saved_at: float = 0.0
    ddp_model: nn.Module | None = None  # the model, or its DistributedDataParallel wrapper
    sampler: PatchSampler | None = None
    autocast: Any = None
    scaler: Any = None
    sparse: SparseTraining | None = None  # the masked units' sparse kernels (CPU), see training.sparse_conv


class Trainer:
    """Train an E2ENet with DSFF.

    ``dataset``: an in-memory :class:`Dataset` (napari layers); otherwise ``config.data.source``
    is loaded (nnU-Net/MSD folder or ``phantom:N``). ``init_from``: a model file to fine-tune (its
    architecture, masks and preprocessing plan are kept). ``rank``/``world_size``: DDP (the process
    group must already be initialised); only rank 0 writes files.
    """

    def __init__(self, config: TrainConfig, run_dir: str | Path | None = None, *, dataset: Dataset | None = None,
                 resume: bool = False, init_from: str | Path | None = None, rank: int = 0, world_size: int = 1,
                 stop: threading.Event | None = None, overwrite: bool = False, command: str | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if resume and overwrite:
            raise InputError("resume continues the run in the folder, overwrite replaces it: choose one",
                             self.run_dir)
        if resume:
            if self.run_dir is None or not (self.run_dir / STATE_FILE).is_file():
                raise InputError("no training state to resume from", self.run_dir / STATE_FILE if self.run_dir else None)
            try:
                config = load_config(self.run_dir / CONFIG_FILE, TrainConfig)
            except InputError:
                raise
            except ValueError as exc:  # load_config names the file in its message
                raise InputError(str(exc)) from None
            if "mirror" not in (json.loads((self.run_dir / CONFIG_FILE).read_text()).get("data") or {}):
                # a run started before DataConfig.mirror existed mirrored every axis: resume it so
                config = config.replace(data=config.data.replace(mirror="all"))
        self.config = config
        self.dataset = dataset
        self.resume = resume
        self.init_from = Path(init_from) if init_from is not None else None
        self.rank = rank
        self.world_size = world_size
        self.stop = stop or threading.Event()
        self.overwrite = overwrite
        # what the lock file tells a refused second process (the napari GUI: "napari")
        self.command = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.model: E2ENet | None = None
        self.summary: TrainSummary | None = None
        self._lock: FolderLock | None = None
        self._val_sampler: tuple[_Prepared, PatchSampler] | None = None  # the validation patches, made once

    @property
    def writes(self) -> bool:
        return self.rank == 0 and self.run_dir is not None

    @property
    def _folder(self) -> Path:
        """``run_dir`` where the caller knows there is one (``writes``, ``resume``)."""
        assert self.run_dir is not None
        return self.run_dir

    # -- the run folder --------------------------------------------------------------------------
    def _take_folder(self) -> list[str]:
        """Lock the (existing) run folder for this process's lifetime, delete temporaries a killed run
        left, and for a new run refuse a folder holding a run, or (``overwrite``) move that run aside.
        Returns notes for the start message."""
        assert self.run_dir is not None
        if self._lock is None:
            self._lock = FolderLock(self.run_dir, LOCK_FILE, command=self.command).acquire()
        notes = []
        if self._lock.took_over:
            notes.append(f"took over {LOCK_FILE} from {describe_holder(self._lock.took_over)}, which no longer runs")
        removed = remove_stale_temporaries(self.run_dir, RUN_FILES, any_owner=True)
        if removed:
            notes.append(f"deleted {len(removed)} temporary file(s) a killed run left")
        if self.resume:
            return notes
        present = [name for name in RESULT_FILES if (self.run_dir / name).exists()]
        if not present:
            return notes
        if not self.overwrite:
            raise InputError(f"already holds a training run ({', '.join(present)}); continue it (--resume), "
                             "move it aside and start a new one (--overwrite), or choose another folder",
                             self.run_dir)
        aside = self._move_aside()
        notes.append(f"the previous run was moved to {aside}")
        return notes

    def _move_aside(self) -> Path:
        """Move the run files (not the lock, nothing else) into a new ``replaced-<time>`` subfolder."""
        assert self.run_dir is not None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.run_dir / f"replaced-{stamp}"
        n = 1
        while aside.exists():
            n += 1
            aside = self.run_dir / f"replaced-{stamp}-{n}"
        try:
            aside.mkdir()
            for name in RUN_FILES:
                if (self.run_dir / name).exists():
                    os.replace(self.run_dir / name, aside / name)
        except OSError as exc:
            raise InputError(f"cannot move the previous run aside ({exc.strerror or exc})", self.run_dir) from None
        if self.init_from is not None and self.init_from.resolve() == (self.run_dir / MODEL_FILE).resolve():
            self.init_from = aside / MODEL_FILE  # fine-tuning from the run being replaced: it moved
        return aside

    def _check_patch(self, arch: Any, source: Path | str | None) -> None:
        """The patch must be a multiple of what the network divides by, and leave the bottleneck more
        than one voxel (instance norm needs two): refuse it before any data is loaded."""
        patch, div = self.config.data.patch, arch.divisor()
        ok = all(p % d == 0 for p, d in zip(patch, div)) and any(p // d > 1 for p, d in zip(patch, div))
        if ok:
            return
        fixed = [max(d, -(-p // d) * d) for p, d in zip(patch, div)]
        if all(f == d for f, d in zip(fixed, div)):
            fixed[0] *= 2
        raise InputError(f"patch {'x'.join(map(str, patch))} does not fit the {arch.name} network: each size must be "
                         f"a multiple of {'x'.join(map(str, div))} (it halves the patch {arch.levels - 1} times) and "
                         f"one at least twice that; e.g. {'x'.join(map(str, fixed))}", source)

    # -- set-up ----------------------------------------------------------------------------------
    def _prepare_data(self, plan: Plan | None, plan_source: Path | str | None = None) -> _Prepared:
        cfg = self.config
        dataset = self.dataset if self.dataset is not None else load_dataset(cfg.data.source)
        if len(dataset.cases) == 0:
            raise InputError("the dataset has no cases", cfg.data.source)
        if plan is None:
            plan = fingerprint(dataset)
            if cfg.data.target_spacing is not None:
                plan = plan.replace(target_spacing=tuple(cfg.data.target_spacing))
        arrays, affines, spacings = [], [], []
        label_ids = list(dataset.labels.names if isinstance(dataset.labels, LabelTable) else dataset.labels)
        for case in dataset.cases:
            image, label = case.load(label_ids)  # unknown label values are refused even when no fingerprint runs
            if label is None:  # (an in-memory Dataset may hold unlabelled cases: was an AttributeError)
                raise InputError(f"case {case.name} has no label map; training needs one for every case",
                                 cfg.data.source)
            self._check_case_memory(image, plan, case.name, plan_source or cfg.data.source)
            array, inverse = preprocess(image, plan)
            arrays.append((array, preprocess_labels(label, plan)))
            affines.append(inverse.network_affine)
            spacings.append(image.spacing)
        names = [case.name for case in dataset.cases]
        if cfg.data.validation_cases:
            unknown = sorted(set(cfg.data.validation_cases) - set(names))
            if unknown:
                raise InputError(f"validation case(s) {unknown} not in the dataset", cfg.data.source)
            val_idx = [i for i, n in enumerate(names) if n in cfg.data.validation_cases]
            train_idx = [i for i, n in enumerate(names) if n not in cfg.data.validation_cases]
            if not train_idx:
                raise InputError("every case is a validation case; nothing left to train on", cfg.data.source)
        else:
            n_val = cfg.data.num_validation
            if n_val is None:
                n_val = round(len(arrays) * cfg.data.validation_fraction)
            n_val = min(max(n_val, 0), len(arrays) - 1)
            order = np.random.default_rng(cfg.seed).permutation(len(arrays))
            val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
        val_idx = val_idx or train_idx[:1]  # one case: validate on the training case (reported)
        labels = dataset.labels if isinstance(dataset.labels, LabelTable) else LabelTable(dict(dataset.labels))
        mirror_axes = mirror_axes_for(cfg.data.mirror, labels.names.values(), affines)
        return _Prepared(plan, labels, arrays[0][0].shape[0], [arrays[i] for i in train_idx],
                         [arrays[i] for i in val_idx], [dataset.cases[i].name for i in val_idx], mirror_axes,
                         IntendedInput.from_plan(plan, spacings))

    @staticmethod
    def _check_case_memory(image: Any, plan: Plan, name: str, source: Path | str | None) -> None:
        """Refuse a case whose resampling to the plan's voxel size would not fit in memory."""
        from ..memory import check_memory, network_grid, training_case_bytes

        grid = network_grid(image, plan)
        voxel = "x".join(f"{s:g}" for s in plan.target_spacing)
        check_memory(training_case_bytes(grid, image.num_channels),
                     f"preparing training case {name} at the voxel size {voxel} mm ({'x'.join(map(str, grid))} "
                     "voxels)", source)

    def _check_batch_memory(self, model: E2ENet, device: torch.device) -> None:
        """Refuse a batch that cannot fit: the batch itself, and on CPU a floor on its activations."""
        from ..memory import check_memory

        cfg = self.config
        voxels = float(np.prod(cfg.data.patch)) * cfg.data.batch
        need = voxels * (4.0 * model.config.in_channels + 8.0)
        if device.type == "cpu":  # level 0 alone keeps several widths[0]-channel maps for backward
            need += voxels * 4.0 * model.config.widths[0] * 4
        check_memory(need, f"a training batch of {cfg.data.batch} patch(es) of {'x'.join(map(str, cfg.data.patch))} "
                           f"voxels", None)

    def _build_model(self, data: _Prepared) -> E2ENet:
        cfg = self.config
        num_classes = max(data.labels.names) + 1
        if self.init_from is not None:
            model, _ = load_model(self.init_from)
            if model.config.num_classes != num_classes or model.config.in_channels != data.in_channels:
                raise InputError(
                    f"model has {model.config.in_channels} channel(s) / {model.config.num_classes} classes but the "
                    f"data has {data.in_channels} / {num_classes}", self.init_from)
            return model
        return create_model(cfg.model, in_channels=data.in_channels, num_classes=num_classes,
                            sparsity=cfg.sparsity.sparsity, seed=cfg.seed, **cfg.model_overrides)

    # -- the loop --------------------------------------------------------------------------------
    def iter_fit(self) -> Iterator[TrainEvent]:
        """The events of the run; the run folder is locked from the first event until the last.
        Freed tensors' memory is kept for the next step meanwhile (:func:`keep_freed_memory`)."""
        try:
            with keep_freed_memory():
                yield from self._iter_fit()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _plan_from_sources(self, state: dict[str, Any] | None, state_path: Path | None) -> tuple[Plan | None, Any]:
        """The preprocessing plan a resumed or initialised run must keep (None: plan anew), and
        where it came from; checks the patch against the architecture that will be trained."""
        plan = None
        plan_source: Path | str | None = None
        if state is not None:
            with _bad_content(state_path, "training state"):
                plan = Plan.from_dict(json.loads(state["plan"]))
            plan_source = state_path
        if self.init_from is not None:
            meta = read_metadata(self.init_from)
            if plan is None:
                with _bad_content(self.init_from, "preprocessing plan in the model metadata"):
                    plan = Plan.from_dict(meta["plan"]) if "plan" in meta else None
                plan_source = self.init_from
            with _bad_content(self.init_from, "model config in the model metadata"):
                arch = ModelConfig.from_dict(meta["model_config"])
            self._check_patch(arch, None)
        else:
            try:
                self._check_patch(self.config.model_config(), None)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        return plan, plan_source

    def _start_run(self, state: dict[str, Any] | None, state_path: Path | None, plan: Plan | None,
                   plan_source: Any, device: torch.device, t_start: float) -> _Run:
        """Data, model, optimiser, updater and connectivity record, restored from ``state`` if any."""
        cfg = self.config
        data = self._prepare_data(plan, plan_source)
        model = self._build_model(data).to(device)
        self.model = model
        self._check_batch_memory(model, device)
        optimizer = make_optimizer(model, cfg)
        updater = (DSFFUpdater(model, optimizer, cfg.sparsity, cfg.iterations, seed=cfg.seed)
                   if model.masks() else None)
        run = _Run(data=data, model=model, device=device, optimizer=optimizer, updater=updater,
                   record=ConnectivityRecord.for_model(model, sparsity=cfg.sparsity.sparsity, model_name=cfg.model),
                   t_start=t_start)
        # DSFF-masked units skip their pruned kernels on the CPU (dense PyTorch elsewhere)
        run.sparse = install_sparse_training(model, device) if updater is not None else None
        if state is not None:
            with _bad_content(state_path, "training state (does it belong to this run's config.json?)"):
                model.set_masks({k: v for k, v in state["masks"].items()})
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                if updater is not None:
                    updater.load_state_dict(state["updater"])
                run.record = ConnectivityRecord.from_dict(json.loads(state["connectivity"]))
                run.history = json.loads(state["history"])
                run.start = int(state["iteration"])
                if not 0 <= run.start <= cfg.iterations:
                    raise ValueError(f"iteration {run.start} is outside 0..{cfg.iterations}")
        run.ddp_model = nn.parallel.DistributedDataParallel(model) if self.world_size > 1 else model
        run.sampler = PatchSampler(data.train, patch=cfg.data.patch, batch=cfg.data.batch,
                                   foreground_oversample=cfg.data.foreground_oversample, augment=cfg.data.augment,
                                   seed=cfg.seed, rank=self.rank,
                                   augment_config=AugmentConfig.for_patch(cfg.data.patch, mirror_axes=data.mirror_axes))
        run.autocast = _autocast(device, cfg.precision)
        run.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "amp" and device.type == "cuda" else None
        return run

    def _open_folder(self, run: _Run, notes: list[str]) -> None:
        """Create and lock the run folder, write config.json and the initial topology."""
        if not self.writes:
            return
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the run folder ({exc.strerror or exc})", self.run_dir) from None
        if self._lock is None:
            notes += self._take_folder()
        save_config(self.config, self._folder / CONFIG_FILE)
        if run.start == 0:
            run.record.record(run.model, "epoch", 0, epoch=0)  # the initial random topology

    def _resume_counters(self, run: _Run, state: dict[str, Any] | None, state_path: Path | None) -> None:
        run.saved_iteration = run.start if state is not None else -1
        run.saved_at = _clock()
        run.completed = run.start
        if state:
            with _bad_content(state_path, "training state"):
                run.epoch_losses = [float(v) for v in state.get("epoch_losses", [])]
        run.last_dice = run.history[-1]["dice"] if run.history else {}
        # until an iteration runs here: the last loss the run recorded (a finished run resumed)
        run.loss_value = (run.epoch_losses[-1] if run.epoch_losses
                          else (run.history[-1]["loss"] if run.history else None))

    def _checkpoint(self, run: _Run, iteration: int) -> None:
        """Model file (with its card), connectivity, metrics and training state at ``iteration``."""
        if not self.writes:
            return
        cfg, data, model = self.config, run.data, run.model
        run.saved_iteration, run.saved_at = iteration, _clock()
        card = ModelCard(data.plan, data.labels, model.config, cfg.data.patch, data.mirror_axes, data.intended,
                         cfg.to_dict(), iteration)
        save_model(model, self._folder / MODEL_FILE, metadata=card.to_metadata())
        run.record.to_json(self._folder / CONNECTIVITY_FILE)
        _write_metrics(self._folder / METRICS_FILE, run.history)
        state = {"iteration": iteration, "model": model.state_dict(), "masks": model.masks(),
                 "optimizer": run.optimizer.state_dict(),
                 "updater": run.updater.state_dict() if run.updater is not None else {},
                 "connectivity": json.dumps(run.record.to_dict()), "history": json.dumps(run.history),
                 "plan": json.dumps(data.plan.to_dict()), "epoch_losses": list(run.epoch_losses)}
        save_state(state, self._folder / STATE_FILE)

    def _end_epoch(self, run: _Run, completed: int, lr: float) -> Generator[TrainEvent, None, bool]:
        """Validation, metrics row, connectivity entry, checkpoint. Returns False (having saved
        nothing) if ``stop`` interrupted the validation: the caller stops, the state is saved."""
        cfg, total = self.config, self.config.iterations
        epoch = math.ceil(completed / cfg.iterations_per_epoch)
        if self.rank == 0 and (epoch % cfg.validation_every_epochs == 0 or completed == total):
            try:
                run.last_dice = self.validate(run.model, run.data, run.device)
            except _ValidationStopped:
                return False
            yield TrainEvent("validation", completed, total, epoch, dice=run.last_dice)
        run.history.append({"epoch": epoch, "iteration": completed, "loss": float(np.mean(run.epoch_losses)),
                            "lr": lr, "dice": run.last_dice, "seconds": time.perf_counter() - run.t_start,
                            "sparsity": run.model.sparsity})
        run.epoch_losses = []
        if self.rank == 0:
            run.record.record(run.model, "epoch", completed, epoch=epoch, loss=run.history[-1]["loss"])
        if epoch % cfg.checkpoint_every_epochs == 0 or completed == total:
            self._checkpoint(run, completed)
            yield TrainEvent("checkpoint", completed, total, epoch)
        return True

    def _step(self, run: _Run, it: int, loss_fn: nn.Module) -> Iterator[TrainEvent]:
        """One optimiser step (and topology update); yields its events."""
        cfg, total, model = self.config, self.config.iterations, run.model
        assert run.ddp_model is not None and run.sampler is not None  # _start_run set them
        run.ddp_model.train()
        lr = poly_lr(cfg.lr, it, total)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        images, target = run.sampler.batch(it)
        images, target = images.to(run.device), target.to(run.device)
        if run.sparse is not None and run.updater is not None:
            # gradient-based regrowth scores the pruned kernels: their gradients on those steps only
            run.sparse.dense_weight_grads(run.updater.needs_dense_grads(it + 1))
        loss = train_step(run.ddp_model, run.optimizer, loss_fn, images, target, autocast=run.autocast,
                          scaler=run.scaler, grad_clip=cfg.grad_clip)
        update = run.updater.after_step(it + 1) if run.updater is not None else None
        completed = run.completed = it + 1
        loss_value = run.loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at iteration {completed}")
        run.epoch_losses.append(loss_value)
        epoch = math.ceil(completed / cfg.iterations_per_epoch)
        yield TrainEvent("iteration", completed, total, epoch, loss=loss_value, lr=lr,
                         seconds=time.perf_counter() - run.t_start)
        if update is not None:
            if self.world_size > 1:
                _check_masks_agree(model)
            if self.rank == 0:
                run.record.record(model, "update", completed, epoch=epoch, update=update, loss=loss_value)
            yield TrainEvent("topology", completed, total, epoch, loss=loss_value, update=update)

    def _iterations(self, run: _Run, resumed: bool) -> Generator[TrainEvent, None, bool]:
        """The training iterations from ``run.start``; returns True when stopped early."""
        cfg, total, start = self.config, self.config.iterations, run.start
        loss_fn = DeepSupervisionLoss()
        if (resumed and start > 0 and (start % cfg.iterations_per_epoch == 0 or start == total)
                and (not run.history or run.history[-1]["iteration"] != start)):
            # stopped during this epoch's end (e.g. its validation): finish it before going on
            finished = yield from self._end_epoch(run, start, poly_lr(cfg.lr, start - 1, total))
            if self.world_size > 1:
                torch.distributed.barrier()
            if not finished:
                return True
        for it in range(start, total):
            if self.stop.is_set():
                return True
            yield from self._step(run, it, loss_fn)
            completed = run.completed
            if completed % cfg.iterations_per_epoch == 0 or completed == total:
                finished = yield from self._end_epoch(run, completed, poly_lr(cfg.lr, it, total))
                if self.world_size > 1:
                    torch.distributed.barrier()
                if not finished:
                    return True
            # Timed save (kill -9 loses at most checkpoint_every_s of work): the first right after
            # the first iteration of a new run, then by the clock, at this iteration boundary.
            if (self.writes and cfg.checkpoint_every_s > 0 and completed < total
                    and run.saved_iteration != completed
                    and (run.saved_iteration < 0 or _clock() - run.saved_at >= cfg.checkpoint_every_s)):
                self._checkpoint(run, completed)
        return False

    def _iter_fit(self) -> Iterator[TrainEvent]:
        cfg, total = self.config, self.config.iterations
        t_start = time.perf_counter()
        device = resolve_device(cfg.device)
        notes: list[str] = []
        if self.writes and self._folder.is_dir():  # a new folder is locked once it exists (below)
            notes += self._take_folder()
        state_path = self.run_dir / STATE_FILE if self.run_dir is not None else None
        state = load_state(self._folder / STATE_FILE) if self.resume else None
        plan, plan_source = self._plan_from_sources(state, state_path)
        run = self._start_run(state, state_path, plan, plan_source, device, t_start)
        self._open_folder(run, notes)
        self._resume_counters(run, state, state_path)
        start = run.start
        if state is not None and self.writes and not (self._folder / MODEL_FILE).is_file():
            self._checkpoint(run, start)  # the state holds the weights: restore the missing model file first
            notes.append(f"{MODEL_FILE} was missing; rewritten from {STATE_FILE} (iteration {start})")
        if state is not None and start == total:
            notes.append(f"the run had already finished ({total} iterations); nothing to do")
        message = f"{len(run.data.train)} training / {len(run.data.val)} validation case(s) on {device}"
        yield TrainEvent("start", start, total, start // cfg.iterations_per_epoch,
                         message="; ".join([message, *notes]))
        stopped = False
        try:
            stopped = yield from self._iterations(run, state is not None)
        except GeneratorExit:
            stopped = True
            raise
        finally:
            # Save at the last *completed* iteration, so resume continues exactly from there.
            if (stopped or self.stop.is_set()) and run.completed != run.saved_iteration and run.completed > 0:
                self._checkpoint(run, run.completed)
        elapsed = time.perf_counter() - t_start
        self.summary = TrainSummary(self.run_dir, run.completed, elapsed, run.loss_value, run.last_dice, stopped)
        yield TrainEvent("stopped" if stopped else "done", run.completed, total,
                         math.ceil(run.completed / cfg.iterations_per_epoch), loss=run.loss_value,
                         dice=run.last_dice, seconds=elapsed)

    def fit(self) -> TrainSummary:
        for _ in self.iter_fit():
            pass
        assert self.summary is not None
        return self.summary

    def validation_mode(self, device: torch.device) -> str:
        """"full" or "patches": ``config.validation``, with "auto" meaning patches on CPU."""
        mode = self.config.validation
        if mode == "auto":
            return "patches" if device.type == "cpu" else "full"
        return mode

    @torch.no_grad()
    def validate(self, model: E2ENet, data: _Prepared, device: torch.device, mode: str | None = None
                 ) -> dict[str, float]:
        """Dice per foreground class on the validation cases (classes absent from both the reference
        and the prediction are left out).

        ``mode`` (default :meth:`validation_mode`): "full" — a sliding window (50 % overlap) over every
        validation case, Dice per case, averaged over the cases; "patches" — the same
        ``config.validation_patches`` patches at every validation (half centred on a labelled voxel,
        half anywhere; no augmentation), one forward pass each, Dice pooled over the patches.
        Raises :class:`_ValidationStopped` as soon as ``self.stop`` is set (checked between tiles,
        cases and patch batches).
        """
        mode = mode or self.validation_mode(device)
        model.eval()
        names = {k: v for k, v in data.labels.names.items() if k != 0}

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model(x.to(device)).float().cpu()

        try:
            if mode == "patches":
                return self._validate_patches(forward, data, names)
            per_class: dict[str, list[float]] = {}
            for image, label in data.val:
                if self.stop.is_set():
                    raise _ValidationStopped
                try:
                    pred = sliding_window_argmax(torch.from_numpy(image), forward, patch=self.config.data.patch,
                                                 num_classes=model.config.num_classes, overlap=0.5, stop=self.stop)
                except SlidingWindowCancelled:
                    raise _ValidationStopped from None
                for k, name in names.items():
                    if (label == k).any() or (pred == k).any():
                        per_class.setdefault(name, []).append(dice(pred, label, k))
            return {name: float(np.mean(v)) for name, v in per_class.items()}
        finally:
            model.train()

    def _validate_patches(self, forward: Any, data: _Prepared, names: dict[int, str]) -> dict[str, float]:
        cfg = self.config
        if self._val_sampler is None or self._val_sampler[0] is not data:
            sampler = PatchSampler(data.val, patch=cfg.data.patch, batch=1, foreground_oversample=0.5, augment=False,
                                   seed=cfg.seed, rank=_VALIDATION_STREAM)
            self._val_sampler = (data, sampler)
        sampler = self._val_sampler[1]
        counts = {k: np.zeros(3, dtype=np.int64) for k in names}  # true positives, predicted, reference
        step = max(1, cfg.data.batch)
        for first in range(0, cfg.validation_patches, step):
            if self.stop.is_set():
                raise _ValidationStopped
            batches = [sampler.batch(k) for k in range(first, min(first + step, cfg.validation_patches))]
            images = torch.cat([b[0] for b in batches])
            labels = torch.cat([b[1] for b in batches])[:, 0].numpy()
            pred = forward(images).argmax(1).numpy()
            for k in names:
                p, r = pred == k, labels == k
                counts[k] += (np.count_nonzero(p & r), np.count_nonzero(p), np.count_nonzero(r))
        return {names[k]: float(2 * c[0] / (c[1] + c[2])) for k, c in counts.items() if c[1] + c[2] > 0}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer``: "sgd" (nnU-Net: Nesterov, ``cfg.momentum``) or "adamw" (betas 0.9, 0.999)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=True)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, images: torch.Tensor,
               target: torch.Tensor, *, autocast: Any = None, scaler: Any = None,
               grad_clip: float = 12.0) -> torch.Tensor:
    """One optimisation step (forward, loss, backward, clip, exactly one ``optimizer.step()``).

    images (B, C, D, H, W) float, target (B, 1, D, H, W) int64; returns the detached loss.
    Masks are not touched here: the DSFF updater re-applies them after the step.
    """
    with autocast if autocast is not None else nullcontext():
        loss = loss_fn(model(images), target)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach()


def mask_fingerprint(model: E2ENet) -> torch.Tensor:
    """Two numbers that change whenever any kernel mask changes (position-weighted active counts)."""
    total = torch.zeros(2, dtype=torch.float64)
    for i, mask in enumerate(model.masks().values()):
        flat = mask.flatten().to(torch.float64).cpu()
        total[0] += flat.sum() * (i + 1)
        total[1] += (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()
    return total


def _check_masks_agree(model: E2ENet) -> None:
    """DDP: every rank must hold the same topology after an update (same seed, same weights)."""
    import torch.distributed as dist

    mine = mask_fingerprint(model)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, mine) for g in gathered):
        raise RuntimeError("DSFF masks diverged between DDP ranks")


@contextmanager
def _bad_content(path: Path | None, what: str) -> Iterator[None]:
    """Turn a malformed file's KeyError/ValueError/RuntimeError into one InputError line naming it."""
    try:
        yield
    except InputError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        kind = "missing entry" if isinstance(exc, KeyError) else type(exc).__name__
        raise InputError(f"unusable {what} ({kind}: {detail})", path) from None


def _autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if precision not in ("fp32", "amp"):
        raise InputError(f"unknown precision {precision!r} (fp32, bf16 or amp)")
    return nullcontext()


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    classes = sorted({name for row in history for name in row["dice"]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["epoch", "iteration", "loss", "lr", "val_dice_mean", *[f"dice_{c}" for c in classes],
                     "seconds", "sparsity"])
    for row in history:
        d = row["dice"]
        mean = float(np.mean(list(d.values()))) if d else float("nan")
        writer.writerow([row["epoch"], row["iteration"], f"{row['loss']:.6f}", f"{row['lr']:.6g}", f"{mean:.4f}",
                         *[f"{d[c]:.4f}" if c in d else "" for c in classes], f"{row['seconds']:.1f}",
                         f"{row['sparsity']:.4f}"])
    atomic_write_text(path, buf.getvalue())
