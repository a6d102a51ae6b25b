"""Exact shape arithmetic of the U-Net, in one place (pure: no torch, no I/O), and the one reflect
rule at the volume border (`reflect_index`: the gather, the kernels, padding and training use it).

Along one spatial axis, let `b` be the size of the bottom feature map after its convolutions.
Walking the analysis path back up, every level adds its convolutions' shrinkage and
multiplies by its pooling factor, so the input size is linear in `b`: in = P*b + c_in, with P
the product of the pooling factors. The synthesis path gives out = P*b + c_out the same way.
Hence, per axis:
  * valid input sizes are c_in + P*b and valid output sizes c_out + P*b for b >= b_min,
  * the context (halo) per side is (c_in - c_out) / 2, the same for every valid size,
  * tiles placed at offsets that are multiples of P reproduce a single whole-volume pass
    exactly (the max-pooling phase is the same), so P is the tile grid step.
With same padding c_in = c_out = 0: sizes are multiples of P and the context is 0.

The engine works in (Z, Y, X) for 2D and 3D networks alike: a 2D network sees every z-slice
separately, i.e. its z axis has step 1 and no context; applied along all three planes
(ModelConfig.planes 3) every axis is in-plane for two of them and takes the in-plane rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# The fixed filter bank in front of the network (sparseseg.model.filters): responses per
# channel and scale, and its kernels' truncation (scipy.ndimage's radius rule at 3 sigma).
FILTERS_PER_SIGMA = 8
TRUNCATE = 3.0


def kernel_radius(sigma: float) -> int:
    return int(TRUNCATE * float(sigma) + 0.5)


def bank_context(sigmas) -> int:
    """Voxels per side in y and x the filter bank consumes: the structure tensor's inner scale
    (0.5 sigma) plus its outer one (sigma) is the widest of its responses."""
    return max((kernel_radius(0.5 * s) + kernel_radius(s) for s in sigmas), default=0)


@dataclass(frozen=True)
class AxisRule:
    """in = step*b + c_in, out = step*b + c_out, for integers b >= b_min."""

    step: int
    c_in: int
    c_out: int
    b_min: int

    @property
    def context(self) -> int:
        return (self.c_in - self.c_out) // 2

    @property
    def min_input(self) -> int:
        return self.step * self.b_min + self.c_in

    @property
    def min_output(self) -> int:
        return self.step * self.b_min + self.c_out

    def output_for_input(self, n: int) -> int | None:
        b, r = divmod(n - self.c_in, self.step)
        return None if r or b < self.b_min else n - 2 * self.context

    def input_for_output(self, m: int) -> int | None:
        b, r = divmod(m - self.c_out, self.step)
        return None if r or b < self.b_min else m + 2 * self.context

    def output_at_most(self, m: int) -> int | None:
        """Largest valid output size <= m."""
        b = (m - self.c_out) // self.step
        return None if b < self.b_min else self.step * b + self.c_out

    def output_at_least(self, m: int) -> int:
        """Smallest valid output size >= m."""
        b = max(self.b_min, -((self.c_out - m) // self.step))
        return self.step * b + self.c_out

    def nearest_inputs(self, n: int) -> list[int]:
        """The valid input sizes just below and above n (for error messages)."""
        b = (n - self.c_in) // self.step
        sizes = [self.step * bb + self.c_in for bb in (b, b + 1) if bb >= self.b_min]
        return sizes or [self.min_input]


def axis_rule(kernels: list[int], pools: list[int], valid: bool) -> AxisRule:
    """Shape rule of one axis for per-level kernel sizes (len L) and pool factors (len L-1)."""
    depth = len(kernels)
    shrink = [2 * (k - 1) if valid else 0 for k in kernels]  # two convolutions per level
    # Input: from the bottom back through the analysis path.
    a, c = 1, 0
    for lvl in range(depth - 1, -1, -1):
        c += shrink[lvl]
        if lvl > 0:
            a, c = a * pools[lvl - 1], c * pools[lvl - 1]
    c_in = c
    # Output: from the bottom through the synthesis path.
    a2, c2 = 1, 0
    for lvl in range(depth - 2, -1, -1):
        a2, c2 = a2 * pools[lvl], c2 * pools[lvl] - shrink[lvl]
    assert a == a2, "input and output slopes always match"
    b_min = max(1, -((c2 - 1) // a2))  # out >= 1 implies every synthesis map is >= 1
    return AxisRule(step=a, c_in=c_in, c_out=c2, b_min=b_min)


@dataclass(frozen=True)
class NetGeometry:
    """Shape rules for the engine's (Z, Y, X) axes; stored in checkpoints and engine files."""

    z: AxisRule
    y: AxisRule
    x: AxisRule
    padding: str

    @property
    def axes(self) -> tuple[AxisRule, AxisRule, AxisRule]:
        return (self.z, self.y, self.x)

    @property
    def context(self) -> tuple[int, int, int]:
        return tuple(a.context for a in self.axes)

    @property
    def step(self) -> tuple[int, int, int]:
        return tuple(a.step for a in self.axes)

    @property
    def min_input(self) -> tuple[int, int, int]:
        return tuple(a.min_input for a in self.axes)

    def output_for_input(self, shape) -> tuple[int, int, int] | None:
        out = tuple(a.output_for_input(int(n)) for a, n in zip(self.axes, shape))
        return None if None in out else out

    def input_for_output(self, shape) -> tuple[int, int, int] | None:
        ins = tuple(a.input_for_output(int(n)) for a, n in zip(self.axes, shape))
        return None if None in ins else ins

    def to_dict(self) -> dict:
        d = {name: asdict(rule) for name, rule in zip("zyx", self.axes)}
        d["padding"] = self.padding
        d["context"] = list(self.context)
        d["step"] = list(self.step)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetGeometry:
        return cls(*(AxisRule(**{k: int(v) for k, v in d[n].items()}) for n in "zyx"), padding=d["padding"])


def geometry_of(cfg) -> NetGeometry:
    """NetGeometry of a ModelConfig (see sparseseg.trainer.config)."""
    valid = cfg.padding == "valid"
    rules = []
    for axis in range(cfg.ndim):
        kernels = [k[axis] for k in cfg.kernel_sizes]
        pools = [p[axis] for p in cfg.pool_sizes]
        rules.append(axis_rule(kernels, pools, valid))
    if cfg.ndim == 2:
        rules.insert(0, AxisRule(step=1, c_in=0, c_out=0, b_min=1))
    # A filter bank in front (valid) widens the input in y and x only (in 3D: on every axis,
    # which all-planes networks have anyway): same step and outputs.
    bank = bank_context(getattr(cfg, "filters", ())) if valid else 0
    if bank:
        rules[1:] = [AxisRule(r.step, r.c_in + 2 * bank, r.c_out, r.b_min) for r in rules[1:]]
    # Applied along all three planes, z is an in-plane axis of two of them: it takes their rule.
    if getattr(cfg, "planes", 1) == 3:
        rules[0] = rules[1]
    return NetGeometry(*rules, padding=cfg.padding)


def forward_work(geometry, planes: int, out, shared_bank: int = 0) -> float:
    """Input voxels a forward pass reads for an output block `out` (Z, Y, X): its input block;
    for a 2D network on all three planes, per plane the sections it computes (the output along
    the plane's normal, as SegmentationModel.all_planes crops them) times their in-plane input
    area, which a 3D bank shared by the planes (`shared_bank`: its context) has already cropped.
    A timed pass scales to a whole volume by this ratio, not by input voxels: a small cube's
    halo is most of its input, while each plane computes only its output's sections."""
    ins = [int(o) + 2 * c for o, c in zip(out, geometry.context)]
    if planes != 3:
        return float(np.prod(ins))
    ins = [n - 2 * shared_bank for n in ins]
    return float(sum(int(out[n]) * np.prod([ins[a] for a in range(3) if a != n]) for n in range(3)))


def reflect_index(coords: np.ndarray, n: int) -> np.ndarray:
    """numpy 'reflect' padding as an index map: ... 2 1 | 0 1 2 ... n-1 | n-2 ..."""
    if n == 1:
        return np.zeros_like(coords)
    period = 2 * (n - 1)
    m = np.mod(coords, period)
    return np.where(m >= n, period - m, m)
