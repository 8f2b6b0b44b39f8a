"""MaskSet: counts, enforcement on weights and optimizer state, plain-tensor state."""

from __future__ import annotations

import pytest
import torch

from napari_e2enet.sparse import MaskSet


def _randomize(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_counts_and_density_exact_per_layer(helpers) -> None:
    model = helpers.tiny_model(0.8)
    masks = MaskSet.from_model(model)
    assert set(masks) == {mw.name for mw in model.maskable()}
    for mw in model.maskable():
        active, total = masks.counts()[mw.name]
        assert total == mw.kernel_shape[0] * mw.kernel_shape[1]
        assert active == max(1, round(0.2 * total)) == masks.active(mw.name)
    assert masks.total() == sum(t for _, t in masks.counts().values())
    assert masks.density() == pytest.approx(masks.active() / masks.total())
    assert masks.sparsity == pytest.approx(model.sparsity)


def test_uniform_is_seeded(helpers) -> None:
    model = helpers.tiny_model(0.8)
    a, b, c = (MaskSet.uniform(model, 0.8, s) for s in (3, 3, 4))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_apply_zeroes_weights_and_sgd_momentum(helpers) -> None:
    model = helpers.tiny_model(0.8)
    optimizer = helpers.sgd(model)
    helpers.train_step(model, optimizer, 1)  # creates momentum buffers
    _randomize(model)
    for state in optimizer.state.values():
        state["momentum_buffer"].normal_()
    masks = MaskSet.from_model(model)
    masks.apply(model, optimizer)
    for mw in model.maskable():
        off = ~masks[mw.name][..., None, None, None].expand_as(mw.weight)
        momentum = optimizer.state[mw.weight]["momentum_buffer"]
        assert torch.all(mw.weight[off] == 0) and torch.all(mw.weight[~off] != 0)
        assert torch.all(momentum[off] == 0) and torch.all(momentum[~off] != 0)


def test_apply_zeroes_adam_moments(helpers) -> None:
    model = helpers.tiny_model(0.8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    helpers.train_step(model, optimizer, 1)
    MaskSet.from_model(model).apply(model, optimizer)
    for mw in model.maskable():
        off = ~mw.module.kernel_mask[..., None, None, None].expand_as(mw.weight)
        state = optimizer.state[mw.weight]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.all(state[key][off] == 0), key
        assert torch.all(mw.weight[off] == 0)


def test_apply_installs_masks_in_the_model(helpers) -> None:
    model = helpers.tiny_model(0.8, mask_seed=0)
    other = MaskSet.uniform(model, 0.8, seed=5)
    other.apply(model)
    for name, mask in model.masks().items():
        assert torch.equal(mask, other[name])
    assert "decoder.nodes.x0_1.up.kernel_mask" in model.state_dict()


def test_apply_rejects_unknown_layers(helpers) -> None:
    model = helpers.tiny_model(0.8)
    with pytest.raises(ValueError, match="unknown"):
        MaskSet({"nope.weight": torch.ones(2, 2, dtype=torch.bool)}).apply(model)


def test_state_dict_is_plain_tensors_and_round_trips(helpers) -> None:
    model = helpers.tiny_model(0.8)
    masks = MaskSet.from_model(model)
    state = masks.state_dict()
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.device.type == "cpu"
               for v in state.values())
    other = MaskSet.uniform(model, 0.8, seed=9)
    other.load_state_dict(state)
    assert all(torch.equal(other[n], masks[n]) for n in masks)
    state[next(iter(state))][0, 0] ^= True  # a copy: the set itself is unchanged
    assert all(torch.equal(other[n], masks[n]) for n in masks)
    with pytest.raises(ValueError):
        other.load_state_dict({k: v for k, v in list(state.items())[1:]})
