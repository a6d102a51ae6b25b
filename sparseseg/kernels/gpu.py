"""GPU launchers with the same signatures as `sparseseg.kernels.reference`, on torch CUDA
tensors (shared with CuPy without copies), launched on torch's current stream so they order
with the network's work."""

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


def _i64(values, device):
    import torch

    return torch.as_tensor(np.asarray(values, np.int64), device=device)


def gather(block, offsets, block_origin, volume_shape, tile_shape, mean, std, out_dtype=np.float32):
    import torch

    src = {torch.uint8: "u8", torch.uint16: "u16", torch.float32: "f32"}.get(block.dtype)
    if src is None:
        raise TypeError(f"gather supports uint8, uint16 and float32 blocks, not {block.dtype}")
    half = np.dtype(out_dtype) == np.float16
    dev = block.device
    off = _i64(offsets, dev)
    out = torch.empty((len(off), block.shape[0]) + tuple(tile_shape), dtype=torch.float16 if half else torch.float32,
                      device=dev)
    m = torch.as_tensor(np.asarray(mean, np.float32), device=dev)
    inv = torch.as_tensor((np.float32(1) / np.asarray(std, np.float32)), device=dev)
    fn = kernel("tile_gather.cu", f"gather_{src}_{'f16' if half else 'f32'}")
    i = np.int64
    _launch(fn, out.numel(), (
        _ptr(block.contiguous()), _ptr(out), _ptr(off), i(block.shape[0]), *map(i, block.shape[1:]),
        *map(i, block_origin), *map(i, volume_shape), *map(i, tile_shape), _ptr(m), _ptr(inv), i(out.numel())))
    return out


def stitch_valid(logits, dst, keep, block_shape, probabilities=False):
    import torch

    dev = logits.device
    labels = torch.zeros(tuple(block_shape), dtype=torch.uint8, device=dev)
    probs = torch.zeros((logits.shape[1],) + tuple(block_shape), dtype=torch.uint8, device=dev) if probabilities else None
    name = "stitch_valid_f16" if logits.dtype == torch.float16 else "stitch_valid_f32"
    logits = logits.contiguous() if logits.dtype in (torch.float16, torch.float32) else logits.float().contiguous()
    n, k, oz, oy, ox = logits.shape
    i = np.int64
    _launch(kernel("stitch_valid.cu", name), n * oz * oy * ox, (
        _ptr(logits), _ptr(labels), _ptr(probs), _ptr(_i64(dst, dev)), _ptr(_i64(keep, dev)), i(k), i(oz), i(oy),
        i(ox), *map(i, block_shape), i(n * oz * oy * ox)))
    return labels, probs


def accumulate_same(logits, weights, pos, acc, wsum):
    import torch

    name = "accumulate_f16" if logits.dtype == torch.float16 else "accumulate_f32"
    logits = logits.contiguous()
    n, k, tz, ty, tx = logits.shape
    i = np.int64
    _launch(kernel("stitch_same.cu", name), wsum.numel(), (
        _ptr(logits), _ptr(weights.contiguous()), _ptr(_i64(pos, logits.device)), i(n), i(k), i(tz), i(ty), i(tx),
        _ptr(acc), _ptr(wsum), *map(i, wsum.shape)))


def finalize_same(acc, wsum, crop_start, block_shape, probabilities=False):
    import torch

    k = acc.shape[0]
    labels = torch.empty(tuple(block_shape), dtype=torch.uint8, device=acc.device)
    probs = torch.empty((k,) + tuple(block_shape), dtype=torch.uint8, device=acc.device) if probabilities else None
    i = np.int64
    _launch(kernel("stitch_same.cu", "finalize_same"), labels.numel(), (
        _ptr(acc), _ptr(wsum), _ptr(labels), _ptr(probs), i(k), *map(i, wsum.shape), *map(i, crop_start),
        *map(i, block_shape)))
    return labels, probs
