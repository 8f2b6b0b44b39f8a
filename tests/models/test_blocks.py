import pytest
import torch

from napari_e2enet.models.blocks import ConvUnit, depth_shift


def reference_shift(x: torch.Tensor) -> torch.Tensor:
    """Slice by slice, straight from the spec: group 0 <- d+1, group 1 <- d, group 2 <- d-1."""
    _, c, d, _, _ = x.shape
    if c < 3:
        return x.clone()
    groups = torch.tensor_split(torch.arange(c), 3)
    out = torch.zeros_like(x)
    for offset, channels in zip((+1, 0, -1), groups):
        for z in range(d):
            src = z + offset
            if 0 <= src < d:
                out[:, channels, z] = x[:, channels, src]
    return out


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 7, 48])
@pytest.mark.parametrize("depth", [1, 2, 5])
def test_depth_shift_matches_slice_by_slice_reference(channels, depth):
    x = torch.randn(2, channels, depth, 3, 4)
    torch.testing.assert_close(depth_shift(x), reference_shift(x), rtol=0, atol=0)


def test_depth_shift_has_no_wraparound_and_keeps_channels_last():
    x = torch.ones(1, 6, 4, 2, 2).contiguous(memory_format=torch.channels_last_3d)
    y = depth_shift(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert y[0, :2, -1].abs().sum() == 0  # group 0 reads beyond the last slice -> zero
    assert y[0, 4:, 0].abs().sum() == 0  # group 2 reads before the first slice -> zero
    assert (y[0, 2:4] == 1).all()


def test_depth_shift_gradient_is_the_reverse_shift():
    x = torch.randn(1, 5, 4, 2, 2, requires_grad=True)
    g = torch.randn(1, 5, 4, 2, 2)
    depth_shift(x).backward(g)
    torch.testing.assert_close((depth_shift(x) * g).sum(), (x * x.grad).sum())


def test_conv_unit_strided_anisotropic_shape():
    unit = ConvUnit(3, 5, (1, 3, 3), (1, 2, 2))
    assert unit(torch.randn(2, 3, 4, 8, 6)).shape == (2, 5, 4, 4, 3)


def _graph_names(t: torch.Tensor) -> set[str]:
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 6), (5, 3, 4, 6)], ids=["batched", "unbatched"])
def test_instance_norm_equals_torch_and_leaves_no_gradient_copy(shape):
    """The unit's norm is nn.InstanceNorm3d's function (values and gradients of input and affine
    parameters), but an in-place LeakyReLU after it records no CopySlices (a full gradient copy)."""
    from napari_e2enet.models.blocks import InstanceNorm3d

    gen = torch.Generator().manual_seed(3)
    ours, ref = InstanceNorm3d(5, eps=1e-5, affine=True), torch.nn.InstanceNorm3d(5, eps=1e-5, affine=True)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            p.copy_(torch.randn(p.shape, generator=gen))
            q.copy_(p)
    x0, g = torch.randn(shape, generator=gen) * 3 + 1, torch.randn(shape, generator=gen)
    outs = []
    for norm in (ours, ref):
        x = x0.clone().requires_grad_()
        y = torch.nn.functional.leaky_relu(norm(x * 1.0), 0.01, inplace=True)
        names = _graph_names(y)
        y.backward(g)
        outs.append((y.detach(), x.grad, norm.weight.grad, norm.bias.grad, names))
    for a, b in zip(outs[0][:4], outs[1][:4], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    if len(shape) == 5:  # an unbatched input takes nn.InstanceNorm3d's own path
        assert "CopySlices" in outs[1][4]  # what nn.InstanceNorm3d + in-place activation records
        assert "CopySlices" not in outs[0][4]
    ours.eval()
    assert torch.allclose(ours(x0), ref.eval()(x0), atol=1e-5)  # instance statistics in eval too


def test_instance_norm_refuses_one_voxel_in_training_as_torch_does():
    from napari_e2enet.models.blocks import InstanceNorm3d

    norm = InstanceNorm3d(3, affine=True)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        norm(torch.randn(2, 3, 1, 1, 1))
    assert norm.eval()(torch.randn(2, 3, 1, 1, 1)).shape == (2, 3, 1, 1, 1)
