"""Kernel references against the engine's CPU path, PTX compilation of every .cu file, and
(where a GPU and CuPy exist) bit-exact GPU parity against the references."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sparseseg.engine.blocks import Block, assemble, read_plan
from sparseseg.engine.tiling import gaussian_weights, softmax
from sparseseg.kernels import reference as ref
from tests.helpers import tiny_config

KERNELS = Path(__file__).parents[1] / "sparseseg" / "kernels"


def test_gather_reference_matches_engine_reflect_padding():
    geom = tiny_config(depth=3).geometry
    vol = (np.random.default_rng(0).random((2, 9, 11, 13)) * 255).astype(np.uint8)
    block = Block((0, 0, 0), (0, 4, 8), (9, 7, 5))
    plan = read_plan(block, vol.shape[1:], geom, (4, 4, 4), 0.5)
    padded = assemble(vol[(slice(None),) + plan.region].astype(np.float32), plan)
    origin = [s.start for s in plan.region]
    resident = vol[(slice(None),) + plan.region]
    starts = [s - c for s, c in zip(block.start, geom.context)]
    tile = (12, 16, 14)
    tiles = ref.gather(resident, [starts], origin, vol.shape[1:], tile, [10.0, 20.0], [2.0, 4.0])
    want = (padded[:, :12, :16, :14] - np.array([10.0, 20.0], np.float32).reshape(-1, 1, 1, 1)) / np.array(
        [2.0, 4.0], np.float32).reshape(-1, 1, 1, 1)
    assert np.allclose(tiles[0], want, atol=1e-6)
    assert ref.gather(resident, [starts], origin, vol.shape[1:], tile, [0, 0], [1, 1], np.float16).dtype == np.float16


def test_stitch_references_match_tiling_semantics():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 4, 5, 6)).astype(np.float32)
    labels, probs = ref.stitch_valid(logits, [(0, 0, 0), (4, 0, 0)], [(4, 5, 6), (2, 5, 6)], (6, 5, 6), True)
    assert np.array_equal(labels[:4], logits[0].argmax(0)) and np.array_equal(labels[4:], logits[1, :, :2].argmax(0))
    assert np.abs(probs[:, :4].astype(int) - np.rint(255 * softmax(logits[0]))).max() == 0
    # same padding: two overlapping tiles, blended
    w = gaussian_weights((4, 5, 6))
    acc = np.zeros((3, 6, 5, 6), np.float32)
    wsum = np.zeros((6, 5, 6), np.float32)
    ref.accumulate_same(logits, w, [(0, 0, 0), (2, 0, 0)], acc, wsum)
    lab, _ = ref.finalize_same(acc, wsum, (0, 0, 0), (6, 5, 6))
    manual = np.zeros_like(acc)
    manual[:, :4] += logits[0] * w
    manual[:, 2:] += logits[1] * w
    ws = np.zeros_like(wsum)
    ws[:4] += w
    ws[2:] += w
    assert np.array_equal(lab, (manual / ws).argmax(0))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("cu", sorted(p.name for p in KERNELS.glob("*.cu")))
def test_cuda_sources_compile_to_ptx(tmp_path, cu):
    r = subprocess.run(["nvcc", "--ptx", "-arch=compute_90", "-I", str(KERNELS), "-o", str(tmp_path / "k.ptx"),
                        str(KERNELS / cu)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("half", [False, True])
def test_gpu_gather_parity(dtype, half):
    pytest.importorskip("cupy")
    import torch

    from sparseseg.kernels import gpu

    rng = np.random.default_rng(2)
    vol = (rng.random((2, 17, 23, 29)) * 200).astype(dtype)
    offsets = [(-5, -7, 3), (10, 15, 20), (0, 0, 0)]        # reflect at both ends
    tile = (13, 11, 17)
    out_dtype = np.float16 if half else np.float32
    want = ref.gather(vol, offsets, (0, 0, 0), vol.shape[1:], tile, [50, 60], [10, 20], out_dtype)
    got = gpu.gather(torch.from_numpy(vol).cuda(), offsets, (0, 0, 0), vol.shape[1:], tile, [50, 60], [10, 20],
                     out_dtype).cpu().numpy()
    assert np.array_equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("half", [False, True])
def test_gpu_stitch_parity(half):
    pytest.importorskip("cupy")
    import torch

    from sparseseg.kernels import gpu

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 4, 7, 9, 11)).astype(np.float16 if half else np.float32)
    dst, keep = [(0, 0, 0), (7, 0, 0), (0, 9, 0)], [(7, 9, 11), (5, 9, 11), (7, 4, 11)]
    want_l, want_p = ref.stitch_valid(logits, dst, keep, (12, 13, 11), True)
    got_l, got_p = gpu.stitch_valid(torch.from_numpy(logits).cuda(), dst, keep, (12, 13, 11), True)
    assert np.array_equal(got_l.cpu().numpy(), want_l)
    assert np.abs(got_p.cpu().numpy().astype(int) - want_p).max() <= 1
    w = gaussian_weights((7, 9, 11))
    pos = [(0, 0, 0), (3, 4, 0), (5, 4, 2)]
    acc = np.zeros((4, 12, 13, 13), np.float32)
    wsum = np.zeros((12, 13, 13), np.float32)
    ref.accumulate_same(logits, w, pos, acc, wsum)
    want_l, want_p = ref.finalize_same(acc, wsum, (1, 2, 3), (10, 10, 9), True)
    acc_g = torch.zeros((4, 12, 13, 13), device="cuda")
    wsum_g = torch.zeros((12, 13, 13), device="cuda")
    gpu.accumulate_same(torch.from_numpy(logits).cuda(), torch.from_numpy(w).cuda(), pos, acc_g, wsum_g)
    assert np.array_equal(acc_g.cpu().numpy(), acc)             # no FMA contraction: bit-exact
    got_l, got_p = gpu.finalize_same(acc_g, wsum_g, (1, 2, 3), (10, 10, 9), True)
    assert np.array_equal(got_l.cpu().numpy(), want_l)
    assert np.abs(got_p.cpu().numpy().astype(int) - want_p).max() <= 1


def test_kernels_import_without_cuda():
    import sparseseg.kernels.gpu  # noqa: F401
    import sparseseg.kernels.loader as loader

    src = loader.source("stitch_same.cu")
    assert "__global__" in src and 'include "common.cuh"' not in src and "reflect_index" in src
