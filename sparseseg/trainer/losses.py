"""Losses on sparsely annotated patches: voxels carrying the ignore value weigh exactly 0."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def balanced_class_weights(counts) -> np.ndarray:
    """Inverse-frequency weights from labelled-voxel counts per class, scaled to mean 1 over
    the classes present (the paper balances frequent background against rare classes).
    An absent class gets weight 0: it contributes no term anyway."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    return (w / w[present].mean()).astype(np.float32)


def weighted_cross_entropy(logits, target, weights, ignore_label: int):
    """Softmax cross-entropy with per-class weights; ignored voxels get weight 0 and no gradient.

    torch's ignore_index drops those voxels from both the sum and the normaliser; a patch with
    no labelled voxel (the sampler never yields one) gives 0 rather than NaN.
    """
    labelled = target != ignore_label
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target.long(), weight=weights, ignore_index=ignore_label)


def soft_jaccard(logits, target, ignore_label: int):
    """1 - (sum p*y + 1) / (sum p + sum y - sum p*y + 1) over labelled voxels, averaged over the
    foreground classes 1..K-1 (Cheng & Varshney 2017)."""
    k = logits.shape[1]
    labelled = (target != ignore_label).unsqueeze(1)
    p = torch.softmax(logits.float(), dim=1) * labelled
    y = F.one_hot(torch.where(labelled[:, 0], target.long(), 0), k).movedim(-1, 1) * labelled
    dims = (0,) + tuple(range(2, logits.ndim))
    inter = (p * y).sum(dims)
    union = p.sum(dims) + y.sum(dims) - inter
    jac = (inter + 1.0) / (union + 1.0)
    return 1.0 - jac[1:].mean()


def segmentation_loss(logits, target, weights, ignore_label: int, dice_weight: float = 0.0):
    loss = weighted_cross_entropy(logits, target, weights, ignore_label)
    if dice_weight > 0:
        loss = loss + dice_weight * soft_jaccard(logits, target, ignore_label)
    return loss
