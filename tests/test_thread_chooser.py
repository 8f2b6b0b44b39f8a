"""ThreadChooser: the CPU thread count of a loop of steps is chosen by timing them, and given back."""

from __future__ import annotations

import time

import torch

from napari_e2enet.device import ThreadChooser


def _run(chooser: ThreadChooser, steps: int, cost: dict[int, float]) -> list[int]:
    used = []
    with chooser:
        for _ in range(steps):
            with chooser.step() as threads:
                assert torch.get_num_threads() == threads
                time.sleep(cost[threads])
                used.append(threads)
    return used


def test_the_faster_count_is_kept_probed_again_and_the_old_count_restored():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        chooser = ThreadChooser(candidates=(2, 1), probe_every=5)
        # two threads are slow here (as on a busy 2-core CPU): after the warm-up and one timed step
        # each, one thread runs, with a probe of two threads every 5th step
        used = _run(chooser, 12, {2: 0.03, 1: 0.005})
        assert used[:3] == [2, 2, 1]
        assert chooser.current == 1
        assert used[3:] == [1, 1, 2, 1, 1, 1, 1, 2, 1]
        assert torch.get_num_threads() == 2  # restored on exit
        # on a quiet machine two threads win and stay
        quiet = ThreadChooser(candidates=(2, 1), probe_every=5)
        used = _run(quiet, 8, {2: 0.005, 1: 0.03})
        assert quiet.current == 2 and used == [2, 2, 1, 2, 2, 1, 2, 2]  # one timed step, one probe
    finally:
        torch.set_num_threads(before)


def test_one_candidate_is_never_switched():
    chooser = ThreadChooser(candidates=(1, 1))
    assert chooser.candidates == (1,)
    assert set(_run(chooser, 4, {1: 0.0})) == {1}


def test_a_prediction_gives_the_thread_count_back_and_the_same_labels_with_one_thread():
    from napari_e2enet.config import InferenceConfig
    from napari_e2enet.data import make_phantom
    from napari_e2enet.inference import Predictor

    image, _ = make_phantom(0, shape=(64, 64, 40))
    predictor = Predictor.from_bundled("phantom-abdomen-ct", config=InferenceConfig(device="cpu"))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        chosen = predictor.predict(image).array
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)  # a one-thread chooser never switches
        single = predictor.predict(image).array
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert (chosen == single).all()
