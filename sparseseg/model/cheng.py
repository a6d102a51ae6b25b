"""The asymmetric residual encoder-decoder of Cheng & Varshney (ICIP 2017, "Volume segmentation
using convolutional neural networks with limited training data"), 2D and 3D, with their two
tricks for small training sets: factorized convolutions and online feature-level augmentation.

Our reading of the paper (where it is not explicit, the choice follows ENet, which the design
descends from, and pyramidal residual networks, which it cites):
  * Input block: a strided convolution giving (w0 - C) maps concatenated with a max-pooling of
    the C input channels (w0 maps at half resolution).
  * Encoder: pre-activation residual blocks (BN, PReLU, conv, BN, PReLU, conv, spatial dropout
    0.1), each adding 8 feature maps; the shortcut is the identity zero-padded with the new maps.
    A downsampling block opens each further level: its first convolution is strided and its
    shortcut subsamples (average pooling of the stride; with feature augmentation, stochastic
    sub-sampling during training, see below).
  * Decoder: small (the asymmetry): one bottleneck block per level, 1x1 reduction to a quarter,
    a stride-s transposed convolution, 1x1 expansion; its shortcut is a 1x1 convolution followed
    by nearest upsampling. No long skip connections (ENet has none; the input block's pooled
    copy of the image and the residual paths carry the detail).
  * Head: BN, PReLU, 1x1 convolution to the class logits.
Per-level kernel and stride sizes come from the ModelConfig (planned from the voxel size like
the U-Net's), so an anisotropic stack keeps z unpooled where it is coarse. Padding is "same":
the output has the input's size, which must be a multiple of the product of the strides.

Factorized (`factorized=True`): every k x k (x k) convolution producing m maps is replaced by the
concatenation of one-dimensional (rank-1) convolutions along each axis whose kernel is wider
than 1, splitting the m maps as evenly as possible (2D: 1 x k and k x 1, m/2 each; 3D: k x 1 x 1,
1 x k x 1 and 1 x 1 x k, m/3 each). In 3D we keep the three axis-aligned kernels because they are
the direct extension of the 2D rule (each map sees one axis, the block's next convolution mixes
them) and treat the axes symmetrically, which matters for anisotropic stacks where z gets its
own maps; a 3 x 3 x 3 kernel costs 27 weights per input-output pair, the factorized one 3.
Transposed convolutions stay full: a 1D transposed convolution with stride 2 on another axis
would only insert zeros.

Feature augmentation (`feature_augment=True`): in training, the shortcut of a downsampling block
partitions each strided axis into regions of t voxels and keeps t/s of them at random (sorted)
per region and axis, instead of averaging; in eval mode (and so in every exported graph) it is
average pooling of stride s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseseg.model.layers import Conv3d

GROWTH = 8                    # feature maps added by every encoder block
BLOCKS = (3, 5, 6)            # encoder blocks per level after the input block (3D factorized: 0.62 M parameters)
DROPOUT = 0.1


def _nn(ndim: int):
    if ndim == 3:
        return Conv3d, nn.BatchNorm3d, nn.ConvTranspose3d, nn.Dropout3d, nn.MaxPool3d, nn.AvgPool3d
    return nn.Conv2d, nn.BatchNorm2d, nn.ConvTranspose2d, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d


def split_evenly(m: int, parts: int) -> list[int]:
    return [m // parts + (1 if i < m % parts else 0) for i in range(parts)]


class FactorizedConv(nn.Module):
    """Concatenated 1D convolutions replacing one k x k (x k) convolution (same padding)."""

    def __init__(self, ndim: int, c_in: int, c_out: int, kernel, stride, bias: bool = True):
        super().__init__()
        conv = _nn(ndim)[0]
        wide = [a for a, k in enumerate(kernel) if k > 1]
        sizes = split_evenly(c_out, len(wide))
        self.branches = nn.ModuleList()
        for a, m in zip(wide, sizes):
            k = tuple(kernel[a] if i == a else 1 for i in range(ndim))
            self.branches.append(conv(c_in, m, k, stride=stride, padding=tuple(v // 2 for v in k), bias=bias))

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


def make_conv(ndim: int, c_in: int, c_out: int, kernel, stride=1, factorized: bool = False, bias: bool = True):
    kernel = tuple(int(k) for k in kernel)
    stride = tuple(int(s) for s in stride) if isinstance(stride, (tuple, list)) else (int(stride),) * ndim
    if factorized and sum(k > 1 for k in kernel) > 1:
        return FactorizedConv(ndim, c_in, c_out, kernel, stride, bias)
    return _nn(ndim)[0](c_in, c_out, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=bias)


def stochastic_subsample(x: torch.Tensor, stride, t: int) -> torch.Tensor:
    """Keep t/s random positions (in order) of every region of t voxels along each strided axis;
    a shorter last region keeps its length/s. Sizes must be multiples of the strides."""
    for axis, s in enumerate(stride):
        if s == 1:
            continue
        dim = axis + 2
        n = x.shape[dim]
        idx = []
        for start in range(0, n, t):
            length = min(t, n - start)
            pick = torch.randperm(length, device=x.device)[: length // s].sort().values
            idx.append(pick + start)
        x = x.index_select(dim, torch.cat(idx))
    return x


def pad_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    """Zero-pad the channel axis to c maps (the pyramidal residual shortcut)."""
    extra = c - x.shape[1]
    if extra <= 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra))


class InputBlock(nn.Module):
    def __init__(self, ndim, c_in, width, kernel, stride, factorized):
        super().__init__()
        if width <= c_in:
            raise ValueError(f"width {width} must exceed the {c_in} input channels")
        self.conv = make_conv(ndim, c_in, width - c_in, kernel, stride, factorized)
        self.pool = _nn(ndim)[4](tuple(stride), stride=tuple(stride))

    def forward(self, x):
        return torch.cat([self.conv(x), self.pool(x)], dim=1)


class ResidualBlock(nn.Module):
    """Pre-activation residual block c -> c + GROWTH; strided (downsampling) when stride > 1."""

    def __init__(self, ndim, c, kernel, stride, factorized, feature_augment=False, t=4):
        super().__init__()
        _, bn, _, drop, _, avg = _nn(ndim)
        out = c + GROWTH
        self.out = out
        self.stride = tuple(stride)
        self.down = any(s > 1 for s in self.stride)
        self.body = nn.Sequential(
            bn(c), nn.PReLU(c), make_conv(ndim, c, out, kernel, self.stride, factorized, bias=False),
            bn(out), nn.PReLU(out), make_conv(ndim, out, out, kernel, 1, factorized), drop(DROPOUT))
        self.pool = avg(self.stride, stride=self.stride) if self.down else None
        self.feature_augment = feature_augment and self.down
        self.t = t

    def shortcut(self, x):
        if not self.down:
            return x
        if self.feature_augment and self.training:
            return stochastic_subsample(x, self.stride, self.t)
        return self.pool(x)

    def forward(self, x):
        return self.body(x) + pad_channels(self.shortcut(x), self.out)


class UpBlock(nn.Module):
    """Bottleneck decoder block c -> c_out, upsampling by `stride` with a transposed convolution."""

    def __init__(self, ndim, c, c_out, stride):
        super().__init__()
        conv, bn, tconv, drop, _, _ = _nn(ndim)
        mid = max(c // 4, 4)
        k = tuple(2 * s - 1 for s in stride)
        self.body = nn.Sequential(
            bn(c), nn.PReLU(c), conv(c, mid, 1, bias=False),
            bn(mid), nn.PReLU(mid),
            tconv(mid, mid, k, stride=tuple(stride), padding=tuple(s - 1 for s in stride),
                  output_padding=tuple(s - 1 for s in stride), bias=False),
            bn(mid), nn.PReLU(mid), conv(mid, c_out, 1), drop(DROPOUT))
        self.skip = conv(c, c_out, 1, bias=False)
        self.scale = tuple(float(s) for s in stride)

    def forward(self, x):
        s = self.skip(x)
        if any(v > 1 for v in self.scale):
            s = F.interpolate(s, scale_factor=self.scale, mode="nearest")
        return self.body(x) + s


class ChengNet(nn.Module):
    """(N, C, ...) -> logits of the same spatial size (see the module docstring)."""

    def __init__(self, cfg):
        super().__init__()
        nd, f = cfg.ndim, cfg.factorized
        if cfg.depth != len(BLOCKS) + 1:
            raise ValueError(f"the Cheng network has {len(BLOCKS) + 1} levels, got depth {cfg.depth}")
        self.input = InputBlock(nd, cfg.in_channels, cfg.base_width, cfg.kernel_sizes[0], cfg.pool_sizes[0], f)
        c = cfg.base_width
        blocks, level_widths = [], []
        for lvl, n in enumerate(BLOCKS, start=1):
            for i in range(n):
                # The first block of levels 2, 3 downsamples (level 1 was reached by the input block).
                stride = cfg.pool_sizes[lvl - 1] if (i == 0 and lvl > 1) else (1,) * nd
                blocks.append(ResidualBlock(nd, c, cfg.kernel_sizes[lvl], stride, f, cfg.feature_augment,
                                            cfg.feature_augment_t))
                c += GROWTH
            level_widths.append(c)
        self.encoder = nn.Sequential(*blocks)
        # Back up through levels 2, 1 (to the encoder's width there) and 0 (to the input block's).
        targets = level_widths[-2::-1] + [cfg.base_width]
        ups = []
        for lvl, c_out in zip(range(len(BLOCKS) - 1, -1, -1), targets):
            ups.append(UpBlock(nd, c, c_out, cfg.pool_sizes[lvl]))
            c = c_out
        self.decoder = nn.Sequential(*ups)
        bn = _nn(nd)[1]
        self.head = nn.Sequential(bn(c), nn.PReLU(c), _nn(nd)[0](c, cfg.num_classes, 1))

    def forward(self, x):
        return self.head(self.decoder(self.encoder(self.input(x))))
