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
