"""Predict a list of cases, one output file each: the loop under ``napari-e2enet predict``.

A generator in the project's "long work" convention: it yields ``CaseStarted``, the predictor's
``PredictProgress`` and ``InputWarning`` items, and one ``CaseResult`` per case (written or skipped),
and simply ends when ``stop`` is set (no result for the case it was working on; nothing partial is
written, as the volume writer is atomic). The caller owns progress bars, signals and the summary.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import read_image, write_volume
from ..errors import InputError
from .predictor import InputWarning, IntensityOffset, Prediction, Predictor, PredictProgress


@dataclass(frozen=True)
class CaseJob:
    """One case: its name, its input file(s) (channels in order) and the output file."""

    name: str
    files: Sequence[Path]
    target: Path


@dataclass(frozen=True)
class CaseStarted:
    """A case is read and its prediction begins (skipped cases are not started)."""

    name: str


@dataclass(frozen=True)
class CaseResult:
    """A case written (``status="ok"``) or left alone because its output exists."""

    case: str
    output: str
    status: str
    seconds: float | None = None
    tiles: int | None = None
    warnings: list[str] = field(default_factory=list)
    intensity_offset: float = 0.0  # added to the voxel values before preprocessing (0: none)

    def to_dict(self) -> dict[str, Any]:
        """The row of ``predict --json``'s ``cases``."""
        if self.status != "ok":
            return {"case": self.case, "output": self.output, "status": self.status}
        return {"case": self.case, "output": self.output, "status": self.status, "seconds": self.seconds,
                "tiles": self.tiles, "warnings": list(self.warnings), "intensity_offset": self.intensity_offset}


BatchEvent = CaseStarted | PredictProgress | InputWarning | CaseResult


def iter_predict_cases(
    predictor: Predictor,
    jobs: Sequence[CaseJob],
    *,
    overwrite: bool = False,
    series: str | None = None,
    stop: threading.Event | None = None,
    intensity_offset: IntensityOffset = None,
) -> Iterator[BatchEvent]:
    """Segment each job's input into its target; see the module docstring for the events.
    ``intensity_offset`` goes to every case's ``Predictor.iter_predict`` ("auto" decides per case).

    Raises:
        InputError: a case's channel count differs from the model's (before its prediction).
    """
    expected = predictor.model.config.in_channels
    for job in jobs:
        if job.target.exists() and not overwrite:
            yield CaseResult(job.name, str(job.target), "skipped (exists)")
            continue
        volume = read_image(job.files, name=job.name, series=series)
        if volume.num_channels != expected:
            raise InputError(f"image has {volume.num_channels} channel(s) but the model expects {expected}",
                             job.files[0])
        yield CaseStarted(job.name)
        prediction = None
        for item in predictor.iter_predict(volume, stop=stop, intensity_offset=intensity_offset):
            if isinstance(item, Prediction):
                prediction = item
            else:
                yield item
        if prediction is None:  # stopped
            return
        write_volume(prediction.labels, job.target, like=volume, label_table=prediction.label_table)
        yield CaseResult(job.name, str(job.target), "ok", round(prediction.seconds, 2), prediction.tiles,
                         list(prediction.warnings), prediction.intensity_offset)
