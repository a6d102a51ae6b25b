"""Soft pseudo-labels: the 2D network along each of its planes and the 3D network, each run
through the engine's block pipeline (`sparseseg.predict`), softmax probabilities averaged."""

from __future__ import annotations

import numpy as np

from sparseseg.engine.predict import predict
from sparseseg.selftrain.planes import from_view, to_view


def predictions(image: np.ndarray, model3d, model2d, planes, device: str = "auto", backend: str = "auto"):
    """Yields (name, probabilities (K, Z, Y, X) float32) for "3d" and "2d-<plane>" of one
    (C, Z, Y, X) image in memory, one at a time (so a caller averaging them holds two)."""
    _, p = predict(model3d, image, probabilities="float32", device=device, backend=backend)
    yield "3d", p
    for plane in planes:
        view = np.ascontiguousarray(to_view(image, plane))
        _, p = predict(model2d, view, probabilities="float32", device=device, backend=backend)
        yield f"2d-{plane}", np.ascontiguousarray(from_view(p, plane))


def average(image: np.ndarray, model3d, model2d, planes, device: str = "auto", backend: str = "auto"):
    """(mean probabilities (K, Z, Y, X) float32, names of the predictions averaged)."""
    total, names = None, []
    for name, p in predictions(image, model3d, model2d, planes, device, backend):
        total = p if total is None else total + p
        names.append(name)
    return total / len(names), names


def dense_targets(mean: np.ndarray, labels: np.ndarray, ignore_label: int, threshold: float = 0.0) -> np.ndarray:
    """Dense uint8 labels: the argmax of the averaged probabilities; voxels whose averaged
    largest probability is below `threshold` ignored; annotated voxels keep their real label."""
    target = mean.argmax(0).astype(np.uint8)
    if threshold > 0:
        target[mean.max(0) < threshold] = ignore_label
    annotated = labels != ignore_label
    target[annotated] = labels[annotated]
    return target


def average_and_candidates(image: np.ndarray, model3d, model2d, planes, device: str = "auto", backend: str = "auto"):
    """(mean probabilities, hard pseudo-label (uint8 argmax) of each prediction, their names):
    what the meta-model trains on."""
    total, hard, names = None, [], []
    for name, p in predictions(image, model3d, model2d, planes, device, backend):
        total = p if total is None else total + p
        hard.append(p.argmax(0).astype(np.uint8))
        names.append(name)
    return total / len(names), hard, names
