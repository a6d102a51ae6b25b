"""Synthetic volumes of branching tubules, like the paper's Xenopus kidney data.

Classes: 0 background, 1 tubule wall, 2 inside the tubule (lumen). Three channels stain
different parts (wall, lumen, both), with blur, uneven illumination and noise, so that no
single channel or threshold separates the classes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLASS_NAMES = ["background", "tubule wall", "tubule inside"]


def _skeleton(shape, rng, n_roots: int) -> tuple[np.ndarray, np.ndarray]:
    """Random branching walks; returns a mask of the centre lines and a radius per voxel."""
    skel = np.zeros(shape, bool)
    radius = np.zeros(shape, np.float32)
    size = np.array(shape, np.float64)
    stack = []
    for _ in range(n_roots):
        pos = rng.uniform(0.15, 0.85, 3) * size
        d = rng.normal(size=3)
        stack.append((pos, d / np.linalg.norm(d), rng.uniform(4.5, 6.5), 0))
    while stack:
        pos, d, r, depth = stack.pop()
        length = rng.uniform(25, 60)
        for _ in range(int(length)):
            d = d + rng.normal(scale=0.12, size=3)
            d /= np.linalg.norm(d)
            pos = pos + d
            idx = np.round(pos).astype(int)
            if (idx < 0).any() or (idx >= size).any():
                break
            skel[tuple(idx)] = True
            radius[tuple(idx)] = r
        else:
            if depth < 3:
                for sign in (-1, 1):
                    turn = rng.normal(size=3)
                    turn -= turn.dot(d) * d
                    nd = d + sign * 0.8 * turn / np.linalg.norm(turn)
                    stack.append((pos, nd / np.linalg.norm(nd), max(2.8, r * rng.uniform(0.75, 0.95)), depth + 1))
    return skel, radius


def tubules(shape=(48, 96, 96), seed: int = 0, wall: float = 2.5, noise: float = 0.2):
    """Returns (image float32 (3, Z, Y, X), labels uint8 (Z, Y, X))."""
    rng = np.random.default_rng(seed)
    n_roots = max(2, int(np.prod(shape) / 30_000))
    skel, radius = _skeleton(shape, rng, n_roots)
    dist, idx = ndimage.distance_transform_edt(~skel, return_indices=True)
    r = radius[tuple(idx)]
    labels = np.zeros(shape, np.uint8)
    labels[dist < r] = 1
    labels[dist < r - wall] = 2
    wall_mask = (labels == 1).astype(np.float32)
    lumen = (labels == 2).astype(np.float32)
    light = ndimage.gaussian_filter(rng.normal(size=shape), 12)
    light = 1.0 + 0.6 * light / (np.abs(light).max() + 1e-6)   # uneven illumination
    chans = [
        ndimage.gaussian_filter(wall_mask, 0.8) * 1.0 + 0.15 * lumen,
        ndimage.gaussian_filter(lumen, 1.0) * 0.8 + 0.2 * wall_mask,
        ndimage.gaussian_filter(wall_mask + lumen, 1.5) * 0.7,
    ]
    image = np.stack([c * light + rng.normal(scale=noise, size=shape) for c in chans]).astype(np.float32)
    return image * 1000.0 + 200.0, labels
