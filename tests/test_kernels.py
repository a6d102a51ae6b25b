"""Kernel references against the engine's CPU path, PTX compilation of every .cu file, and
(where a GPU and CuPy exist) bit-exact GPU parity against the references."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseseg.engine.tensor_ops import normalization_tensors
from sparseseg.engine.tiling import gaussian_weights
from sparseseg.kernels import reference as ref

KERNELS = Path(__file__).parents[1] / "sparseseg" / "kernels"


def test_gather_reference_reflects_normalizes_and_casts():
    """Reflect padding at the volume border, clip then (x - mean) * (1 / std) per channel in
    float32, then the cast; slices and index maps give the same tiles."""
    vol = (np.random.default_rng(0).random((2, 9, 11, 13)) * 255).astype(np.uint8)
    region = torch.from_numpy(vol[:, 2:, :, 3:])                  # resident part, starts at (2, 0, 3)
    norm = {"mean": [10.0, 20.0], "std": [2.0, 4.0], "lo": [5.0, 0.0], "hi": [200.0, 250.0]}
    offsets = [(0, 0, 0), (4, 8, 2)]
    origin = (3, -5, 4)                                           # grid start: tiles cross the y border
    tile = (6, 9, 7)
    got = ref.gather(region, (2, 0, 3), offsets, origin, vol.shape[1:], tile, normalization_tensors(norm, "cpu"))
    padded = np.pad(vol.astype(np.float32), [(0, 0)] + [(20, 20)] * 3, mode="reflect")
    m = np.float32([10, 20]).reshape(-1, 1, 1, 1)
    inv = (np.float32(1) / np.float32([2, 4])).reshape(-1, 1, 1, 1)
    lo, hi = np.float32([5, 0]).reshape(-1, 1, 1, 1), np.float32([200, 250]).reshape(-1, 1, 1, 1)
    for n, off in enumerate(offsets):
        sl = tuple(slice(o + f + 20, o + f + 20 + t) for o, f, t in zip(origin, off, tile))
        want = (np.clip(padded[(slice(None),) + sl], lo, hi) - m) * inv
        assert np.array_equal(got[n].numpy(), want)
    half = ref.gather(region, (2, 0, 3), offsets, origin, vol.shape[1:], tile, None, torch.float16)
    assert half.dtype == torch.float16 and np.array_equal(half[0].numpy(), padded[:, 23:29, 15:24, 24:31])


def test_stitch_references():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(2, 3, 4, 5, 6)).astype(np.float32))
    labels = torch.zeros((6, 5, 6), dtype=torch.uint8)
    probs = torch.zeros((3, 6, 5, 6), dtype=torch.uint8)
    ref.stitch_valid(logits, [(0, 0, 0), (4, 0, 0)], [(4, 5, 6), (2, 5, 6)], labels, probs)
    lg = logits.numpy()
    assert np.array_equal(labels[:4].numpy(), lg[0].argmax(0)) and np.array_equal(labels[4:].numpy(),
                                                                                 lg[1, :, :2].argmax(0))
    e = np.exp(lg[0] - lg[0].max(0))
    assert np.abs(probs[:, :4].numpy().astype(int) - np.rint(255 * e / e.sum(0))).max() <= 1
    # same padding: two overlapping tiles, blended
    w = torch.from_numpy(gaussian_weights((4, 5, 6)))
    acc = torch.zeros((3, 6, 5, 6))
    wsum = torch.zeros((6, 5, 6))
    ref.accumulate_same(logits, w, [(0, 0, 0), (2, 0, 0)], acc, wsum)
    lab = torch.zeros((5, 5, 6), dtype=torch.uint8)
    ref.finalize_same(acc, wsum, (1, 0, 0), lab)
    wn = w.numpy()
    manual = np.zeros((3, 6, 5, 6), np.float32)
    manual[:, :4] += lg[0] * wn
    manual[:, 2:] += lg[1] * wn
    ws = np.zeros((6, 5, 6), np.float32)
    ws[:4] += wn
    ws[2:] += wn
    assert np.array_equal(lab.numpy(), (manual / ws).argmax(0)[1:])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("cu", sorted(p.name for p in KERNELS.glob("*.cu")))
def test_cuda_sources_compile_to_ptx(tmp_path, cu):
    r = subprocess.run(["nvcc", "--ptx", "-arch=compute_90", "-I", str(KERNELS), "-o", str(tmp_path / "k.ptx"),
                        str(KERNELS / cu)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_gpu_gather_parity(dtype, half, normalize):
    pytest.importorskip("cupy")
    from sparseseg.kernels import gpu

    rng = np.random.default_rng(2)
    vol = (rng.random((2, 17, 23, 29)) * 200).astype(dtype)
    region = torch.from_numpy(vol[:, 1:, :, 2:]).cuda()          # resident part, starts at (1, 0, 2)
    offsets = [(0, 0, 0), (8, 12, 16), (4, 0, 8)]
    origin = (-4, -7, 3)                                          # reflect at both ends
    tile = (13, 11, 17)
    norm = normalization_tensors({"mean": [50, 60], "std": [10, 20], "lo": [5, 0], "hi": [150, 190]}, "cuda") \
        if normalize else None
    out_dtype = torch.float16 if half else torch.float32
    args = (region, (1, 0, 2), offsets, origin, vol.shape[1:], tile, norm, out_dtype)
    assert torch.equal(gpu.gather(*args), ref.gather(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("half", [False, True])
def test_gpu_stitch_parity(half):
    pytest.importorskip("cupy")
    from sparseseg.kernels import gpu

    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(size=(3, 4, 7, 9, 11)).astype(np.float16 if half else np.float32)).cuda()
    dst, keep = [(0, 0, 0), (7, 0, 0), (0, 9, 0)], [(7, 9, 11), (5, 9, 11), (7, 4, 11)]
    outs = []
    for fn in (ref.stitch_valid, gpu.stitch_valid):
        labels = torch.zeros((12, 13, 11), dtype=torch.uint8, device="cuda")
        probs = torch.zeros((4, 12, 13, 11), dtype=torch.uint8, device="cuda")
        fn(logits, dst, keep, labels, probs)
        outs.append((labels, probs))
    assert torch.equal(outs[0][0], outs[1][0])
    assert (outs[0][1].int() - outs[1][1].int()).abs().max() <= 1
    w = torch.from_numpy(gaussian_weights((7, 9, 11))).cuda()
    pos = [(0, 0, 0), (3, 4, 0), (5, 4, 2)]
    outs = []
    for acc_fn, fin_fn in ((ref.accumulate_same, ref.finalize_same), (gpu.accumulate_same, gpu.finalize_same)):
        acc = torch.zeros((4, 12, 13, 13), device="cuda")
        wsum = torch.zeros((12, 13, 13), device="cuda")
        acc_fn(logits, w, pos, acc, wsum)
        labels = torch.zeros((10, 10, 9), dtype=torch.uint8, device="cuda")
        probs = torch.zeros((4, 10, 10, 9), dtype=torch.uint8, device="cuda")
        fin_fn(acc, wsum, (1, 2, 3), labels, probs)
        outs.append((acc, labels, probs))
    assert torch.equal(outs[0][0], outs[1][0])              # no FMA contraction: bit-exact accumulators
    assert torch.equal(outs[0][1], outs[1][1])
    assert (outs[0][2].int() - outs[1][2].int()).abs().max() <= 1


def test_kernels_import_without_cuda():
    import sparseseg.kernels.gpu  # noqa: F401
    import sparseseg.kernels.loader as loader

    src = loader.source("stitch_same.cu")
    assert "__global__" in src and 'include "common.cuh"' not in src and "reflect_index" in src
