"""Which slices of an existing labels volume are already annotated, per plane.

A painted xy slice puts one labelled row into every xz and yz slice it crosses, so "any
labelled voxel" alone would mark every xz and yz slice as annotated after one xy slice. A slice
therefore counts as annotated in its plane only if it holds more labelled voxels than the
slices of the other planes already counted can explain. Slices are decided densest first, from
three 2D projections of the labelled-voxel count (z-y, z-x, y-x) gathered block by block (a few
MB even for a 2048^3 volume).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.suggest.planes import block_shape


def label_projections(labels, ignore: int, max_block_voxels: int = 1 << 24):
    """Counts of labelled voxels (value != ignore) summed over x, y and z: (Z,Y), (Z,X), (Y,X)."""
    z, y, x = labels.shape
    pzy = np.zeros((z, y), np.int64)
    pzx = np.zeros((z, x), np.int64)
    pyx = np.zeros((y, x), np.int64)
    chunks = getattr(labels.array, "chunks", None)
    chunks = tuple(chunks[-3:]) if chunks is not None and len(chunks) >= 3 else None
    block = block_shape(labels.shape, (1, 1, 1), chunks, max_block_voxels)
    for z0, y0, x0 in itertools.product(*(range(0, s, b) for s, b in zip(labels.shape, block))):
        reg = (slice(z0, z0 + block[0]), slice(y0, y0 + block[1]), slice(x0, x0 + block[2]))
        data = labels.read(reg)
        if data.shape[0] != 1:
            raise SparsesegError(f"{labels.source}: labels must have one channel, found {data.shape[0]}")
        m = data[0] != ignore
        bz, by, bx = m.shape
        pzy[z0:z0 + bz, y0:y0 + by] += m.sum(axis=2)
        pzx[z0:z0 + bz, x0:x0 + bx] += m.sum(axis=1)
        pyx[y0:y0 + by, x0:x0 + bx] += m.sum(axis=0)
    return pzy, pzx, pyx


def annotated_slices(pzy, pzx, pyx) -> dict[str, list[int]]:
    """Per plane, the slices painted as slices of that plane (see the module docstring).

    Each step takes the slice with the densest unexplained labelled voxels and subtracts its
    voxels from the slices of the other planes it crosses; it stops when no slice holds more
    labelled voxels than the counted slices explain. A voxel where two counted slices cross is
    subtracted twice, so an unexplained remainder is never over-stated."""
    z, y = pzy.shape
    x = pzx.shape[1]
    rest = {"xy": pzy.sum(axis=1), "xz": pzy.sum(axis=0), "yz": pzx.sum(axis=0)}
    area = {"xy": y * x, "xz": z * x, "yz": z * y}
    found = {"xy": [], "xz": [], "yz": []}
    while True:
        best = max(((rest[p].max() / area[p], -k, p) for k, p in enumerate(rest)), default=None)
        if best is None or best[0] <= 0:
            break
        p = best[2]
        i = int(np.argmax(rest[p]))
        found[p].append(i)
        rest[p] = rest[p].astype(np.float64)
        rest[p][i] = -np.inf  # counted
        if p == "xy":
            rest["xz"] = rest["xz"] - pzy[i, :]
            rest["yz"] = rest["yz"] - pzx[i, :]
        elif p == "xz":
            rest["xy"] = rest["xy"] - pzy[:, i]
            rest["yz"] = rest["yz"] - pyx[i, :]
        else:
            rest["xy"] = rest["xy"] - pzx[:, i]
            rest["xz"] = rest["xz"] - pyx[:, i]
    return {p: sorted(v) for p, v in found.items()}


def find_annotated(labels, shape, ignore: int = 255, max_block_voxels: int = 1 << 24) -> dict[str, list[int]]:
    if tuple(labels.shape) != tuple(shape):
        raise SparsesegError(f"annotated labels {labels.source} have shape {'x'.join(map(str, labels.shape))}, "
                             f"the image {'x'.join(map(str, shape))}")
    if labels.channels != 1:
        raise SparsesegError(f"{labels.source}: labels must have one channel, found {labels.channels}")
    if math.prod(shape) == 0:
        return {"xy": [], "xz": [], "yz": []}
    return annotated_slices(*label_projections(labels, ignore, max_block_voxels))
