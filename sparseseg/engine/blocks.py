"""Write blocks and their read regions (pure: no I/O, no GPU).

The output is split into blocks aligned to the output chunks, so every block writes whole
chunks and no two tasks ever touch the same chunk. Block starts are multiples of the network's
grid step, so tiles inside every block sit on one global grid and a valid network gives the
same result as one pass over the whole volume.

A block's read region is the block plus the context the tile layout needs. Coordinates beyond
the volume are mapped with numpy's 'reflect' rule on the *whole* volume (period 2(n-1)), so a
block at the border sees exactly what a reflect-padded whole volume would show it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from sparseseg.engine.tiling import tile_layout
from sparseseg.errors import SparsesegError


@dataclass(frozen=True)
class Block:
    index: tuple[int, int, int]
    start: tuple[int, int, int]     # output region, in volume coordinates
    shape: tuple[int, int, int]

    @property
    def key(self) -> str:
        return "_".join(map(str, self.index))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.shape))

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))


def block_size(geometry, requested, volume_shape, default=(128, 256, 256)) -> tuple[int, int, int]:
    """Block (= output chunk) size: requested or default, rounded up to the grid step and no
    larger than the volume needs."""
    size = tuple(requested) if requested else default
    out = []
    for rule, b, n in zip(geometry.axes, size, volume_shape):
        if b < 1:
            raise SparsesegError(f"--block sizes must be positive, got {size}")
        b = min(b, n)
        out.append(int(math.ceil(b / rule.step) * rule.step))
    return tuple(out)


def make_blocks(volume_shape, block) -> list[Block]:
    counts = [math.ceil(n / b) for n, b in zip(volume_shape, block)]
    blocks = []
    for idx in itertools.product(*(range(c) for c in counts)):
        start = tuple(i * b for i, b in zip(idx, block))
        shape = tuple(min(b, n - s) for b, n, s in zip(block, volume_shape, start))
        blocks.append(Block(tuple(idx), start, shape))
    return blocks


def reflect_index(coords: np.ndarray, n: int) -> np.ndarray:
    """numpy 'reflect' padding as an index map: ... 2 1 | 0 1 2 ... n-1 | n-2 ..."""
    if n == 1:
        return np.zeros_like(coords)
    period = 2 * (n - 1)
    m = np.mod(coords, period)
    return np.where(m >= n, period - m, m)


@dataclass(frozen=True)
class ReadPlan:
    """How to build a block's padded input: read `region` from the store, then index each axis
    with `take[a]` (positions inside the region) to get the reflect-padded input."""

    region: tuple[slice, slice, slice]
    take: tuple[np.ndarray, np.ndarray, np.ndarray]
    identity: bool                   # no padding needed: the region is the input as it is


def read_plan(block: Block, volume_shape, geometry, tile_out, overlap: float, halo=(0, 0, 0)) -> ReadPlan:
    """The input a block needs: from `start - context - halo` over the tile layout's extent."""
    out_shape = tuple(n + 2 * h for n, h in zip(block.shape, halo))
    _, _, extent = tile_layout(geometry, out_shape, tile_out, overlap)
    region, take, identity = [], [], True
    for start, ctx, h, ext, n in zip(block.start, geometry.context, halo, extent, volume_shape):
        coords = np.arange(start - ctx - h, start - ctx - h + ext)
        idx = reflect_index(coords, n)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        region.append(slice(lo, hi))
        local = idx - lo
        take.append(local)
        identity &= bool(np.array_equal(local, np.arange(ext)))
    return ReadPlan(tuple(region), tuple(take), identity)


def assemble(data: np.ndarray, plan: ReadPlan) -> np.ndarray:
    """(C, region) -> (C, padded input) following the plan."""
    if plan.identity:
        return data
    return data[np.ix_(np.arange(data.shape[0]), *plan.take)]
