"""Compile the .cu sources with NVRTC (through CuPy's RawModule) once per device, on first use.

Nothing here touches CUDA at import: `module()` does, when a GPU path first needs a kernel.
"""

from __future__ import annotations

import functools
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = ("tile_gather.cu", "stitch_valid.cu", "stitch_same.cu")


def source(name: str) -> str:
    """A .cu file with common.cuh inlined (NVRTC gets one translation unit, no include path)."""
    common = (HERE / "common.cuh").read_text().replace("#pragma once", "")
    return (HERE / name).read_text().replace('#include "common.cuh"', common)


@functools.lru_cache(maxsize=None)
def _module(name: str, device: int):
    try:
        import cupy
    except ImportError:
        from sparseseg.errors import SparsesegError

        raise SparsesegError("the GPU kernels need CuPy (pip install cupy-cuda12x)") from None
    with cupy.cuda.Device(device):
        mod = cupy.RawModule(code=source(name), options=("--std=c++17",))
        mod.compile()
        return mod


def kernel(name: str, function: str, device: int | None = None):
    import cupy

    dev = cupy.cuda.runtime.getDevice() if device is None else device
    return _module(name, dev).get_function(function)
