"""Base networks and meta-network as one module, so the meta-model runs as one engine file.

Inside a tile the composed module runs the 3D base network and the 2D base network along each
of its planes, averages their softmax probabilities over the meta-network's input window,
concatenates them to the image and applies the meta-network. The engine sees one network with
one NetGeometry; the shape arithmetic below makes its tiles reproduce the separate pipeline
(base networks through the engine over the whole volume, then the meta-network over the image
and their averaged probabilities) exactly, away from the volume border.

Per axis (pure integer arithmetic, see `axis_plan`):
  * the meta-network has context m; the composed output window [s, s + n) needs base
    probabilities over [s - m, s + n + m);
  * a base network of pooling step P computes its outputs from `lead` = ceil(m / P) * P before s,
    so its pooling phase is the one a whole-volume pass has (s is a multiple of the composed
    step, the lcm of every step), and as far right as its next valid output size reaches;
  * the composed context is the largest reach of any part; valid output sizes are the
    meta-network's smallest valid output plus multiples of the composed step, and for those
    every crop is a constant offset from each end of its tensor (so dynamic ONNX axes work).

Near the volume border the two pipelines differ: there the meta-network's context reaches
outside the volume, where the separate pipeline reflects the probability maps and the composed
module computes base probabilities from the reflected image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparseseg.model.shapes import AxisRule, NetGeometry
from sparseseg.selftrain.planes import PLANES, inverse


@dataclass(frozen=True)
class AxisPlan:
    rule: AxisRule               # the composed module's rule on this axis
    meta_crop: tuple             # (left, right) trim of the composed input -> the meta image window
    inputs: tuple                # per base part: (left, right) trim of the composed input
    outputs: tuple               # per base part: (left, right) trim of its output -> the meta window


def axis_plan(meta: AxisRule, parts) -> AxisPlan:
    """Composed rule and crops along one axis for the meta rule and the base parts' rules."""
    step = math.lcm(meta.step, *(r.step for r in parts))
    m, out0 = meta.context, meta.min_output
    leads = [-(-m // r.step) * r.step for r in parts]

    def reach(out):
        sizes = [r.output_at_least(out + m + lead) for r, lead in zip(parts, leads)]
        left = [lead + r.context for r, lead in zip(parts, leads)]
        right = [size - lead + r.context - out for r, size, lead in zip(parts, sizes, leads)]
        return sizes, left, right

    sizes, left, right = reach(out0)
    assert reach(out0 + step)[2] == right and reach(out0 + 2 * step)[2] == right, "crops are periodic"
    context = max([m] + left + right)
    rule = AxisRule(step=step, c_in=out0 - step + 2 * context, c_out=out0 - step, b_min=1)
    inputs = tuple((context - lft, context - rgt) for lft, rgt in zip(left, right))
    outputs = tuple((lead - m, size - (lead - m) - (out0 + 2 * m)) for size, lead in zip(sizes, leads))
    return AxisPlan(rule, (context - m, context - m), inputs, outputs)


def _crop(t: torch.Tensor, trims) -> torch.Tensor:
    """Trim (left, right) voxels from each spatial axis of (N, C, Z, Y, X)."""
    idx = [slice(None), slice(None)]
    for axis, (a, b) in enumerate(trims):
        idx.append(slice(a, t.shape[2 + axis] - b))
    return t[tuple(idx)]


def _to_view(t: torch.Tensor, plane: str) -> torch.Tensor:
    return t.permute(0, 1, *(2 + a for a in PLANES[plane]))


def _from_view(t: torch.Tensor, plane: str) -> torch.Tensor:
    return t.permute(0, 1, *(2 + a for a in inverse(plane)))


class ComposedConfig:
    """What the engine and export read of a model's `cfg`: channels, classes, ndim, geometry
    and a `to_dict` (the 3D base network's configuration: the engine's tile-memory estimate
    measures that network, the largest part run at once)."""

    def __init__(self, base_cfg, geometry: NetGeometry):
        self.base_cfg, self._geometry = base_cfg, geometry
        self.in_channels, self.num_classes, self.ndim = base_cfg.in_channels, base_cfg.num_classes, 3
        self.arch, self.padding = "selftrain-meta", geometry.padding

    @property
    def geometry(self) -> NetGeometry:
        return self._geometry

    def to_dict(self) -> dict:
        return self.base_cfg.to_dict()


class ComposedMeta(nn.Module):
    """Raw intensities (N, C, Z, Y, X) -> meta-network logits (N, K, Z', Y', X')."""

    def __init__(self, base3d, base2d, planes, meta):
        super().__init__()
        self.base3d, self.base2d, self.meta = base3d, base2d, meta
        self.planes = list(planes)
        names = ["3d"] + [f"2d-{p}" for p in self.planes]
        geoms = [base3d.cfg.geometry] + [base2d.cfg.geometry] * len(self.planes)
        plans = []
        for axis in range(3):
            parts = [geoms[0].axes[axis]] + [base2d.cfg.geometry.axes[PLANES[p].index(axis)] for p in self.planes]
            plans.append(axis_plan(meta.cfg.geometry.axes[axis], parts))
        self.plans = plans
        self.part_names = names
        padding = "valid" if any(p.rule.context for p in plans) else "same"
        self.cfg = ComposedConfig(base3d.cfg, NetGeometry(*(p.rule for p in plans), padding=padding))

    @property
    def normalization(self) -> dict:
        """Each part normalizes inside itself: from outside the module takes raw intensities."""
        return self.base3d.normalization

    def to(self, *args, **kwargs):
        """As nn.Module.to, but a 3D memory format (the engine's torch backend on CUDA asks for
        channels_last_3d) goes to the 3D parts only: torch refuses it for the 2D network's 4D
        weights."""
        fmt = kwargs.pop("memory_format", None)
        super().to(*args, **kwargs)
        if fmt is not None:
            self.base3d.to(memory_format=fmt)
            self.meta.to(memory_format=fmt)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for i, name in enumerate(self.part_names):
            xin = _crop(x, [p.inputs[i] for p in self.plans])
            if name == "3d":
                logits = self.base3d(xin)
            else:
                plane = name[3:]
                logits = _from_view(self.base2d(_to_view(xin, plane).contiguous()), plane)
            prob = torch.softmax(_crop(logits, [p.outputs[i] for p in self.plans]), dim=1)
            total = prob if total is None else total + prob
        image = _crop(x, [p.meta_crop for p in self.plans])
        return self.meta(torch.cat([image, total / len(self.part_names)], dim=1))
