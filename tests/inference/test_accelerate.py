"""The fast inference path: ``accelerate(model)`` must be the same function as ``model.eval()``.

fp32: max |Δlogit| ≤ 1e-4 on random input, for both backends ("dense": oneDNN 2-D folding;
"sparse": the C kernels of ``napari_e2enet.inference.cpu``), across sparsities, random,
block-structured and dead-channel masks, non-cubic inputs, anisotropic pools, batches and
the no-shift variant. bf16: argmax agreement with fp32 on ≥ 99 % of voxels for a briefly
trained (trained-like) model; random-init models are tested with a looser bound because their
16 logits are nearly tied (documented in the test). Inputs stay ≤ 32³ (2 shared cores).

The sparse tests skip only on a machine without a C compiler: where one exists and the kernels
do not build, they fail. The kernels themselves are tested per CPU family in test_cpu_kernels.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from napari_e2enet.inference.cpu import compact, find_compiler
from napari_e2enet.inference.cpu.compact import conv_csc, convt_csr, depth_offsets, kernel_status
from napari_e2enet.inference.fastpath import AcceleratedE2ENet, accelerate, backend_info, bf16_native
from napari_e2enet.models import create_model
from napari_e2enet.sparse.compact import block_size, effective_mask, uniform_block_masks

KERNELS, KERNEL_REASON = kernel_status()
# no compiler: skip; a compiler but no kernels: the sparse tests run and fail with the reason
needs_kernels = pytest.mark.skipif(find_compiler() is None, reason=f"no C compiler here ({KERNEL_REASON})")
BACKENDS = ["dense", pytest.param("sparse", marks=needs_kernels)]
TOL = 1e-4

# A 6-level paper-shaped network with small widths; mixed pools keep a ≥ 2-voxel bottleneck at 16×32×32.
REDUCED = dict(widths=(8, 16, 24, 32, 32, 32), pools=((2, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2), (1, 2, 2)))


def _reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _max_diff(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> float:
    ref = _reference(model, x)
    fast = accelerate(model, **kwargs)
    out = fast(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    return float((out - ref).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.8, 0.9])
def test_e2enet_small_matches_model(backend, sparsity):
    torch.manual_seed(0)
    model = create_model("e2enet_small", sparsity=sparsity, seed=1)
    x = torch.randn(1, 1, 32, 32, 32)
    assert _max_diff(model, x, backend=backend) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.8, 0.9])
def test_reduced_paper_network_matches_model(backend, sparsity):
    torch.manual_seed(1)
    model = create_model("e2enet", sparsity=sparsity, seed=2, **REDUCED)
    x = torch.randn(1, 1, 16, 32, 32)
    assert _max_diff(model, x, backend=backend) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block,dead", [(1, 3), (4, 0), (8, 0), (4, 2)])
def test_block_and_dead_channel_masks(backend, block, dead):
    """Block-structured masks and masks with whole input/output channels switched off."""
    torch.manual_seed(2)
    model = create_model("e2enet_small", sparsity=0.0)
    masks = uniform_block_masks(model, 0.8, block, seed=3, dead_channels=dead)
    model.set_masks(masks)
    if block > 1 and not dead:
        assert all(block_size(m) >= min(block, 4) for m in masks.values())
    if dead:
        assert any(not bool(m.any(1).all()) for m in masks.values())  # some output has no input
    x = torch.randn(1, 1, 32, 32, 32)
    assert _max_diff(model, x, backend=backend) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_sparsity_with_empty_paths(backend):
    """S = 0.99 leaves single kernels per layer: most up ConvT outputs and inputs are unused."""
    torch.manual_seed(3)
    model = create_model("e2enet_small", sparsity=0.99, seed=4)
    x = torch.randn(1, 1, 32, 32, 32)
    assert _max_diff(model, x, backend=backend) <= TOL


@needs_kernels
@pytest.mark.parametrize("pools", [None, ((1, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2))])
def test_up_sampling_in_depth_pieces_gives_the_same_logits_in_less_memory(monkeypatch, pools):
    """Large nodes compute their up-sampled input a few slices at a time (pieces read across
    their borders through the depth shift), and the encoder writes its conv outputs into the
    arena slice by slice: same logits, a smaller arena."""
    from napari_e2enet.inference import fastpath as acc

    torch.manual_seed(6)
    kwargs = {"pools": pools} if pools else {}
    model = create_model("e2enet_small", sparsity=0.9, seed=7, **kwargs)
    x = torch.randn(1, 1, 16, 32, 32)
    whole = accelerate(model, backend="sparse")
    whole(x)
    arena_whole = whole._pool.nbytes
    for depth in (2, 4, 6):  # pieces of 2 (one low-resolution slice), uneven last piece
        monkeypatch.setattr(acc, "_UP_PIECE_BYTES", 0)
        monkeypatch.setattr(acc, "_UP_PIECE_DEPTH", depth)
        monkeypatch.setattr(acc, "_CONV_PIECE_BYTES", depth * 4096)  # 1..4 slices per encoder conv piece
        pieced = accelerate(model, backend="sparse")
        assert float((pieced(x) - _reference(model, x)).abs().max()) <= TOL
        pieced(x)  # the planned arena on the second call
        assert pieced._pool.nbytes < arena_whole


@needs_kernels
@pytest.mark.parametrize("pools", [None, ((1, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2))])
def test_up_channels_computed_inside_the_fusion_conv_give_the_same_logits(monkeypatch, pools):
    """Nodes whose up-sampled input is large compute it inside their first fusion conv (never
    stored): bit-identical logits to the ConvT-then-conv path, in depth pieces and with in-place
    outputs too; a (1, 2, 2) up-sampling keeps the stored path."""
    from napari_e2enet.inference import fastpath as acc
    from napari_e2enet.inference.cpu import compact

    torch.manual_seed(8)
    model = create_model("e2enet_small", sparsity=0.9, seed=9, **({"pools": pools} if pools else {}))
    x = torch.randn(1, 1, 16, 32, 32)
    monkeypatch.setattr(acc, "_COMPUTED_UP_BYTES", 1 << 62)
    stored = accelerate(model, backend="sparse")
    expected = stored(x)
    kinds = []
    original = compact.Kernels.sconv133

    def recording(self, *args, **kwargs):
        kinds.append(kwargs.get("up") is not None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(compact.Kernels, "sconv133", recording)
    monkeypatch.setattr(acc, "_COMPUTED_UP_BYTES", 0)
    for depth in (16, 4):  # whole, and depth pieces (the level-0 output laid on its input)
        monkeypatch.setattr(acc, "_UP_PIECE_BYTES", 0 if depth < 16 else 1 << 62)
        monkeypatch.setattr(acc, "_UP_PIECE_DEPTH", depth)
        kinds.clear()
        computed = accelerate(model, backend="sparse")
        assert torch.equal(computed(x), expected)
        assert torch.equal(computed(x), expected)  # the planned arena
        assert any(kinds) and (all(kinds) is False)  # some nodes computed their up channels


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_cubic_input_anisotropic_pools_and_batch(backend):
    torch.manual_seed(4)
    pools = ((1, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2))
    model = create_model("e2enet_small", sparsity=0.9, seed=5, pools=pools)
    x = torch.randn(2, 1, 8, 32, 48)
    assert _max_diff(model, x, backend=backend) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_depth_shift_and_two_input_channels(backend):
    torch.manual_seed(5)
    model = create_model("e2enet_small", in_channels=2, num_classes=5, sparsity=0.8, depth_shift=False)
    x = torch.randn(1, 2, 16, 32, 32)
    assert _max_diff(model, x, backend=backend) <= TOL


def test_dense_backend_without_kernels(monkeypatch):
    """The pure-PyTorch path (no C compiler): same function, precise instance-norm statistics."""
    import napari_e2enet.inference.fastpath as acc

    monkeypatch.setattr(acc, "kernel_status", lambda: (None, "no C compiler (test)"))
    torch.manual_seed(6)
    model = create_model("e2enet_small", sparsity=0.9, seed=6)
    x = torch.randn(1, 1, 32, 32, 32)
    fast = acc.accelerate(model)
    assert fast.backend == "dense"
    assert backend_info(fast) == {"backend": "dense", "backend_reason": "no C compiler (test)"}
    assert float((fast(x) - _reference(model, x)).abs().max()) <= TOL
    with pytest.raises(RuntimeError, match="no C compiler"):
        acc.accelerate(model, backend="sparse")


@needs_kernels
def test_auto_backend_choice_and_buffer_reuse():
    torch.manual_seed(7)
    sparse_model = create_model("e2enet_small", sparsity=0.9, seed=7)
    dense_model = create_model("e2enet_small", sparsity=0.0)
    assert KERNELS is not None, KERNEL_REASON
    chosen = backend_info(accelerate(sparse_model))
    assert chosen["backend"] == f"sparse-{KERNELS.family}" and chosen["backend_reason"].startswith("model density 0.1")
    dense = backend_info(accelerate(dense_model))
    assert dense == {"backend": "dense", "backend_reason": "model density 1.00 ≥ 0.5 (dense oneDNN is faster there)"}
    assert backend_info(accelerate(sparse_model, backend="dense"))["backend_reason"] == "backend='dense' requested"
    assert backend_info(torch.nn.Identity()) == {"backend": "dense", "backend_reason": "the PyTorch model as is"}
    fast = accelerate(sparse_model)
    a, b = torch.randn(1, 1, 32, 32, 32), torch.randn(1, 1, 16, 48, 32)
    ra, rb = _reference(sparse_model, a), _reference(sparse_model, b)
    for _ in range(2):  # pooled buffers are reused across calls and shapes
        assert float((fast(a) - ra).abs().max()) <= TOL
        assert float((fast(b) - rb).abs().max()) <= TOL


@needs_kernels
def test_planned_buffers_hold_less_and_leftover_values_do_not_leak():
    """After the first call the pool lays its buffers out in one arena; a later call must give the
    same logits even when the arena holds garbage (every kernel writes its whole output, halo
    included), and the arena must be smaller than one buffer per size would be."""
    model = create_model("e2enet_small", sparsity=0.9, seed=3)
    x = torch.randn(1, 1, 32, 64, 64)
    ref = _reference(model, x)
    fast = accelerate(model, backend="sparse")
    first = fast(x)
    pool = fast._pool
    assert pool.nbytes > 0
    recorded = []  # what one buffer per size would keep: the most live at once, per size
    pool.clear()
    orig_take, orig_give = pool.take, pool.give
    live: dict[int, int] = {}
    peak: dict[int, int] = {}

    def take(n):
        t = orig_take(n)
        live[n] = live.get(n, 0) + 1
        peak[n] = max(peak.get(n, 0), live[n])
        recorded.append(n)
        return t

    def give(t):
        live[t.numel()] -= 1
        orig_give(t)

    pool.take, pool.give = take, give
    fast(x)
    pool.take, pool.give = orig_take, orig_give
    per_size = 4 * sum(n * k for n, k in peak.items())
    assert len(set(recorded)) > 1
    assert 0 < pool.nbytes < per_size
    pool._arena.fill_(float("nan"))
    again = fast(x)
    assert torch.equal(again, first)
    assert float((again - ref).abs().max()) <= TOL


def test_buffer_plan_never_overlaps_live_buffers():
    gen = torch.Generator().manual_seed(0)
    record = []
    for step in range(60):  # random sizes and lifetimes
        size = int(torch.randint(1, 500, (1,), generator=gen))
        first = step * 2
        last = first + 1 + int(torch.randint(0, 40, (1,), generator=gen))
        record.append([size, first, last])
    plan, total = compact._plan_offsets(record, 16)
    assert [p[0] for p in plan] == [r[0] for r in record]
    for (size_a, off_a), (_, fa, la) in zip(plan, record, strict=True):
        assert off_a % 16 == 0 and off_a + size_a <= total
        for (size_b, off_b), (_, fb, lb) in zip(plan, record, strict=True):
            if (off_a, fa) != (off_b, fb) and fa < lb and fb < la:  # alive together
                assert off_a + size_a <= off_b or off_b + size_b <= off_a
    peak_live = max(sum(-(-r[0] // 16) * 16 for r in record if r[1] <= t < r[2]) for t in range(200))
    assert peak_live <= total <= sum(-(-r[0] // 16) * 16 for r in record)
    assert compact._plan_offsets(record, 16) == (plan, total)


def test_buffer_pool_records_again_when_a_call_departs_from_the_plan():
    pool = compact.BufferPool()
    pool.begin()
    a, b = pool.take(64), pool.take(32)
    pool.give(a)
    c = pool.take(48)  # may share a's memory in the plan
    pool.give(b)
    pool.give(c)
    pool.end()
    assert pool.nbytes >= 4 * (64 + 32)
    pool.begin()
    a2, b2 = pool.take(64), pool.take(32)
    arena = pool._arena
    assert a2.data_ptr() >= arena.data_ptr() and b2.data_ptr() >= arena.data_ptr()
    odd = pool.take(1000)  # not in the plan: fresh memory, and the plan is dropped at the end
    assert not (arena.data_ptr() <= odd.data_ptr() < arena.data_ptr() + 4 * arena.numel())
    pool.end()
    assert pool.nbytes == 0
    outside = pool.take(16)  # outside begin/end: always fresh memory
    assert outside.numel() == 16 and pool.nbytes == 0


def test_model_is_not_modified_and_later_changes_are_not_seen():
    torch.manual_seed(8)
    model = create_model("e2enet_small", sparsity=0.8, seed=8).train()
    x = torch.randn(1, 1, 32, 32, 32)
    fast = accelerate(model)
    assert model.training  # accelerate reads, never changes, the model
    before = fast(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    assert torch.equal(fast(x), before)


def test_bad_arguments_and_inputs():
    model = create_model("e2enet_small", sparsity=0.8)
    with pytest.raises(ValueError):
        accelerate(model, precision="fp16")
    with pytest.raises(ValueError):
        accelerate(model, backend="gpu")
    fast = accelerate(model)
    with pytest.raises(ValueError):
        fast(torch.randn(1, 1, 20, 32, 32))  # not a multiple of 16
    with pytest.raises(ValueError):
        fast(torch.randn(1, 2, 32, 32, 32))  # wrong channel count


def test_unsupported_kernel_falls_back_to_the_model():
    torch.manual_seed(9)
    model = create_model("e2enet_k333", sparsity=0.8, widths=(4, 8, 8), pools=((2, 2, 2),) * 2)
    x = torch.randn(1, 1, 16, 16, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = accelerate(model)
    assert not isinstance(fast, AcceleratedE2ENet)
    assert any("depth > 1" in str(w.message) for w in caught)
    assert torch.equal(fast(x), _reference(model, x))


# -- bf16 -------------------------------------------------------------------------------------


def _trained_like_model() -> torch.nn.Module:
    """A tiny E2ENet trained for a few Adam steps to segment intensity bands of smooth random
    volumes: its logits have the clear margins of trained weights (random-init logits are
    near-ties). Deterministic; a few seconds on 2 cores."""
    gen = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    model = create_model("e2enet_small", num_classes=4, sparsity=0.8, seed=10,
                         widths=(8, 16, 16), pools=((2, 2, 2),) * 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(12):
        x, y = _bands(gen, 2, 16)
        loss = F.cross_entropy(model(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.apply_masks()
    return model.eval()


def _bands(gen: torch.Generator, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coarse = torch.randn(n, 1, size // 4, size // 4, size // 4, generator=gen)
    field = F.interpolate(coarse, size=(size, size, size), mode="trilinear", align_corners=False)
    field = (field - field.mean()) / field.std()
    labels = torch.bucketize(field[:, 0], torch.tensor([-0.7, 0.0, 0.7]))
    return field + 0.1 * torch.randn(field.shape, generator=gen), labels


@pytest.fixture(scope="module")
def trained_like_model() -> torch.nn.Module:
    return _trained_like_model()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_agrees_in_argmax_on_trained_like_weights(backend, trained_like_model):
    model = trained_like_model
    x, _ = _bands(torch.Generator().manual_seed(11), 1, 32)
    ref = _reference(model, x).argmax(1)
    out = accelerate(model, "bf16", backend=backend)(x)
    assert out.dtype == torch.float32
    assert float((out.argmax(1) == ref).float().mean()) >= 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_runs_on_random_weights(backend):
    """Random-init E2ENets have nearly tied logits (16 classes), so bf16 rounding flips ~1–2 %
    of the argmaxes; this only checks the path runs and mostly agrees."""
    torch.manual_seed(12)
    model = create_model("e2enet_small", sparsity=0.9, seed=12)
    x = torch.randn(1, 1, 32, 32, 32)
    ref = _reference(model, x)
    out = accelerate(model, "bf16", backend=backend)(x)
    assert torch.isfinite(out).all()
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) >= 0.95
    assert accelerate(model, "auto").precision == ("bf16" if bf16_native() else "fp32")


def test_bf16_sparse_backend_runs_its_fusion_convs_in_bf16_where_the_cpu_can():
    """With AVX512-BF16 the sparse decoder's (1,3,3) convs take bf16 weights (and say so); the
    result stays within bf16 rounding of fp32. Elsewhere they stay fp32, also said."""
    kernels, _ = kernel_status()
    if kernels is None:
        pytest.skip("no sparse kernels here")
    model = create_model("e2enet_small", sparsity=0.9, seed=17).eval()
    fast = accelerate(model, "bf16", backend="sparse")
    convs = [u.conv for node in fast._sparse_nodes.values() for u in node.units]
    assert convs and all((c.weight_pairs is not None) == kernels.bf16 for c in convs)
    assert fast.sparse_bf16 == kernels.bf16
    assert ("bf16 fusion convs" if kernels.bf16 else "fp32 fusion convs") in backend_info(fast)["backend_reason"]
    x = torch.randn(1, 1, 16, 32, 32)
    ref = _reference(model, x)
    out = fast(x)
    assert float((out - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    assert "fusion convs" not in backend_info(accelerate(model, "fp32", backend="sparse"))["backend_reason"]


# -- compact forms and kernels ----------------------------------------------------------------


def test_csc_and_csr_reconstruct_the_masked_weights():
    torch.manual_seed(13)
    w = torch.randn(6, 10, 1, 3, 3)
    mask = torch.rand(6, 10) < 0.3
    w[~mask] = 0
    w[0, 1] = 0  # an active kernel with zero weights is skipped too
    mask[0, 1] = True
    csc = conv_csc(w, mask)
    assert csc.nnz == int(effective_mask(w, mask).sum()) == int(mask.sum()) - 1
    dense = torch.zeros(6, 10, 9)
    for i in range(10):
        for k in range(int(csc.colptr[i]), int(csc.colptr[i + 1])):
            dense[int(csc.rowidx[k]), i] = csc.weights[k]
    assert torch.equal(dense.view(6, 10, 1, 3, 3), w)
    wt = torch.randn(10, 6, 2, 2, 2)
    tmask = torch.rand(10, 6) < 0.3
    wt[~tmask] = 0
    csr = convt_csr(wt, tmask)
    rebuilt = torch.zeros(6, 10, 8)
    for o in range(6):
        for k in range(int(csr.rowptr[o]), int(csr.rowptr[o + 1])):
            rebuilt[o, int(csr.colidx[k])] = csr.weights[k]
    assert torch.equal(rebuilt.permute(1, 0, 2).reshape(10, 6, 2, 2, 2), wt)
    assert csr.kernel == (2, 2, 2)


def test_block_size_and_depth_offsets():
    base = torch.rand(3, 5) < 0.5
    assert block_size(base.repeat_interleave(8, 0).repeat_interleave(8, 1)) == 8
    assert block_size(base.repeat_interleave(4, 0).repeat_interleave(4, 1)) in (4, 8, 16)
    assert block_size(torch.eye(6, dtype=torch.bool)) == 1
    assert depth_offsets(7).tolist() == [1, 1, 1, 0, 0, -1, -1]
    assert depth_offsets(2).tolist() == [0, 0]
    assert depth_offsets(6, enabled=False).abs().sum() == 0
    from napari_e2enet.models.blocks import depth_shift

    for channels in range(1, 40):  # the same groups as the model's own shift, read off its output
        depth = torch.arange(1.0, 6.0).view(1, 1, 5, 1, 1).expand(1, channels, 5, 1, 1).contiguous()
        read = depth_shift(depth)[0, :, 2, 0, 0] - 3  # slice 2 reads slice 2 + offset
        assert read.to(torch.int32).tolist() == depth_offsets(channels).tolist(), channels


def test_kernels_can_be_disabled(monkeypatch):
    monkeypatch.setenv("NAPARI_E2ENET_NO_KERNELS", "1")
    assert compact.load_kernels() is None
    assert compact.kernel_status()[1] == "disabled by NAPARI_E2ENET_NO_KERNELS=1"
    model = create_model("e2enet_small", sparsity=0.9, seed=6)
    assert backend_info(accelerate(model)) == {"backend": "dense",
                                               "backend_reason": "disabled by NAPARI_E2ENET_NO_KERNELS=1"}


def test_inference_accelerate_is_always_the_function():
    """The module is ``inference.fastpath``: importing it does not turn ``inference.accelerate``
    into a module (it did while both were called ``accelerate``)."""
    import napari_e2enet.inference as inference
    import napari_e2enet.inference.fastpath as fastpath

    assert inference.accelerate is fastpath.accelerate and callable(inference.accelerate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accelerated_forward_follows_the_models_fusion_plan(backend):
    """Rewire one node in the model's plan (x0_2 reads the backbone feature x0_0 instead of x0_1):
    the model and the accelerated forward change together, because both run the plan."""
    import dataclasses

    from napari_e2enet.models.fusion import last_reads

    torch.manual_seed(8)
    model = create_model("e2enet_small", sparsity=0.8, seed=8)
    x = torch.randn(1, 1, 16, 32, 32)
    plan = model.fusion_plan()
    model.decoder.plan = tuple(s if s.key != "x0_2" else dataclasses.replace(s, forward=(0, 0)) for s in plan)
    model.decoder._last_reads = last_reads(model.decoder.plan)
    rewired = _reference(model, x)
    assert float((accelerate(model, backend=backend)(x) - rewired).abs().max()) <= TOL
    model.decoder.plan = plan
    model.decoder._last_reads = last_reads(plan)
    assert float((rewired - _reference(model, x)).abs().max()) > 10 * TOL
