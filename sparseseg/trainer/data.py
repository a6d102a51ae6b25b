"""Loading and checking training data: images (C, Z, Y, X) with sparse labels (Z, Y, X)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.volume import check_finite, open_volume


@dataclass
class TrainingVolume:
    image: np.ndarray        # (C, Z, Y, X) float32, raw intensities
    labels: np.ndarray       # (Z, Y, X) uint8, ignore_label where not annotated
    name: str
    voxel_size: tuple | None = None


def check_pair(image: np.ndarray, labels: np.ndarray, num_classes: int | None, ignore_label: int, name: str):
    if image.shape[1:] != labels.shape:
        raise SparsesegError(f"{name}: image shape {image.shape[1:]} and label shape {labels.shape} differ")
    check_finite(image, f"image {name}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise SparsesegError(f"{name}: labels must be integers, got {labels.dtype}")
    values = np.unique(labels)
    annotated = values[values != ignore_label]
    if annotated.size == 0:
        raise SparsesegError(f"{name}: labels contain no annotated voxel (every voxel is {ignore_label})")
    if (annotated < 0).any():
        raise SparsesegError(f"{name}: negative label values {annotated[annotated < 0].tolist()}")
    if num_classes is not None and (annotated >= num_classes).any():
        bad = annotated[annotated >= num_classes].tolist()
        raise SparsesegError(f"{name}: label values {bad} >= number of classes {num_classes} "
                             f"(and not the ignore value {ignore_label})")


def load_pairs(image_paths, label_paths, ignore_label: int, num_classes: int | None = None):
    if len(image_paths) != len(label_paths):
        raise SparsesegError(f"got {len(image_paths)} --image but {len(label_paths)} --labels; give them in pairs")
    if not image_paths:
        raise SparsesegError("no training volume given (--image/--labels)")
    vols = []
    for ip, lp in zip(image_paths, label_paths):
        iv, lv = open_volume(ip), open_volume(lp)
        image = np.array(iv.read(dtype=np.float32))   # in memory and writable (not a read-only memmap)
        labels = lv.read_labels()
        if labels.dtype != np.uint8:
            if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
                raise SparsesegError(f"{lp}: label values must lie in 0..255")
        labels = labels.astype(np.uint8)
        check_pair(image, labels, num_classes, ignore_label, str(ip))
        vols.append(TrainingVolume(image, labels, str(ip), iv.voxel_size or lv.voxel_size))
    channels = {v.image.shape[0] for v in vols}
    if len(channels) > 1:
        raise SparsesegError(f"training images have different channel counts: {sorted(channels)}")
    return vols


def infer_num_classes(vols, ignore_label: int) -> int:
    top = max(int(v.labels[v.labels != ignore_label].max()) for v in vols)
    return max(2, top + 1)


def channel_stats(vols) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over all voxels of all images (on a strided subsample for big
    volumes: the statistics only need to be stable, not exact)."""
    samples = []
    for v in vols:
        step = max(1, int(round((v.image[0].size / 4e6) ** (1 / 3))))
        samples.append(v.image[:, ::step, ::step, ::step].reshape(v.image.shape[0], -1))
    x = np.concatenate(samples, axis=1).astype(np.float64)
    std = x.std(1)
    std = np.where(std > 1e-8, std, 1.0)
    return x.mean(1).tolist(), std.tolist()


def class_counts(vols, num_classes: int, ignore_label: int) -> np.ndarray:
    counts = np.zeros(num_classes, np.int64)
    for v in vols:
        lab = v.labels[v.labels != ignore_label]
        counts += np.bincount(lab, minlength=num_classes)[:num_classes]
    return counts
