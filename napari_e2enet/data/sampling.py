"""Patch sampling for training: ``PatchSampler.batch(iteration)`` is a pure function of
(seed, rank, iteration), so a resumed run needs only the iteration number (docs/CONVENTIONS.md).

nnU-Net style: each sample picks a case uniformly; a fraction ``foreground_oversample`` of the samples
(in expectation, exactly) is centred on a random voxel of a random class present in that case; the
others are uniform random crops. Volumes smaller than the patch are zero-padded (centred) once at
construction. Augmentation: ``augment.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .augment import AugmentConfig, extract_patch, intensity_augment, mirror, spatial_matrix

__all__ = ["PatchSampler", "SampleSpec"]

_LOCATIONS_STREAM = 0x10C
_SPEC_STREAM = 0
_AUGMENT_STREAM = 1


@dataclass(frozen=True)
class SampleSpec:
    """Where one sample of a batch comes from (before augmentation)."""

    case: int
    start: tuple[int, int, int]  # lower corner in the padded volume
    foreground: bool  # forced onto a foreground voxel
    label: int | None  # the class it was centred on (foreground samples)
    voxel: tuple[int, int, int] | None  # the chosen foreground voxel (padded volume coordinates)


class PatchSampler:
    """Random training patches from preprocessed cases.

    Args:
        cases: list of (image (C, D, H, W) float32, labels (D, H, W) integer) on the network grid.
        patch: (D, H, W) patch size. batch: samples per batch.
        foreground_oversample: expected fraction of samples centred on foreground.
        augment: apply spatial + intensity augmentation (``augment_config``, default nnU-Net's).
        seed, rank: with the iteration, the only source of randomness.
        spacing: (D, H, W) voxel size of the cases; anisotropic data (max/min > 3, or a patch whose
            D is 3× smaller than H/W) rotates in-plane only.
        max_locations_per_class: foreground voxels remembered per class and case (seeded subsample).
    """

    def __init__(
        self,
        cases: Sequence[tuple[np.ndarray, np.ndarray]],
        patch: Sequence[int],
        batch: int,
        foreground_oversample: float = 0.33,
        augment: bool = True,
        seed: int = 0,
        rank: int = 0,
        *,
        augment_config: AugmentConfig | None = None,
        spacing: Sequence[float] | None = None,
        max_locations_per_class: int = 10_000,
    ) -> None:
        if not cases:
            raise ValueError("PatchSampler: no cases")
        self.patch = tuple(int(p) for p in patch)
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"PatchSampler: patch must be three positive sizes, got {patch}")
        if batch < 1:
            raise ValueError("PatchSampler: batch must be >= 1")
        if not 0.0 <= foreground_oversample <= 1.0:
            raise ValueError("PatchSampler: foreground_oversample must be in [0, 1]")
        self.batch_size = int(batch)
        self.foreground_oversample = float(foreground_oversample)
        self.augment = bool(augment)
        self.seed, self.rank = int(seed), int(rank)
        self.augment_config = augment_config or AugmentConfig.for_patch(self.patch, spacing)

        self._images: list[torch.Tensor] = []
        self._labels: list[np.ndarray] = []
        self._classes: list[list[tuple[int, np.ndarray]]] = []  # per case: (class id, flat voxel indices)
        channels = None
        for k, (image, label) in enumerate(cases):
            image = np.asarray(image, dtype=np.float32)
            label = np.asarray(label)
            if image.ndim != 4:
                raise ValueError(f"PatchSampler: case {k} image must be (C, D, H, W), got {image.shape}")
            if label.shape != image.shape[1:]:
                raise ValueError(
                    f"PatchSampler: case {k} label shape {label.shape} != image {image.shape[1:]}"
                )
            if label.dtype.kind not in "biu":
                raise ValueError(f"PatchSampler: case {k} labels must be integers, got {label.dtype}")
            if channels is None:
                channels = image.shape[0]
            elif image.shape[0] != channels:
                raise ValueError(
                    f"PatchSampler: case {k} has {image.shape[0]} channels, case 0 has {channels}"
                )
            image, label = self._pad(image, label)
            self._images.append(torch.from_numpy(np.ascontiguousarray(image)))
            self._labels.append(np.ascontiguousarray(label))
            self._classes.append(self._locations(label, k, max_locations_per_class))
        self.num_channels = int(channels or 1)

    def _pad(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        need = [max(p - s, 0) for p, s in zip(self.patch, label.shape, strict=True)]
        if not any(need):
            return image, label
        widths = [(n // 2, n - n // 2) for n in need]
        return np.pad(image, [(0, 0), *widths]), np.pad(label, widths)

    def _locations(self, label: np.ndarray, case: int, limit: int) -> list[tuple[int, np.ndarray]]:
        flat = np.flatnonzero(label)
        if flat.size == 0:
            return []
        values = label.reshape(-1)[flat]
        order = np.argsort(values, kind="stable")
        flat, values = flat[order], values[order]
        ids, starts = np.unique(values, return_index=True)
        bounds = [*starts[1:], flat.size]
        rng = np.random.default_rng([self.seed, _LOCATIONS_STREAM, case])
        out = []
        for ident, lo, hi in zip(ids, starts, bounds, strict=True):
            idx = flat[lo:hi]
            if idx.size > limit:
                idx = np.sort(rng.choice(idx, size=limit, replace=False))
            out.append((int(ident), idx))
        return out

    @property
    def num_cases(self) -> int:
        return len(self._images)

    def sample_specs(self, iteration: int) -> list[SampleSpec]:
        """Where each sample of batch ``iteration`` comes from (a pure function of seed, rank, iteration)."""
        rng = np.random.default_rng([self.seed, self.rank, int(iteration), _SPEC_STREAM])
        expected = self.batch_size * self.foreground_oversample
        n_fg = math.floor(expected)
        if rng.random() < expected - n_fg:
            n_fg += 1
        specs = []
        for b in range(self.batch_size):
            case = int(rng.integers(self.num_cases))
            shape = self._labels[case].shape
            classes = self._classes[case]
            if b < n_fg and classes:
                ident, locations = classes[int(rng.integers(len(classes)))]
                flat = int(locations[int(rng.integers(locations.size))])
                voxel = tuple(int(v) for v in np.unravel_index(flat, shape))
                start = tuple(
                    int(np.clip(v - p // 2, 0, s - p))
                    for v, p, s in zip(voxel, self.patch, shape, strict=True)
                )
                specs.append(SampleSpec(case, start, True, ident, voxel))  # type: ignore[arg-type]
            else:
                start = tuple(int(rng.integers(s - p + 1)) for p, s in zip(self.patch, shape, strict=True))
                specs.append(SampleSpec(case, start, False, None, None))  # type: ignore[arg-type]
        return specs

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``iteration``: (images (B, C, *patch) float32, labels (B, 1, *patch) int64).

        Identical for identical (seed, rank, iteration), whatever was sampled before.
        """
        images, labels = [], []
        for b, spec in enumerate(self.sample_specs(iteration)):
            image, label = self._images[spec.case], self._labels[spec.case]
            if self.augment:
                rng = np.random.default_rng([self.seed, self.rank, int(iteration), _AUGMENT_STREAM, b])
                cfg = self.augment_config
                img, lab = extract_patch(image, label, spec.start, self.patch, spatial_matrix(rng, cfg))  # type: ignore[arg-type]
                img = intensity_augment(img, rng, cfg)
                img, lab = mirror(img, lab, rng, cfg)
            else:
                img, lab = extract_patch(image, label, spec.start, self.patch, None)  # type: ignore[arg-type]
            images.append(img)
            labels.append(lab)
        return (
            torch.from_numpy(np.stack(images).astype(np.float32, copy=False)),
            torch.from_numpy(np.stack(labels)[:, None].astype(np.int64, copy=False)),
        )

    __call__ = batch
