"""The self-contained segmentation model: normalization buffers around the network that the
configuration names. Every artifact (checkpoint, ONNX graph, engine) wraps this module."""

from __future__ import annotations

import torch
from torch import nn

from sparseseg.model import normalization as norm
from sparseseg.model.cheng import ChengNet
from sparseseg.model.config import ModelConfig
from sparseseg.model.filters import FilterBank
from sparseseg.model.unet import UNet
from sparseseg.model.volume_filters import VolumeFilterBank

# plane -> order of the (Z, Y, X) axes that puts the plane's normal first (its sections along z).
PLANES = {"xy": (0, 1, 2), "xz": (1, 0, 2), "yz": (2, 0, 1)}


def build_net(cfg: ModelConfig) -> nn.Module:
    """The bare network (N, C, ...) -> logits for a configuration."""
    if cfg.arch == "cheng":
        return ChengNet(cfg)
    return UNet(cfg)


class SegmentationModel(nn.Module):
    """Raw intensities (N, C, Z, Y, X) -> logits (N, K, Z', Y', X').

    Normalization lives in buffers, so a checkpoint or an exported graph needs nothing else. A
    2D network is applied to every z-slice (z folded into the batch), so callers always speak
    5D and the engine treats 2D and 3D networks alike. With `cfg.planes` 3 the 2D network runs
    on the sections of all three planes and the output is the log of their mean probability
    (`forward`); `sections` is the xy pass alone, which is what training patches need. A 3D
    filter bank (`cfg.filter_dims` 3) runs once on the block and the planes share its responses;
    `apply_net` is the network after it, which trains on responses computed once per volume.
    """

    def __init__(self, cfg: ModelConfig, mean=None, std=None, normalization: str = "global", percentiles=None):
        super().__init__()
        self.cfg = cfg
        self.filters = None
        if cfg.filters:
            from dataclasses import replace

            bank = VolumeFilterBank if cfg.filter_dims == 3 else FilterBank
            self.filters = bank(cfg.in_channels, cfg.filters, cfg.padding)
            self.net = build_net(replace(cfg, in_channels=self.filters.out_channels, filters=(), filter_dims=2))
        else:
            self.net = build_net(cfg)
        c = cfg.in_channels
        # "volume"/"percentile" keep an identity here: the caller normalizes each input volume
        # with its own statistics (see model.normalization), which one graph cannot know.
        spec = norm.spec(normalization, mean, std, percentiles, channels=c)
        self.normalization_mode, self.percentiles = spec["mode"], spec["percentiles"]
        self.register_buffer("mean", torch.as_tensor(spec["mean"], dtype=torch.float32).reshape(c))
        self.register_buffer("std", torch.as_tensor(spec["std"], dtype=torch.float32).reshape(c))

    @property
    def normalization(self) -> dict:
        """The contract field: {"mode", "in_graph", "mean", "std", "percentiles"}."""
        return norm.spec(self.normalization_mode, self.mean.tolist(), self.std.tolist(), self.percentiles,
                         self.cfg.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.planes == 3:
            return self.all_planes(x)
        return self.sections(x)

    def sections(self, x: torch.Tensor) -> torch.Tensor:
        """The network on every z-section (2D) or on the volume (3D)."""
        return self.apply_net(self.prepare(x))

    def all_planes(self, x: torch.Tensor) -> torch.Tensor:
        """log of the mean softmax of the xy, xz and yz passes over the output window they share.
        Each pass first drops the sections along its normal that only the other passes need, so
        no section is computed for nothing; log-probabilities keep argmax and softmax exact."""
        context = self.cfg.geometry.context
        shared = self.filters is not None and self.filters.dims == 3
        if shared:       # the 3D bank's responses, computed once for the three planes
            x = self.prepare(x)
            used = 0 if self.filters.same else self.filters.context
            context = tuple(c - used for c in context)
        mean = None
        for order in PLANES.values():
            view = x.permute(0, 1, *(2 + a for a in order))
            c = context[order[0]]
            view = view[:, :, c:view.shape[2] - c] if c else view
            y = self.apply_net(view) if shared else self.sections(view)
            back = [order.index(a) for a in range(3)]
            p = torch.softmax(y.float(), dim=1).permute(0, 1, *(2 + a for a in back))
            mean = p if mean is None else mean + p
        return torch.log(mean / len(PLANES))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input: normalized intensities, or the filter bank's responses to them."""
        x = self.normalize(x)
        return x if self.filters is None else self.filters(x)

    def apply_net(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.ndim == 3:
            return self.net(x)
        n, c, z, h, w = x.shape
        y = self.net(x.permute(0, 2, 1, 3, 4).reshape(n * z, c, h, w))
        return y.reshape(n, z, y.shape[1], y.shape[2], y.shape[3]).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def calibrate_filters(self, x: torch.Tensor) -> None:
        """Fit the filter bank's response z-scores on (N, C, Z, Y, X) training input (raw, as
        forward takes it; per-volume normalization already applied where the mode needs it)."""
        if self.filters is not None:
            self.filters.calibrate(self.normalize(x))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
