"""The incumbent baseline (benchmarks/baselines/forest.py) learns a toy volume from a few slices."""

import numpy as np
import pytest

from sparseseg.eval.metrics import iou_per_class
from sparseseg.trainer.sparse import annotated_mask, sparsify
from tests.helpers import blobs

pytest.importorskip("sklearn")
from benchmarks.baselines.forest import _features, fit_predict, is_thin


def test_filter_bank_sizes():
    # 2D: smoothing, LoG, gradient magnitude, DoG, 2 structure-tensor and 2 Hessian eigenvalues per scale.
    assert _features(np.zeros((16, 16)), sigmas=(1.0, 2.0)).shape == (16, 16, 16)
    assert _features(np.zeros((8, 16, 16)), sigmas=(1.0,)).shape == (10, 8, 16, 16)
    assert is_thin((20, 1024, 1024)) and not is_thin((64, 64, 64))
    assert is_thin((64, 64, 64), voxel_size=(50, 4, 4))


@pytest.mark.parametrize("two_d", [True, False])
def test_forest_learns_blobs_from_few_slices(two_d):
    image, dense = blobs((12, 40, 40), seed=3)
    slices = [(0, 3), (0, 8)]
    pred, info = fit_predict(image, sparsify(dense, slices, 255), 255, n_trees=10, sigmas=(1.0, 2.0),
                             two_d=two_d, max_samples=1000)
    held = dense.copy()
    held[annotated_mask(dense, slices)] = 255
    assert info["training_samples"] <= 1200 and info["annotated_voxels"] == 2 * 40 * 40
    assert iou_per_class(pred, held, 2)["iou"][1] > 0.8
    # Applied to another volume of the same kind, it still segments it.
    other, other_dense = blobs((12, 40, 40), seed=4)
    pred2, _ = fit_predict(image, sparsify(dense, slices, 255), 255, n_trees=10, sigmas=(1.0, 2.0),
                           two_d=two_d, predict_image=other)
    assert iou_per_class(pred2, other_dense, 2)["iou"][1] > 0.8


def test_one_fit_predicts_the_training_volume_and_others():
    image, dense = blobs((12, 40, 40), seed=3)
    other, _ = blobs((12, 40, 40), seed=4)
    sparse = sparsify(dense, [(0, 3), (0, 8)], 255)
    kw = dict(n_trees=10, sigmas=(1.0, 2.0), two_d=False, max_samples=1000)
    preds, info = fit_predict(image, sparse, 255, predict_images=[other], **kw)
    assert len(preds) == 2 and len(info["predict_seconds"]) == 2
    assert np.array_equal(preds[0], fit_predict(image, sparse, 255, **kw)[0])       # the same seeded forest
    assert np.array_equal(preds[1], fit_predict(image, sparse, 255, predict_image=other, **kw)[0])
    with pytest.raises(ValueError):
        fit_predict(image, sparse, 255, predict_image=other, predict_images=[other], **kw)
