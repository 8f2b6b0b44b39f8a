import dataclasses

import pytest
import torch

from napari_e2enet import create_model, list_models
from napari_e2enet.models import model_config
from napari_e2enet.models.fusion import last_reads


def test_registry_lists_paper_variant_small_variant_and_ablations():
    assert {"e2enet", "e2enet_small", "e2enet_noshift", "e2enet_k333"} <= set(list_models())
    assert model_config("e2enet").widths == (48, 96, 192, 320, 320, 320)
    assert not model_config("e2enet_noshift").depth_shift
    assert model_config("e2enet_k333").kernel == (3, 3, 3)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no_such_model")


def test_paper_network_has_15_fused_nodes_and_two_units_on_the_last_diagonal():
    model = create_model("e2enet", sparsity=0)
    nodes = model.decoder.node_info
    assert len(nodes) == 15
    for info in nodes:
        units = len(model.decoder.nodes[info.key].fuse)
        assert units == (2 if info.level + info.stage == 5 else 1)
        assert ("down" in info.inputs) == (info.level > 0)


@pytest.mark.parametrize(
    ("shape", "pools"),
    [
        ((16, 16, 16), ((2, 2, 2),) * 2),
        ((8, 24, 16), ((2, 2, 2),) * 2),
        ((4, 32, 24), ((1, 2, 2), (2, 2, 2))),  # anisotropic: no down-sampling in depth first
        ((3, 16, 8), ((1, 2, 2), (1, 2, 2))),
    ],
)
def test_output_shapes_train_and_eval(shape, pools):
    model = create_model("e2enet_small", num_classes=3, widths=(4, 8, 8), pools=pools, sparsity=0.5)
    x = torch.randn(2, 1, *shape)
    outs = model.train()(x)
    assert len(outs) == 2  # heads on levels 0..L-2 at most: num_heads is clipped by config validation
    scale = [1, 1, 1]
    for i, out in enumerate(outs):
        assert out.shape == (2, 3, *(s // f for s, f in zip(shape, scale)))
        if i < len(pools):
            scale = [f * p for f, p in zip(scale, pools[i])]
    assert model.eval()(x).shape == (2, 3, *shape)


def test_four_deep_supervision_heads_on_the_paper_layout():
    model = create_model("e2enet_small", num_classes=2, widths=(2, 4, 4, 4, 4), sparsity=0)
    outs = model.train()(torch.randn(1, 1, 32, 32, 32))
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4]


def test_gradients_reach_every_parameter(tiny_config):
    model = create_model(tiny_config, sparsity=0.5)
    outs = model.train()(torch.randn(2, 1, 8, 16, 16))
    sum(o.square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_same_seed_same_model_and_output():
    torch.manual_seed(3)
    a = create_model("e2enet_small", num_classes=4, sparsity=0.8, seed=1).eval()
    torch.manual_seed(3)
    b = create_model("e2enet_small", num_classes=4, sparsity=0.8, seed=1).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    c = create_model("e2enet_small", num_classes=4, sparsity=0.8, seed=2)
    assert any((a.masks()[k] != c.masks()[k]).any() for k in a.masks())


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9])
def test_masks_cover_fusion_and_up_weights_at_exact_density(sparsity):
    model = create_model("e2enet_small", sparsity=sparsity)
    maskable = model.maskable()
    names = {mw.name for mw in maskable}
    # every fusion conv and every up ConvTranspose, nothing from backbone or heads
    expected = {n for n, _ in model.named_parameters()
                if n.startswith("decoder.") and n.endswith("weight") and (".up." in n or ".conv." in n)}
    assert names == expected
    if sparsity == 0:
        assert model.masks() == {}
        return
    for mw in maskable:
        mask = mw.module.kernel_mask
        assert mask.shape == mw.kernel_shape
        assert int(mask.sum()) == max(1, round((1 - sparsity) * mask.numel()))
        dead = ~mask[..., None, None, None].expand_as(mw.weight)
        assert (mw.weight[dead] == 0).all()
    assert model.sparsity == pytest.approx(sparsity, abs=0.01)


def test_set_masks_rejects_wrong_shapes_and_names():
    model = create_model("e2enet_small", sparsity=0.8)
    name = next(iter(model.masks()))
    with pytest.raises(ValueError, match="shape"):
        model.set_masks({name: torch.ones(1, 1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown"):
        model.set_masks({"backbone.stages.0.0.conv.weight": torch.ones(1, 1, dtype=torch.bool)})


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="pools"):
        model_config("e2enet", pools=((2, 2, 2),) * 2)
    with pytest.raises(ValueError, match="odd"):
        model_config("e2enet", kernel=(2, 3, 3))


def test_fusion_plan_states_the_wiring_the_decoder_runs():
    """E2ENet.fusion_plan(): x(i, j) reads x(i, j-1) as is, x(i+1, j-1) up-sampled by the deeper
    level's pool, x(i-1, j-1) max-pooled by its own (not at level 0); module paths name the masked
    weights; the decoder's forward follows the plan (a node swapped in the plan changes its output)."""
    model = create_model("e2enet_small", num_classes=2, widths=(4, 8, 8), pools=((1, 2, 2), (2, 2, 2)),
                         sparsity=0.5, seed=0).eval()
    plan = model.fusion_plan()
    assert [s.key for s in plan] == [info.key for info in model.decoder.node_info] == ["x0_1", "x1_1", "x0_2"]
    by_key = {s.key: s for s in plan}
    x11 = by_key["x1_1"]
    assert (x11.forward, x11.deeper, x11.shallower) == ((1, 0), (2, 0), (0, 0))
    assert x11.up_kernel == (2, 2, 2) and x11.down_pool == (1, 2, 2)
    assert by_key["x0_1"].shallower is None and by_key["x0_1"].down_pool is None
    assert [s.output for s in plan] == [False, True, True] and len(by_key["x0_2"].fuse) == 2
    masked = {f"decoder.{s.up}.weight" for s in plan} | {f"decoder.{p}.conv.weight" for s in plan for p in s.fuse}
    assert masked == {mw.name for mw in model.maskable()} == set(model.masks())
    x = torch.randn(1, 1, 4, 16, 16)
    with torch.no_grad():
        ref = model(x)
        model.decoder.plan = tuple(
            s if s.key != "x0_2" else dataclasses.replace(s, forward=(0, 0)) for s in plan)
        model.decoder._last_reads = last_reads(model.decoder.plan)
        assert not torch.equal(model(x), ref)


def test_last_reads_frees_each_value_after_its_last_reader():
    plan = create_model("e2enet", sparsity=0).fusion_plan()
    reads = last_reads(plan)
    freed = [src for step in plan for src in reads[step.key]]
    assert len(freed) == len(set(freed))  # each value once
    assert set(freed) == {src for step in plan for src in step.sources}
    deepest_first = sorted(plan, key=lambda s: (s.info.stage, -s.info.level))
    for step, done in ((s, last_reads(deepest_first)[s.key]) for s in deepest_first):
        assert step.deeper in done and (step.forward in done) == (step.info.level == 0)
