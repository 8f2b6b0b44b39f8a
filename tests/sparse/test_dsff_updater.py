"""DSFF updater: RigL-style invariants of prune + regrow and exact resumption."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from napari_e2enet.config import SparsityConfig
from napari_e2enet.sparse import DSFFUpdater, MaskSet


def _flat_masks(model) -> dict[str, torch.Tensor]:
    return {name: mask.reshape(-1).clone() for name, mask in model.masks().items()}


def _randomize_weights(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mw in model.maskable():
            mw.weight.copy_(torch.randn(mw.weight.shape, generator=g))


def _l1(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().sum(dim=(2, 3, 4)).reshape(-1)


def test_density_exact_and_prune_smallest_l1_regrow_from_inactive(make_run) -> None:
    model, _, updater = make_run(update_every=1, total=8)
    counts = {name: int(m.sum()) for name, m in model.masks().items()}
    for it in range(1, 8):  # every call is an update; weights change between them
        _randomize_weights(model, seed=it)
        before = _flat_masks(model)
        layers = {mw.name: mw for mw in model.maskable()}
        l1 = {name: _l1(layers[name].weight * layers[name].module.kernel_mask[..., None, None, None])
              for name in before}
        update = updater.after_step(it)
        assert update is not None and update.iteration == it and update.update_index == it
        r = updater.prune_fraction(it)
        assert update.prune_fraction == pytest.approx(r)
        after = _flat_masks(model)
        for name, old in before.items():
            new = after[name]
            assert int(new.sum()) == counts[name]  # density exactly constant
            pruned = old & ~new
            regrown = new & ~old
            active_idx = torch.nonzero(old).view(-1)
            n = min(math.ceil(r * active_idx.numel() - 1e-9), int((~old).sum()))
            assert int(pruned.sum()) == int(regrown.sum()) == n == update.pruned[name] == update.regrown[name]
            # pruned = exactly the n smallest-L1 active kernels (random weights: no ties)
            smallest = active_idx[torch.argsort(l1[name][active_idx])[:n]]
            assert set(torch.nonzero(pruned).view(-1).tolist()) == set(smallest.tolist())
            # regrown only from the previously inactive kernels, never the just-pruned ones
            assert not torch.any(regrown & old)
            assert not torch.any(regrown & pruned)
        assert update.total_pruned == sum(update.pruned.values())
        assert update.active == sum(counts.values())
        assert update.density == pytest.approx(updater.density)


def test_new_kernels_start_at_zero_weight_and_momentum_kept_ones_untouched(make_run, helpers) -> None:
    model, optimizer, updater = make_run(update_every=2, total=10)
    helpers.train_step(model, optimizer, 1)
    assert updater.after_step(1) is None
    helpers.train_step(model, optimizer, 2)
    with torch.no_grad():  # make every entry non-zero so that a missed zeroing would show
        for mw in model.maskable():
            mw.weight.add_(1.0)
            optimizer.state[mw.weight]["momentum_buffer"].add_(1.0)
    layers = {mw.name: mw for mw in model.maskable()}
    before = _flat_masks(model)
    weights = {n: layers[n].weight.detach().clone() for n in before}
    update = updater.after_step(2)
    assert update is not None and update.total_regrown > 0
    for name, new in _flat_masks(model).items():
        weight = layers[name].weight.detach().reshape(-1, *layers[name].weight.shape[2:])
        momentum = optimizer.state[layers[name].weight]["momentum_buffer"].reshape_as(weight)
        regrown, kept = new & ~before[name], new & before[name]
        assert torch.all(weight[regrown] == 0) and torch.all(momentum[regrown] == 0)
        assert torch.all(weight[~new] == 0) and torch.all(momentum[~new] == 0)
        assert torch.equal(weight[kept], weights[name].reshape_as(weight)[kept])
        assert torch.all(momentum[kept] != 0)


def test_masked_weights_zero_after_every_step_and_one_optimizer_step_per_iteration(make_run, helpers) -> None:
    model, optimizer, updater = make_run(update_every=2, total=8)
    steps = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    counts = {name: int(m.sum()) for name, m in model.masks().items()}

    def check(it, update) -> None:
        assert len(steps) == it  # exactly one optimizer.step() per iteration, the trainer's
        for mw in model.maskable():
            off = ~mw.module.kernel_mask[..., None, None, None].expand_as(mw.weight)
            assert torch.all(mw.weight[off] == 0)
            assert torch.all(optimizer.state[mw.weight]["momentum_buffer"][off] == 0)
            assert int(mw.module.kernel_mask.sum()) == counts[mw.name]

    updates = helpers.run(model, optimizer, updater, 0, 8, each=check)
    assert [u.iteration for u in updates] == [2, 4, 6]
    assert len(steps) == 8
    assert not hasattr(updater, "step")


def test_survival_counts_match_mask_history(make_run, helpers) -> None:
    model, optimizer, updater = make_run(update_every=2, total=10)
    history = [_flat_masks(model)]
    updates = helpers.run(model, optimizer, updater, 0, 9,
                          each=lambda it, u: history.append(_flat_masks(model)) if u else None)
    assert updates[0].survived is None and updates[0].survival_rate is None
    for k in range(1, len(updates)):
        prev_before, prev_after, now = history[k - 1], history[k], history[k + 1]
        expected = {n: int((prev_after[n] & ~prev_before[n] & now[n]).sum()) for n in now}
        assert updates[k].survived == expected
        assert updates[k].previous_regrown == updates[k - 1].total_regrown
        assert updates[k].total_survived == sum(expected.values())


def test_deterministic_per_seed_and_seeds_differ(make_run, helpers) -> None:
    def final_masks(seed: int) -> dict[str, torch.Tensor]:
        model, optimizer, updater = make_run(update_every=2, total=8, seed=seed, init_seed=0)
        helpers.run(model, optimizer, updater, 0, 8)
        return _flat_masks(model)

    a, b = final_masks(1), final_masks(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # same initial topology and weights, different updater seed: random regrowth differs
    model, optimizer, _ = make_run(update_every=2, total=8, seed=1)
    other = DSFFUpdater(model, optimizer, SparsityConfig(update_every=2), total_iterations=8, seed=2)
    helpers.run(model, optimizer, other, 0, 8)
    c = _flat_masks(model)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_no_global_rng_use(make_run, helpers) -> None:
    model, optimizer, updater = make_run(update_every=1, total=4)
    helpers.train_step(model, optimizer, 1)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()  # noqa: NPY002 - the legacy global state is the point
    assert updater.after_step(1) is not None
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # noqa: NPY002


def test_state_round_trip_resumes_exactly(make_run, helpers) -> None:
    total, k = 10, 5
    model, optimizer, updater = make_run(update_every=2, total=total, seed=3)
    helpers.run(model, optimizer, updater, 0, k)
    buffer = io.BytesIO()  # through torch.save, as a checkpoint would
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "dsff": updater.state_dict()}, buffer)
    helpers.run(model, optimizer, updater, k, total)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    # a fresh process: different initial weights and initial topology, then load
    fresh, fresh_opt, fresh_updater = make_run(update_every=2, total=total, seed=3, init_seed=7, mask_seed=8)
    assert any(not torch.equal(fresh.masks()[n], m) for n, m in model.masks().items())
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    fresh_updater.load_state_dict(saved["dsff"])
    assert fresh_updater.update_count == 2 and fresh_updater.last_iteration == k
    resumed = helpers.run(fresh, fresh_opt, fresh_updater, k, total)
    assert [u.iteration for u in resumed] == [6, 8]
    assert resumed[0].survived is not None  # survival bookkeeping survived the restart
    for name, mask in model.masks().items():
        assert torch.equal(fresh.masks()[name], mask)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert updater.state_dict()["update_count"] == fresh_updater.state_dict()["update_count"] == 4


def test_load_state_rejects_a_different_run(make_run) -> None:
    _, _, updater = make_run(update_every=2, total=10, seed=0)
    state = updater.state_dict()
    _, _, other = make_run(update_every=2, total=10, seed=1)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)


def test_gradient_regrowth_picks_largest_gradient_inactive_kernels(make_run) -> None:
    model, _, updater = make_run(update_every=1, total=4, regrow="gradient")
    g = torch.Generator().manual_seed(0)
    for mw in model.maskable():
        mw.weight.grad = torch.randn(mw.weight.shape, generator=g)
    _randomize_weights(model, seed=1)
    before = _flat_masks(model)
    grads = {mw.name: _l1(mw.weight.grad) for mw in model.maskable()}
    update = updater.after_step(1)
    assert update is not None and update.regrow == "gradient"
    for name, new in _flat_masks(model).items():
        inactive = torch.nonzero(~before[name]).view(-1)
        n = update.regrown[name]
        assert n > 0
        largest = inactive[torch.argsort(grads[name][inactive], descending=True)[:n]]
        assert set(torch.nonzero(new & ~before[name]).view(-1).tolist()) == set(largest.tolist())


def test_gradient_regrowth_needs_gradients(make_run) -> None:
    _, _, updater = make_run(update_every=1, total=4, regrow="gradient")
    with pytest.raises(RuntimeError, match="grad"):
        updater.after_step(1)


def test_dense_density_limit_regrows_at_most_the_inactive(helpers) -> None:
    model = helpers.tiny_model(0.3)
    config = SparsityConfig(sparsity=0.3, update_every=1, prune_fraction=1.0, prune_fraction_min=1.0)
    updater = DSFFUpdater(model, None, config, total_iterations=3)
    before = _flat_masks(model)
    update = updater.after_step(1)
    for name, new in _flat_masks(model).items():
        inactive = int((~before[name]).sum())
        assert update.pruned[name] == update.regrown[name] == inactive
        assert torch.equal(new, ~before[name]) or inactive < int(before[name].sum())
        assert int(new.sum()) == int(before[name].sum())


def test_schedule_rules_inside_the_updater(make_run, helpers) -> None:
    model, optimizer, updater = make_run(update_every=3, total=9)
    assert [u.iteration for u in helpers.run(model, optimizer, updater, 0, 9)] == [3, 6]
    with pytest.raises(ValueError, match="iteration"):
        updater.after_step(9)  # the same step twice
    model = helpers.tiny_model(0.8)
    config = SparsityConfig(update_every=2, stop_updates_at=0.5)
    updater = DSFFUpdater(model, None, config, total_iterations=12)
    assert [it for it in range(1, 13) if updater.after_step(it)] == [2, 4, 6]


def test_dense_model_makes_a_no_op_and_dense_plus_sparsity_gets_masks(helpers) -> None:
    dense = helpers.tiny_model(0.0)
    updater = DSFFUpdater(dense, None, SparsityConfig(sparsity=0.0, update_every=1), total_iterations=4)
    assert updater.after_step(1) is None and dense.masks() == {}
    dense = helpers.tiny_model(0.0)
    updater = DSFFUpdater(dense, None, SparsityConfig(sparsity=0.8, update_every=1), total_iterations=4, seed=4)
    expected = MaskSet.uniform(helpers.tiny_model(0.0), 0.8, seed=4)
    assert all(torch.equal(dense.masks()[n], expected[n]) for n in expected)


def test_masks_must_match_the_configured_sparsity(helpers) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        DSFFUpdater(helpers.tiny_model(0.8), None, SparsityConfig(sparsity=0.9), total_iterations=4)
    with pytest.raises(ValueError, match="sparsity"):
        DSFFUpdater(helpers.tiny_model(0.8), None, SparsityConfig(sparsity=0.0), total_iterations=4)


def test_updater_works_through_a_wrapper(helpers) -> None:
    model = helpers.tiny_model(0.8)
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like from outside
    updater = DSFFUpdater(wrapper, None, SparsityConfig(update_every=1), total_iterations=4)
    before = copy.deepcopy(model.masks())
    assert updater.after_step(1) is not None
    assert any(not torch.equal(before[n], m) for n, m in model.masks().items())
