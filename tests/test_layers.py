import pytest
import torch
import torch.nn.functional as F

from sparseseg.model import layers
from sparseseg.model.layers import Conv3d


@pytest.mark.parametrize("kernel,padding", [((1, 3, 3), 0), ((3, 3, 3), 0), ((3, 3, 3), 1), ((1, 3, 3), (0, 1, 1)),
                                            ((1, 1, 1), 0)])
def test_conv3d_as_2d_equals_conv3d_and_is_taken_on_thin_cpu_inputs(monkeypatch, kernel, padding):
    """The CPU rewrite (depth folded into the batch of 2D convolutions) gives conv3d's output
    and gradients, and is what runs for a batch-of-one thin patch."""
    calls = []
    real = layers.conv3d_as_2d
    monkeypatch.setattr(layers, "conv3d_as_2d", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv = Conv3d(6, 5, kernel, padding=padding)
    x = torch.randn(1, 6, 7, 19, 23, requires_grad=True)
    y = conv(x)
    ref = F.conv3d(x, conv.weight, conv.bias, padding=conv.padding)
    assert calls and y.shape == ref.shape and torch.allclose(y, ref, atol=1e-5)
    g = torch.autograd.grad(y.square().sum(), [x, conv.weight, conv.bias])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, conv.weight, conv.bias])
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv3d_keeps_torchs_kernel_where_it_is_fast_and_in_exports(monkeypatch):
    monkeypatch.setattr(layers, "conv3d_as_2d", lambda *a: pytest.fail("rewrite taken"))
    conv = Conv3d(4, 4, 3)
    conv(torch.randn(2, 4, 5, 12, 12))                       # batch > 1: oneDNN already
    conv(torch.randn(1, 4, 40, 200, 12))                     # C*Z*Y > 20480: oneDNN already
    Conv3d(4, 4, 3, stride=2)(torch.randn(1, 4, 5, 12, 12))  # strided: not covered
    torch.jit.trace(conv, torch.randn(1, 4, 5, 12, 12), check_trace=False)   # the ONNX export traces plain Conv
