"""A reference that ignores the image: every voxel takes the label of the nearest annotated voxel.

It tells what a semi-automated protocol measures: where copying the painted slices' labels across
the gap scores as well as a method that reads the image, the protocol rewards interpolating the
annotation (objects large against the slice spacing), not seeing the structures. It has no answer
for another volume (the fully automated case), so only semi-automated tests get a score.

    from benchmarks.baselines.interpolation import nearest_label
    pred = nearest_label(sparse_labels_zyx, ignore_label=255)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def nearest_label(sparse: np.ndarray, ignore_label: int = 255) -> np.ndarray:
    """(Z, Y, X) labels: each voxel the label of its nearest annotated voxel (Euclidean, voxel units)."""
    annotated = sparse != ignore_label
    if not annotated.any():
        raise ValueError("no annotated voxel to interpolate from")
    _, nearest = ndi.distance_transform_edt(~annotated, return_indices=True)
    return sparse[tuple(nearest)].astype(np.uint8)
