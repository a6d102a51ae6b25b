"""Which gather/stitch functions the block worker calls: the engine's torch functions
(kernels/torch_ops.py, any device, the default) or the CUDA kernels (kernels/gpu.py) on a
CUDA device, chosen with `--kernels torch|cuda` or SPARSESEG_KERNELS.

The kernels stay opt-in until their parity tests (tests/test_kernels.py, marked `gpu`) and a
benchmark have run on a GPU. Where a kernel does not take the data at hand (bfloat16 input
tiles, float16/float32 probabilities) the torch function runs instead, so a choice never
changes what is computed, only where. Nothing here touches CUDA at import; on a CPU device the
torch functions run whatever was asked for.
"""

from __future__ import annotations

import os

from sparseseg.errors import SparsesegError

KERNELS = ("torch", "cuda")
ENV = "SPARSESEG_KERNELS"


def kernels_option(value: str | None) -> str:
    """The user's choice (None: $SPARSESEG_KERNELS, else torch), checked."""
    value = value or os.environ.get(ENV) or "torch"
    if value not in KERNELS:
        raise SparsesegError(f"unknown kernels {value!r} (expected {' or '.join(KERNELS)}; from --kernels or ${ENV})")
    return value


def check_kernels(kernels: str, device: str) -> None:
    """Fail before anything is written when the CUDA kernels cannot run: no CUDA device, or no CuPy."""
    if kernels != "cuda":
        return
    if device != "cuda":
        raise SparsesegError("--kernels cuda needs a CUDA device (the run is on CPU); use --kernels torch")
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        raise SparsesegError("--kernels cuda needs CuPy (pip install cupy-cuda12x)")


class TorchOps:
    """kernels/torch_ops.py as the worker calls it."""

    name = "torch"

    def __init__(self):
        from sparseseg.kernels import torch_ops

        self.gather = torch_ops.gather
        self.stitch_valid = torch_ops.stitch_valid
        self.accumulate_same = torch_ops.accumulate_same
        self.finalize_same = torch_ops.finalize_same


class CudaOps:
    """The kernels of kernels/gpu.py where they take the data, else the torch function."""

    name = "cuda"

    def __init__(self):
        import torch

        from sparseseg.kernels import gpu

        self._torch_ops = TorchOps()
        self._gpu = gpu
        self._in = (torch.uint8, torch.uint16, torch.float32)
        self._out = (torch.float32, torch.float16)
        self._uint8 = torch.uint8

    def gather(self, region, region_start, offsets, origin, volume_shape, tile_shape, norm=None, dtype=None):
        fn = self._gpu.gather if region.dtype in self._in and (dtype or self._out[0]) in self._out \
            else self._torch_ops.gather
        return fn(region, region_start, offsets, origin, volume_shape, tile_shape, norm, dtype or self._out[0])

    def stitch_valid(self, logits, offsets, keep, labels, probs=None):
        fn = self._gpu.stitch_valid if probs is None or probs.dtype == self._uint8 else self._torch_ops.stitch_valid
        fn(logits, offsets, keep, labels, probs)

    def accumulate_same(self, logits, weights, offsets, acc, wsum):
        self._gpu.accumulate_same(logits, weights, offsets, acc, wsum)

    def finalize_same(self, acc, wsum, crop_start, labels, probs=None):
        fn = self._gpu.finalize_same if probs is None or probs.dtype == self._uint8 else self._torch_ops.finalize_same
        fn(acc, wsum, crop_start, labels, probs)


def block_ops(kernels: str, device):
    """The functions for one worker: the CUDA kernels only when asked for and on a CUDA device."""
    if kernels == "cuda" and getattr(device, "type", str(device)) == "cuda":
        return CudaOps()
    return TorchOps()
