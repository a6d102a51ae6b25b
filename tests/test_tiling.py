import numpy as np
import pytest
import torch

from sparseseg.engine.tiling import pad_region, predict_array, torch_forward
from sparseseg.errors import SparsesegError
from sparseseg.model.network import SegmentationModel
from tests.helpers import tiny_config


def _whole_pass(model, image, geom):
    outs = [r.output_at_least(n) for r, n in zip(geom.axes, image.shape[1:])]
    ctx = geom.context
    padded = pad_region(image, ctx, [o - n + c for o, n, c in zip(outs, image.shape[1:], ctx)])
    with torch.no_grad():
        full = model(torch.from_numpy(padded[None]))[0].numpy()
    return full[(slice(None),) + tuple(slice(0, n) for n in image.shape[1:])]


@pytest.mark.parametrize("ndim", [2, 3])
def test_valid_tiles_equal_one_pass(ndim):
    cfg = tiny_config(ndim=ndim, depth=3)
    torch.manual_seed(0)
    model = SegmentationModel(cfg).eval()
    image = np.random.default_rng(0).random((1, 21, 37, 43)).astype(np.float32)
    full = _whole_pass(model, image, cfg.geometry)
    for tile in [(4, 4, 4), (8, 12, 20)] if ndim == 3 else [(1, 4, 4), (3, 12, 20)]:
        labels, probs = predict_array(torch_forward(model), image, cfg.geometry, tile_out=tile, batch=3,
                                      probabilities=True)
        assert np.array_equal(labels, full.argmax(0))
        assert np.abs(probs - torch.softmax(torch.from_numpy(full), 0).numpy()).max() < 1e-5


def test_same_padding_blending_covers_everything():
    cfg = tiny_config(padding="same", depth=2)
    model = SegmentationModel(cfg).eval()
    image = np.random.default_rng(1).random((1, 13, 30, 17)).astype(np.float32)
    labels, probs = predict_array(torch_forward(model), image, cfg.geometry, tile_out=(8, 8, 8),
                                  probabilities=True)
    assert labels.shape == image.shape[1:] and np.allclose(probs.sum(0), 1, atol=1e-5)
    # one tile covering everything gives the plain forward pass
    big = np.random.default_rng(2).random((1, 8, 16, 16)).astype(np.float32)
    lab1, _ = predict_array(torch_forward(model), big, cfg.geometry, tile_out=(8, 16, 16))
    with torch.no_grad():
        ref = model(torch.from_numpy(big[None]))[0].argmax(0).numpy()
    assert np.array_equal(lab1, ref)


def test_invalid_tile_lists_nearest_sizes():
    cfg = tiny_config(depth=3)
    with pytest.raises(SparsesegError, match="nearest valid"):
        predict_array(lambda x: x, np.zeros((1, 20, 20, 20), np.float32), cfg.geometry, tile_out=(5, 5, 5))


def test_reflect_pad_single_slice():
    img = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    out = pad_region(img, (2, 1, 0), (2, 1, 0))
    assert out.shape == (1, 5, 4, 2) and (out[0, :, 1:3] == img[0, 0]).all()
