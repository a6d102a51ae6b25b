import json

import numpy as np
import pytest
import torch

import sparseseg
from sparseseg.engine.tiling import check_tile, default_batch, default_tile, pad_region, tile_input
from sparseseg.errors import SparsesegError
from sparseseg.model.config import plan_model
from sparseseg.model.network import SegmentationModel
from tests.helpers import tiny_config


def _whole_pass(model, image, geom):
    outs = [r.output_at_least(n) for r, n in zip(geom.axes, image.shape[1:])]
    ctx = geom.context
    padded = np.pad(image, [(0, 0)] + [(c, o - n + c) for o, n, c in zip(outs, image.shape[1:], ctx)], mode="reflect")
    with torch.no_grad():
        full = model(torch.from_numpy(padded[None]))[0].numpy()
    return full[(slice(None),) + tuple(slice(0, n) for n in image.shape[1:])]


@pytest.mark.parametrize("ndim", [2, 3])
def test_valid_tiles_equal_one_pass(ndim):
    """sparseseg.predict (the engine's block pipeline in-process, device cpu) equals one pass over
    the whole volume for several block, tile and batch sizes."""
    cfg = tiny_config(ndim=ndim, depth=3)
    torch.manual_seed(0)
    model = SegmentationModel(cfg).eval()
    image = np.random.default_rng(0).random((1, 21, 37, 43)).astype(np.float32)
    full = _whole_pass(model, image, cfg.geometry)
    runs = [((12, 20, 20), 3, None), ((8, 12, 20), 1, (16, 16, 24))] if ndim == 3 else \
        [((7, 20, 20), 3, None), ((3, 12, 20), 2, (8, 16, 24))]
    for tile, batch, block in runs:
        labels, probs = sparseseg.predict(model, image, tile=tile, batch=batch, block=block, device="cpu",
                                          probabilities=True)
        assert np.array_equal(labels, full.argmax(0))
        assert np.abs(probs - torch.softmax(torch.from_numpy(full), 0).numpy()).max() < 1e-5


def test_same_padding_single_tile_is_the_plain_forward():
    cfg = tiny_config(padding="same", depth=2)
    model = SegmentationModel(cfg).eval()
    big = np.random.default_rng(2).random((1, 8, 16, 16)).astype(np.float32)
    lab1, _ = sparseseg.predict(model, big, tile=(8, 16, 16), device="cpu")
    with torch.no_grad():
        ref = model(torch.from_numpy(big[None]))[0].argmax(0).numpy()
    assert np.array_equal(lab1, ref)


def test_invalid_tile_lists_nearest_sizes():
    cfg = tiny_config(depth=3)
    with pytest.raises(SparsesegError, match="nearest valid"):
        check_tile(cfg.geometry, (5, 5, 5))
    with pytest.raises(SparsesegError, match="nearest valid"):
        sparseseg.predict(SegmentationModel(cfg), np.zeros((20, 20, 20), np.float32), tile=(5, 5, 5), device="cpu")


def test_reflect_pad_matches_numpy_and_single_slice():
    img = np.random.default_rng(0).random((2, 5, 6, 7)).astype(np.float32)
    assert np.array_equal(pad_region(img, (3, 0, 6), (4, 5, 2)),
                          np.pad(img, [(0, 0), (3, 4), (0, 5), (6, 2)], mode="reflect"))
    img = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    out = pad_region(img, (2, 1, 0), (2, 1, 0))
    assert out.shape == (1, 5, 4, 2) and (out[0, :, 1:3] == img[0, 0]).all()


def _contract(cfg):
    return {"model_config": cfg.to_dict(), "geometry": cfg.geometry.to_dict(), "in_channels": cfg.in_channels,
            "num_classes": cfg.num_classes}


def _ratio(geom, tile):
    return np.prod(tile_input(geom, tile)) / np.prod(tile)


PAPER_INPUT, PAPER_OUTPUT = (116, 132, 132), (28, 44, 44)


@pytest.mark.parametrize("budget_gib", [1, 4])
def test_default_tile_paper_network_cpu(budget_gib):
    """CPU budgets: never less than the paper's tile, never more input voxels per output voxel
    than the paper's tile needs (37), and within the measured memory budget."""
    from sparseseg.engine.tiling import tile_bytes

    cfg = plan_model("paper", 3, 3)
    c = _contract(cfg)
    tile = default_tile(c, "cpu", extent=(128, 256, 256), budget=budget_gib << 30)
    tin = tile_input(cfg.geometry, tile)
    assert all(a >= b for a, b in zip(tin, PAPER_INPUT)), tin
    assert _ratio(cfg.geometry, tile) <= np.prod(PAPER_INPUT) / np.prod(PAPER_OUTPUT)
    assert tile_bytes(c, tile) <= budget_gib << 30 or tin == (132, 132, 132)


def test_default_tile_paper_network_gpu_budget_and_batch():
    from sparseseg.engine.tiling import MAX_BATCH, tile_bytes

    cfg = plan_model("paper", 3, 3)
    c = _contract(cfg)
    tile = default_tile(c, "cuda", extent=(512, 512, 512), budget=40 << 30)      # an H100's share
    tin = tile_input(cfg.geometry, tile)
    assert all(a >= b for a, b in zip(tin, PAPER_INPUT)) and np.prod(tin) > 4 * np.prod(PAPER_INPUT)
    # on CUDA the batch is what the budget holds, capped by MAX_BATCH and by the block's tiles
    per_tile = tile_bytes(c, tile)
    assert default_batch(c, "cuda", tile, 64, budget=3 * per_tile + per_tile // 2) == min(3, MAX_BATCH)
    assert default_batch(c, "cuda", tile, 64, budget=100 * per_tile) == MAX_BATCH
    # the tile chosen for the H100 share above (23.5 GiB at its measured peak) leaves room for one
    # tile per pass in 40 GiB, three in 80 GiB
    assert 20 << 30 < per_tile < 27 << 30
    assert default_batch(c, "cuda", tile, 64, budget=40 << 30) == 1
    assert default_batch(c, "cuda", tile, 64, budget=80 << 30) == 3
    assert default_batch(c, "cuda", tile, 2, budget=100 * per_tile) == 2
    assert default_batch(c, "cuda", tile, 64, budget=per_tile // 2) == 1      # one tile even over budget
    assert default_batch(c, "cpu", tile, 64, budget=100 * per_tile) == 1     # CPU: never batched


@pytest.mark.parametrize("voxel_size", [None, (4, 1, 1)])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_default_tile_small_and_anisotropic_presets(voxel_size, padding):
    cfg = plan_model("small", 1, 2, padding=padding, voxel_size=voxel_size)
    c = _contract(cfg)
    extent = (40, 300, 300)
    tile = check_tile(cfg.geometry, default_tile(c, "cpu", extent=extent, budget=1 << 30))
    # one tile covers a short axis; a long axis gets a tile at least the network's context
    assert tile[0] == check_tile(cfg.geometry, (tile[0],) * 3)[0]
    if padding == "valid":
        assert tile[0] == cfg.geometry.z.output_at_least(40)
        assert tile[1] >= max(cfg.geometry.context) and _ratio(cfg.geometry, tile) < 8
    small = default_tile(c, "cpu", extent=extent, budget=1 << 24)
    assert np.prod(small) <= np.prod(tile)


def test_default_tile_of_a_plan_is_its_profile(tmp_path):
    """A fake TensorRT sidecar: the default tile is the profile's opt tile; a tile outside the
    profile is a one-line error naming it."""
    from sparseseg.engine.plan import choose
    from sparseseg.engine.tiling import check_profile_tile

    cfg = plan_model("small", 1, 2)
    c = _contract(cfg)
    ctx = cfg.geometry.context
    ins = {k: [b, 1] + [t + 2 * x for t, x in zip(tile, ctx)] for k, tile, b in
           (("min", (4, 4, 4), 1), ("opt", (36, 52, 52), 4), ("max", (68, 100, 100), 4))}
    c["profile"] = ins
    (tmp_path / "m.plan.json").write_text(json.dumps(c))
    assert default_tile(c, "cuda") == (36, 52, 52)
    blk, tile, batch = choose(c, (200, 300, 300), device="cuda")
    assert tile == (36, 52, 52) and batch == 4
    with pytest.raises(SparsesegError, match="outside the plan's profile .*max 68x100x100"):
        check_profile_tile(c, (76, 52, 52))
    with pytest.raises(SparsesegError, match="outside the plan's profile"):
        choose(c, (200, 300, 300), device="cuda", tile=(76, 52, 52))
