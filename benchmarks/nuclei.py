"""The light-microscopy nuclei protocol, shared by `real_data.py --dataset nuclei` and `nuclei_levers.py`.

Two 75^3 crops (a, b) of stained nuclei with dense instance labels (../shared/data/plantseg_nuclei,
read its SOURCE.txt). Classes: 0 background, 1 interior, 2 boundary (a nucleus voxel whose
6-neighbourhood holds another id, background included). Annotation: N evenly spaced xy, N xz and N yz
planes of crop a (`sparseseg.trainer.sparse.orthogonal_slices`). Scoring:
  semi : densify crop a from its own planes, IoU on a's voxels nobody annotated;
  auto : apply the model trained on a's planes to all of crop b.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

CLASSES = ["background", "interior", "boundary"]
PROTOCOLS = ("semi", "auto")


def boundary_classes(instances: np.ndarray) -> np.ndarray:
    """(Z, Y, X) instance ids -> uint8 classes 0 background / 1 interior / 2 boundary (a 6-neighbour
    with another id, background included; the volume border reflects, so it makes no boundary)."""
    fp = ndimage.generate_binary_structure(3, 1)
    mx = ndimage.maximum_filter(instances, footprint=fp)
    mn = ndimage.minimum_filter(instances, footprint=fp)
    return np.where(instances > 0, np.where((mx != instances) | (mn != instances), 2, 1), 0).astype(np.uint8)


def load_crop(name: str, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Crop `name` ("a" or "b"): (image float32 (Z, Y, X), classes uint8)."""
    import tifffile

    d = Path(data) / "plantseg_nuclei"
    img = tifffile.imread(d / f"nuclei_{name}_image_zyx.tif").astype(np.float32)
    ins = tifffile.imread(d / f"nuclei_{name}_instances_zyx.tif")
    return img, boundary_classes(ins)


def annotation(labels: np.ndarray, n: int, ignore_label: int = 255):
    """(slices, sparse labels): n xy, n xz and n yz evenly spaced planes of `labels`, the rest ignored."""
    from sparseseg.trainer.sparse import orthogonal_slices, sparsify

    slices = orthogonal_slices(labels.shape, (n, n, n))
    return slices, sparsify(labels, slices, ignore_label)


def semi_target(labels: np.ndarray, slices, ignore_label: int = 255) -> np.ndarray:
    """The semi-automated score's target: the dense labels with the annotated planes ignored."""
    from sparseseg.trainer.sparse import annotated_mask

    out = labels.copy()
    out[annotated_mask(labels, slices)] = ignore_label
    return out


def protocol(n: int, data: Path, ignore_label: int = 255):
    """(train image, sparse train labels, {"semi": (image, target), "auto": (image, target)}, slices)."""
    ia, la = load_crop("a", data)
    ib, lb = load_crop("b", data)
    slices, sparse = annotation(la, n, ignore_label)
    return ia, sparse, {"semi": (ia, semi_target(la, slices, ignore_label)), "auto": (ib, lb)}, slices
