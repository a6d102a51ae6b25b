import numpy as np
import torch

from sparseseg.trainer.augment import Augmenter, bspline_matrix, elastic_field
from sparseseg.trainer.config import AugmentConfig


def test_bspline_interpolates_control_values():
    m = bspline_matrix(97, 32.0)
    v = np.random.default_rng(0).normal(size=m.shape[1])
    assert np.allclose((m @ v)[[0, 32, 64, 96]], v[1:5], atol=1e-4)


def test_elastic_field_statistics_and_smoothness():
    g = torch.Generator().manual_seed(0)
    f = elastic_field((64, 64, 64), (4, 4, 0), (32, 32, 32), g, "cpu")
    assert f[2].abs().max() == 0                       # sigma 0 axis does not move
    assert 2.0 < float(f[0].std()) < 6.0               # ~ N(0, 4) between control points
    assert float((f[0, 1:] - f[0, :-1]).abs().max()) < 1.5   # smooth: no jumps between neighbours


def _sample(cfg, image, labels, start, in_shape, out_off, out_shape, seed=0):
    aug = Augmenter(cfg, None, False, [image.mean()], [image.std() + 1e-6], seed, "cpu")
    return aug.sample(image, labels, start, in_shape, out_off, out_shape, 255)


def test_identity_augmentation_is_a_crop():
    rng = np.random.default_rng(0)
    image = rng.random((1, 20, 30, 30)).astype(np.float32)
    labels = rng.integers(0, 3, (20, 30, 30)).astype(np.uint8)
    cfg = AugmentConfig(elastic=False, rotate=False, scale=(), flip=False, gray=False, probability=1.0)
    x, y = _sample(cfg, image, labels, (2, 3, 4), (10, 12, 14), (1, 2, 3), (8, 8, 8))
    assert np.allclose(x.numpy()[0], image[0, 2:12, 3:15, 4:18], atol=1e-5)
    assert np.array_equal(y.numpy(), labels[3:11, 5:13, 7:15])


def _one_annotated_slice():
    rng = np.random.default_rng(1)
    image = rng.random((1, 16, 40, 40)).astype(np.float32)
    labels = np.full((16, 40, 40), 255, np.uint8)
    labels[8] = rng.integers(0, 3, (40, 40))             # one annotated slice
    return image, labels


def _thickness(y):
    """Labelled voxels per (y, x) column of the output, over the columns that meet the slice."""
    n = (y.numpy() != 255).sum(0)
    return n[n > 0]


def test_labels_stay_labels_and_outside_is_ignored():
    image, labels = _one_annotated_slice()
    # Scaling by 1.3 about the centre and in-plane rotation never thicken a z-slice: with nearest
    # sampling each output column meets it at most once, and points outside the volume are ignored.
    cfg = AugmentConfig(probability=1.0, scale=(1.3, 1.3), elastic=False)
    for seed in range(5):
        # patch at the corner: rotation/scale pull in points from outside the volume
        x, y = _sample(cfg, image, labels, (0, 0, 0), (16, 40, 40), (0, 0, 0), (16, 40, 40), seed)
        assert set(np.unique(y.numpy()).tolist()) <= {0, 1, 2, 255}        # nearest: no blended values
        t = _thickness(y)
        assert t.max() == 1 and t.size > 0.4 * 40 * 40
        assert torch.isfinite(x).all()


def test_default_augmentation_keeps_a_slice_thin():
    """With elastic deformation (sigma 4 voxels on a 32-voxel grid) and scales 0.85-1.15, one
    annotated slice stays about one voxel thick: 1/scale <= 1.18 on average, a local
    compression adds a little; a misaligned label field would smear it over many voxels."""
    image, labels = _one_annotated_slice()
    means = []
    for seed in range(8):
        _, y = _sample(AugmentConfig(probability=1.0), image, labels, (0, 0, 0), (16, 40, 40), (0, 0, 0),
                       (16, 40, 40), seed)
        t = _thickness(y)
        assert t.max() <= 4
        means.append(t.mean())
    assert np.mean(means) < 1.35 and max(means) < 1.7


def test_2d_planar_augmentation_keeps_slice():
    image = np.zeros((1, 5, 32, 32), np.float32)
    image[0, 2] = 1.0
    labels = np.full((5, 32, 32), 255, np.uint8)
    labels[2] = 1
    aug = Augmenter(AugmentConfig(probability=1.0, gray=False), None, True, [0.5], [0.5], 0, "cpu")
    x, y = aug.sample(image, labels, (2, 0, 0), (1, 32, 32), (0, 0, 0), (1, 32, 32), 255)
    # no z motion: the slice read is still slice 2 wherever the point lands in the volume
    assert set(np.unique(x.numpy()).round(4).tolist()) <= {1.0}
    assert set(np.unique(y.numpy()).tolist()) <= {1, 255}


def test_lossless_mode_moves_voxels_without_resampling():
    # Flips and right-angle turns only: every output value is one stored voxel value, and the
    # label at each output voxel is the label stored under the image value read there.
    rng = np.random.default_rng(3)
    image = rng.permutation(16 * 31 * 30).reshape(1, 16, 31, 30).astype(np.float32)   # distinct values
    labels = (image[0] % 3).astype(np.uint8)
    cfg = AugmentConfig.mode("lossless")
    cfg = AugmentConfig(**{**cfg.__dict__, "gray": False, "probability": 1.0})
    turned = 0
    for seed in range(8):
        x, y = _sample(cfg, image, labels, (2, 5, 4), (10, 21, 20), (1, 1, 1), (8, 19, 18), seed)
        # grid_sample's normalised coordinates cost ~1e-6 of a voxel: a neighbour weighs < 1e-5
        # (values differ by up to 15,000), where a real half-voxel blend would be off by thousands.
        assert np.abs(x.numpy()[0] - np.round(x.numpy()[0])).max() < 0.15
        v = np.round(x.numpy()[0])
        assert np.isin(v, image).all()                              # no blended values
        inner = v[1:9, 1:20, 1:19]
        ok = y.numpy() != 255
        assert np.array_equal(y.numpy()[ok], (inner[ok] % 3).astype(np.uint8))
        turned += not np.array_equal(v, image[0, 2:12, 5:26, 4:24])
    assert turned >= 4                                               # it does augment


def _pair(mode, planar, seed=3):
    args = (AugmentConfig.mode(mode), None, planar, [0.5, 0.5], [0.3, 0.3], seed, "cpu")
    fast, slow = Augmenter(*args), Augmenter(*args)
    slow.integral = False               # the interpolating path, as for elastic/scaled patches
    return fast, slow


def test_gathered_patches_equal_interpolated_ones():
    """Flips and right-angle turns are gathered, not resampled: inside the volume the same image
    values and labels as grid_sample gives, draw for draw (same random stream)."""
    rng = np.random.default_rng(1)
    image = rng.random((2, 30, 41, 37)).astype(np.float32)
    labels = rng.integers(0, 4, (30, 41, 37)).astype(np.uint8)
    labels[labels == 3] = 255
    for mode in ("lossless", "none"):
        for planar in (False, True):
            fast, slow = _pair(mode, planar)
            assert fast.integral
            shape, out = ((1, 20, 20), (1, 10, 11)) if planar else ((8, 17, 20), (4, 10, 11))
            for _ in range(60):
                start = tuple(int(rng.integers(0, n - s + 1)) for n, s in zip(labels.shape, shape))
                xa, ya = fast.sample(image, labels, start, shape, (0, 3, 4), out, 255)
                xb, yb = slow.sample(image, labels, start, shape, (0, 3, 4), out, 255)
                assert torch.allclose(xa, xb, atol=1e-5) and torch.equal(ya, yb)


def test_gathered_patch_reflects_like_the_engine():
    """Past the border the image is reflected by the engine's rule (read_reflected), however far
    the patch reaches, and labels there are ignored."""
    from sparseseg.trainer.data import read_reflected

    rng = np.random.default_rng(2)
    image = rng.random((1, 6, 9, 8)).astype(np.float32)
    labels = rng.integers(0, 2, (6, 9, 8)).astype(np.uint8)
    fast, _ = _pair("none", False)
    start, shape = (-4, 5, -7), (10, 12, 14)
    x, y = fast.sample(image, labels, start, shape, (2, 3, 4), (6, 6, 6), 255)
    assert np.array_equal(x.numpy(), read_reflected(image, start, shape))
    window = np.full((6, 6, 6), 255)
    inside = labels[0:4, 8:9, 0:3]                     # output window (-2..3, 8..13, -3..2) meets the volume here
    window[2:6, 0:1, 3:6] = inside
    assert np.array_equal(y.numpy(), window)
