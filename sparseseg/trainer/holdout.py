"""Held-out annotated slices for validation (the paper's protocol).

Validation on voxels next to training voxels of the same slice measures memory, not
generalisation, so whole annotated slices are held out and masked out of everything training
sees (sampler, augmentation reads, class weights). An annotated slice is a plane at least half
labelled (a slice painted as a whole, as in the paper); a volume annotated with strokes has
none, and then every z-slice holding labels counts as one.
"""

from __future__ import annotations

import numpy as np

from sparseseg.errors import SparsesegError

DENSE_PLANE = 0.5


def annotated_slices(scan, shape) -> list[tuple[int, int]]:
    """(axis, index) of the annotated slices of one volume (see the module note)."""
    out = []
    for axis, counts in enumerate(scan.per_plane):
        area = int(np.prod(shape)) // shape[axis]
        out += [(axis, int(i)) for i in np.flatnonzero(counts >= DENSE_PLANE * area)]
    if not out:
        out = [(0, int(i)) for i in np.flatnonzero(scan.per_plane[0])]
    return out


def choose_held_out(vols, ignore_label: int, per_axis: int, fraction: float, rng) -> list[dict]:
    """Per volume: {axis: [indices]} of held-out slices. `per_axis` K holds out K slices per
    plane orientation (of each volume); `fraction` a share of all annotated slices (at least
    one); neither: nothing."""
    if per_axis and fraction:
        raise SparsesegError("--val-slices and --val-fraction exclude each other; give one")
    held = [{} for _ in vols]
    if not per_axis and not fraction:
        return held
    candidates = [(vi, a, i) for vi, v in enumerate(vols)
                  for a, i in annotated_slices(v.scan(ignore_label), v.shape)]
    if per_axis:
        pick = []
        for vi in range(len(vols)):
            for axis in range(3):
                group = [c for c in candidates if c[0] == vi and c[1] == axis]
                if group:
                    idx = rng.choice(len(group), size=min(per_axis, len(group)), replace=False)
                    pick += [group[i] for i in idx]
    else:
        k = max(1, int(round(fraction * len(candidates))))
        pick = [candidates[i] for i in rng.choice(len(candidates), size=min(k, len(candidates)), replace=False)]
    for vi, axis, index in pick:
        held[vi].setdefault(axis, []).append(index)
    return [{a: sorted(ix) for a, ix in h.items()} for h in held]


def describe(held) -> str:
    parts = []
    for vi, h in enumerate(held):
        for axis, ix in sorted(h.items()):
            parts.append(f"volume {vi} {'zyx'[axis]}={','.join(map(str, ix))}")
    return "; ".join(parts) or "none"
