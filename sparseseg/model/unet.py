"""The U-Net of Cicek et al. 2016, configurable (2D/3D, valid/same, width, depth, per-level
kernels and pooling), and the wrapper that makes it a self-contained segmentation model.

Per level: two convolutions, each followed by optional BatchNorm and ReLU, the first giving
base*2^l maps and the second doubling them *before* pooling (32 -> 64, 64 -> 128, ...). The
synthesis path up-convolves (kernel = stride = the pooling factor, channels kept), concatenates
the centre-cropped skip of equal resolution, and applies two convolutions; a final 1x1(x1)
convolution gives the class logits.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseseg.model.config import ModelConfig
from sparseseg.model.layers import Conv3d


def _layers(ndim: int):
    if ndim == 3:
        return Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d
    return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d


class ConvBlock(nn.Sequential):
    def __init__(self, cfg: ModelConfig, c_in: int, c_mid: int, c_out: int, kernel: tuple):
        conv, bn, _, _ = _layers(cfg.ndim)
        pad = tuple(k // 2 for k in kernel) if cfg.padding == "same" else 0
        layers = []
        for a, b in ((c_in, c_mid), (c_mid, c_out)):
            layers.append(conv(a, b, kernel, padding=pad))
            if cfg.batchnorm:
                layers.append(bn(b))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def center_crop(t: torch.Tensor, shape) -> torch.Tensor:
    """Crop the spatial dims of t to `shape`, centred (valid-padding skip connections)."""
    idx = [slice(None), slice(None)]
    for have, want in zip(t.shape[2:], shape):
        start = (have - want) // 2
        idx.append(slice(start, start + want))
    return t[tuple(idx)]


class UNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        conv, _, pool, up = _layers(cfg.ndim)
        w = [cfg.base_width * 2 ** lvl for lvl in range(cfg.depth + 1)]
        self.down = nn.ModuleList()
        self.pools = nn.ModuleList()
        c = cfg.in_channels
        for lvl in range(cfg.depth):
            self.down.append(ConvBlock(cfg, c, w[lvl], w[lvl + 1], cfg.kernel_sizes[lvl]))
            c = w[lvl + 1]
            if lvl < cfg.depth - 1:
                self.pools.append(pool(cfg.pool_sizes[lvl], stride=cfg.pool_sizes[lvl]))
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for lvl in range(cfg.depth - 2, -1, -1):
            p = cfg.pool_sizes[lvl]
            # No bias: a convolution follows at once (and the paper's 19,069,955 count has none).
            self.ups.append(up(c, c, p, stride=p, bias=False))
            skip = w[lvl + 1]
            self.up_blocks.append(ConvBlock(cfg, c + skip, skip, skip, cfg.kernel_sizes[lvl]))
            c = skip
        self.head = conv(c, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for lvl, block in enumerate(self.down):
            x = block(x)
            if lvl < len(self.pools):
                skips.append(x)
                x = self.pools[lvl](x)
        for up, block in zip(self.ups, self.up_blocks):
            x = up(x)
            skip = skips.pop()
            x = block(torch.cat([center_crop(skip, x.shape[2:]), x], dim=1))
        return self.head(x)
