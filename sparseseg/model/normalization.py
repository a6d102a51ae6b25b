"""Intensity normalization as an explicit, stored choice.

Three modes, named in every checkpoint and engine contract (field "normalization"):

- ``global``: one z-score for every input, from the training volumes' statistics; it lives
  inside the graph (``in_graph`` true), so an exported model takes raw intensities.
- ``volume``: a z-score per input volume, from that volume's own statistics.
- ``percentile``: clip each input volume to its own [lo, hi] percentiles (0.5/99.5 by default),
  then z-score it with the clipped values' statistics (nnU-Net's rule for CT, useful for EM and
  fluorescence with saturated or dead pixels).

For ``volume`` and ``percentile`` the graph holds an identity normalization (``in_graph``
false) and whoever feeds it (trainer, engine) calls :func:`volume_statistics` once per input
volume, from a sample, and :func:`apply` to every block it reads: statistics never come from a
block alone, or two blocks of one volume would be scaled differently.
"""

from __future__ import annotations

import numpy as np

from sparseseg.errors import SparsesegError

MODES = ("global", "volume", "percentile")
DEFAULT_PERCENTILES = (0.5, 99.5)
SAMPLE_VOXELS = 2_000_000       # enough for stable statistics, cheap to read


def spec(mode: str, mean=None, std=None, percentiles=None, channels: int = 1) -> dict:
    """The contract/checkpoint field. `mean`/`std` are what the graph subtracts and divides by:
    the training statistics for global, identity (0, 1) otherwise."""
    if mode not in MODES:
        raise SparsesegError(f"unknown normalization {mode!r} (choose from {', '.join(MODES)})")
    in_graph = mode == "global"
    if not in_graph or mean is None:
        mean, std = [0.0] * channels, [1.0] * channels
    pct = None
    if mode == "percentile":
        pct = [float(v) for v in (percentiles or DEFAULT_PERCENTILES)]
        if not 0 <= pct[0] < pct[1] <= 100:
            raise SparsesegError(f"normalization percentiles must satisfy 0 <= lo < hi <= 100, got {pct}")
    return {"mode": mode, "in_graph": in_graph, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "percentiles": pct}


def from_contract(d: dict | None, channels: int) -> dict:
    """Read a stored field; legacy files carry only mean/std (global, in the graph)."""
    if not d:
        return spec("global", channels=channels)
    return spec(d.get("mode", "global"), d.get("mean"), d.get("std"), d.get("percentiles"), channels)


def _spatial_shape(volume):
    return tuple(int(s) for s in volume.shape[-3:])


def _read(volume, region) -> np.ndarray:
    """(C, z, y, x) float64 from a sparseseg Volume or an array (C, Z, Y, X) / (Z, Y, X)."""
    if hasattr(volume, "read"):
        out = volume.read(region, dtype=np.float32)
    else:
        arr = volume if len(volume.shape) == 4 else None
        out = np.asarray(arr[(slice(None),) + tuple(region)]) if arr is not None else \
            np.asarray(volume[tuple(region)])[None]
    return np.asarray(out, dtype=np.float64)


def sample(volume, budget: int = SAMPLE_VOXELS) -> np.ndarray:
    """(C, N) intensities from a lazy sample of a whole volume. A volume of at most 32x the
    budget is read strided (every k-th voxel per axis); a larger one as up to 64 blocks of 32^3
    on an even grid, so a chunked store is touched in at most 64 places, never read whole."""
    shape = _spatial_shape(volume)
    total = int(np.prod(shape))
    if total <= 32 * budget:
        step = max(1, int(np.ceil((total / budget) ** (1 / 3))))
        x = _read(volume, tuple(slice(None, None, step) for _ in shape))
        return x.reshape(x.shape[0], -1)
    b = [min(32, n) for n in shape]
    starts = [np.unique(np.linspace(0, n - s, 4).astype(int)) for n, s in zip(shape, b)]
    parts = []
    for z in starts[0]:
        for y in starts[1]:
            for x0 in starts[2]:
                region = (slice(z, z + b[0]), slice(y, y + b[1]), slice(x0, x0 + b[2]))
                v = _read(volume, region)
                parts.append(v.reshape(v.shape[0], -1))
    return np.concatenate(parts, axis=1)


def statistics_of_sample(x: np.ndarray, mode: str, percentiles=None) -> dict:
    """Per-channel statistics of a (C, N) sample, as `volume_statistics` returns them."""
    if not np.isfinite(x).all():
        raise SparsesegError("the image holds NaN or infinite values; clean it before training or inference")
    lo = hi = None
    if mode == "percentile":
        p = percentiles or DEFAULT_PERCENTILES
        lo, hi = np.percentile(x, p[0], axis=1), np.percentile(x, p[1], axis=1)
        x = np.clip(x, lo[:, None], hi[:, None])
    std = x.std(1)
    std = np.where(std > 1e-8, std, 1.0)      # a constant channel: shift only, never divide by 0
    return {"mean": x.mean(1).tolist(), "std": std.tolist(),
            "lo": None if lo is None else lo.tolist(), "hi": None if hi is None else hi.tolist()}


def volume_statistics(volume, spec_: dict) -> dict:
    """{"mean", "std", "lo", "hi"} (lists per channel; lo/hi None unless percentile) of one
    volume, computed once from a strided lazy sample (see `sample`)."""
    mode = spec_["mode"] if isinstance(spec_, dict) else str(spec_)
    pct = spec_.get("percentiles") if isinstance(spec_, dict) else None
    return statistics_of_sample(sample(volume), mode, pct)


def apply(x, stats: dict):
    """Normalize a block (C, ...) (numpy or torch) with one volume's statistics: clip to
    [lo, hi] when given, then z-score."""
    c = x.shape[0]
    shape = (c,) + (1,) * (x.ndim - 1)
    if isinstance(x, np.ndarray):
        x = x.astype(np.float32, copy=False)
        if stats.get("lo") is not None:
            x = np.clip(x, np.asarray(stats["lo"], np.float32).reshape(shape),
                        np.asarray(stats["hi"], np.float32).reshape(shape))
        return (x - np.asarray(stats["mean"], np.float32).reshape(shape)) / np.asarray(
            stats["std"], np.float32).reshape(shape)
    import torch

    def t(v):
        return torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(shape)

    if stats.get("lo") is not None:
        x = torch.maximum(torch.minimum(x, t(stats["hi"])), t(stats["lo"]))
    return (x - t(stats["mean"])) / t(stats["std"])
