"""Write blocks and their read regions (pure: no I/O, no GPU).

The output is split into blocks aligned to the output chunks, so every block writes whole
chunks and no two tasks ever touch the same chunk. Block starts are multiples of the network's
grid step, so tiles inside every block sit on one global grid and a valid network gives the
same result as one pass over the whole volume.

A block's read region is the block plus the context the tile layout needs. Coordinates beyond
the volume are mapped with numpy's 'reflect' rule on the *whole* volume (period 2(n-1)), so a
block at the border sees exactly what a reflect-padded whole volume would show it;
`model.shapes.reflect_index` is the one definition of that rule (gather, kernels and `pad_region` use it).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from sparseseg.engine.tiling import DEFAULT_BLOCK, axis_layout, tile_stride
from sparseseg.errors import SparsesegError
from sparseseg.model.shapes import reflect_index


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


def block_size(geometry, requested, volume_shape, default=DEFAULT_BLOCK) -> tuple[int, int, int]:
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


@dataclass(frozen=True)
class ReadPlan:
    """What a block reads and computes.

    The tile grid of the block starts at volume coordinate `origin` (= first output voxel -
    context) and has tiles at `offsets` (block-grid coordinates, i.e. relative to `origin`,
    equal for a tile's input and output); tile n's input covers volume coordinates
    origin + offsets[n] + [0, tile_input), reflected at the volume border. `region` is the part
    of the volume those coordinates touch (read once). The tiles predict `out_shape` voxels; the
    block is the crop starting at `crop` (0 for valid networks)."""

    region: tuple[slice, slice, slice]
    origin: tuple[int, int, int]
    offsets: tuple[tuple[int, int, int], ...]
    stride: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    crop: tuple[int, int, int]

    @property
    def region_start(self) -> tuple[int, int, int]:
        return tuple(s.start for s in self.region)

    @property
    def region_shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.region)

    def keep(self) -> list[tuple[int, int, int]]:
        """Valid networks: the output voxels each tile keeps (its first `stride`, cut at the end)."""
        return [tuple(min(s, n - o) for s, n, o in zip(self.stride, self.out_shape, off)) for off in self.offsets]


def _same_tiles(start: int, size: int, n: int, tile: int, stride: int) -> tuple[int, int]:
    """First and last index k of the global tiles [k*stride, k*stride + tile) that touch
    [start, start + size), for a volume of n voxels covered by tiles k = 0 .. k_max."""
    k_max = math.ceil(max(n - tile, 0) / stride)
    first = max(0, -((tile - 1 - start) // stride))       # ceil((start - tile + 1) / stride)
    last = min(k_max, (start + size - 1) // stride)
    return first, last


def axis_span(start: int, size: int, n: int, rule, padding: str, tile: int, stride: int, overlap: float):
    """One axis of a block's plan: (first output voxel the tiles cover, their output extent,
    crop offset of the block, read region lo, hi). Pure integer arithmetic, no arrays, so
    planning a huge volume stays cheap."""
    if padding == "same":
        f, last = _same_tiles(start, size, n, tile, stride)
        first, out = f * stride, (last - f) * stride + tile
    else:
        first, out = start, size
    count, extent = axis_layout(padding, out, tile, stride, rule.context)
    lo_c, hi_c = first - rule.context, first - rule.context + extent - 1
    lo, hi = reflect_bounds(lo_c, hi_c, n)
    return first, out, start - first, lo, hi + 1, count


def reflect_bounds(lo: int, hi: int, n: int) -> tuple[int, int]:
    """min and max of reflect_index over the coordinates lo..hi (inclusive): the volume range a
    block reads (a block's own extent plus context, so the array stays small)."""
    if n == 1 or hi - lo + 1 >= 2 * (n - 1):
        return 0, n - 1
    idx = reflect_index(np.arange(lo, hi + 1), n)
    return int(idx.min()), int(idx.max())


def read_plan(block: Block, volume_shape, geometry, tile_out, overlap: float) -> ReadPlan:
    """The input a block needs.

    Valid networks: the block itself from `start - context` over the tile layout's extent.
    Same-padding networks: all tiles of the *global* grid (offsets k * stride) that touch the
    block, so every voxel is blended from exactly the tiles and weights a whole-volume pass
    would give it: seamless, with only the tiles at block borders computed twice.
    """
    stride = tile_stride(geometry, tile_out, overlap)
    spans = [axis_span(s, b, n, r, geometry.padding, t, st, overlap) for s, b, n, r, t, st in
             zip(block.start, block.shape, volume_shape, geometry.axes, tile_out, stride)]
    offsets = tuple(itertools.product(*([i * st for i in range(sp[5])] for sp, st in zip(spans, stride))))
    return ReadPlan(region=tuple(slice(sp[3], sp[4]) for sp in spans),
                    origin=tuple(sp[0] - r.context for sp, r in zip(spans, geometry.axes)),
                    offsets=offsets, stride=tuple(stride), out_shape=tuple(sp[1] for sp in spans),
                    crop=tuple(sp[2] for sp in spans))
