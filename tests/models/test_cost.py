import copy
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_e2enet import create_model
from napari_e2enet.models.cost import model_cost

# The E2ENet paper's table (README "Paper fidelity"): AMOS setting, 1 input channel, 16 classes, 128^3.
PAPER = {0.0: (23.90e6, 3069.55e9), 0.8: (9.44e6, 778.74e9), 0.9: (7.64e6, None)}


@pytest.mark.parametrize("sparsity", sorted(PAPER))
def test_paper_table_within_half_a_percent(sparsity):
    params, flops = PAPER[sparsity]
    cost = model_cost(create_model("e2enet", in_channels=1, num_classes=16, sparsity=sparsity), (128, 128, 128))
    assert cost.params_effective == pytest.approx(params, rel=0.005)
    if flops is not None:
        assert cost.flops_paper == pytest.approx(flops, rel=0.005)


def flop_counter_macs(model: torch.nn.Module, shape) -> int:
    twin = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        twin(torch.empty(shape, device="meta"))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(("name", "patch", "pools"), [
    ("e2enet", (128, 128, 128), None),
    ("e2enet_small", (32, 48, 64), None),
    ("e2enet_small", (8, 64, 64), ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))),
    ("e2enet_k333", (64, 64, 64), None),
])
def test_dense_macs_match_torch_flop_counter(name, patch, pools):
    overrides = {"pools": pools} if pools else {}
    model = create_model(name, sparsity=0.8, **overrides)
    cost = model_cost(model, patch)
    assert cost.macs_dense == flop_counter_macs(model, (1, 1, *patch))
    # masked layers shrink the effective count, nothing else does
    assert cost.macs_effective < cost.macs_dense
    assert cost.params_effective < cost.params_dense


def test_transposed_convs_are_overstated_eightfold_in_the_paper_convention():
    dense = model_cost(create_model("e2enet", sparsity=0), (128, 128, 128))
    up_macs = 0
    model = create_model("e2enet", sparsity=0)
    for mw in model.maskable():
        if mw.role == "up":
            cin, cout = mw.weight.shape[:2]
            level = mw.node.level
            voxels_in = (128 // 2 ** (level + 1)) ** 3
            up_macs += cin * cout * 8 * voxels_in
    assert dense.flops_paper == 2 * (dense.macs_dense + 7 * up_macs)


def test_effective_cost_counts_the_masks_actually_installed():
    model = create_model("e2enet_small", sparsity=0.8)
    before = model_cost(model, (32, 32, 32))
    model.set_masks({name: torch.ones_like(mask) for name, mask in model.masks().items()})
    after = model_cost(model, (32, 32, 32))  # all-ones masks: effective == dense
    assert after.params_effective == after.params_dense
    assert after.macs_effective == after.macs_dense
    assert before.macs_effective < after.macs_effective


def test_patch_must_fit_the_pools():
    with pytest.raises(ValueError, match="multiple"):
        model_cost(create_model("e2enet_small"), (30, 32, 32))


def test_cli_info_json_reports_the_paper_numbers():
    out = subprocess.run(
        [sys.executable, "-m", "napari_e2enet.cli", "info", "--model", "e2enet", "--in-channels", "1",
         "--classes", "16", "--sparsity", "0.8", "--patch", "128", "128", "128", "--json"],
        capture_output=True, text=True, check=True,
    )
    data = json.loads(out.stdout)
    assert {"params_dense", "params_effective", "macs_dense", "macs_effective", "flops_paper"} <= set(data)
    assert data["params_effective"] == pytest.approx(9.44e6, rel=0.005)
    assert data["flops_paper"] == pytest.approx(778.74e9, rel=0.005)


def test_cli_info_bad_model_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "napari_e2enet.cli", "info", "--model", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "nope" in out.stderr and "Traceback" not in out.stderr
