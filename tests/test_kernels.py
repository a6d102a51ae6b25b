"""Kernel references against the engine's CPU path, PTX compilation of every .cu file, and
(where a GPU and CuPy exist) bit-exact GPU parity against the references."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseseg.engine.tiling import gaussian_weights
from sparseseg.kernels import torch_ops as ref
from sparseseg.kernels.torch_ops import normalization_tensors

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
    # resident part, starts at (0, 0, 2): z reflects through voxel 0, so the region must hold it
    region = torch.from_numpy(np.ascontiguousarray(vol[:, :, :, 2:])).cuda()
    offsets = [(0, 0, 0), (8, 12, 16), (4, 0, 8)]
    origin = (-4, -7, 3)                                          # reflect at both ends
    tile = (13, 11, 17)
    norm = normalization_tensors({"mean": [50, 60], "std": [10, 20], "lo": [5, 0], "hi": [150, 190]}, "cuda") \
        if normalize else None
    out_dtype = torch.float16 if half else torch.float32
    args = (region, (0, 0, 2), offsets, origin, vol.shape[1:], tile, norm, out_dtype)
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


# ---------------------------------------------------------------- the engine's switch (--kernels)

def test_kernel_switch_defaults_to_torch_and_checks_its_input(monkeypatch):
    from sparseseg.errors import SparsesegError
    from sparseseg.kernels.select import block_ops, check_kernels, kernels_option

    monkeypatch.delenv("SPARSESEG_KERNELS", raising=False)
    assert kernels_option(None) == "torch" and kernels_option("cuda") == "cuda"
    monkeypatch.setenv("SPARSESEG_KERNELS", "cuda")
    assert kernels_option(None) == "cuda"
    monkeypatch.setenv("SPARSESEG_KERNELS", "triton")
    with pytest.raises(SparsesegError, match="unknown kernels 'triton'"):
        kernels_option(None)
    with pytest.raises(SparsesegError, match="--kernels cuda needs a CUDA device"):
        check_kernels("cuda", "cpu")
    check_kernels("torch", "cpu")
    assert block_ops("cuda", torch.device("cpu")).name == "torch"      # CPU never runs the kernels


def test_worker_calls_the_selected_functions(monkeypatch):
    """The block worker computes through the functions the switch selects (here a recording
    wrapper of the torch ones), with the job's --kernels value."""
    import sparseseg
    from sparseseg.kernels import select
    from sparseseg.model.network import SegmentationModel
    from tests.helpers import tiny_config

    calls, asked = [], []

    class Recording:
        name = "recording"

        def __init__(self):
            inner = select.TorchOps()
            for fn in ("gather", "stitch_valid", "accumulate_same", "finalize_same"):
                setattr(self, fn, lambda *a, _f=getattr(inner, fn), _n=fn, **k: (calls.append(_n), _f(*a, **k))[1])

    monkeypatch.setattr(select, "block_ops", lambda kernels, device: (asked.append(kernels), Recording())[1])
    torch.manual_seed(0)
    image = np.random.default_rng(0).random((10, 20, 20)).astype(np.float32)
    for padding, fns in (("valid", {"gather", "stitch_valid"}), ("same", {"gather", "accumulate_same",
                                                                          "finalize_same"})):
        calls.clear()
        model = SegmentationModel(tiny_config(depth=2, padding=padding)).eval()
        sparseseg.predict(model, image, device="cpu", backend="torch", kernels="torch")
        assert set(calls) == fns
    assert asked == ["torch", "torch"]


@pytest.mark.parametrize("option, message", [(("--kernels", "cuda"), "--kernels cuda needs a CUDA device"),
                                             (("--precision", "tf32"), "--precision tf32 needs a CUDA device")])
def test_cli_gpu_only_options_on_cpu_are_one_line_and_write_nothing(tmp_path, option, message):
    from click.testing import CliRunner

    from sparseseg.cli import main
    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.network import SegmentationModel
    from tests.helpers import tiny_config

    ck = save_checkpoint(tmp_path / "m.pt", SegmentationModel(tiny_config()), None, ["a", "b"], 255)
    np.save(tmp_path / "v.npy", np.zeros((8, 16, 16), np.float32))
    r = CliRunner().invoke(main, ["infer", "--engine", str(ck), str(tmp_path / "v.npy"), "--output",
                                  str(tmp_path / "o.zarr"), "--device", "cpu", *option])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and message in r.output
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_gpu_gather_parity_on_a_real_read_plan(dtype):
    """The kernel and the torch gather on the data of a real block at the volume border (its
    region, tile offsets and grid origin from blocks.read_plan), normalization in the gather."""
    pytest.importorskip("cupy")
    from sparseseg.engine.blocks import make_blocks, read_plan
    from sparseseg.engine.tiling import tile_input
    from sparseseg.kernels import gpu
    from tests.helpers import tiny_config

    geom = tiny_config(depth=3).geometry
    shape, tile = (21, 37, 43), (12, 12, 12)
    vol = (np.random.default_rng(4).random((1,) + shape) * 200).astype(dtype)
    norm = normalization_tensors({"mean": [90.0], "std": [40.0], "lo": [3.0], "hi": [190.0]}, "cuda")
    for block in make_blocks(shape, (16, 16, 24)):
        plan = read_plan(block, shape, geom, tile, 0.5)
        region = torch.from_numpy(np.ascontiguousarray(vol[(slice(None),) + plan.region])).cuda()
        for n in (None, norm):
            args = (region, plan.region_start, plan.offsets, plan.origin, shape, tile_input(geom, tile), n,
                    torch.float32)
            assert torch.equal(gpu.gather(*args), ref.gather(*args)), block.key


@pytest.mark.gpu
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_gpu_engine_kernels_equal_torch_functions(padding, precision, dtype):
    """The whole block pipeline on CUDA with --kernels cuda against --kernels torch: several
    blocks (volume border and interior), per-volume normalization in the gather, uint8
    probabilities: labels bit for bit, probabilities to one quantization step."""
    pytest.importorskip("cupy")
    import sparseseg
    from sparseseg.model.network import SegmentationModel
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    model = SegmentationModel(tiny_config(depth=2, width=8, classes=3, padding=padding),
                              normalization="percentile").eval()
    with torch.no_grad():                       # weights that give all three classes (checked on CPU)
        for p in model.parameters():
            p.normal_(0, 0.3)
    image = (np.random.default_rng(5).random((20, 36, 44)) * 200).astype(dtype)
    tile = (12, 12, 12) if padding == "valid" else (8, 16, 16)
    runs = {k: sparseseg.predict(model, image, tile=tile, block=(16, 16, 24), batch=3, device="cuda",
                                 backend="torch", precision=precision, probabilities="uint8", kernels=k)
            for k in ("torch", "cuda")}
    assert np.array_equal(runs["torch"][0], runs["cuda"][0])
    assert np.abs(runs["torch"][1].astype(int) - runs["cuda"][1].astype(int)).max() <= 1
