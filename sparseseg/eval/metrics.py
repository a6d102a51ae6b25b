"""Intersection over union on annotated voxels only (the paper's evaluation)."""

from __future__ import annotations

import numpy as np


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
    """(K, K) counts [true, predicted] over voxels whose label is not the ignore value."""
    mask = labels != ignore_label
    t = labels[mask].astype(np.int64)
    p = pred[mask].astype(np.int64)
    k = max(num_classes, int(t.max(initial=0)) + 1, int(p.max(initial=0)) + 1)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def iou_from_confusion(cm: np.ndarray) -> dict:
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    denom = tp + fp + fn
    iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    fg = iou[1:]
    return {
        "iou": [None if np.isnan(v) else float(v) for v in iou],
        "mean_foreground_iou": float(np.nanmean(fg)) if np.isfinite(fg).any() else None,
        "voxels": int(cm.sum()),
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
    }


def iou_per_class(pred, labels, num_classes: int, ignore_label: int = 255) -> dict:
    """IoU = TP / (TP + FP + FN) per class (None where a class is absent from both), and the
    mean over foreground classes 1..K-1."""
    return iou_from_confusion(confusion(pred, labels, num_classes, ignore_label))
