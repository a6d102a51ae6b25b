"""Planes and block-wise reduction of a volume into per-plane stacks of small 2D slices.

A plane is named by the two axes its slices span: `xy` slices hold z fixed, `xz` hold y fixed,
`yz` hold x fixed. Features are computed on slices shrunk to at most `size` pixels per side
(area averaging), so one pass over the volume, block by block, fills all three stacks at once:
a 2048^3 volume is read once, in blocks of at most `max_block_voxels`, and the stacks are
~1/64 of it at size 256. Each output pixel comes from exactly one block because blocks start
on multiples of the shrink factors.
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np

from sparseseg.errors import SparsesegError

log = logging.getLogger(__name__)

# plane name -> the (z, y, x) axis its slices hold fixed
PLANES = {"xy": 0, "xz": 1, "yz": 2}


def parse_planes(text: str | tuple | list) -> tuple[str, ...]:
    names = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not names:
        raise SparsesegError("--planes is empty (use e.g. xy,xz,yz)")
    for n in names:
        if n not in PLANES:
            raise SparsesegError(f"unknown plane {n!r} (use xy, xz or yz)")
    if len(set(names)) != len(names):
        raise SparsesegError(f"--planes names a plane twice: {','.join(names)}")
    return tuple(names)


def check_planes(shape, planes) -> None:
    """A plane exists only where its slices are 2D images: both in-plane axes longer than 1."""
    if any(s == 0 for s in shape):
        raise SparsesegError(f"the volume is empty (shape {'x'.join(map(str, shape))})")
    for p in planes:
        fixed = PLANES[p]
        inplane = [shape[a] for a in range(3) if a != fixed]
        if min(inplane) < 2:
            kind = "a 2D image" if min(shape) == 1 else "this volume"
            raise SparsesegError(f"plane {p} does not exist for {kind} of shape {'x'.join(map(str, shape))} "
                                 f"(its slices would be {inplane[0]}x{inplane[1]}); choose other --planes")


def shrink_factors(shape, size: int) -> tuple[int, int, int]:
    """Per-axis integer factor so that every axis is at most `size` long once shrunk."""
    return tuple(max(1, math.ceil(s / size)) for s in shape)


def block_shape(shape, factors, chunks, max_voxels: int) -> tuple[int, int, int]:
    """Blocks aligned to the shrink factors (and, where possible, to the store's chunks),
    grown x first, then y, then z, while they stay under `max_voxels` (a bound that only the
    shrink factors themselves can exceed: a block is at least one factor-sized cell)."""
    unit = []
    for s, f, c in zip(shape, factors, chunks or (1, 1, 1)):
        u = f * max(1, math.ceil(int(c) / f))
        unit.append(min(u, f * math.ceil(s / f)))
    # Chunks larger than the bound: split them (a chunk is then read in parts, never past the bound).
    while math.prod(unit) > max_voxels and any(u > f for u, f in zip(unit, factors)):
        a = max(range(3), key=lambda i: unit[i] / factors[i])
        unit[a] = factors[a] * max(1, math.ceil(unit[a] / factors[a] / 2))
    block = list(unit)
    for axis in (2, 1, 0):
        while block[axis] < shape[axis] and math.prod(block) * 2 <= max_voxels:
            block[axis] = min(block[axis] * 2, unit[axis] * math.ceil(shape[axis] / unit[axis]))
    return tuple(block)


def _block_mean(a: np.ndarray, axis: int, f: int) -> np.ndarray:
    """Mean over consecutive groups of `f` along `axis`; the last group may be shorter."""
    if f == 1:
        return a
    starts = np.arange(0, a.shape[axis], f)
    sums = np.add.reduceat(a, starts, axis=axis)
    counts = np.minimum(starts + f, a.shape[axis]) - starts
    shape = [1] * a.ndim
    shape[axis] = len(counts)
    return sums / counts.reshape(shape)


def reduce_volume(volume, planes, size: int = 256, max_block_voxels: int = 1 << 24) -> dict[str, np.ndarray]:
    """One block-wise pass over `volume`; returns per plane a float32 stack (N, C, h, w) of its
    N slices shrunk to at most `size` per side (area mean)."""
    shape = volume.shape
    check_planes(shape, planes)
    f = shrink_factors(shape, size)
    small = tuple(math.ceil(s / k) for s, k in zip(shape, f))
    c = volume.channels
    z, y, x = shape
    out = {}
    if "xy" in planes:
        out["xy"] = np.zeros((z, c, small[1], small[2]), np.float32)
    if "xz" in planes:
        out["xz"] = np.zeros((y, c, small[0], small[2]), np.float32)
    if "yz" in planes:
        out["yz"] = np.zeros((x, c, small[0], small[1]), np.float32)
    chunks = getattr(volume.array, "chunks", None)
    chunks = tuple(chunks[-3:]) if chunks is not None and len(chunks) >= 3 else None
    block = block_shape(shape, f, chunks, max_block_voxels)
    starts = [range(0, s, b) for s, b in zip(shape, block)]
    nblocks = math.prod(len(r) for r in starts)
    log.info("reading %s in %d blocks of %s (slices shrunk by %s)", "x".join(map(str, shape)), nblocks,
             "x".join(map(str, block)), "x".join(map(str, f)))
    for z0, y0, x0 in itertools.product(*starts):
        z1, y1, x1 = min(z0 + block[0], z), min(y0 + block[1], y), min(x0 + block[2], x)
        data = volume.read((slice(z0, z1), slice(y0, y1), slice(x0, x1)), dtype=np.float32)  # (C, bz, by, bx)
        sz, sy, sx = z0 // f[0], y0 // f[1], x0 // f[2]
        if "xy" in out:
            r = _block_mean(_block_mean(data, 2, f[1]), 3, f[2])
            out["xy"][z0:z1, :, sy:sy + r.shape[2], sx:sx + r.shape[3]] = r.transpose(1, 0, 2, 3)
        if "xz" in out:
            r = _block_mean(_block_mean(data, 1, f[0]), 3, f[2])  # (C, bz', by, bx')
            out["xz"][y0:y1, :, sz:sz + r.shape[1], sx:sx + r.shape[3]] = r.transpose(2, 0, 1, 3)
        if "yz" in out:
            r = _block_mean(_block_mean(data, 1, f[0]), 2, f[1])  # (C, bz', by', bx)
            out["yz"][x0:x1, :, sz:sz + r.shape[1], sy:sy + r.shape[2]] = r.transpose(3, 0, 1, 2)
    return out
