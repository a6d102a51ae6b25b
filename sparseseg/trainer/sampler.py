"""Patch sampler that only yields patches whose output window holds labelled voxels.

A labelled voxel can be learnt from only if some output window containing it has its whole
input window inside the volume (valid convolutions, no padding, as in the paper). The sampler
picks such a voxel uniformly over all volumes, then a random output window around it.
"""

from __future__ import annotations

import numpy as np

from sparseseg.errors import SparsesegError


class PatchSampler:
    def __init__(self, label_volumes, context, out_shape, ignore_label: int, rng: np.random.Generator,
                 exclude=None):
        self.context = tuple(context)
        self.out_shape = tuple(out_shape)
        self.rng = rng
        self.coords = []      # per volume: (n, 3) int32 coordinates of usable labelled voxels
        for i, lab in enumerate(label_volumes):
            usable = lab != ignore_label
            if exclude is not None:
                usable &= ~exclude[i]
            inner = tuple(slice(c, n - c) for c, n in zip(self.context, lab.shape))
            mask = np.zeros_like(usable)
            mask[inner] = usable[inner]
            self.coords.append(np.argwhere(mask).astype(np.int32))
        self.counts = np.array([len(c) for c in self.coords], np.int64)
        self.shapes = [lab.shape for lab in label_volumes]
        if self.counts.sum() == 0:
            raise SparsesegError(
                f"no annotated voxel lies at least the network's context {self.context} (z, y, x) away from "
                "the volume border; annotate further inside, or use --padding same")

    def sample(self):
        """(volume index, input window start, output window start) in volume coordinates."""
        vi = int(self.rng.choice(len(self.counts), p=self.counts / self.counts.sum()))
        c = self.coords[vi][self.rng.integers(len(self.coords[vi]))]
        # Any output window containing the voxel whose input stays inside the volume. The range is
        # never empty: the voxel lies >= context from the border and the patch fits the volume.
        start = []
        for pos, ctx, out, n in zip(c, self.context, self.out_shape, self.shapes[vi]):
            lo = max(ctx, int(pos) - out + 1)
            hi = min(n - ctx - out, int(pos))
            start.append(int(self.rng.integers(lo, hi + 1)))
        out_start = tuple(start)
        in_start = tuple(s - ctx for s, ctx in zip(out_start, self.context))
        return vi, in_start, out_start
