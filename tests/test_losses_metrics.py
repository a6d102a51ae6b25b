import numpy as np
import torch

from sparseseg.trainer.losses import (
    balanced_class_weights,
    segmentation_loss,
    soft_jaccard,
    weighted_cross_entropy,
)
from sparseseg.trainer.metrics import iou_per_class


def test_ignored_voxels_get_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 5, 6, requires_grad=True)
    target = torch.full((1, 4, 5, 6), 255)
    target[0, 1] = torch.randint(0, 3, (5, 6))
    loss = segmentation_loss(logits, target, torch.tensor([0.5, 1.0, 2.0]), 255, dice_weight=1.0)
    loss.backward()
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0
    assert logits.grad[~ignored].abs().max() > 0


def test_loss_ignores_values_of_unlabelled_voxels():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 3, 3, 3)
    target = torch.full((1, 3, 3, 3), 255)
    target[0, 0] = 1
    other = logits.clone()
    other[:, :, 1:] = torch.randn(1, 2, 2, 3, 3) * 100   # change only unlabelled voxels
    w = torch.ones(2)
    assert torch.allclose(weighted_cross_entropy(logits, target, w, 255), weighted_cross_entropy(other, target, w, 255))
    assert torch.allclose(soft_jaccard(logits, target, 255), soft_jaccard(other, target, 255))


def test_no_labelled_voxel_gives_zero_not_nan():
    logits = torch.randn(1, 2, 2, 2, 2, requires_grad=True)
    loss = weighted_cross_entropy(logits, torch.full((1, 2, 2, 2), 255), torch.ones(2), 255)
    assert float(loss) == 0.0


def test_balanced_weights():
    w = balanced_class_weights([900, 100, 0])
    assert w[2] == 0 and w[1] / w[0] == 9 and abs(w[:2].mean() - 1) < 1e-6


def test_iou_on_known_arrays():
    labels = np.array([0, 0, 1, 1, 1, 2, 255, 255])
    pred = np.array([0, 1, 1, 1, 0, 2, 2, 1])
    res = iou_per_class(pred, labels, 3, 255)
    # class 0: TP 1, FP 1 (voxel 4), FN 1 (voxel 1) -> 1/3; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: 1/1
    assert res["iou"] == [1 / 3, 0.5, 1.0]
    assert res["mean_foreground_iou"] == 0.75
    assert res["voxels"] == 6
