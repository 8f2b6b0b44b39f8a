"""``iter_predict_cases``, the loop under ``napari-e2enet predict``, with a stand-in predictor."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_e2enet.data import read_image, write_volume
from napari_e2enet.data.volume import Volume
from napari_e2enet.errors import InputError
from napari_e2enet.inference import InputWarning, Prediction, PredictProgress
from napari_e2enet.inference.batch import CaseJob, CaseResult, CaseStarted, iter_predict_cases
from napari_e2enet.labels import LabelTable


class _Thresholder:
    """Labels = image > 0, in two progress steps; ``stop`` is honoured between them."""

    def __init__(self, in_channels: int = 1) -> None:
        self.model = SimpleNamespace(config=SimpleNamespace(in_channels=in_channels))

    def iter_predict(self, volume: Volume, stop: threading.Event | None = None, intensity_offset=None):
        yield PredictProgress(1, 2)
        if stop is not None and stop.is_set():
            return
        yield InputWarning("looks odd")
        labels = volume.with_array((volume.array[0] > 0).astype(np.uint8))
        yield PredictProgress(2, 2)
        yield Prediction(labels, 0.5, "cpu", 2, LabelTable.from_dict({"0": "background", "1": "thing"}), ("odd",))


def _cases(tmp_path: Path, n: int) -> list[CaseJob]:
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(n):
        src = tmp_path / f"c{i}.nii.gz"
        write_volume(Volume(rng.standard_normal((6, 5, 4)).astype(np.float32), np.eye(4), None, f"c{i}"), src)
        jobs.append(CaseJob(f"c{i}", [src], tmp_path / "out" / f"c{i}.nii.gz"))
    (tmp_path / "out").mkdir()
    return jobs


def test_cases_are_written_and_existing_ones_skipped(tmp_path):
    jobs = _cases(tmp_path, 2)
    jobs[0].target.write_bytes(b"kept")
    events = list(iter_predict_cases(_Thresholder(), jobs))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["CaseResult", "CaseStarted", "PredictProgress", "InputWarning", "PredictProgress", "CaseResult"]
    skipped, written = (e for e in events if isinstance(e, CaseResult))
    assert skipped.to_dict() == {"case": "c0", "output": str(jobs[0].target), "status": "skipped (exists)"}
    assert jobs[0].target.read_bytes() == b"kept"
    assert written.status == "ok" and written.tiles == 2 and written.warnings == ["odd"]
    image = read_image(jobs[1].files)
    np.testing.assert_array_equal(read_image(jobs[1].target).array[0], image.array[0] > 0)
    assert isinstance(events[1], CaseStarted) and events[1].name == "c1"


def test_stop_ends_without_a_result_or_a_file(tmp_path):
    jobs = _cases(tmp_path, 2)
    stop = threading.Event()
    stop.set()
    events = list(iter_predict_cases(_Thresholder(), jobs, stop=stop))
    assert not any(isinstance(e, CaseResult) for e in events)
    assert [e.name for e in events if isinstance(e, CaseStarted)] == ["c0"]  # the next case never starts
    assert not any(job.target.exists() for job in jobs)


def test_channel_count_is_checked_before_predicting(tmp_path):
    jobs = _cases(tmp_path, 1)
    with pytest.raises(InputError, match=r"1 channel.*expects 2"):
        list(iter_predict_cases(_Thresholder(in_channels=2), jobs))
