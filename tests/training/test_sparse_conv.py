"""The sparse training path (training/sparse_conv.py over inference/cpu/kernels_train.c): the same
numbers as the dense masked conv, the path really taken, the trainer using it, bad arguments refused."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from napari_e2enet import create_model
from napari_e2enet.config import SparsityConfig
from napari_e2enet.inference.cpu import find_compiler, load
from napari_e2enet.inference.cpu.build import cpu_families
from napari_e2enet.inference.cpu.compact import Kernels, load_kernels
from napari_e2enet.models.blocks import ConvUnit
from napari_e2enet.sparse import DSFFUpdater
from napari_e2enet.training import Trainer
from napari_e2enet.training.sparse_conv import (
    SparseConvPlan,
    SparseTraining,
    SparseUpPlan,
    sparse_conv133,
    sparse_up_conv,
)

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler: the dense path runs (tested elsewhere)")


# Set by tests/inference/test_cpu_kernels.py::test_sanitizers_find_nothing, which reruns the
# equivalence tests below in a subprocess with libasan preloaded: then the kernels are an
# AddressSanitizer + UBSan build of the best family, not the cached optimised library.
SANITIZE = os.environ.get("NAPARI_E2ENET_TEST_SANITIZE") == "1"


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    if SANITIZE:
        return Kernels(load(cache_dir=tmp_path_factory.mktemp("asan-kernels"), sanitize=True, warnings_as_errors=True))
    k = load_kernels()
    assert k is not None, "a C compiler exists, so the kernels must build"  # fail, not skip
    return k


def _masked_unit(i: int, o: int, density: float, seed: int, shift: bool = True) -> tuple[ConvUnit, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    unit = ConvUnit(i, o, shift=shift)
    mask = torch.rand(o, i, generator=g) < density
    mask[0, -1] = True
    with torch.no_grad():
        unit.conv.weight.copy_(torch.randn(unit.conv.weight.shape, generator=g) * mask[..., None, None, None])
        unit.conv.bias.copy_(torch.randn(o, generator=g))
    return unit, mask


@pytest.mark.parametrize("shape, density, shift, group", [
    ((2, 7, 5, 4, 5, 9), 0.4, True, 64),     # odd H, W: the tile and vector tails
    ((1, 37, 12, 3, 8, 16), 0.2, True, 5),   # output groups 5 + 5 + 2 (forward), 8 input groups (dX)
    ((1, 2, 3, 2, 3, 3), 0.5, True, 64),     # C < 3: no depth shift
    ((2, 6, 4, 3, 4, 8), 0.3, False, 4),     # a unit without the shift
    ((1, 20, 70, 2, 9, 33), 0.3, True, 64),  # 70 outputs: a full group of 64 and a short one
])
def test_sparse_conv_equals_the_dense_masked_conv(kernels, shape, density, shift, group):
    n, i, o, d, h, w = shape
    unit, mask = _masked_unit(i, o, density, seed=i * o, shift=shift)
    x = torch.randn(n, i, d, h, w, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ref = unit.conv(unit.shift(x))
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    params = (x, unit.conv.weight, unit.conv.bias)
    rx, rw, rb = torch.autograd.grad(ref, params, gy)
    active = mask[..., None, None, None]
    plan = SparseConvPlan.from_mask(mask, shift=shift, group=group)
    for dense in (False, True):
        y = sparse_conv133(x, unit.conv.weight, unit.conv.bias, plan, kernels, dense_weight_grad=dense)
        sx, sw, sb = torch.autograd.grad(y, params, gy)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sx, rx, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sb, rb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sw * active, rw * active, atol=1e-4, rtol=1e-4)
        if dense:  # every kernel's gradient, as gradient regrowth reads it
            torch.testing.assert_close(sw, rw, atol=1e-4, rtol=1e-4)
        else:  # pruned kernels: exactly zero
            assert not (sw * ~active).any()
            assert (rw * ~active).abs().max() > 0.1  # (the dense gradient there is not)


@pytest.mark.parametrize("family", cpu_families())
def test_every_kernel_family_this_cpu_runs_computes_the_same_conv(tmp_path_factory, family):
    # the equivalence tests above run the best family; the portable (generic) form of the training
    # kernels is another code path (no intrinsics) that a machine without AVX2 would use
    lib = load(family, cache_dir=tmp_path_factory.mktemp(f"kernels-{family}"))
    unit, mask = _masked_unit(37, 70, 0.3, seed=11)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 37, 3, 9, 33, generator=g)
    plan = SparseConvPlan.from_mask(mask, shift=True)
    taps = unit.conv.weight.detach().reshape(-1, 9)
    y = torch.empty(2, 70, 3, 9, 33)
    lib.tconv_fwd(x=x, ptr=plan.ptr, idx=plan.idx, weights=taps[plan.flat].contiguous(), group=plan.group, y=y,
                  ishift=plan.ishift, threads=2)
    ref = torch.nn.functional.conv3d(unit.shift(x), unit.conv.weight.detach(), None, padding=(0, 1, 1))
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    gy = torch.randn(ref.shape, generator=g)
    dw = torch.empty(plan.nnz, 9, dtype=torch.float64)
    lib.tconv_dw(x=x, dy=gy, ptr=plan.ptr_w, idx=plan.idx_w, chunk=37, dw=dw, ishift=plan.ishift, threads=2)
    want = torch.ops.aten.convolution_backward(gy, unit.shift(x), unit.conv.weight.detach(), None, (1, 1, 1), (0, 1, 1),
                                               (1, 1, 1), False, (0, 0, 0), 1, (False, True, False))[1]
    torch.testing.assert_close(dw.float(), want.reshape(-1, 9)[plan.flat_w], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("splits, group", [((5, 5, 3), 4), ((1, 12), 64), ((13,), 64)])
def test_sparse_conv_of_parts_equals_the_conv_of_their_concatenation(kernels, splits, group):
    # A fused node's first unit reads its forward, up and down inputs where they lie: the values
    # and every part's gradient must be those of the conv of the concatenation, depth shift included
    # (its three channel groups straddle the parts' boundaries here).
    i, o = sum(splits), 6
    unit, mask = _masked_unit(i, o, 0.4, seed=5)
    g = torch.Generator().manual_seed(7)
    parts = [torch.randn(2, c, 4, 5, 11, generator=g, requires_grad=True) for c in splits]
    ref = unit.conv(unit.shift(torch.cat(parts, dim=1)))
    gy = torch.randn(ref.shape, generator=g)
    params = (*parts, unit.conv.weight, unit.conv.bias)
    want = torch.autograd.grad(ref, params, gy)
    y = sparse_conv133(parts, unit.conv.weight, unit.conv.bias, SparseConvPlan.from_mask(mask, shift=True, group=group),
                       kernels)
    got = torch.autograd.grad(y, params, gy)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(got[:-2], want[:-2], strict=True):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    active = mask[..., None, None, None]
    torch.testing.assert_close(got[-2] * active, want[-2] * active, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[-1], want[-1], atol=1e-4, rtol=1e-4)
    # and the unit itself, through its installed hook, gives the same as on the concatenation
    model_unit = copy.deepcopy(unit).train()
    with torch.no_grad():
        model_unit.conv.register_buffer("kernel_mask", mask.clone())
    sparse = SparseTraining(model_unit, kernels, max_density=1.0)
    assert sparse.units
    torch.testing.assert_close(model_unit.forward_parts([p.detach() for p in parts]),
                               model_unit(torch.cat([p.detach() for p in parts], dim=1)), atol=1e-4, rtol=1e-4)
    assert sparse.calls == 2


@pytest.mark.parametrize("shape, kernel, density, bias", [
    ((2, 7, 5, 3, 5, 11), (2, 2, 2), 0.4, False),  # odd D, H, W: the vector tails
    ((1, 9, 4, 2, 3, 9), (1, 2, 2), 0.3, True),    # the decoder's in-plane up-sampling
    ((1, 5, 3, 2, 2, 17), (2, 2, 2), 1.0, False),  # every kernel active, two vectors + a tail per row
])
def test_sparse_up_conv_equals_the_dense_masked_conv_transpose(kernels, shape, kernel, density, bias):
    n, i, o, d, h, w = shape
    g = torch.Generator().manual_seed(i * o)
    up = torch.nn.ConvTranspose3d(i, o, kernel, stride=kernel, bias=bias)
    mask = torch.rand(i, o, generator=g) < density
    mask[-1, 0] = True
    active = mask[..., None, None, None]
    with torch.no_grad():
        up.weight.copy_(torch.randn(up.weight.shape, generator=g) * active)
    x = torch.randn(n, i, d, h, w, generator=g, requires_grad=True)
    ref = up(x)
    gy = torch.randn(ref.shape, generator=g)
    params = (x, up.weight) + ((up.bias,) if bias else ())
    want = torch.autograd.grad(ref, params, gy)
    plan = SparseUpPlan.from_mask(mask)
    for dense in (False, True):
        y = sparse_up_conv(x, up.weight, up.bias, plan, kernels, dense_weight_grad=dense)
        got = torch.autograd.grad(y, params, gy)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
        if bias:
            torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1] * active, want[1] * active, atol=1e-4, rtol=1e-4)
        if dense:
            torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
        else:  # pruned kernels: exactly zero
            assert not (got[1] * ~active).any()
            if density < 1:
                assert (want[1] * ~active).abs().max() > 0.1


def _tiny_masked_model(sparsity: float = 0.8):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return create_model("e2enet_small", sparsity=sparsity, seed=0, widths=(8, 16, 16),
                            pools=((2, 2, 2),) * 2, num_heads=2, num_classes=3)


def test_a_masked_model_takes_the_sparse_path_with_the_same_gradients(kernels):
    dense = _tiny_masked_model().train()
    sparse_model = copy.deepcopy(dense)
    sparse = SparseTraining(sparse_model, kernels)
    masked = [m for m in sparse_model.modules()
              if isinstance(m, ConvUnit) and getattr(m.conv, "kernel_mask", None) is not None]
    assert masked and len(sparse.units) == len(masked)
    ups = [m for m in sparse_model.modules()
           if isinstance(m, torch.nn.ConvTranspose3d) and getattr(m, "kernel_mask", None) is not None]
    assert ups and len(sparse.ups) == len(ups)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))

    def grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = sum((out.square().mean() for out in model(x)), torch.zeros(()))
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in model.named_parameters()}

    loss_d, grad_d = grads(dense)
    loss_s, grad_s = grads(sparse_model)
    assert sparse.calls == len(masked)  # every masked unit ran the kernels, nothing fell back
    assert sparse.up_calls == len(ups)  # and every masked up ConvTranspose3d
    # and the first conv (one input channel, dense): its gradients are checked with the others below
    assert [stem.calls for stem in sparse.stems.values()] == [1]
    torch.testing.assert_close(loss_s, loss_d, atol=1e-5, rtol=1e-5)
    masks = dict(sparse_model.masks())
    hooked = {id(u.unit.conv.weight) for u in sparse.units.values()} | {id(u.conv.weight) for u in sparse.ups.values()}
    assert len(hooked) == len(masks)  # every masked layer is on the sparse path
    for name, g in grad_d.items():
        if name in masks:
            keep = masks[name][..., None, None, None]
            torch.testing.assert_close(grad_s[name] * keep, g * keep, atol=1e-4, rtol=1e-3)
            assert not (grad_s[name] * ~keep).any(), name
        else:
            torch.testing.assert_close(grad_s[name], g, atol=1e-4, rtol=1e-3)
    sparse.dense_weight_grads(True)
    _, grad_full = grads(sparse_model)
    for name in masks:
        torch.testing.assert_close(grad_full[name], grad_d[name], atol=1e-4, rtol=1e-3)
    calls = sparse.calls, sparse.up_calls
    sparse_model.eval()
    with torch.no_grad():
        sparse_model(x)
    assert (sparse.calls, sparse.up_calls) == calls  # inference never takes the training path
    sparse.remove()
    assert all(m.fused_conv is None for m in masked)
    assert all("forward" not in m.__dict__ for m in ups)


def test_under_bf16_autocast_the_masked_units_still_take_the_kernels(kernels):
    """`--precision bf16` on a CPU: the kernels run in float32 inside the autocast region (they
    stepped aside before, and the masked zeros were computed in bf16: 9.19 s against 6.08 s per
    step of the paper network on a Zen 4). Same path as fp32, gradients within bf16 rounding of
    the fp32 ones, pruned kernels' gradients still exactly zero."""
    reference = _tiny_masked_model().train()
    model = copy.deepcopy(reference)
    sparse = SparseTraining(model, kernels)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(5))

    def grads(net: torch.nn.Module, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = sum((out.float().square().mean() for out in net(x)), torch.zeros(()))
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in net.named_parameters()}

    loss_ref, grad_ref = grads(reference, False)
    loss, grad = grads(model, True)
    assert sparse.calls == len(sparse.units) > 0 and sparse.up_calls == len(sparse.ups) > 0
    assert [stem.calls for stem in sparse.stems.values()] == [1]
    assert abs(float(loss) - float(loss_ref)) <= 0.02 * abs(float(loss_ref))
    masks = dict(model.masks())
    for name, g in grad_ref.items():
        assert grad[name] is not None and grad[name].dtype == torch.float32 and torch.isfinite(grad[name]).all(), name
        if name.endswith(".bias") and name.replace(".bias", ".weight") in grad_ref:
            continue  # a conv bias in front of an instance norm: its gradient is rounding noise
        keep = masks[name][..., None, None, None] if name in masks else torch.ones((), dtype=torch.bool)
        cosine = F.cosine_similarity((grad[name] * keep).flatten(), (g * keep).flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))  # the pruned kernels' dense gradients are not computed
        assert not (grad[name] * ~keep).any(), name


def test_dense_layers_and_a_high_density_stay_on_pytorch(kernels):
    unit, mask = _masked_unit(6, 4, 1.0, seed=0)
    unit.conv.register_buffer("kernel_mask", mask)
    holder = torch.nn.Sequential(unit).train()
    sparse = SparseTraining(holder, kernels)
    holder(torch.randn(1, 6, 2, 4, 8))
    assert sparse.calls == 0  # density 1 >= MAX_DENSITY
    unit.conv.kernel_mask = None
    holder(torch.randn(1, 6, 2, 4, 8))
    assert sparse.calls == 0


def test_a_model_without_masks_is_left_unhooked(kernels):
    # nothing masked: install_sparse_training returns None, so it must not leave a one-input-channel
    # unit (which the kernels would take) hooked where nobody can remove it
    from napari_e2enet.training.sparse_conv import install_sparse_training

    stem = ConvUnit(1, 4, shift=False)
    model = torch.nn.Sequential(stem, ConvUnit(4, 4)).train()
    assert install_sparse_training(model) is None
    assert stem.fused_conv is None
    sparse = SparseTraining(model, kernels)  # installed explicitly, the stem is taken
    assert list(sparse.stems) == ["0"] and stem.fused_conv is not None
    x = torch.randn(1, 1, 3, 5, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x), model.eval()(x), atol=1e-5, rtol=1e-5)  # kernels vs oneDNN
    assert sparse.stems["0"].calls == 1
    sparse.remove()
    assert stem.fused_conv is None


def test_dense_weight_gradients_only_at_gradient_regrowth_updates():
    model = _tiny_masked_model()
    for regrow, expected in (("gradient", [False, True, False, True]), ("random", [False] * 4)):
        updater = DSFFUpdater(model, None, SparsityConfig(sparsity=0.8, update_every=2, regrow=regrow), 10)
        assert [updater.needs_dense_grads(it) for it in (1, 2, 3, 4)] == expected


def test_the_trainer_trains_masked_units_sparsely(tmp_path, tiny_train_config, tiny_phantoms, kernels):
    trainer = Trainer(tiny_train_config.replace(iterations=1, iterations_per_epoch=1), tmp_path, dataset=tiny_phantoms)
    list(trainer.iter_fit())
    hooks = [m.fused_conv for m in trainer.model.modules() if isinstance(m, ConvUnit) and m.fused_conv is not None]
    assert hooks and all(h.calls == 1 for h in hooks)  # every masked unit, its training forward
    ups = [m.forward for m in trainer.model.modules() if isinstance(m, torch.nn.ConvTranspose3d) and "forward" in m.__dict__]
    assert ups and all(u.calls == 1 for u in ups)  # and every masked up ConvTranspose3d


def test_bindings_refuse_bad_arguments(kernels):
    lib = kernels.library
    mask = torch.ones(4, 5, dtype=torch.bool)
    plan = SparseConvPlan.from_mask(mask, shift=True, group=2)
    x, y = torch.zeros(1, 5, 2, 3, 8), torch.zeros(1, 4, 2, 3, 8)
    taps = torch.zeros(plan.nnz, 9)
    good = dict(x=x, ptr=plan.ptr, idx=plan.idx, weights=taps, group=2, y=y, ishift=plan.ishift)
    lib.tconv_fwd(**good)
    bad = [
        ({"group": 0}, "group"),
        ({"group": 1}, "ptr"),  # the structure was built for groups of 2
        ({"idx": plan.idx.flip(0).contiguous()}, "group's range"),
        ({"weights": torch.zeros(plan.nnz, 8)}, "weights"),
        ({"y": torch.zeros(1, 4, 2, 3, 7)}, "output"),
        ({"x": x.transpose(3, 4)}, "x"),
        ({"ishift": torch.full((5,), 2, dtype=torch.int32)}, "ishift"),
        ({"x": x.double()}, "x"),
    ]
    for change, words in bad:
        with pytest.raises(ValueError, match=words):
            lib.tconv_fwd(**{**good, **change})
    with pytest.raises(ValueError, match="dw"):
        lib.tconv_dw(x=x, dy=y, ptr=plan.ptr_w, idx=plan.idx_w, chunk=5, dw=torch.zeros(plan.nnz, 9))
    with pytest.raises(ValueError, match="ptr"):  # built for one chunk of all 5 inputs
        lib.tconv_dw(x=x, dy=y, ptr=plan.ptr_w, idx=plan.idx_w, chunk=2, dw=torch.zeros(plan.nnz, 9, dtype=torch.float64))
    up = SparseUpPlan.from_mask(torch.ones(5, 4, dtype=torch.bool))
    good_up = dict(x=x, kernel=(1, 2, 2), ptr=up.ptr, idx=up.idx, weights=torch.zeros(up.nnz, 4),
                   y=torch.zeros(1, 4, 2, 6, 16))
    lib.upconv_fwd(**good_up)
    for change, words in [({"kernel": (3, 2, 2)}, "more than 8 taps"), ({"kernel": (1, 2)}, "kernel"),
                          ({"y": torch.zeros(1, 4, 2, 6, 15)}, "output"), ({"ptr": up.ptr_t}, "ptr"),
                          ({"weights": torch.zeros(up.nnz, 8)}, "weights")]:
        with pytest.raises(ValueError, match=words):
            lib.upconv_fwd(**{**good_up, **change})
    with pytest.raises(ValueError, match="dw"):
        lib.upconv_dw(x=x, dy=good_up["y"], kernel=(1, 2, 2), ptr=up.ptr, idx=up.idx, dw=torch.zeros(up.nnz, 4))


def test_the_sparse_path_follows_mask_changes(kernels):
    """Topology updates replace a mask, set_masks / tests may edit it in place: the next step uses it."""
    unit, mask = _masked_unit(12, 6, 0.3, seed=5)
    unit.conv.register_buffer("kernel_mask", mask)
    holder = torch.nn.Sequential(unit).train()
    sparse = SparseTraining(holder, kernels)
    x = torch.randn(1, 12, 3, 8, 8, generator=torch.Generator().manual_seed(6))

    def check() -> None:
        with torch.no_grad():
            unit.conv.weight.copy_(torch.randn(unit.conv.weight.shape) * unit.conv.kernel_mask[..., None, None, None])
        calls = sparse.calls
        got = sparse.units["0"](x)
        assert sparse.calls == calls + 1
        torch.testing.assert_close(got, unit.conv(unit.shift(x)), atol=1e-4, rtol=1e-4)

    check()
    mask[0, -1], mask[1, -1] = False, ~mask[1, -1]  # in place, the density stays low
    check()
    unit.conv.kernel_mask = torch.rand(6, 12, generator=torch.Generator().manual_seed(7)) < 0.3  # replaced
    check()
