"""The CUDA kernels' own source compiled for the CPU (kernels/host.py) and launched through the
real launchers of kernels/gpu.py, against the engine's torch functions on the engine's own read
plans: odd shapes, reflect borders, several batch sizes, and index arithmetic past 2^31 elements
(large arrays of untouched zero pages, so little memory is used)."""

import numpy as np
import pytest
import torch

from sparseseg.engine.blocks import make_blocks, read_plan
from sparseseg.engine.tiling import gaussian_weights, tile_input
from sparseseg.kernels import host
from sparseseg.kernels import torch_ops as ref
from sparseseg.kernels.torch_ops import normalization_tensors
from tests.helpers import tiny_config

pytestmark = [pytest.mark.host_kernels,
              pytest.mark.skipif(host.compiler() is None, reason="no host C++ compiler (g++ or $CXX) to build "
                                                                 "the .cu sources for the CPU")]


@pytest.fixture
def gpu(monkeypatch):
    """kernels/gpu.py with its CuPy launch replaced by the host launch of the same source."""
    from sparseseg.kernels import gpu as launchers

    monkeypatch.setattr(launchers, "_launch", host.launch)
    monkeypatch.setattr(launchers, "kernel", host.kernel)
    return launchers


def _plans(padding, shape, block, tile, depth=2):
    geom = tiny_config(depth=depth, padding=padding).geometry
    return geom, [(b, read_plan(b, shape, geom, tile, 0.5)) for b in make_blocks(shape, block)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("out", [torch.float32, torch.float16])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_gather_equals_the_torch_gather_on_real_read_plans(gpu, dtype, out, padding):
    shape = (21, 37, 43)                                           # odd: partial blocks, reflect at both ends
    tile = (12, 12, 12) if padding == "valid" else (8, 16, 8)
    geom, plans = _plans(padding, shape, (16, 16, 24), tile)
    vol = (np.random.default_rng(4).random((2,) + shape) * 200).astype(dtype)
    norm = normalization_tensors({"mean": [90.0, 20.0], "std": [40.0, 3.0], "lo": [3.0, 1.0], "hi": [190.0, 50.0]},
                                 "cpu")
    tin = tile_input(geom, tile)
    checked = 0
    for block, plan in plans:
        region = torch.from_numpy(np.ascontiguousarray(vol[(slice(None),) + plan.region]))
        for batch in (1, 2, 5):
            group = plan.offsets[:batch]
            for n in (None, norm):
                args = (region, plan.region_start, group, plan.origin, shape, tin, n, out)
                got, want = gpu.gather(*args), ref.gather(*args)
                assert got.dtype == want.dtype and torch.equal(got, want), (block.key, batch)
                checked += 1
    assert checked == len(plans) * 6


@pytest.mark.parametrize("half", [False, True])
def test_stitch_valid_equals_the_torch_stitch_on_real_plans(gpu, half):
    shape, tile = (21, 37, 43), (12, 12, 12)
    geom, plans = _plans("valid", shape, (16, 16, 24), tile)
    rng = np.random.default_rng(5)
    for block, plan in plans:
        keep = plan.keep()
        for batch in sorted({1, min(3, len(plan.offsets)), len(plan.offsets)}):
            logits = torch.from_numpy(rng.normal(size=(batch, 4) + tile).astype(np.float16 if half else np.float32))
            logits[:, 2] = logits[:, 1]                             # exact ties: the lowest class wins
            outs = []
            for fn in (ref.stitch_valid, gpu.stitch_valid):
                labels = torch.full(block.shape, 77, dtype=torch.uint8)
                probs = torch.full((4,) + block.shape, 77, dtype=torch.uint8)
                fn(logits, plan.offsets[:batch], keep[:batch], labels, probs)
                outs.append((labels, probs))
            assert torch.equal(outs[0][0], outs[1][0]), (block.key, batch)
            assert (outs[0][1].int() - outs[1][1].int()).abs().max() <= 1


@pytest.mark.parametrize("half", [False, True])
def test_same_padding_accumulate_and_finalize_equal_the_torch_functions(gpu, half):
    shape, tile = (21, 37, 43), (8, 16, 8)
    geom, plans = _plans("same", shape, (16, 16, 24), tile)
    w = torch.from_numpy(gaussian_weights(tile))
    rng = np.random.default_rng(6)
    for block, plan in plans:
        logits = torch.from_numpy(rng.normal(size=(len(plan.offsets), 3) + tile).astype(
            np.float16 if half else np.float32))
        outs = []
        for acc_fn, fin_fn in ((ref.accumulate_same, ref.finalize_same), (gpu.accumulate_same, gpu.finalize_same)):
            acc = torch.zeros((3,) + plan.out_shape)
            wsum = torch.zeros(plan.out_shape)
            for i in range(0, len(plan.offsets), 4):                # batches of 4, the last one shorter
                acc_fn(logits[i:i + 4], w, plan.offsets[i:i + 4], acc, wsum)
            labels = torch.zeros(block.shape, dtype=torch.uint8)
            probs = torch.zeros((3,) + block.shape, dtype=torch.uint8)
            fin_fn(acc, wsum, plan.crop, labels, probs)
            outs.append((acc, wsum, labels, probs))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), block.key
        assert torch.equal(outs[0][2], outs[1][2]), block.key
        assert (outs[0][3].int() - outs[1][3].int()).abs().max() <= 1


# ---------------------------------------------------------------- past 2^31 elements

def _zeros(shape, dtype):
    """A large array of untouched zero pages: only the voxels written or read take memory."""
    return torch.from_numpy(np.zeros(shape, dtype))


def test_gather_indexes_past_2_31_elements(gpu):
    shape = (800, 1200, 1200)                                       # 2 channels: 2.3e9 elements
    region = _zeros((2,) + shape, np.uint8)
    assert region.numel() > 2 ** 31
    corner = (np.random.default_rng(7).random((2, 12, 12, 12)) * 255).astype(np.uint8)
    region[:, -12:, -12:, -12:] = torch.from_numpy(corner)
    tin = (16, 16, 16)
    origin = tuple(n - 12 for n in shape)                          # the tile runs 4 voxels past the border
    args = (region, (0, 0, 0), [(0, 0, 0)], origin, shape, tin, None, torch.float32)
    got, want = gpu.gather(*args), ref.gather(*args)
    assert torch.equal(got, want) and got[0, 1].sum() > 0
    assert torch.equal(got[0, :, :12, :12, :12], torch.from_numpy(corner).float())


def test_stitch_valid_indexes_past_2_31_elements(gpu):
    labels = _zeros((1024, 1024, 1024), np.uint8)
    probs = _zeros((3, 1024, 1024, 1024), np.uint8)               # 3.2e9 elements
    logits = torch.randn(1, 3, 8, 8, 8)
    dst = [(1016, 1016, 1016)]
    gpu.stitch_valid(logits, dst, [(8, 8, 8)], labels, probs)
    assert torch.equal(labels[-8:, -8:, -8:], logits[0].argmax(0).to(torch.uint8))
    p = torch.softmax(logits[0], 0)
    assert (probs[:, -8:, -8:, -8:].int() - torch.round(p * 255).int()).abs().max() <= 1
    assert labels[-9:-8].sum() == 0 and probs[2, -9:-8].sum() == 0  # nothing beside the tile


def test_accumulate_and_finalize_index_past_2_31_elements(gpu):
    rshape = (1100, 1000, 1000)
    acc, wsum = _zeros((2,) + rshape, np.float32), _zeros(rshape, np.float32)   # acc: 2.2e9 elements
    tile = (4, 6, 8)
    w = torch.from_numpy(gaussian_weights(tile))
    logits = torch.randn(2, 2, *tile)
    pos = [tuple(n - t for n, t in zip(rshape, tile)), tuple(n - t - 2 for n, t in zip(rshape, tile))]
    gpu.accumulate_same(logits, w, pos, acc, wsum)
    sl = tuple(slice(n - t - 2, n) for n, t in zip(rshape, tile))
    want_acc, want_w = torch.zeros((2,) + tuple(t + 2 for t in tile)), torch.zeros(tuple(t + 2 for t in tile))
    ref.accumulate_same(logits, w, [(2, 2, 2), (0, 0, 0)], want_acc, want_w)
    assert torch.equal(acc[(slice(None),) + sl], want_acc) and torch.equal(wsum[sl], want_w)
    labels = torch.zeros((3, 4, 5), dtype=torch.uint8)
    crop = tuple(n - 5 for n in rshape)
    gpu.finalize_same(acc, wsum, crop, labels)
    want = torch.zeros_like(labels)
    ref.finalize_same(acc, wsum, crop, want)
    assert torch.equal(labels, want)


def test_launchers_refuse_a_batch_that_does_not_match_its_offsets(gpu):
    """The kernels read one offset row per tile: fewer rows than tiles would be read past the end."""
    with pytest.raises(ValueError, match="3 tiles but 2 offsets"):
        gpu.stitch_valid(torch.zeros(3, 2, 4, 4, 4), [(0, 0, 0)] * 2, [(4, 4, 4)] * 2,
                         torch.zeros((8, 8, 8), dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 tiles but 2 offsets"):
        gpu.accumulate_same(torch.zeros(3, 2, 4, 4, 4), torch.ones(4, 4, 4), [(0, 0, 0)] * 2,
                            torch.zeros((2, 8, 8, 8)), torch.zeros((8, 8, 8)))


def test_host_library_is_cached_and_a_bad_name_is_one_line():
    from sparseseg.errors import SparsesegError

    a = host.library("tile_gather.cu")
    assert host.library("tile_gather.cu") is a and any(host.cache_dir().glob("tile_gather-*.so"))
    with pytest.raises(SparsesegError, match="unknown kernel source"):
        host.library("nope.cu")
