"""numpy references of the CUDA kernels, with the same signatures as the GPU launchers in
`sparseseg.kernels.gpu`. They define what the kernels must compute; GPU tests compare against
them bit for bit (labels) and to one quantization step (uint8 probabilities)."""

from __future__ import annotations

import numpy as np

from sparseseg.engine.blocks import reflect_index as _reflect


def gather(block, offsets, block_origin, volume_shape, tile_shape, mean, std, out_dtype=np.float32):
    """block (C, bz, by, bx) at `block_origin`; offsets (N, 3) tile origins in volume coordinates
    -> (N, C, tz, ty, tx) normalized tiles, reflect-padded at the volume border."""
    mean = np.asarray(mean, np.float32).reshape(-1, 1, 1, 1)
    inv_std = (np.float32(1) / np.asarray(std, np.float32)).reshape(-1, 1, 1, 1)
    out = np.empty((len(offsets), block.shape[0]) + tuple(tile_shape), out_dtype)
    for n, off in enumerate(np.asarray(offsets, np.int64)):
        idx = [_reflect(np.arange(o, o + t), v) - b for o, t, v, b in zip(off, tile_shape, volume_shape, block_origin)]
        tile = block[np.ix_(np.arange(block.shape[0]), *idx)].astype(np.float32)
        out[n] = ((tile - mean) * inv_std).astype(out_dtype)
    return out


def softmax_uint8(logits: np.ndarray) -> np.ndarray:
    """(K, ...) float logits -> uint8 round(255 * softmax), half to even (as CUDA's rintf)."""
    logits = logits.astype(np.float32)
    e = np.exp(logits - logits.max(0, keepdims=True))
    return np.rint(255 * e / e.sum(0, keepdims=True)).astype(np.uint8)


def stitch_valid(logits, dst, keep, block_shape, probabilities=False):
    """logits (N, K, oz, oy, ox) -> labels (bz, by, bx) uint8 [, probs (K, bz, by, bx) uint8]:
    each tile's first keep[n] voxels per axis written at dst[n]."""
    labels = np.zeros(tuple(block_shape), np.uint8)
    probs = np.zeros((logits.shape[1],) + tuple(block_shape), np.uint8) if probabilities else None
    for lg, d, k in zip(logits, np.asarray(dst, np.int64), np.asarray(keep, np.int64)):
        lg = lg[:, :k[0], :k[1], :k[2]].astype(np.float32)
        sl = tuple(slice(a, a + b) for a, b in zip(d, k))
        labels[sl] = lg.argmax(0)
        if probabilities:
            probs[(slice(None),) + sl] = softmax_uint8(lg)
    return labels, probs


def accumulate_same(logits, weights, pos, acc, wsum):
    """acc (K, region) += logits[n] * weights at pos[n]; wsum (region) += weights; in tile order."""
    w = weights.astype(np.float32)
    t = weights.shape
    for lg, p in zip(logits, np.asarray(pos, np.int64)):
        sl = tuple(slice(a, a + b) for a, b in zip(p, t))
        acc[(slice(None),) + sl] += lg.astype(np.float32) * w
        wsum[sl] += w


def finalize_same(acc, wsum, crop_start, block_shape, probabilities=False):
    """argmax (and uint8 softmax) of acc / wsum over the crop."""
    sl = tuple(slice(a, a + b) for a, b in zip(crop_start, block_shape))
    blended = acc[(slice(None),) + sl] / wsum[sl]
    return blended.argmax(0).astype(np.uint8), (softmax_uint8(blended) if probabilities else None)
