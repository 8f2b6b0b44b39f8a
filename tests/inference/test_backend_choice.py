"""Backend and precision chosen by measurement (issue 18), and the bf16 accuracy gate.

``MeasuredE2ENet`` times its candidates on the first input of a shape (interleaved, after one
warm-up each), keeps the fastest per shape and returns that candidate's own output; the gate offers a
precision only where the recorded bundled-model Dice delta is within 0.005 of fp32, and one test
recomputes that delta on a crop of each bundled model (bf16 through oneDNN, emulated on CPUs without
native bf16: slow, so one tile each).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_e2enet import create_model
from napari_e2enet.bundled import sample_files
from napari_e2enet.config import InferenceConfig
from napari_e2enet.data import make_phantom, read_volume
from napari_e2enet.inference import Predictor, fastpath
from napari_e2enet.inference.cpu import find_compiler
from napari_e2enet.inference.fastpath import (
    PRECISION_DICE_DELTA,
    PRECISION_DICE_TOLERANCE,
    MeasuredE2ENet,
    accelerate_measured,
    backend_info,
    offered_precisions,
    precision_passed,
)
from napari_e2enet.metrics import dice


class _Clock:
    """A fake ``time.perf_counter`` that only the candidates advance: the probe's decisions are
    then exact, whatever else the machine is doing."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Timed(nn.Module):
    """Adds ``value``; each call costs ``costs[i]`` fake seconds (the last one repeats)."""

    def __init__(self, clock: _Clock, costs: list[float], value: float, name: str) -> None:
        super().__init__()
        self.clock, self.costs, self.value, self.calls = clock, costs, value, 0
        self.backend_name, self.precision = name, "fp32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.costs[min(self.calls, len(self.costs) - 1)]
        self.calls += 1
        return x + self.value


def test_the_faster_candidate_is_kept_per_shape_and_its_own_output_returned(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(fastpath.time, "perf_counter", clock)
    # warm-ups 1.0 and 0.8 s (close: both are timed), then 0.9 and 0.5 s per run
    slow, fast = _Timed(clock, [1.0, 0.9], 1.0, "sparse-x"), _Timed(clock, [0.8, 0.5], 2.0, "dense")
    net = MeasuredE2ENet([("sparse-x fp32", slow), ("dense fp32", fast)], rounds=2, default_reason="density rule")
    assert "not measured yet" in backend_info(net)["backend_reason"]
    x = torch.zeros(1, 1, 2, 2, 2)
    out = net(x)
    assert torch.equal(out, x + 2.0)  # the winner's output, not the warm-up's or the loser's
    assert (slow.calls, fast.calls) == (3, 3)  # one warm-up + two timed rounds each
    assert net(x).eq(2.0).all() and (slow.calls, fast.calls) == (3, 4)  # cached: only the winner runs
    info = backend_info(net)
    assert info["backend"] == "dense" and info["backend_reason"].endswith(": dense fp32")
    assert info["backend_reason"] == "sparse-x fp32 0.9 s vs dense fp32 0.5 s per tile (1x1x2x2x2): dense fp32"
    y = torch.zeros(1, 1, 4, 2, 2)  # a new tile shape is timed again
    net.probe = False  # ... unless the job is too small: then candidate 0 runs untimed
    assert net(y).eq(1.0).all() and (4, 4) == (slow.calls, fast.calls)
    assert tuple(y.shape) not in net.choices


def test_a_candidate_far_slower_on_its_first_run_is_not_timed_again(monkeypatch):
    """The probe's cost: a loser whose warm-up took over twice the quickest is not run again, and
    when one candidate is left its warm-up output is the tile's: one extra run per loser in all."""
    clock = _Clock()
    monkeypatch.setattr(fastpath.time, "perf_counter", clock)
    sparse, dense = _Timed(clock, [0.6, 0.2], 1.0, "sparse-x"), _Timed(clock, [1.45], 2.0, "dense")
    net = MeasuredE2ENet([("sparse-x fp32", sparse), ("dense fp32", dense)], rounds=2)
    x = torch.zeros(1, 1, 2, 2, 2)
    assert torch.equal(net(x), x + 1.0)  # sparse's warm-up output
    assert (sparse.calls, dense.calls) == (1, 1)
    assert backend_info(net)["backend_reason"] == (
        "sparse-x fp32 0.6 s (first run) vs dense fp32 1.45 s (first run) per tile (1x1x2x2x2): sparse-x fp32")
    # three candidates, one far behind: the two close ones are timed, the slow one is not rerun
    clock2 = _Clock()
    monkeypatch.setattr(fastpath.time, "perf_counter", clock2)
    a, b, c = (_Timed(clock2, costs, v, n) for costs, v, n in (([1.0, 0.7], 1.0, "a"), ([1.1, 0.6], 2.0, "b"),
                                                                ([3.0], 3.0, "c")))
    net3 = MeasuredE2ENet([("a fp32", a), ("b fp32", b), ("c bf16", c)], rounds=1)
    assert torch.equal(net3(x), x + 2.0) and (a.calls, b.calls, c.calls) == (2, 2, 1)
    assert backend_info(net3)["backend_reason"] == (
        "a fp32 0.7 s vs b fp32 0.6 s vs c bf16 3 s (first run) per tile (1x1x2x2x2): b fp32")


def test_measured_choice_on_a_masked_model_matches_the_model():
    torch.manual_seed(0)
    model = create_model("e2enet_small", sparsity=0.9, seed=1, widths=(4, 8, 8), pools=((2, 2, 2),) * 2)
    net = accelerate_measured(model, "fp32")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = model.eval()(x)
    if find_compiler() is None:  # one backend offered: no probe, the module accelerate builds
        assert not isinstance(net, MeasuredE2ENet)
    else:
        assert isinstance(net, MeasuredE2ENet) and len(net.names) == 2
        assert sorted(n.split("-")[0].split()[0] for n in net.names) == ["dense", "sparse"]
        assert net.names[0].startswith("sparse")  # the density rule's pick (0.1 < 0.5) runs first
    assert float((net(x) - ref).abs().max()) <= 1e-4
    assert float((net(x) - ref).abs().max()) <= 1e-4  # the cached choice
    assert "per tile" in backend_info(net)["backend_reason"] or not isinstance(net, MeasuredE2ENet)
    dense = accelerate_measured(model, "fp32", backend="dense")
    assert backend_info(dense) == {"backend": "dense", "backend_reason": "backend='dense' requested"}


def test_the_gate_offers_only_precisions_within_the_tolerance(monkeypatch):
    assert precision_passed("fp32")[0]
    ok, why = precision_passed("bf16")
    assert ok and "≤ 0.005" in why
    monkeypatch.setattr(fastpath, "bf16_native", lambda: True)
    assert offered_precisions("auto")[0] == ["bf16", "fp32"]
    monkeypatch.setitem(PRECISION_DICE_DELTA, "bf16", {**PRECISION_DICE_DELTA["bf16"], "x/dense": -0.006})
    ok, why = precision_passed("bf16")
    assert not ok and "x/dense" in why and "> 0.005" in why
    assert offered_precisions("auto")[0] == ["fp32"]
    monkeypatch.setattr(fastpath, "bf16_native", lambda: False)
    monkeypatch.setitem(PRECISION_DICE_DELTA, "bf16", {})
    assert offered_precisions("auto") == (["fp32"], "no native bf16 on this CPU: fp32")
    assert offered_precisions("bf16")[0] == ["bf16"]  # an explicit request is honoured


def _one_tile_case(name: str):
    """A 32³-voxel crop of the bundled model's sample (on the model's grid already: one tile of a
    32³ patch), with its reference labels."""
    if name == "mni152-tissue":
        files = sample_files()
        image, ref = read_volume(files["image"]), read_volume(files["labels"])
        box = (slice(34, 66), slice(42, 74), slice(36, 68))
    else:
        image, ref = make_phantom(0)
        box = (slice(32, 64), slice(32, 64), slice(16, 48))
    return image.crop(box), ref.array[box]


@pytest.mark.parametrize("backend", ["dense", "sparse"])
@pytest.mark.parametrize("name", ["mni152-tissue", "phantom-abdomen-ct"])
def test_bf16_dice_of_the_bundled_models_stays_within_the_gate(name, backend):
    """Both fast-path backends: on a CPU with AVX512-BF16 the sparse one runs its fusion convs
    in bf16 too (e2e_sconv133_bf16), elsewhere only the oneDNN encoder."""
    if backend == "sparse" and fastpath.kernel_status()[0] is None:
        pytest.skip("no sparse kernels here (no C compiler)")
    image, ref = _one_tile_case(name)
    classes = [int(c) for c in np.unique(ref) if c != 0]
    scores = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor.from_bundled(name, InferenceConfig(device="cpu", precision=precision, backend=backend))
        predictor.patch = (32, 32, 32)  # one tile (emulated bf16 is ~6x slower than fp32 on AVX2)
        labels = predictor.predict(image).array
        scores[precision] = float(np.mean([dice(labels, ref, c) for c in classes]))
    assert scores["fp32"] > 0.5  # the crop is segmented at all
    assert abs(scores["bf16"] - scores["fp32"]) <= PRECISION_DICE_TOLERANCE


def test_predict_with_an_unavailable_backend_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """`predict --backend sparse` where the kernels cannot be had: exit 2 with one line saying why,
    no traceback, nothing written (it was 'unexpected RuntimeError', exit 1)."""
    from napari_e2enet.cli import main

    monkeypatch.setattr(fastpath, "kernel_status", lambda: (None, "no C compiler here"))
    out = tmp_path / "labels"
    code = main(["predict", "-i", str(sample_files()["image"]), "--output", str(out), "--backend", "sparse"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "sparse CPU kernels cannot be used: no C compiler here" in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists() or not any(out.iterdir())  # no labels, no temporary left
