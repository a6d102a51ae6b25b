"""GPU launchers with the same signatures as the engine's torch functions
(`sparseseg.kernels.torch_ops`, their references), on torch CUDA
tensors (shared with CuPy without copies), launched on torch's current stream so they order
with the network's work. Outputs are written into the tensors the caller passes, as in the
references."""

from __future__ import annotations

import numpy as np

from sparseseg.kernels.loader import kernel

THREADS = 256


def _launch(fn, total: int, args):
    import cupy
    import torch

    blocks = max(1, min((total + THREADS - 1) // THREADS, 65535 * 8))
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    with stream:
        fn((blocks,), (THREADS,), args)


def _ptr(t):
    return t.data_ptr() if t is not None else 0


def _upload_i64(values, device):
    """(N, 3) int64 on `device`, copied from pinned memory without a host sync; the caller keeps
    the result alive until after the launch (a freed temporary's block goes to the next tensor)."""
    import torch

    host = torch.from_numpy(np.ascontiguousarray(np.asarray(values, np.int64).reshape(-1, 3)))
    if getattr(device, "type", str(device)) != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _check_batch(logits, *rows):
    """One offset row per tile: the kernels index the rows by tile and would read past fewer."""
    for r in rows:
        if len(r) != len(logits):
            raise ValueError(f"{len(logits)} tiles but {len(r)} offsets")


def _channel(t):
    return None if t is None else t.reshape(-1).float().contiguous()


def gather(region, region_start, offsets, origin, volume_shape, tile_shape, norm=None, dtype=None):
    import torch

    dtype = dtype or torch.float32
    src = {torch.uint8: "u8", torch.uint16: "u16", torch.float32: "f32"}.get(region.dtype)
    dst = {torch.float32: "f32", torch.float16: "f16"}.get(dtype)
    if src is None or dst is None:
        raise TypeError(f"gather supports uint8/uint16/float32 -> float32/float16, not {region.dtype} -> {dtype}")
    dev = region.device
    off = _upload_i64(offsets, dev)
    region = region.contiguous()
    out = torch.empty((len(off), region.shape[0]) + tuple(tile_shape), dtype=dtype, device=dev)
    norm = norm or {}
    mean, inv, lo, hi = (_channel(norm.get(k)) for k in ("mean", "inv_std", "lo", "hi"))
    i = np.int64
    _launch(kernel("tile_gather.cu", f"gather_{src}_{dst}"), out.numel(), (
        _ptr(region), _ptr(out), _ptr(off), i(region.shape[0]), *map(i, region.shape[1:]), *map(i, region_start),
        *map(i, origin), *map(i, volume_shape), *map(i, tile_shape), _ptr(mean), _ptr(inv), _ptr(lo), _ptr(hi),
        i(out.numel())))
    return out


def stitch_valid(logits, offsets, keep, labels, probs=None):
    import torch

    if probs is not None and probs.dtype != torch.uint8:
        raise TypeError("the stitch kernel writes uint8 probabilities only")
    dev = logits.device
    name = "stitch_valid_f16" if logits.dtype == torch.float16 else "stitch_valid_f32"
    logits = logits.contiguous() if logits.dtype in (torch.float16, torch.float32) else logits.float().contiguous()
    _check_batch(logits, offsets, keep)
    n, k, oz, oy, ox = logits.shape
    i = np.int64
    both = _upload_i64(list(offsets) + list(keep), dev)      # one upload: dst rows, then keep rows
    dst, kept = both[:n], both[n:]
    _launch(kernel("stitch_valid.cu", name), n * oz * oy * ox, (
        _ptr(logits), _ptr(labels), _ptr(probs), _ptr(dst), _ptr(kept), i(k), i(oz), i(oy),
        i(ox), *map(i, labels.shape), i(n * oz * oy * ox)))


def accumulate_same(logits, weights, offsets, acc, wsum):
    import torch

    name = "accumulate_f16" if logits.dtype == torch.float16 else "accumulate_f32"
    logits = logits.contiguous() if logits.dtype in (torch.float16, torch.float32) else logits.float().contiguous()
    _check_batch(logits, offsets)
    n, k, tz, ty, tx = logits.shape
    i = np.int64
    weights = weights.contiguous()
    fn = kernel("stitch_same.cu", name)
    # One launch per tile over its own voxels, in order: overlapping tiles add in the reference's
    # order without atomics, and the work is the tiles' size, not region x tiles.
    for t, pos in enumerate(offsets):
        _launch(fn, tz * ty * tx, (
            _ptr(logits) + t * k * tz * ty * tx * logits.element_size(), _ptr(weights), *map(i, pos), i(k), i(tz),
            i(ty), i(tx), _ptr(acc), _ptr(wsum), *map(i, wsum.shape)))


def finalize_same(acc, wsum, crop_start, labels, probs=None):
    import torch

    if probs is not None and probs.dtype != torch.uint8:
        raise TypeError("the finalize kernel writes uint8 probabilities only")
    i = np.int64
    _launch(kernel("stitch_same.cu", "finalize_same"), labels.numel(), (
        _ptr(acc), _ptr(wsum), _ptr(labels), _ptr(probs), i(acc.shape[0]), *map(i, wsum.shape), *map(i, crop_start),
        *map(i, labels.shape)))
