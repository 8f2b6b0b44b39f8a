import pytest
import torch

from napari_e2enet import create_model, list_models
from napari_e2enet.models import model_config


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
