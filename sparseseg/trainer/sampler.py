"""Patch sampler that only yields patches whose output window holds labelled voxels.

Every labelled voxel can be learnt from: the input window may reach past the volume border,
where the augmenter reflects the image (as the engine does at inference) and labels are
ignored. The sampler picks a labelled voxel uniformly over all volumes, then a random output
window inside the volume containing it.

The index is per z-slice and per 64x64 (y, x) tile: labelled-voxel counts, 4 bytes per tile
(8 MB for a 2048^3 volume, whatever the number of labelled voxels). A draw picks a volume, a
slice and a tile by their counts, then reads that one tile's labels to pick the voxel.
"""

from __future__ import annotations

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.trainer.data import SLAB_VOXELS, read_labels

TILE = 64


def index_labels(view, ignore_label: int, num_classes: int):
    """One pass over a (masked) label view: per-(z, tile) labelled counts and class counts."""
    z, y, x = view.shape
    ty, tx = -(-y // TILE), -(-x // TILE)
    tiles = np.zeros((z, ty, tx), np.int32)
    classes = np.zeros(256, np.int64)
    step = max(1, SLAB_VOXELS // max(1, y * x))
    for z0 in range(0, z, step):
        slab = read_labels(view, (slice(z0, min(z, z0 + step)), slice(None), slice(None)))
        classes += np.bincount(slab.ravel(), minlength=256)
        labelled = np.pad(slab != ignore_label, ((0, 0), (0, ty * TILE - y), (0, tx * TILE - x)))
        tiles[z0:z0 + len(slab)] = labelled.reshape(len(slab), ty, TILE, tx, TILE).sum((2, 4))
    classes[ignore_label] = 0
    return tiles, classes[:num_classes]


class PatchSampler:
    def __init__(self, label_views, tile_counts, out_shape, ignore_label: int, rng: np.random.Generator):
        self.views = label_views
        self.out_shape = tuple(out_shape)
        self.ignore = ignore_label
        self.rng = rng
        # Cumulative counts: a draw is one searchsorted, not a pass over every tile.
        self.cumulative = [np.cumsum(t.reshape(-1), dtype=np.int64) for t in tile_counts]
        self.grids = [t.shape for t in tile_counts]
        self.counts = np.array([c[-1] if len(c) else 0 for c in self.cumulative], np.int64)
        if self.counts.sum() == 0:
            raise SparsesegError("no annotated voxel is left for training (the held-out slices take them all); "
                                 "hold out fewer slices (--val-slices / --val-fraction)")

    def _voxel(self, vi):
        flat = int(np.searchsorted(self.cumulative[vi], self.rng.integers(self.counts[vi]), side="right"))
        z, ty, tx = np.unravel_index(flat, self.grids[vi])
        region = (slice(z, z + 1), slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE))
        lab = read_labels(self.views[vi], region)[0]
        yx = np.flatnonzero(lab != self.ignore)
        y, x = np.unravel_index(yx[self.rng.integers(len(yx))], lab.shape)
        return int(z), int(ty * TILE + y), int(tx * TILE + x)

    def sample(self):
        """(volume index, output window start) in volume coordinates; the input window starts
        `context` earlier and may reach past the border (reflected)."""
        vi = int(self.rng.choice(len(self.counts), p=self.counts / self.counts.sum()))
        c = self._voxel(vi)
        start = []
        for pos, out, n in zip(c, self.out_shape, self.views[vi].shape):
            lo, hi = max(0, pos - out + 1), min(n - out, pos)
            start.append(int(self.rng.integers(lo, hi + 1)))
        return vi, tuple(start)
