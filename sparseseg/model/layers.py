"""Conv3d that runs fast on CPU for the thin, single-patch inputs of sparse training.

Why: for a batch of one, PyTorch picks its slow im2col kernel (`slow_conv3d`) instead of oneDNN
whenever channels x depth x height of the input is at most 20480 (a heuristic tuned for 2D
images). One-section training patches (5 sections deep) fall there at every level: on ISBI
defaults slow_conv3d and its backward took ~70% of a training step. A 3D convolution is the sum
over its kernel's depth of 2D convolutions over the input with depth folded into the batch, and
those run through oneDNN: forward + backward 1.1-10x faster per layer on those shapes (most
4-10x; one thread, 2-core VM with another run beside it, 2026-11-24), with equal results (to
float rounding for depth > 1). Where PyTorch already uses oneDNN the plain 3D convolution is faster, so it stays; so does every case this rewrite does not cover
(strides, dilation, groups, other devices, ONNX export and tracing: the graph keeps plain Conv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SLOW_CONV3D_LIMIT = 20480        # PyTorch's bound (ConvParams::use_mkldnn): C*Z*Y at batch 1


def conv3d_as_2d(x: torch.Tensor, weight: torch.Tensor, bias, padding) -> torch.Tensor:
    """F.conv3d(x, weight, bias, padding=padding) (stride 1, no dilation, one group) as kz 2D
    convolutions with depth folded into the batch."""
    pz, py, px = padding
    if pz:
        x = F.pad(x, (0, 0, 0, 0, pz, pz))
    n, c, d, h, w = x.shape
    depth = d - weight.shape[2] + 1
    out = None
    for dz in range(weight.shape[2]):
        plane = x[:, :, dz:dz + depth].transpose(1, 2).reshape(n * depth, c, h, w)
        y = F.conv2d(plane, weight[:, :, dz], bias if dz == 0 else None, padding=(py, px))
        out = y if out is None else out + y
    return out.reshape(n, depth, *out.shape[1:]).transpose(1, 2).contiguous()


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or \
        torch.compiler.is_compiling()


class Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters and state dict), computed as 2D convolutions on CPU where
    PyTorch would run its slow kernel (see the module docstring)."""

    def _conv_forward(self, x, weight, bias):
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1
                and x.shape[1] * x.shape[2] * x.shape[3] <= SLOW_CONV3D_LIMIT
                and not (weight.shape[3] > 3 and weight.shape[4] > 3)
                and self.stride == (1, 1, 1) and self.dilation == (1, 1, 1) and self.groups == 1
                and self.padding_mode == "zeros" and not isinstance(self.padding, str) and not _exporting()):
            return conv3d_as_2d(x, weight, bias, self.padding)
        return super()._conv_forward(x, weight, bias)
