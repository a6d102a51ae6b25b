import numpy as np
import pytest
import torch

from sparseseg.errors import SparsesegError
from sparseseg.eval.metrics import iou_per_class
from sparseseg.trainer.losses import (
    balanced_class_weights,
    jaccard_classes,
    segmentation_loss,
    soft_jaccard,
    weighted_cross_entropy,
)


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
    assert w[2] == 0 and abs(w[1] / w[0] - 9) < 1e-5 and abs(w[:2].mean() - 1) < 1e-6


def test_balanced_weights_are_clipped():
    w = balanced_class_weights([9900, 100])                 # 99:1 unbounded
    assert abs(w[1] / w[0] - 10) < 1e-5 and abs(w.mean() - 1) < 1e-6
    assert abs(balanced_class_weights([9900, 100], max_ratio=0)[1] / balanced_class_weights([9900, 100], 0)[0]
               - 99) < 1e-3


def test_jaccard_loss_is_the_papers_formula():
    # Binary, perfectly confident logits: p is 0/1, so the loss is 1 - (|P&Y| + 1) / (|P|Y| + 1).
    target = torch.tensor([[0, 0, 1, 1, 1, 255]]).view(1, 1, 1, 6)
    pred = torch.tensor([0, 1, 1, 1, 0, 1])
    logits = torch.stack([(pred == 0).float(), (pred == 1).float()]).view(1, 2, 1, 1, 6) * 100
    # minority class 1 among labelled voxels? counts [2, 3] -> minority is class 0
    assert jaccard_classes([2, 3]) == (0,) and jaccard_classes([5, 1]) == (1,) and jaccard_classes([5, 1, 1]) == (1, 2)
    # class 1: P = {1, 2, 3} (voxel 5 is unlabelled), Y = {2, 3, 4}: (2 + 1) / (4 + 1)
    j1 = float(soft_jaccard(logits, target, 255, classes=(1,)))
    assert abs(j1 - (1 - 3 / 5)) < 1e-5
    # class 0: P = {0, 4}, Y = {0, 1}: (1 + 1) / (3 + 1)
    assert abs(float(segmentation_loss(logits, target, None, 255, loss="jaccard", classes=(0,))) - 0.5) < 1e-5


def test_loss_modes():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 2, 3, 3)
    target = torch.randint(0, 2, (1, 2, 3, 3))
    w = torch.ones(2)
    ce = weighted_cross_entropy(logits, target, w, 255)
    jac = soft_jaccard(logits, target, 255)
    assert torch.allclose(segmentation_loss(logits, target, w, 255, loss="ce"), ce)
    assert torch.allclose(segmentation_loss(logits, target, w, 255, loss="ce+jaccard"), ce + jac)
    assert torch.allclose(segmentation_loss(logits, target, w, 255, 0.5, loss="ce+jaccard"), ce + 0.5 * jac)
    assert torch.allclose(segmentation_loss(logits, target, w, 255, loss="jaccard"), jac)


def test_jaccard_next_to_cross_entropy_skips_classes_absent_from_the_batch():
    # A patch without class 2: beside cross-entropy, Jaccard scores classes 1 only (the paper's
    # sum p / (sum p + 1) for an absent class would push class 2 to "never"); alone it keeps all.
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 4, 4, requires_grad=True)
    target = torch.randint(0, 2, (1, 2, 4, 4))
    w = torch.ones(3)
    ce = weighted_cross_entropy(logits, target, w, 255)
    present_only = soft_jaccard(logits, target, 255, classes=(1,))
    every = soft_jaccard(logits, target, 255)
    assert float(every) > float(present_only) + 0.1
    assert torch.allclose(segmentation_loss(logits, target, w, 255, loss="ce+jaccard"), ce + present_only)
    assert torch.allclose(segmentation_loss(logits, target, w, 255, loss="jaccard"), every)
    # No scored class present at all: the term is 0 with a gradient graph, not NaN.
    zeros = torch.zeros_like(target)
    alone = segmentation_loss(logits, zeros, w, 255, loss="ce+jaccard")
    assert torch.allclose(alone, weighted_cross_entropy(logits, zeros, w, 255))
    alone.backward()
    assert torch.isfinite(logits.grad).all()


def test_schedules():
    from sparseseg.trainer.schedule import lr_at

    assert lr_at(0, 100, 1.0, "constant") == 1.0 == lr_at(99, 100, 1.0, "constant")
    assert [lr_at(i, 100, 1.0, "step") for i in (49, 50, 74, 75)] == [1.0, 0.1, 0.1, 0.01]
    assert lr_at(0, 100, 1.0, "poly") == 1.0 and abs(lr_at(50, 100, 1.0, "poly") - 0.5 ** 0.9) < 1e-12
    assert lr_at(0, 100, 1.0, "poly", warmup=10) == 0.01 and lr_at(10, 100, 1.0, "constant", warmup=10) == 1.0
    with pytest.raises(SparsesegError, match="unknown schedule"):
        lr_at(0, 10, 1.0, "cosine")


def test_iou_on_known_arrays():
    labels = np.array([0, 0, 1, 1, 1, 2, 255, 255])
    pred = np.array([0, 1, 1, 1, 0, 2, 2, 1])
    res = iou_per_class(pred, labels, 3, 255)
    # class 0: TP 1, FP 1 (voxel 4), FN 1 (voxel 1) -> 1/3; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: 1/1
    assert res["iou"] == [1 / 3, 0.5, 1.0]
    assert res["mean_foreground_iou"] == 0.75
    assert res["voxels"] == 6


def test_class_weights_option_names_and_numbers():
    from sparseseg.errors import SparsesegError
    from sparseseg.trainer.options import parse_class_weights

    assert parse_class_weights("balanced", 3) == () and parse_class_weights(None, 3) == ()
    assert parse_class_weights("Uniform", 3) == (1.0, 1.0, 1.0)
    assert parse_class_weights("1,2.5", 2) == (1.0, 2.5)
    with pytest.raises(SparsesegError, match="balanced, uniform or numbers"):
        parse_class_weights("heavy", 2)
