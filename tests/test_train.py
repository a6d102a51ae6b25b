import numpy as np
import torch

from sparseseg.model.checkpoint import load_checkpoint
from sparseseg.pipeline import predict_volume
from sparseseg.trainer.config import AugmentConfig
from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.metrics import iou_per_class
from sparseseg.trainer.sparse import orthogonal_slices, sparsify
from sparseseg.trainer.train import train
from tests.helpers import blobs, fast_train_config, tiny_config


def test_tiny_overfit_reaches_high_iou():
    image, labels = blobs()
    cfg = tiny_config(width=8)
    res = train([TrainingVolume(image, labels, "toy")], cfg, fast_train_config(iterations=80, patch_output=(8, 16, 16)),
                ["bg", "ball"], progress=False)
    pred, _ = predict_volume(res.model, image)
    assert iou_per_class(pred, labels, 2)["iou"][1] > 0.9


def test_sparse_training_with_augmentation_and_validation(tmp_path):
    image, labels = blobs(seed=3)
    sparse = sparsify(labels, orthogonal_slices(labels.shape, (3, 3, 3)))
    cfg = tiny_config(width=4)
    tc = fast_train_config(iterations=6, augment=AugmentConfig(), val_fraction=0.3, val_every=3,
                           patch_output=(4, 8, 8), dice_weight=0.5)
    res = train([TrainingVolume(image, sparse, "toy")], cfg, tc, ["bg", "ball"], out_path=tmp_path / "m.pt",
                progress=False)
    assert any("val_mean_foreground_iou" in h for h in res.history)
    ck = load_checkpoint(tmp_path / "m.pt")
    assert ck.iteration == 6 and ck.train_config["patch_output"] == [4, 8, 8]


def test_seed_reproducible_and_resume_identical(tmp_path):
    image, labels = blobs(seed=1)
    cfg = tiny_config(width=4)
    vols = [TrainingVolume(image, labels, "toy")]
    tc = fast_train_config(iterations=6, augment=AugmentConfig(), patch_output=(4, 8, 8), checkpoint_every=3)
    a = train(vols, cfg, tc, ["bg", "fg"], out_path=tmp_path / "a.pt", progress=False)
    b = train(vols, cfg, tc, ["bg", "fg"], out_path=tmp_path / "b.pt", progress=False)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    # stop after 3 iterations, then resume to 6: same weights as the uninterrupted run
    from dataclasses import replace

    train(vols, cfg, replace(tc, iterations=3), ["bg", "fg"], out_path=tmp_path / "c.pt", progress=False)
    c = train(vols, cfg, tc, ["bg", "fg"], out_path=tmp_path / "c.pt", resume=tmp_path / "c.pt", progress=False)
    for (k, va), vc in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.allclose(va, vc, atol=1e-6), k


def test_2d_baseline_trains():
    image, labels = blobs(seed=2)
    cfg = tiny_config(ndim=2, width=4)
    res = train([TrainingVolume(image, labels, "toy")], cfg, fast_train_config(iterations=3, patch_output=(1, 8, 8)),
                ["bg", "fg"], progress=False)
    pred, _ = predict_volume(res.model, image)
    assert pred.shape == labels.shape and np.isfinite(res.final_loss)
