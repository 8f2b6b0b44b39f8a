"""Fine-tune a trained model on one volume's corrected labels: the correction loop of the GUI, the
``napari-e2enet finetune`` command and the Python API share this one path.

Why not ``Trainer`` with ``init_from`` (what the first build did): it starts like a new training —
fingerprinting, a validation sliding window, fresh SGD momentum at the paper's learning rate,
heavy augmentation — and learns from *every* voxel of the label layer, most of which are the
model's own uncorrected mistakes. On a domain-shifted copy of the sample it lowered the Dice it
was meant to raise. Here instead:

- the loss (Dice + CE, all deep-supervision heads) is restricted to the **planes the user
  corrected**: every slice that holds an edit, along the axis the edits are confined to (a user
  who fixed a slice vouches for all of it, and the rest of the volume is never taught back its own
  errors). Without an edit mask, the whole label map is used (a reference segmentation);
- the image is cropped to the **same field of view Segment uses** (the foreground's bounding box
  for a foreground-normalised plan) and patches lie inside it, holding a corrected voxel, as the
  sliding window's tiles do: patches centred on edge voxels and half filled with zero padding
  taught the network a picture it never sees (the bundled model labelled 42 % of the background
  of such patches wrong on the shifted sample, and the loss went into that, not the corrections);
- no augmentation, no validation inside the loop; AdamW at a constant learning rate, all layers
  (``train="all"``, default) or the decoder and heads only (``train="decoder"``); DSFF stays on
  (masks re-applied after every step; topology updates on the usual schedule, which in a short run
  means none). Defaults measured on the scanner-shifted sample (``benchmarks/finetune_corrections.py``,
  k = 6 corrected slices, mean Dice on the other slices 0.812 before): decoder only at 3e-4 for 30
  steps 0.836; all layers at 1e-3: 60 steps 0.865, 90 steps 0.871, 120 steps at batch 1 0.864;
  3e-3 no better (0.864 at 60); a 32x64x64 patch worse (0.834);
- the result is a run folder like ``train`` writes (``model.safetensors`` with the base model's
  plan, label table, intended input and mirror axes), so Segment, ``predict --model RUN`` and a
  later fine-tune all take it.

``iter_finetune`` is a generator of :class:`FinetuneEvent` that stops at the next iteration when
``stop`` is set (nothing is written then).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..allocator import keep_freed_memory
from ..config import MIN_UPDATE_EVERY, SparsityConfig
from ..data import Plan, Volume, preprocess, preprocess_labels
from ..data.intended_input import IntendedInput, IntensityOffset, apply_intensity_offset
from ..data.preprocess import field_of_view
from ..device import ThreadChooser, resolve_device
from ..errors import InputError
from ..fileio import atomic_write_text
from ..labels import LabelTable
from ..modelcard import (
    FINETUNE_FILE,
    MODEL_FILE,
    ModelCard,
    load_model,
    model_file_in,
    read_metadata,
    save_model,
)
from ..models import E2ENet
from ..sparse import DSFFUpdater
from .losses import deep_supervision_weights
from .sparse_conv import SparseTraining, install_sparse_training

__all__ = ["FinetuneConfig", "FinetuneEvent", "correction_region", "finetune", "iter_finetune", "masked_dice_ce"]

TRAINABLE = ("decoder", "all")


@dataclass(frozen=True)
class FinetuneConfig:
    """How a fine-tune runs (defaults measured in ``benchmarks/finetune_corrections.py``).

    Attributes:
        iterations: optimiser steps.
        lr: AdamW learning rate (constant).
        batch: patches per step. patch: (D, H, W) on the network grid; None = the model's training
            patch, capped at 64 per axis.
        train: "decoder" (encoder frozen) or "all".
        weight_decay: AdamW weight decay.
        centre_sigma: loss weights fall off from the patch centre as a Gaussian of this share of the
            patch size (0: uniform), as the sliding window weights its tiles.
        seed: patch positions.
        device: "cpu", "cuda", ... ("auto" picks).
    """

    iterations: int = 80
    lr: float = 1e-3
    batch: int = 2
    patch: tuple[int, int, int] | None = None
    train: str = "all"
    weight_decay: float = 3e-5
    centre_sigma: float = 0.25
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise InputError(f"fine-tune iterations must be >= 1, got {self.iterations}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise InputError(f"fine-tune learning rate must be a positive number, got {self.lr}")
        if self.batch < 1:
            raise InputError(f"fine-tune batch must be >= 1, got {self.batch}")
        if self.train not in TRAINABLE:
            raise InputError(f"fine-tune 'train' must be one of {TRAINABLE}, got {self.train!r}")
        if self.patch is not None and (len(self.patch) != 3 or min(self.patch) < 8):
            raise InputError(f"fine-tune patch must be three sizes >= 8, got {self.patch}")

    def replace(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class FinetuneEvent:
    """kind: "start" | "iteration" | "done" | "stopped"; ``run_dir`` is set on "done"."""

    kind: str
    iteration: int
    total: int
    loss: float | None = None
    seconds: float = 0.0
    run_dir: Path | None = None
    message: str = ""


def correction_region(edited: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool edits → (X, Y, Z) bool region the loss is computed on.

    The planes holding an edit, along the voxel axis on which the edits touch the fewest planes
    (the axis the user scrolled through while correcting slice by slice; ties: the smaller share of
    the axis). Empty edits → empty region.
    """
    edited = np.asarray(edited, bool)
    if not edited.any():
        return np.zeros(edited.shape, bool)
    planes = [np.flatnonzero(edited.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    axis = min(range(3), key=lambda k: (len(planes[k]), len(planes[k]) / edited.shape[k]))
    region = np.zeros(edited.shape, bool)
    index: list[Any] = [slice(None)] * 3
    index[axis] = planes[axis]
    region[tuple(index)] = True
    return region


def masked_dice_ce(logits: list[torch.Tensor] | torch.Tensor, target: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """Deep-supervised soft Dice (foreground classes, batch Dice) + cross-entropy, each voxel weighted
    by ``mask`` (0 = not in the loss).

    logits: (B, K, D_h, H_h, W_h) per head, full resolution first; target (B, 1, D, H, W) int64;
    mask (B, 1, D, H, W) bool or float weights ≥ 0. Heads see target and mask resized by nearest
    neighbour.
    """
    heads = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    total = heads[0].new_zeros(())
    for weight, out in zip(deep_supervision_weights(len(heads)), heads):
        size = tuple(out.shape[2:])
        tgt = F.interpolate(target.float(), size=size, mode="nearest").long()[:, 0]
        msk = F.interpolate(mask.float(), size=size, mode="nearest")[:, 0]
        if not bool(msk.any()):
            continue
        out = out.float()
        ce = (F.cross_entropy(out, tgt, reduction="none") * msk).sum() / msk.sum()
        prob = out.softmax(1)[:, 1:]
        onehot = F.one_hot(tgt, out.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
        m = msk[:, None]
        dims = (0, 2, 3, 4)
        inter = (prob * onehot * m).sum(dims)
        denom = (prob * m).sum(dims) + (onehot * m).sum(dims)
        dice_loss = 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
        total = total + weight * (ce + dice_loss)
    return total


def _patch_size(config: FinetuneConfig, meta: dict[str, Any], divisor: tuple[int, int, int]) -> tuple[int, int, int]:
    patch: tuple[int, ...]
    if config.patch is not None:
        patch = config.patch
    else:
        train = meta.get("train_config") or {}
        patch = tuple(min(int(p), 64) for p in (train.get("data") or {}).get("patch") or (48, 48, 48))
    d, h, w = (max(k, (int(p) // k) * k) for p, k in zip(patch, divisor, strict=True))
    return d, h, w


def _pools_product(model: E2ENet) -> tuple[int, int, int]:
    out = [1, 1, 1]
    for pool in model.config.pools:
        for k in range(3):
            out[k] *= int(pool[k])
    return (out[0], out[1], out[2])


def centre_weights(patch: tuple[int, int, int], sigma_scale: float) -> np.ndarray:
    """(D, H, W) Gaussian weights, 1 at the patch centre, sigma = ``sigma_scale`` × size per axis.

    The sliding window keeps mostly the centres of its tiles (Gaussian blending); a convolutional
    network is least reliable near a patch's border (zero padding), so a loss over whole patches
    spends its gradient on border voxels that never reach a prediction.
    """
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (sigma_scale * n)) ** 2) for n in patch]
    return (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).astype(np.float32)


class _RegionSampler:
    """Patches that hold a random voxel of the loss region and lie inside the volume, as the
    sliding window's tiles do (a volume smaller than the patch is padded symmetrically with zeros,
    as the sliding window pads it).

    Why inside: centring a patch on a region voxel near the edge fills half of it with padding the
    network never sees at inference (it predicts on the foreground's bounding box); on the shifted
    sample the bundled model labelled 42 % of the background wrong in such patches, and the loss
    spent itself on that instead of the corrections.
    """

    def __init__(self, image: np.ndarray, labels: np.ndarray, region: np.ndarray, patch: tuple[int, int, int],
                 seed: int, sigma_scale: float = 0.0) -> None:
        self.patch = patch
        self.weights = centre_weights(patch, sigma_scale) if sigma_scale > 0 else None
        size = [max(s, p) for s, p in zip(region.shape, patch, strict=True)]
        pad = [((n - s) // 2, n - s - (n - s) // 2) for n, s in zip(size, region.shape, strict=True)]
        self.image = np.pad(image, [(0, 0), *pad])
        self.labels = np.pad(labels, pad)
        self.region = np.pad(region, pad)
        where = np.flatnonzero(self.region)
        self.centres = np.stack(np.unravel_index(where, self.region.shape), axis=1) if where.size else None
        self.rng = np.random.default_rng(seed)

    def start(self, voxel: np.ndarray) -> tuple[int, int, int]:
        """Patch start (D, H, W) that holds ``voxel``, as close to centring it as the volume allows."""
        return tuple(int(np.clip(int(voxel[k]) - self.patch[k] // 2, 0, self.region.shape[k] - self.patch[k]))
                     for k in range(3))  # type: ignore[return-value]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.centres is not None
        picks = self.centres[self.rng.integers(0, len(self.centres), size)]
        images, labels, masks = [], [], []
        for c in picks:
            start = self.start(c)
            sl = tuple(slice(start[k], start[k] + self.patch[k]) for k in range(3))
            index = (slice(None), *sl)  # built apart: mypy reads x[(a, *b)] as the 3.11-only x[a, *b]
            images.append(self.image[index])
            labels.append(self.labels[sl])
            masks.append(self.region[sl])
        mask = np.stack(masks)[:, None]
        weight = mask if self.weights is None else mask * self.weights
        return (torch.from_numpy(np.stack(images)).float(),
                torch.from_numpy(np.stack(labels)[:, None].astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))


def iter_finetune(model_file: str | Path, image: Volume, labels: Volume, out: str | Path, *,
                  edited: np.ndarray | None = None, config: FinetuneConfig | None = None,
                  stop: threading.Event | None = None,
                  intensity_offset: IntensityOffset = None) -> Iterator[FinetuneEvent]:
    """Fine-tune ``model_file`` on ``labels`` of ``image`` (restricted to the edited planes) and
    write the result as a run folder ``out``. ``intensity_offset`` (a number, "auto" or None) is
    applied to ``image`` as prediction applies it (:func:`~napari_e2enet.data.intended_input.apply_intensity_offset`),
    so that a CT stored with an offset is learnt from in HU, as it was segmented; the "start" event's
    message says what was added.

    image: (X, Y, Z) or (C, X, Y, Z) Volume; labels: (X, Y, Z) integer Volume on the image's grid;
    edited: (X, Y, Z) bool, True where the user changed a label (None: learn from every voxel).
    """
    config = config or FinetuneConfig()
    stop = stop or threading.Event()
    t0 = time.perf_counter()
    model_file = model_file_in(model_file)
    meta = read_metadata(model_file)
    card = ModelCard.from_metadata(meta, model_file)
    image, _, offset_notes = apply_intensity_offset(image, card.intended or IntendedInput.from_plan(card.plan),
                                                    intensity_offset)
    region = _corrected_region(image, labels, edited, card.labels)
    device = resolve_device(config.device)
    model, _ = load_model(model_file)
    if model.config.in_channels != image.num_channels:
        raise InputError(f"image has {image.num_channels} channel(s) but the model expects "
                         f"{model.config.in_channels}", image.name or None)
    model = model.to(device)
    patch = _patch_size(config, meta, _pools_product(model))
    sampler, region_voxels = _teaching_patches(image, labels, region, card.plan, patch, config)
    params, optimizer, updater = _optimiser(model, config, meta)
    total = config.iterations
    yield FinetuneEvent("start", 0, total, seconds=time.perf_counter() - t0,
                        message="; ".join([f"{region_voxels} voxels in the corrected region; patch {patch}, "
                                           f"{'decoder only' if config.train == 'decoder' else 'all layers'}",
                                           *offset_notes]))
    model.train()
    loss_value = float("nan")
    # The masked fusion convs skip their pruned kernels on the CPU (training.sparse_conv): the bundled
    # models are DSFF-sparse, and fine-tune time is what the user waits for.
    sparse = install_sparse_training(model, device) if model.masks() else None
    with ThreadChooser(None if device.type == "cpu" else (torch.get_num_threads(),)) as threads, keep_freed_memory():
        for it in range(total):
            if stop.is_set():
                _remove(sparse)
                yield FinetuneEvent("stopped", it, total, loss_value, time.perf_counter() - t0)
                return
            if sparse is not None:
                sparse.dense_weight_grads(updater is not None and updater.needs_dense_grads(it + 1))
            with threads.step():
                loss_value = _train_step(model, sampler.batch(config.batch), device, optimizer, params)
            if updater is not None:
                updater.after_step(it + 1)  # re-applies the masks; prunes/regrows on the DSFF schedule
            else:
                model.apply_masks()
            if not np.isfinite(loss_value):
                raise FloatingPointError(f"fine-tune loss became {loss_value} at iteration {it + 1}")
            yield FinetuneEvent("iteration", it + 1, total, loss_value, time.perf_counter() - t0)
    _remove(sparse)
    if stop.is_set():
        yield FinetuneEvent("stopped", total, total, loss_value, time.perf_counter() - t0)
        return
    info = {"base_model": str(model_file), "image": image.name, "config": dataclasses.asdict(config),
            "region_voxels": region_voxels, "seconds": round(time.perf_counter() - t0, 2),
            "cpu_threads": threads.current if device.type == "cpu" else None}
    run_dir = _write_run(model, Path(out), meta, info)
    yield FinetuneEvent("done", total, total, loss_value, time.perf_counter() - t0, run_dir=run_dir)


def _remove(sparse: SparseTraining | None) -> None:
    if sparse is not None:
        sparse.remove()


def _corrected_region(image: Volume, labels: Volume, edited: np.ndarray | None, table: LabelTable) -> np.ndarray:
    """(X, Y, Z) bool: where the loss looks (:func:`correction_region`), after checking that the
    labels and edits fit the image and the model's label table."""
    if labels.spatial_shape != image.spatial_shape:
        raise InputError(f"labels shape {labels.spatial_shape} differs from the image's {image.spatial_shape}",
                         labels.name or None)
    unknown = sorted(set(np.unique(labels.array).tolist()) - set(table.ids) - {0})
    if unknown:
        raise InputError(f"label value(s) {unknown[:5]} are not classes of the model ({table})", labels.name or None)
    if edited is not None and np.asarray(edited).shape != image.spatial_shape:
        raise InputError(f"edit mask shape {np.asarray(edited).shape} differs from the image's {image.spatial_shape}")
    region = np.ones(image.spatial_shape, bool) if edited is None else correction_region(edited)
    if not region.any():
        raise InputError("no corrected voxels: paint or erase some labels first")
    return region


def _teaching_patches(image: Volume, labels: Volume, region: np.ndarray, plan: Plan, patch: tuple[int, int, int],
                      config: FinetuneConfig) -> tuple[_RegionSampler, int]:
    """The sampler of training patches on the network's grid, and the corrected region's voxel count
    (after any thickening). The image is cropped to Segment's field of view first."""
    box = field_of_view(image, plan)  # the network is taught on what Segment will show it
    if box is None:
        raise InputError("the image holds nothing but its background value", image.name or None)
    image, region = image.crop(box), region[box]
    if not region.any():
        raise InputError("the corrections lie outside the image's foreground, where the model never predicts")
    array, _ = preprocess(image, plan)
    grid = Volume(labels.array[box], image.affine, None, labels.name)
    net_labels = preprocess_labels(grid, plan)
    net_region = preprocess_labels(grid.with_array(region.astype(np.uint8)), plan).astype(bool)
    for _ in range(4):  # a plane thinner than the network's voxels can vanish when resampled: thicken it
        if net_region.any():
            break
        region = ndi.binary_dilation(region)
        net_region = preprocess_labels(grid.with_array(region.astype(np.uint8)), plan).astype(bool)
    sampler = _RegionSampler(array, net_labels, net_region, patch, config.seed, config.centre_sigma)
    if sampler.centres is None:
        raise InputError("the corrected region vanished on the model's grid (too thin after resampling)")
    return sampler, int(region.sum())


def _optimiser(model: E2ENet, config: FinetuneConfig, meta: dict[str, Any]
               ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, DSFFUpdater | None]:
    """(trained parameters, AdamW over them, the DSFF updater or None for a dense or hand-masked model)."""
    if config.train == "decoder":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if not model.masks():
        return params, optimizer, None
    # ΔT = 40, the floor a regrown (zero) kernel needs to earn its weight: a topology update every
    # 3 iterations, as the run-scaled default would give a 30-iteration run, only destroys.
    sparsity = float(((meta.get("train_config") or {}).get("sparsity") or {}).get("sparsity", model.sparsity))
    try:
        updater = DSFFUpdater(model, optimizer, SparsityConfig(sparsity=sparsity, update_every=MIN_UPDATE_EVERY),
                              config.iterations, seed=config.seed)
    except ValueError:  # masks that no sparsity setting reproduces (hand-made): keep them, no updates
        updater = None
    return params, optimizer, updater


def _write_run(model: E2ENet, run_dir: Path, meta: dict[str, Any], info: dict[str, Any]) -> Path:
    """The run folder: the model with the base model's card, and ``finetune.json``."""
    model.eval()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the run folder ({exc.strerror})", run_dir) from None
    keep: dict[str, Any] = {k: meta[k] for k in ("plan", "labels", "train_config", "mirror_axes", "intended_input")
                            if k in meta}
    save_model(model, run_dir / MODEL_FILE, metadata={**keep, "iterations": info["config"]["iterations"],
                                                      "finetune": info})
    atomic_write_text(run_dir / FINETUNE_FILE, json.dumps(info, indent=2) + "\n")
    return run_dir


def _train_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], device: torch.device,
                optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> float:
    """One AdamW step on (images, labels, loss weights); returns the loss."""
    images, target, mask = (t.to(device) for t in batch)
    loss = masked_dice_ce(model(images), target, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 12.0)
    optimizer.step()
    return float(loss.detach())


def warm_up_finetune() -> None:
    """Import what the first optimiser step needs, ahead of time (e.g. in a background thread while
    the user paints corrections). Why: ``torch.optim.Optimizer.__init__`` imports ``torch._dynamo``
    on first use, 2–7 s on a 2-core CPU, which the user would otherwise wait for after clicking
    Fine-tune."""
    import torch._dynamo  # noqa: F401


def finetune(model_file: str | Path, image: Volume, labels: Volume, out: str | Path, **kwargs: Any) -> Path:
    """``iter_finetune`` run to the end; returns the run folder."""
    run_dir = None
    for event in iter_finetune(model_file, image, labels, out, **kwargs):
        if event.kind == "done":
            run_dir = event.run_dir
    if run_dir is None:
        raise InputError("fine-tune was stopped before it finished")
    return run_dir
