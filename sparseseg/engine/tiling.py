"""Tile geometry of the engine: valid tile sizes, the tile grid, the blending weights.

Valid-padding networks: tiles of output size T are placed at offsets that are multiples of the
stride S = floor(T / step) * step, where step = 2^poolings (per axis). Each tile keeps its first
S output voxels. Because every tile offset is a multiple of the grid step, the max-pooling
phase is the same as in one pass over the whole padded volume, so stitching is a copy and the
result equals that single pass (a step of T itself would not: 44 is not a multiple of 8).

Same-padding networks: tiles overlap by a fraction and are blended with a Gaussian importance
map (sigma = T/8, as nnU-Net), accumulated only over the region at hand.

Pure geometry (no torch, no I/O): the engine's gather and stitch (kernels/torch_ops.py) follow
these layouts on the device, and `default_tile` below picks the tile from
the engine file and the device (sizes measured by engine/measure.py).
"""

from __future__ import annotations

import math
import os

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.model.shapes import reflect_index


def check_tile(geometry, tile_out) -> tuple[int, int, int]:
    tile_out = tuple(int(t) for t in tile_out)
    for name, rule, t in zip("zyx", geometry.axes, tile_out):
        if geometry.padding == "valid":
            if rule.input_for_output(t) is None or t < rule.step:
                near = [s for s in (rule.output_at_most(t), rule.output_at_least(t)) if s and s >= rule.step]
                near = near or [rule.output_at_least(rule.step)]
                raise SparsesegError(f"tile output size {t} along {name} is not valid for this network "
                                     f"(nearest valid: {', '.join(map(str, sorted(set(near))))})")
        elif t % rule.step or t < rule.step:
            lo = max(rule.step, t // rule.step * rule.step)
            raise SparsesegError(f"tile size {t} along {name} must be a multiple of {rule.step} "
                                 f"(nearest valid: {lo}, {lo + rule.step})")
    return tile_out


def tile_stride(geometry, tile_out, overlap: float) -> tuple[int, int, int]:
    if geometry.padding == "valid":
        return tuple(t // r.step * r.step for r, t in zip(geometry.axes, tile_out))
    return tuple(max(r.step, int(t * (1 - overlap)) // r.step * r.step) if t > r.step else t
                 for r, t in zip(geometry.axes, tile_out))


def axis_layout(padding: str, n: int, tile: int, stride: int, context: int) -> tuple[int, int]:
    """Tiles along one axis to cover n output voxels, and the input extent they read."""
    if padding == "valid":
        count = max(1, math.ceil(n / stride))
    else:
        count = max(1, math.ceil(max(n - tile, 0) / stride) + 1)
    return count, (count - 1) * stride + tile + 2 * context


def tile_layout(geometry, out_shape, tile_out, overlap: float = 0.5):
    """Tile offsets per axis (output coordinates), the stride, and the input extent the region
    must provide, counted from `-context` (valid) or 0 (same)."""
    stride = tile_stride(geometry, tile_out, overlap)
    offsets, extent = [], []
    for n, t, s, r in zip(out_shape, tile_out, stride, geometry.axes):
        count, ext = axis_layout(geometry.padding, n, t, s, r.context)
        offsets.append([i * s for i in range(count)])
        extent.append(ext)
    return offsets, stride, tuple(extent)


def tile_input(geometry, tile_out) -> tuple[int, int, int]:
    return tuple(t + 2 * c for t, c in zip(tile_out, geometry.context))


def gaussian_weights(tile, sigma_scale: float = 1 / 8) -> np.ndarray:
    w = np.ones(tuple(tile), np.float32)
    for axis, t in enumerate(tile):
        x = np.arange(t, dtype=np.float64) - (t - 1) / 2
        g = np.exp(-0.5 * (x / max(t * sigma_scale, 1e-6)) ** 2) if t > 1 else np.ones(1)
        shape = [1] * len(tile)
        shape[axis] = t
        w = w * g.reshape(shape).astype(np.float32)
    w /= w.max()
    return np.maximum(w, 1e-3)  # no voxel may have zero weight at the tile rim


def pad_region(image: np.ndarray, before, after) -> np.ndarray:
    """numpy 'reflect' padding of (C, Z, Y, X) through the engine's one reflect rule
    (`reflect_index`; an axis of length 1 repeats its only slice)."""
    idx = [reflect_index(np.arange(-int(b), n + int(a)), n) for n, b, a in zip(image.shape[1:], before, after)]
    return image[np.ix_(np.arange(image.shape[0]), *idx)]


# ------------------------------------------------------------------ default tile and batch

DEFAULT_BLOCK = (128, 256, 256)  # write block (= output chunk) when --block is not given
MAX_ACTIVATION_ELEMENTS = 2 ** 31  # cuDNN refuses (or splits slowly) convolutions on tensors this large
NVML_LIBRARY = "libnvidia-ml.so.1"
CPU_BUDGET = 2 << 30            # bytes of activations per CPU worker: fixed, so the default tile (which
                                # a resumed run must repeat) does not depend on the memory free today
GPU_BUDGET_FRACTION = 0.6       # of the free device memory (blocks, accumulators and cuDNN need the rest)
MAX_BATCH = 8


def memory_budget(device: str) -> int:
    """Bytes the network's activations may take: a share of the free GPU memory, or on CPU a
    fixed CPU_BUDGET (less where the machine has less than 4x that available)."""
    if device == "cuda":
        free = nvml_free_bytes()
        if free is None:                    # no NVML: ask CUDA (this opens a context in this process)
            import torch

            free, _ = torch.cuda.mem_get_info()
        return int(free * GPU_BUDGET_FRACTION)
    try:
        avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 * CPU_BUDGET
    return int(min(CPU_BUDGET, avail // 4))


def nvml_free_bytes() -> int | None:
    """Free memory of the first visible GPU from the driver's NVML, or None where NVML is missing.

    NVML opens no CUDA context, so the client that plans a run holds no GPU memory that its
    workers need. The first entry of CUDA_VISIBLE_DEVICES (an index or a UUID) names the GPU;
    indices are taken in NVML's PCI order (set CUDA_DEVICE_ORDER=PCI_BUS_ID for them to agree)."""
    import ctypes

    class Memory(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    try:
        lib = ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return None
    if lib.nvmlInit_v2() != 0:
        return None
    try:
        first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
        handle = ctypes.c_void_p()
        if first.isdigit():
            rc = lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(int(first)), ctypes.byref(handle))
        else:
            rc = lib.nvmlDeviceGetHandleByUUID(first.encode(), ctypes.byref(handle))
        mem = Memory()
        if rc != 0 or lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
            return None
        return int(mem.free)
    finally:
        lib.nvmlShutdown()


def run_dtype(precision: str) -> str:
    """The activations' dtype of a run in `precision` (what the tile measure counts in)."""
    return {"fp16": "float16", "bf16": "bfloat16"}.get(precision, "float32")


def profile_tiles(contract: dict) -> dict:
    """Output tiles {"min", "opt", "max": (z, y, x), "batch": largest batch} of a plan's
    optimization profile, from its sidecar contract (derived from the input shapes, so sidecars
    written before the output tiles were recorded read the same)."""
    from sparseseg.model.contract import geometry_of_contract

    profile = contract.get("profile")
    if not isinstance(profile, dict) or not all(k in profile for k in ("min", "opt", "max")):
        raise SparsesegError("this plan's sidecar records no optimization profile; rebuild it with sparseseg-export")
    ctx = geometry_of_contract(contract).context
    tiles = {k: tuple(int(n) - 2 * c for n, c in zip(profile[k][2:], ctx)) for k in ("min", "opt", "max")}
    tiles["batch"] = int(profile["max"][0])
    return tiles


def plan_profile(contract: dict) -> dict | None:
    """A TensorRT plan's optimization profile as output tiles {"min", "opt", "max", "batch"}, or
    None for engines without one."""
    if "profile" not in contract:
        return None
    prof = profile_tiles(contract)
    return {k: tuple(int(v) for v in prof[k]) for k in ("min", "opt", "max")} | {"batch": int(prof["batch"])}


def check_profile_tile(contract: dict, tile) -> None:
    prof = plan_profile(contract)
    if prof is None:
        return
    if any(t < lo or t > hi for t, lo, hi in zip(tile, prof["min"], prof["max"])):
        fmt = "x".join
        raise SparsesegError(f"--tile {fmt(map(str, tile))} is outside the plan's profile "
                             f"(min {fmt(map(str, prof['min']))}, opt {fmt(map(str, prof['opt']))}, max "
                             f"{fmt(map(str, prof['max']))}); rebuild the plan with sparseseg-export --tile")


def _candidate(geometry, m: int, extent) -> tuple[int, int, int]:
    """Output tile of about m voxels per axis, each axis capped at one tile covering `extent`."""
    out = []
    for rule, n in zip(geometry.axes, extent):
        if geometry.padding == "valid":
            cap = rule.output_at_least(max(n, rule.step))
            t = rule.output_at_least(max(m, rule.step))
        else:
            cap = max(rule.step, -(-n // rule.step) * rule.step)
            t = max(rule.step, -(-m // rule.step) * rule.step)
        out.append(min(t, cap))
    return tuple(out)


def default_tile(contract: dict, device: str, extent=None, budget: int | None = None,
                 dtype: str = "float32") -> tuple[int, int, int]:
    """The output tile to run an engine file with.

    A TensorRT plan: its profile's opt tile. Otherwise the largest tile of about equal size per
    axis whose measured activation peak (engine/measure.py) fits the device's memory budget,
    never larger than one tile covering `extent` (the block) per axis, and never smaller than
    the tile whose output equals the network's context per side: its input is at most 27
    (= 3^3) input voxels per output voxel, and for the paper network that is 132^3 in, 44^3
    out (the paper's 116x132x132 tile needs 37)."""
    from sparseseg.model.contract import geometry_of_contract

    prof = plan_profile(contract)
    if prof is not None:
        return prof["opt"]
    geometry = geometry_of_contract(contract)
    extent = tuple(extent) if extent is not None else tuple(
        -(-b // r.step) * r.step for b, r in zip(DEFAULT_BLOCK, geometry.axes))
    budget = budget if budget is not None else memory_budget(device)
    floor = max(max(geometry.step), max(geometry.context))
    # Distinct candidates from the floor up to one tile covering the extent; the activation peak
    # grows with the tile, so a binary search measures only a handful of them.
    cands, m = [_candidate(geometry, floor, extent)], floor
    while not all(c >= e for c, e in zip(cands[-1], extent)):
        m += max(geometry.step)
        cand = _candidate(geometry, m, extent)
        if cand != cands[-1]:
            cands.append(cand)
    lo, hi = 0, len(cands) - 1              # cands[0] is taken whatever the budget (the floor)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tile_bytes(contract, cands[mid], dtype=dtype) <= budget and \
                tile_largest(contract, cands[mid], dtype) < MAX_ACTIVATION_ELEMENTS:
            lo = mid
        else:
            hi = mid - 1
    return cands[lo]


def _tile_shape(contract: dict, tile_out, batch: int = 1) -> tuple:
    from sparseseg.model.contract import geometry_of_contract

    return (batch, contract["in_channels"]) + tile_input(geometry_of_contract(contract), tile_out)


def tile_bytes(contract: dict, tile_out, batch: int = 1, dtype: str = "float32") -> int:
    from sparseseg.engine.measure import tile_peak_bytes

    return tile_peak_bytes(contract["model_config"], _tile_shape(contract, tile_out, batch), dtype)


def tile_largest(contract: dict, tile_out, dtype: str = "float32") -> int:
    """Elements of the largest activation of one tile (batch 1: torch splits a batch into parts
    cuDNN can index, but cannot split one tile)."""
    from sparseseg.engine.measure import largest_activation

    return largest_activation(contract["model_config"], _tile_shape(contract, tile_out), dtype)


def check_activation_cap(contract: dict, tile_out, dtype: str = "float32") -> None:
    """A one-line error for a tile whose largest activation reaches MAX_ACTIVATION_ELEMENTS."""
    n = tile_largest(contract, tile_out, dtype)
    if n >= MAX_ACTIVATION_ELEMENTS:
        raise SparsesegError(f"--tile {'x'.join(map(str, tile_out))}: its largest activation has {n:.3g} elements, "
                             "at or above cuDNN's 2^31-element limit; pass a smaller --tile")


def default_batch(contract: dict, device: str, tile_out, tiles_per_block: int, budget: int | None = None,
                  dtype: str = "float32") -> int:
    """Tiles per forward pass: a TensorRT plan's profile batch; on CUDA as many as the memory
    budget holds (at most MAX_BATCH and the tiles of a block); on CPU 1 (a batch gains nothing
    there and multiplies the memory)."""
    prof = plan_profile(contract)
    if prof is not None:
        return max(1, min(prof["batch"], tiles_per_block))
    if device != "cuda":
        return 1
    budget = budget if budget is not None else memory_budget(device)
    per_tile = tile_bytes(contract, tile_out, dtype=dtype)
    return max(1, min(MAX_BATCH, tiles_per_block, budget // max(per_tile, 1)))
