"""Patch sampler that only yields patches whose output window holds labelled voxels.

Every labelled voxel can be learnt from: the input window may reach past the volume border,
where the augmenter reflects the image (as the engine does at inference) and labels are
ignored. The sampler picks a labelled voxel uniformly over all volumes, then a random output
window inside the volume containing it.

`class_fraction` of the draws instead pick a class uniformly among the annotated ones, then a
voxel of that class (nnU-Net forces a foreground voxel into a third of its patches). Why: with
few annotated sections a rare class is absent from most patches (one VNC section: 4.7%
mitochondria, 81% of 92x92 patches hold none) and the network can learn to never predict it.
Unlike class weights this does not change what a voxel costs, so frequent thin structures
(membranes) are not thickened.

The index is per class, z-slice and 64x64 (y, x) tile: voxel counts, 4 bytes per tile and class
(8 MB per class for a 2048^3 volume, whatever the number of labelled voxels). A draw picks a
volume, a slice and a tile by their counts, then reads that one tile's labels to pick the voxel.
"""

from __future__ import annotations

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.trainer.data import SLAB_VOXELS, read_labels

TILE = 64


def index_labels(view, ignore_label: int, num_classes: int):
    """One pass over a (masked) label view: per-(class, z, tile) voxel counts and class counts."""
    z, y, x = view.shape
    ty, tx = -(-y // TILE), -(-x // TILE)
    tiles = np.zeros((num_classes, z, ty, tx), np.int32)
    classes = np.zeros(256, np.int64)
    step = max(1, SLAB_VOXELS // max(1, y * x))
    for z0 in range(0, z, step):
        slab = read_labels(view, (slice(z0, min(z, z0 + step)), slice(None), slice(None)))
        classes += np.bincount(slab.ravel(), minlength=256)
        padded = np.pad(slab, ((0, 0), (0, ty * TILE - y), (0, tx * TILE - x)), constant_values=ignore_label)
        for c in range(num_classes):
            tiles[c, z0:z0 + len(slab)] = (padded == c).reshape(len(slab), ty, TILE, tx, TILE).sum((2, 4))
    classes[ignore_label] = 0
    return tiles, classes[:num_classes]


class PatchSampler:
    def __init__(self, label_views, class_tiles, out_shape, ignore_label: int, rng: np.random.Generator,
                 class_fraction: float = 0.0):
        self.views = label_views
        self.out_shape = tuple(out_shape)
        self.ignore = ignore_label
        self.rng = rng
        self.class_fraction = float(class_fraction)
        self.grids = [t.shape[1:] for t in class_tiles]
        # Cumulative counts: a draw is one searchsorted, not a pass over every tile. Key None:
        # any labelled voxel; key c: voxels of class c.
        self.cumulative = {None: [np.cumsum(t.sum(0).reshape(-1), dtype=np.int64) for t in class_tiles]}
        if self.class_fraction > 0:
            for c in range(class_tiles[0].shape[0]):
                self.cumulative[c] = [np.cumsum(t[c].reshape(-1), dtype=np.int64) for t in class_tiles]
        self.totals = {key: np.array([cum[-1] if len(cum) else 0 for cum in cums], np.int64)
                       for key, cums in self.cumulative.items()}
        self.counts = self.totals[None]
        self.classes = [key for key, tot in self.totals.items() if key is not None and tot.sum() > 0]
        if self.counts.sum() == 0:
            raise SparsesegError("no annotated voxel is left for training (the held-out slices take them all); "
                                 "hold out fewer slices (--val-slices / --val-fraction)")

    def _voxel(self, key, vi):
        cum = self.cumulative[key][vi]
        flat = int(np.searchsorted(cum, self.rng.integers(cum[-1]), side="right"))
        z, ty, tx = np.unravel_index(flat, self.grids[vi])
        region = (slice(z, z + 1), slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE))
        lab = read_labels(self.views[vi], region)[0]
        yx = np.flatnonzero(lab != self.ignore if key is None else lab == key)
        y, x = np.unravel_index(yx[self.rng.integers(len(yx))], lab.shape)
        return int(z), int(ty * TILE + y), int(tx * TILE + x)

    def sample(self):
        """(volume index, output window start) in volume coordinates; the input window starts
        `context` earlier and may reach past the border (reflected)."""
        key = None
        # No draw at all when off, so runs without class sampling keep their random stream.
        if self.class_fraction > 0 and self.rng.random() < self.class_fraction:
            key = self.classes[int(self.rng.integers(len(self.classes)))]
        totals = self.totals[key]
        vi = int(self.rng.choice(len(totals), p=totals / totals.sum()))
        c = self._voxel(key, vi)
        start = []
        for pos, out, n in zip(c, self.out_shape, self.views[vi].shape):
            lo, hi = max(0, pos - out + 1), min(n - out, pos)
            start.append(int(self.rng.integers(lo, hi + 1)))
        return vi, tuple(start)
