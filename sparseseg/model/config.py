"""Network configuration: frozen dataclasses, parsed once at the edge (CLI) and
saved into every artifact as plain JSON-able dicts.

Presets plan per-level kernel and pooling sizes from the voxel size (nnU-Net's rule: an axis
whose spacing is more than twice the finest one gets kernel 1 and is not pooled until pooling
the others has caught up), then from the volume's shape (an axis too short for the network's
smallest valid input loses pooling, then 3-wide kernels, from the top level down), so a
20-section EM stack of 1024x1024 trains with `--preset small` and no extra flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from sparseseg.errors import SparsesegError
from sparseseg.model.shapes import axis_rule, geometry_of

PRESETS = {
    # Cicek et al. 2016: four resolution levels, 32 -> 512 channels, BatchNorm before ReLU.
    # "section_input": the in-plane input of a one-section-deep training patch (a 3D network with
    # labels on separate sections, and every 2D network; sparseseg.trainer.config): wider, as the
    # patch is shallow. small: measured (ISBI,
    # VNC, benchmarks/results/real_data_runs.jsonl, tags s5-*-thin); paper: scaled alike, unmeasured.
    "paper": {"base_width": 32, "depth": 4, "batchnorm": True, "patch_input": (116, 132, 132),
              "section_input": (188, 188)},
    # Trains on 2 CPU cores in minutes: three levels, 16 -> 128 channels.
    "small": {"base_width": 16, "depth": 3, "batchnorm": True, "patch_input": (60, 92, 92),
              "section_input": (132, 132)},
}


ARCHS = ("unet", "cheng")
CHENG_DEPTH = 4        # input block + three encoder levels (sparseseg.model.cheng.BLOCKS)
CHENG_WIDTH = 16       # maps after the input block (ENet's 16)
# ilastik's default scales, as the incumbent forest uses them (benchmarks/baselines/forest.py).
ILASTIK_SIGMAS = (0.7, 1.0, 1.6, 3.5, 5.0)
# Sections a one-section training patch may read on a thin z axis (two on each side): the
# network then sees its neighbours in z, at a cost of about three 2D passes per patch.
SECTION_INPUT = 5


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int
    num_classes: int
    ndim: int = 3
    base_width: int = 32
    depth: int = 4
    # Per level (depth entries), per network axis ((z,) y, x): convolution kernel sizes (odd).
    kernel_sizes: tuple = ()
    # Per pooling step (depth - 1 entries), per axis: max-pool / up-convolution factors.
    pool_sizes: tuple = ()
    padding: str = "valid"
    batchnorm: bool = False
    # "unet" (Cicek 2016) or "cheng" (Cheng & Varshney 2017, sparseseg.model.cheng: always
    # same padding, BatchNorm, depth 4); the last three fields apply to "cheng" only.
    arch: str = "unet"
    factorized: bool = False
    feature_augment: bool = False
    feature_augment_t: int = 4
    # Scales (sigmas, voxels) of the fixed in-plane filter bank in front of the network
    # (sparseseg.model.filters); () for none: the network sees the normalized image.
    filters: tuple = ()
    # 2: the bank filters each section (in-plane); 3: the whole volume (sparseseg.model.
    # volume_filters), for a 2D network on all three planes, which then share its responses.
    filter_dims: int = 2
    # 2D networks: 1 = applied to every xy section; 3 = applied to the xy, xz and yz sections and
    # their probabilities averaged (labels on orthogonal planes; sparseseg.model.network).
    planes: int = 1

    def __post_init__(self):
        if not self.kernel_sizes:
            object.__setattr__(self, "kernel_sizes", ((3,) * self.ndim,) * self.depth)
        if not self.pool_sizes:
            object.__setattr__(self, "pool_sizes", ((2,) * self.ndim,) * (self.depth - 1))
        object.__setattr__(self, "kernel_sizes", tuple(tuple(int(v) for v in k) for k in self.kernel_sizes))
        object.__setattr__(self, "pool_sizes", tuple(tuple(int(v) for v in p) for p in self.pool_sizes))
        object.__setattr__(self, "filters", tuple(float(v) for v in self.filters))
        if any(not 0 < v <= 32 for v in self.filters) or len(set(self.filters)) != len(self.filters):
            raise SparsesegError(f"--filters must be distinct scales in (0, 32], got {list(self.filters)}")
        if self.ndim not in (2, 3):
            raise SparsesegError(f"ndim must be 2 or 3, got {self.ndim}")
        if self.padding not in ("valid", "same"):
            raise SparsesegError(f"padding must be 'valid' or 'same', got {self.padding!r}")
        if self.depth < 1 or len(self.kernel_sizes) != self.depth or len(self.pool_sizes) != self.depth - 1:
            raise SparsesegError("need one kernel size per level and one pool size per level but the last")
        for k in self.kernel_sizes + self.pool_sizes:
            if len(k) != self.ndim:
                raise SparsesegError(f"kernel/pool sizes must have {self.ndim} entries, got {k}")
        if any(v % 2 == 0 or v < 1 for k in self.kernel_sizes for v in k):
            raise SparsesegError("kernel sizes must be odd and positive")
        if self.planes not in (1, 3) or (self.planes == 3 and self.ndim != 2):
            raise SparsesegError(f"planes must be 1, or 3 for a 2D network, got {self.planes} (ndim {self.ndim})")
        if self.planes == 3 and any(len(set(k)) > 1 for k in self.kernel_sizes + self.pool_sizes):
            raise SparsesegError("a 2D network applied in three planes needs the same kernels and pooling on both "
                                 "of its axes (isotropic voxels)")
        if self.filter_dims not in (2, 3) or (self.filter_dims == 3 and self.planes != 3):
            raise SparsesegError(f"3D filters (--filter-dims 3) apply to a 2D network on all three planes "
                                 f"(--planes all), got --filter-dims {self.filter_dims} with planes {self.planes}")
        if self.in_channels < 1 or self.num_classes < 2:
            raise SparsesegError("need at least 1 input channel and 2 classes")
        self._check_arch()

    def _check_arch(self):
        if self.arch not in ARCHS:
            raise SparsesegError(f"unknown --arch {self.arch!r} (choose from {', '.join(ARCHS)})")
        if self.filters and self.arch != "unet":
            raise SparsesegError(f"--filters applies to --arch unet only, not {self.arch}")
        if self.arch != "cheng":
            for flag, on in (("--factorized", self.factorized), ("--feature-augment", self.feature_augment)):
                if on:
                    raise SparsesegError(f"{flag} applies to --arch cheng only (the {self.arch} has no such layers)")
            return
        if self.padding != "same":
            raise SparsesegError("--arch cheng pads its convolutions (padding 'same')")
        if self.depth != CHENG_DEPTH:
            raise SparsesegError(f"--arch cheng has {CHENG_DEPTH} resolution levels, got --depth {self.depth}")
        if self.base_width <= self.in_channels:
            raise SparsesegError(f"--arch cheng needs --base-width above the {self.in_channels} input channels")
        strides = {v for p in self.pool_sizes for v in p if v > 1}
        t = self.feature_augment_t
        if self.feature_augment and (t < 2 or any(t % s for s in strides)):
            raise SparsesegError(f"--feature-augment-t must be a multiple of every stride {sorted(strides)}, got {t}")

    @property
    def geometry(self):
        return geometry_of(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernel_sizes"] = [list(k) for k in self.kernel_sizes]
        d["pool_sizes"] = [list(p) for p in self.pool_sizes]
        d["filters"] = list(self.filters)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _plan_levels(depth: int, spacing: tuple[float, ...]) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net-style per-level kernels and pools from a (relative) voxel spacing."""
    s = list(spacing)
    kernels, pools = [], []
    for lvl in range(depth):
        finest = min(s)
        kernels.append([3 if v <= 2 * finest else 1 for v in s])
        if lvl < depth - 1:
            p = [2 if v <= 2 * finest else 1 for v in s]
            pools.append(p)
            s = [v * f for v, f in zip(s, p)]
    return kernels, pools


def _fit_shape(kernels, pools, valid: bool, sizes, z_limit: int | None = None) -> None:
    """Shrink the network along each *thin* axis (under half the longest one, like the z of a
    20-section EM stack) until its smallest valid input fits half that axis (so a training
    patch still has room to move); in place. Drops pooling first, then 3-wide kernels, from the
    top level down: the fine levels of a thin axis are the least useful there. Axes that are not
    thin keep the preset's network: a volume that is simply too small is reported, not
    silently given a degenerate network. `z_limit` tightens the bound on a thin first axis."""
    longest = max(sizes)
    for axis, size in enumerate(sizes):
        if size * 2 > longest:
            continue
        limit = max(1, size // 2)
        if axis == 0 and z_limit and len(sizes) == 3:
            limit = min(limit, z_limit)
        while True:
            rule = axis_rule([k[axis] for k in kernels], [p[axis] for p in pools], valid)
            if rule.min_input <= limit:
                break
            pooled = [lvl for lvl, p in enumerate(pools) if p[axis] > 1]
            wide = [lvl for lvl, k in enumerate(kernels) if k[axis] > 1]
            if pooled:
                pools[pooled[0]][axis] = 1
            elif wide:
                kernels[wide[0]][axis] = 1
            else:
                break


def plan_model(preset: str, in_channels: int, num_classes: int, *, ndim: int = 3, padding: str = "valid",
               batchnorm: bool | None = None, base_width: int | None = None, depth: int | None = None,
               voxel_size=None, shape=None, arch: str = "unet", factorized: bool = False,
               feature_augment: bool = False, feature_augment_t: int = 4, filters=(),
               sections: bool = False, planes: int = 1, filter_dims: int = 2) -> ModelConfig:
    """A ModelConfig for a preset, adapted to the data's voxel size and/or shape (Z, Y, X).

    `sections`: the labels lie on separate xy sections (sparseseg.trainer.data.on_separate_sections),
    so training patches are one section deep; a thin z axis then keeps 3-wide z kernels only
    where the network's input stays within SECTION_INPUT sections, so a patch stays cheap.
    `planes` 3: a 2D network applied along all three planes (ModelConfig.planes).

    For arch "cheng" the preset gives only the patch budget: the network always pads, has
    BatchNorm and 4 levels, and starts from 16 maps unless `base_width` says otherwise."""
    if preset not in PRESETS:
        raise SparsesegError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if arch not in ARCHS:
        raise SparsesegError(f"unknown --arch {arch!r} (choose from {', '.join(ARCHS)})")
    p = PRESETS[preset]
    if arch == "cheng":
        p = {**p, "depth": CHENG_DEPTH, "base_width": CHENG_WIDTH, "batchnorm": True}
        padding = "same"
    depth = depth or p["depth"]
    spacing = tuple(voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0)
    if any(v <= 0 for v in spacing):
        raise SparsesegError(f"voxel size must be positive, got {spacing}")
    axes = slice(0, 3) if ndim == 3 else slice(1, 3)
    kernels, pools = _plan_levels(depth, spacing[axes])
    if shape is not None:
        _fit_shape(kernels, pools, padding == "valid", tuple(shape)[axes], SECTION_INPUT if sections else None)
    return ModelConfig(
        in_channels=in_channels, num_classes=num_classes, ndim=ndim,
        base_width=base_width or p["base_width"], depth=depth,
        kernel_sizes=tuple(map(tuple, kernels)), pool_sizes=tuple(map(tuple, pools)),
        padding=padding, batchnorm=p["batchnorm"] if batchnorm is None else batchnorm, arch=arch,
        factorized=factorized, feature_augment=feature_augment, feature_augment_t=feature_augment_t,
        filters=tuple(filters or ()), planes=planes, filter_dims=filter_dims if filters else 2)
