"""Turn dense labels into sparse slice annotations, for experiments like the paper's."""

from __future__ import annotations

import numpy as np


def evenly_spaced(n: int, count: int) -> list[int]:
    """`count` slice indices spread evenly over an axis of length n (centres of equal parts)."""
    count = min(count, n)
    return sorted({int((i + 0.5) * n / count) for i in range(count)})


def orthogonal_slices(shape, counts) -> list[tuple[int, int]]:
    """(axis, index) pairs: counts[a] evenly spaced slices normal to axis a (0=z, 1=y, 2=x)."""
    return [(axis, idx) for axis, c in enumerate(counts) if c for idx in evenly_spaced(shape[axis], c)]


def sparsify(labels: np.ndarray, slices, ignore_label: int = 255) -> np.ndarray:
    """Keep only the given (axis, index) slices of a dense label volume; the rest is ignored."""
    out = np.full_like(labels, ignore_label)
    for axis, idx in slices:
        sl = [slice(None)] * labels.ndim
        sl[axis] = idx
        out[tuple(sl)] = labels[tuple(sl)]
    return out


def annotated_mask(labels: np.ndarray, slices) -> np.ndarray:
    mask = np.zeros(labels.shape, bool)
    for axis, idx in slices:
        sl = [slice(None)] * labels.ndim
        sl[axis] = idx
        mask[tuple(sl)] = True
    return mask
