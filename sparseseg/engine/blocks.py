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
    with `take[a]` (positions inside the region) to get the reflect-padded input. The tiles
    predict `out_shape` voxels starting `offset` voxels before the block (0 for valid nets)."""

    region: tuple[slice, slice, slice]
    take: tuple[np.ndarray, np.ndarray, np.ndarray]
    identity: bool                   # no padding needed: the region is the input as it is
    out_shape: tuple[int, int, int]
    offset: tuple[int, int, int]


def _same_tiles(start: int, size: int, n: int, tile: int, stride: int) -> tuple[int, int]:
    """First and last index k of the global tiles [k*stride, k*stride + tile) that touch
    [start, start + size), for a volume of n voxels covered by tiles k = 0 .. k_max."""
    k_max = math.ceil(max(n - tile, 0) / stride)
    first = max(0, -((tile - 1 - start) // stride))       # ceil((start - tile + 1) / stride)
    last = min(k_max, (start + size - 1) // stride)
    return first, last


def read_plan(block: Block, volume_shape, geometry, tile_out, overlap: float) -> ReadPlan:
    """The input a block needs.

    Valid networks: the block itself from `start - context` over the tile layout's extent.
    Same-padding networks: all tiles of the *global* grid (offsets k * stride) that touch the
    block, so every voxel is blended from exactly the tiles and weights a whole-volume pass
    would give it: seamless, with only the tiles at block borders computed twice.
    """
    from sparseseg.engine.tiling import tile_stride

    if geometry.padding == "same":
        stride = tile_stride(geometry, tile_out, overlap)
        spans = [_same_tiles(s, b, n, t, st) for s, b, n, t, st in
                 zip(block.start, block.shape, volume_shape, tile_out, stride)]
        first = tuple(f * st for (f, _), st in zip(spans, stride))
        out_shape = tuple((last - f) * st + t for (f, last), st, t in zip(spans, stride, tile_out))
        offset = tuple(s - f for s, f in zip(block.start, first))
    else:
        first, out_shape, offset = block.start, block.shape, (0, 0, 0)
    _, _, extent = tile_layout(geometry, out_shape, tile_out, overlap)
    region, take, identity = [], [], True
    for start, ctx, ext, n in zip(first, geometry.context, extent, volume_shape):
        coords = np.arange(start - ctx, start - ctx + ext)
        idx = reflect_index(coords, n)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        region.append(slice(lo, hi))
        local = idx - lo
        take.append(local)
        identity &= bool(np.array_equal(local, np.arange(ext)))
    return ReadPlan(tuple(region), tuple(take), identity, tuple(out_shape), tuple(offset))


def assemble(data: np.ndarray, plan: ReadPlan) -> np.ndarray:
    """(C, region) -> (C, padded input) following the plan."""
    if plan.identity:
        return data
    return data[np.ix_(np.arange(data.shape[0]), *plan.take)]
