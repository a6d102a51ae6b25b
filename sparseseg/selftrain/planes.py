"""Each plane as the z axis of a transposed view, so a 2D network (which works slice by slice
along z) trains on and predicts any of the three orthogonal planes without knowing about them.

The views are numpy transposes of volumes held in memory: nothing is copied for training, and
the trainer (which picks a random training volume per patch) sees the three planes as three
volumes, i.e. a random plane per patch as in Zheng et al.
"""

from __future__ import annotations

import logging

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.model.network import PLANES
from sparseseg.trainer.config import patch_output_size
from sparseseg.trainer.data import plane_volume

log = logging.getLogger("sparseseg.selftrain")



def inverse(plane: str) -> tuple[int, int, int]:
    return tuple(int(i) for i in np.argsort(PLANES[plane]))


def to_view(array: np.ndarray, plane: str) -> np.ndarray:
    """(..., Z, Y, X) -> the plane's view (..., normal, a, b); a transpose, not a copy."""
    lead = tuple(range(array.ndim - 3))
    return array.transpose(lead + tuple(len(lead) + a for a in PLANES[plane]))


def from_view(array: np.ndarray, plane: str) -> np.ndarray:
    """Inverse of `to_view`."""
    lead = tuple(range(array.ndim - 3))
    return array.transpose(lead + tuple(len(lead) + a for a in inverse(plane)))


def in_memory(vols) -> bool:
    """True when every volume is an array in memory; False when all are read lazily (then the
    2D network uses xy only and pseudo-labels go block-wise, sparseseg.selftrain.blockwise)."""
    held = [isinstance(v.image, np.ndarray) and isinstance(v.labels, np.ndarray) for v in vols]
    if any(held) and not all(held):
        raise SparsesegError("--self-train needs all training volumes in memory or all read lazily, not a mix")
    return all(held)


def usable_planes(vols, model_cfg, preset: str) -> list[str]:
    """"xy" and every other plane whose slices hold the training patch the xy plane gets.

    The trainer uses one patch size for all its volumes (the largest that fits the smallest),
    so a plane with small slices (xz/yz of a 20-section EM stack) would shrink the xy patches
    too; such a plane is left out with a log line."""
    def patch(views):
        smallest = tuple(min(v.shape[a] for v in views) for a in range(3))
        try:
            return patch_output_size(model_cfg, preset, smallest)
        except SparsesegError:
            return None

    xy = patch(vols)
    planes = ["xy"]
    for plane in ("xz", "yz"):
        views = [plane_volume(v, plane) for v in vols]
        if patch(list(vols) + views) == xy:
            planes.append(plane)
        else:
            smallest = tuple(min(v.shape[a] for v in views) for a in (1, 2))
            need = model_cfg.geometry.input_for_output(xy)[1:] if xy else "?"
            log.info("2D base network: plane %s skipped, its slices (%d x %d) cannot hold the xy training "
                     "patch (input %s)", plane, *smallest, need)
    return planes
