"""Whole-volume prediction: preprocessing → sliding window → argmax → labels on the source grid.

``Predictor.iter_predict(volume)`` is a generator: it first yields an :class:`InputWarning` for
each way the scan differs from what the model expects (``intended_input``), then
:class:`PredictProgress` per forward batch of tiles (a cancel point: stop iterating, or set
``stop``) and finally a :class:`Prediction` whose ``labels`` Volume has the source shape and exactly
the source affine and header.

The network sees every scan in the orientation its plan names (``Plan.orientation``), so storage
order does not change the result. Models that normalise over the foreground (skull-stripped MRI)
predict only inside the foreground's bounding box (nnU-Net's crop): the rest is background, and the
time follows the content, not the padding around it.

``intensity_offset`` (``iter_predict``, ``predict``) adds a number to every voxel before anything
else, e.g. −1024 for a CT stored without its rescale intercept (air near 0 instead of −1000 HU);
``"auto"`` adds the offset :func:`~napari_e2enet.data.intended_input.stored_ct_offset` detects, for a
CT model only. The offset applied is ``Prediction.intensity_offset``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bundled import rank_bundled_models
from ..config import InferenceConfig
from ..data import Plan, Volume, preprocess
from ..data.intended_input import (
    CT_OFFSET_OPTION,
    CT_OFFSET_WIDGET,
    IntendedInput,
    IntensityOffset,
    apply_intensity_offset,
    input_warnings,
    scan_statistics,
)
from ..data.io import float32_voxels
from ..data.preprocess import field_of_view
from ..device import ThreadChooser, resolve_device
from ..errors import InputError
from ..labels import LabelTable
from ..memory import check_memory, network_grid, prediction_bytes
from ..modelcard import DEFAULT_MODEL, ModelCard, bundled_model, load_model, model_file_in, resolve_model
from ..models import E2ENet
from .sliding_window import SlidingWindowResult, TileProgress, iter_sliding_window, tile_starts

PROBE_MIN_TILES = 8  # fewer tiles than this: the fast path's backend is not timed (see _allow_probe)
MIRROR_AXES = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))  # tensor dims of (N, C, D, H, W)


def tta_flips(mirror_axes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The TTA flips (tensor dims) that only use network axes the model was trained to mirror
    (nnU-Net's "allowed mirroring axes"): a model trained without left-right flips has learned the
    side and would label a flipped left kidney as the right one."""
    allowed = {a + 2 for a in mirror_axes}
    return tuple(f for f in MIRROR_AXES if set(f) <= allowed)


class PredictionCancelled(RuntimeError):
    """``predict`` was asked to stop before it finished."""


@dataclass(frozen=True)
class PredictProgress:
    done: int
    total: int
    stage: str = "tiles"


@dataclass(frozen=True)
class InputWarning:
    """The scan is not what the model expects (one line: what is off and what to do)."""

    message: str


@dataclass(frozen=True)
class Prediction:
    labels: Volume  # (X, Y, Z) integer labels on the source grid, source affine and header
    seconds: float
    device: str
    tiles: int
    label_table: LabelTable
    warnings: tuple[str, ...] = ()
    backend: str = ""  # what ran the tiles ("dense", "sparse-avx2", ...) and why (measured or not)
    backend_reason: str = ""
    precision: str = ""  # the precision that ran ("fp32" or "bf16")
    intensity_offset: float = 0.0  # added to the voxel values before preprocessing (0: none)


class Predictor:
    """A trained model with its preprocessing plan and label table, ready to segment volumes."""

    def __init__(self, model: E2ENet, plan: Plan, labels: LabelTable, *, patch: tuple[int, int, int],
                 config: InferenceConfig | None = None, source: str = "",
                 mirror_axes: tuple[int, ...] = (0, 1, 2), intended: IntendedInput | None = None) -> None:
        self.config = config or InferenceConfig()
        self.device = resolve_device(self.config.device)
        self.model = model.to(self.device).eval()
        self.plan = plan
        self.labels = labels
        self.patch: tuple[int, int, int] = (int(patch[0]), int(patch[1]), int(patch[2]))
        self.source = source
        self.mirror_axes = tuple(int(a) for a in mirror_axes)  # network axes TTA may flip
        self.intended = intended or IntendedInput.from_plan(plan)
        self._network: nn.Module | None = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, config: InferenceConfig | None = None, *,
                        expected_sha256: str | None = None) -> Predictor:
        """A ``model.safetensors`` file, or a run folder / bundled-model folder containing one."""
        path = model_file_in(path)
        model, meta = load_model(path, expected_sha256=expected_sha256)
        card = ModelCard.from_metadata(meta, path)
        return cls(model, card.plan, card.labels, patch=card.patch, config=config, source=str(path),
                   mirror_axes=card.mirror_axes, intended=card.intended)

    @classmethod
    def from_bundled(cls, name: str = DEFAULT_MODEL, config: InferenceConfig | None = None) -> Predictor:
        """A model shipped in ``resources/models/<name>``; its checksum is verified before loading."""
        bundled = bundled_model(name)
        return cls.from_checkpoint(bundled.weights, config, expected_sha256=bundled.sha256)

    @classmethod
    def from_any(cls, spec: str | Path | None, config: InferenceConfig | None = None) -> Predictor:
        """``None`` → the default bundled model; a bundled name; or a path to a file/run folder."""
        source = resolve_model(spec)  # a bundled model's checksum is verified before loading
        return cls.from_checkpoint(source.path, config, expected_sha256=source.sha256)

    # -- prediction ----------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        """The module that runs the tiles: the accelerated sparse path where enabled."""
        if self._network is None:
            net: nn.Module = self.model
            if self.config.accelerate:
                from .fastpath import accelerate_measured, borrow_outputs

                # backend/precision "auto" are decided by timing the first tile of each tile shape
                # (MeasuredE2ENet); the choice is kept with the network, so once per Predictor
                net = accelerate_measured(self.model, self.config.precision, backend=self.config.backend)
                # the tiles' logits in the fast path's arena: the sliding window blends them before
                # the next call (and TTA copies the first), 128 MiB less at 16 × 128³
                borrow_outputs(net)
            self._network = net
        return self._network

    def _tile_predictor(self, threads: ThreadChooser | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """(N, C, D, H, W) preprocessed tiles → (N, K, D, H, W) float32 logits on the CPU (the mean over
        the mirror flips with TTA); each call is one timed step of ``threads``."""
        threads = threads or ThreadChooser((torch.get_num_threads(),))
        net, device, tta = self.network, self.device, self.config.tta
        flips = tta_flips(self.mirror_axes)
        use_autocast = not self.config.accelerate and self._model_precision() == "bf16"

        @torch.inference_mode()
        def run(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device)
            with threads.step(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                if not tta:
                    return net(x).float().cpu()
                acc: torch.Tensor | None = None
                for axes in flips:
                    xi = torch.flip(x, axes) if axes else x
                    out = net(xi).float()
                    out = torch.flip(out, axes) if axes else out
                    # (a copy: the network may return its own buffer, overwritten by the next flip)
                    acc = out.clone() if acc is None else acc + out
                assert acc is not None  # flips always holds the identity
                return (acc / len(flips)).cpu()

        return run

    def _model_precision(self) -> str:
        """The precision the PyTorch model runs in without the fast path (autocast bf16 or fp32)."""
        from .fastpath import offered_precisions

        return offered_precisions(self.config.precision)[0][0]

    def precision_info(self) -> dict[str, str]:
        """``{"precision": what ran (or runs next), "reason": why}`` (builds the network)."""
        from .fastpath import offered_precisions

        offered, why = offered_precisions(self.config.precision)
        if not self.config.accelerate:
            return {"precision": offered[0], "reason": why}
        ran = str(getattr(self.network, "precision", offered[0]))
        if len(offered) > 1:
            why = f"{why}; timed against {', '.join(offered)} (see backend_reason)"
        return {"precision": ran, "reason": why}

    def _allow_probe(self, shape: tuple[int, ...]) -> None:
        """Let a MeasuredE2ENet time its candidates only when the volume has enough tiles to repay the
        probe (each candidate runs the first tile twice, warm-up and timed: 3 tile runs more with two
        candidates; the bundled models' backends differ by 1.8-2x on an AVX2 EPYC, which repays that
        within 8 tiles, and the choice is kept for later volumes of the same Predictor)."""
        from .fastpath import MeasuredE2ENet

        net = self.network
        if isinstance(net, MeasuredE2ENet):
            tiles = math.prod(len(tile_starts(max(int(s), p), p, self.config.overlap))
                              for s, p in zip(shape, self.patch, strict=True))
            net.probe = tiles >= PROBE_MIN_TILES

    def check_input(self, volume: Volume) -> list[str]:
        """Raise InputError when the model cannot take ``volume`` (channel count); return one-line
        warnings where the scan is not what the model expects (:mod:`.intended_input`)."""
        expected = self.model.config.in_channels
        if volume.num_channels != expected:
            raise InputError(f"image has {volume.num_channels} channel(s) but the model expects {expected}",
                             volume.name or None)
        if volume.array.dtype.kind == "f":  # (every integer fits float32's range)
            # voxels that are Inf for the float32 network (a float64 1e300 from the API) are refused
            # before the statistics below cast them (with an overflow warning) and warn about the scan
            float32_voxels(volume.array, volume.name or None)
        stats = scan_statistics(volume)
        warnings = input_warnings(self.intended, stats)
        if warnings and not stats.empty:
            better = self._fitting_bundled_model(stats)
            if better is not None:
                name, summary = better
                if stats.ct_offset:
                    warnings[0] += (f"; the bundled model '{name}' ({summary}) fits this scan once corrected: "
                                    f"--model {name} {CT_OFFSET_OPTION} auto, or choose it in the Segment widget "
                                    f"and tick {CT_OFFSET_WIDGET}")
                else:
                    warnings[0] += (f"; the bundled model '{name}' ({summary}) fits this scan: --model {name}, or "
                                    "choose it in the Segment widget")
        return warnings

    def _fitting_bundled_model(self, stats: Any) -> tuple[str, str] | None:
        """(name, what it expects) of a bundled model that would give no warning, other than this one.
        For a CT stored with an offset a CT model's first warning is the offset's (input_warnings puts
        it first), which the hint's correction removes, so only its other warnings count."""
        for name, warnings in rank_bundled_models(stats):
            intended = bundled_model(name).intended
            if intended is None or intended == self.intended:
                continue
            if stats.ct_offset and intended.is_ct:
                warnings = warnings[1:]
            if not warnings:
                return name, intended.summary()
        return None

    def apply_intensity_offset(self, volume: Volume, intensity_offset: IntensityOffset = None
                               ) -> tuple[Volume, float, list[str]]:
        """:func:`~napari_e2enet.data.intended_input.apply_intensity_offset` for this model's intended input."""
        return apply_intensity_offset(volume, self.intended, intensity_offset)

    def iter_predict(self, volume: Volume, stop: threading.Event | None = None,
                     intensity_offset: IntensityOffset = None) -> Iterator[InputWarning | PredictProgress | Prediction]:
        """See the module docstring; ``intensity_offset`` (a number, "auto" or None) as in
        :meth:`apply_intensity_offset`."""
        t0 = time.perf_counter()
        source = volume
        volume, offset, notes = self.apply_intensity_offset(volume, intensity_offset)
        copy = volume.array.nbytes if volume is not source else 0  # lives beside the caller's volume
        warnings = (*notes, *self.check_input(volume))
        box = field_of_view(volume, self.plan)
        if box is not None:  # what cannot fit is refused before anything else is said about the volume
            self._check_memory(volume.crop(box), volume.name, extra=copy)
        for message in warnings:
            yield InputWarning(message)
        labels: np.ndarray = np.zeros(volume.spatial_shape, _label_dtype(self.model.config.num_classes))
        tiles = 0
        if box is not None:  # else: nothing but background, and no network call
            crop = volume.crop(box)
            image, inverse = preprocess(crop, self.plan)
            result: SlidingWindowResult | None = None
            self._allow_probe(image.shape[1:])
            # the CPU thread count is chosen by timing tiles: on a busy 2-core CPU one thread beat two
            # (phantom CT at load 5.5: 11 s vs 18 s, identical labels); on a quiet one two threads win
            with ThreadChooser(None if self.device.type == "cpu" else (torch.get_num_threads(),)) as threads:
                for item in iter_sliding_window(torch.from_numpy(image), self._tile_predictor(threads),
                                                patch=self.patch, num_classes=self.model.config.num_classes,
                                                overlap=self.config.overlap,
                                                tiles_per_batch=self.config.tiles_per_batch, stop=stop):
                    if isinstance(item, TileProgress):
                        tiles = item.total
                        yield PredictProgress(item.done, item.total)
                    else:
                        result = item
            if result is None:  # stopped
                return
            labels[box] = inverse.labels_to_source(result.labels)
        out = Volume(labels, volume.affine.copy(), header=volume.header,
                     name=f"{volume.name}_labels" if volume.name else "labels", meta=dict(volume.meta))
        ran = self.ran()
        yield Prediction(out, time.perf_counter() - t0, str(self.device), tiles, self.labels, warnings,
                         ran["backend"], ran["backend_reason"], ran["precision"], offset)

    def ran(self) -> dict[str, str]:
        """The backend, its reason and the precision of the last tiles (builds the network)."""
        from .fastpath import backend_info

        info = backend_info(self.network, "InferenceConfig.accelerate is off: the PyTorch model as is")
        return {**info, "precision": self.precision_info()["precision"]}

    def _check_memory(self, crop: Volume, name: str | None, extra: float = 0.0) -> None:
        """Refuse (one line naming the model file) a volume whose resampling to this model's voxel size
        would need more memory than there is, before allocating any of it. ``extra``: bytes already
        held for it besides the caller's volume (the intensity-offset copy)."""
        grid = network_grid(crop, self.plan)
        need = extra + prediction_bytes(crop.spatial_shape, crop.num_channels, grid, self.model.config.num_classes,
                                        self.patch)
        voxel = "x".join(f"{s:g}" for s in self.plan.target_spacing)
        check_memory(need, f"segmenting {name or 'the image'} ({'x'.join(map(str, crop.spatial_shape))} voxels) "
                           f"at this model's voxel size of {voxel} mm ({'x'.join(map(str, grid))} voxels)",
                     self.source or None)

    def predict(self, volume: Volume, stop: threading.Event | None = None,
                intensity_offset: IntensityOffset = None) -> Volume:
        """Labels on the source grid; raises :class:`PredictionCancelled` if ``stop`` was set."""
        for item in self.iter_predict(volume, stop, intensity_offset):
            if isinstance(item, Prediction):
                return item.labels
        raise PredictionCancelled("prediction was cancelled")

    def describe(self) -> dict[str, Any]:
        """The model, its settings and the backend that runs the tiles (``sparse-avx512``,
        ``sparse-avx2``, ``sparse-generic`` or ``dense``) with the reason (this builds the network)."""
        from .fastpath import backend_info

        orientation = self.plan.orientation or "storage order (a model file from before orientation handling)"
        return {"source": self.source, "device": str(self.device), "patch": list(self.patch),
                **backend_info(self.network, "InferenceConfig.accelerate is off: the PyTorch model as is"),
                "classes": self.labels.names, "sparsity": round(self.model.sparsity, 4),
                "precision": self.precision_info()["precision"], "precision_reason": self.precision_info()["reason"],
                "tta": self.config.tta, "overlap": self.config.overlap,
                "orientation": orientation, "intended_input": self.intended.to_dict()}


def _label_dtype(num_classes: int) -> type:
    return np.uint8 if num_classes <= 255 else np.int16
