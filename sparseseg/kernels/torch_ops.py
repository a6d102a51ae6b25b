"""Gather and stitch as torch functions on any device: the engine's per-block compute (the
default), and the references the CUDA kernels (kernels/gpu.py) must match (labels bit for bit;
uint8 probabilities to one quantization step).

Data of one block (see `blocks.ReadPlan`): the resident input `region` (C, rz, ry, rx) starting
at volume voxel `region_start`; tile offsets (N, 3) in block-grid coordinates; the grid's
`origin` in volume coordinates; the volume shape (reflection happens at its true border).
"""

from __future__ import annotations

import numpy as np
import torch

from sparseseg.model.shapes import reflect_index


def normalization_tensors(norm: dict | None, device) -> dict | None:
    """{'mean', 'std', 'lo', 'hi'} lists -> per-channel float32 tensors (inv_std = 1/std in
    float32, as the kernel computes), or None when the graph normalizes itself."""
    if norm is None:
        return None
    shape = (-1, 1, 1, 1)
    out = {"mean": torch.as_tensor(np.asarray(norm["mean"], np.float32), device=device).view(shape),
           "inv_std": torch.as_tensor(np.float32(1) / np.asarray(norm["std"], np.float32), device=device).view(shape)}
    for key in ("lo", "hi"):
        out[key] = (torch.as_tensor(np.asarray(norm[key], np.float32), device=device).view(shape)
                    if norm.get(key) is not None else None)
    return out


def _axis_index(start: int, length: int, n: int, region_start: int, region_len: int):
    """A slice when the tile lies inside the region without reflection, else an index array."""
    if start >= 0 and start + length <= n and region_start <= start and start + length <= region_start + region_len:
        return slice(start - region_start, start - region_start + length)
    return reflect_index(np.arange(start, start + length), n) - region_start


def gather(region: torch.Tensor, region_start, offsets, origin, volume_shape, tile_shape, norm: dict | None = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(C, rz, ry, rx) stored dtype -> (N, C, tz, ty, tx) `dtype` tiles: reflect padding at the
    volume border, then (only when `norm` is given: the graph does not normalize) clip to
    [lo, hi] and (x - mean) * inv_std in float32, then the cast."""
    n_tiles = len(offsets)
    out = torch.empty((n_tiles, region.shape[0]) + tuple(tile_shape), dtype=dtype, device=region.device)
    for n, off in enumerate(offsets):
        tile = region
        idx = [_axis_index(o + f, t, v, r, rl) for o, f, t, v, r, rl in
               zip(origin, off, tile_shape, volume_shape, region_start, region.shape[1:])]
        if all(isinstance(i, slice) for i in idx):
            tile = region[(slice(None),) + tuple(idx)]
        else:
            for axis, i in enumerate(idx, start=1):
                if isinstance(i, slice):
                    tile = tile.narrow(axis, i.start, i.stop - i.start)
                else:
                    tile = tile.index_select(axis, torch.as_tensor(i, device=region.device))
        if norm is None:
            out[n].copy_(tile)
        else:
            x = tile.float()
            if norm["lo"] is not None:
                x = torch.maximum(torch.minimum(x, norm["hi"]), norm["lo"])
            out[n].copy_((x - norm["mean"]) * norm["inv_std"])
    return out


def quantize(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Probabilities for storage: uint8 = round(255 p) half to even (CUDA's rintf), else a cast."""
    if dtype == torch.uint8:
        return torch.round(p * 255).to(torch.uint8)
    return p.to(dtype)


def stitch_valid(logits: torch.Tensor, offsets, keep, labels: torch.Tensor, probs: torch.Tensor | None = None):
    """Valid networks: each tile's first keep[n] output voxels are copied to offsets[n] of the
    block: argmax into `labels` (uint8), softmax into `probs` (K, ...) if given."""
    for lg, d, k in zip(logits, offsets, keep):
        lg = lg[:, :k[0], :k[1], :k[2]]
        dst = tuple(slice(a, a + b) for a, b in zip(d, k))
        labels[dst] = lg.argmax(0).to(torch.uint8)
        if probs is not None:
            probs[(slice(None),) + dst] = quantize(torch.softmax(lg.float(), 0), probs.dtype)


def accumulate_same(logits: torch.Tensor, weights: torch.Tensor, offsets, acc: torch.Tensor, wsum: torch.Tensor):
    """Same-padding networks: acc (K, region) += logits[n] * weights and wsum += weights at
    offsets[n], tile by tile in order (the kernel adds in the same order: bit-exact)."""
    t = weights.shape
    for lg, p in zip(logits, offsets):
        sl = tuple(slice(a, a + b) for a, b in zip(p, t))
        acc[(slice(None),) + sl] += lg.float() * weights
        wsum[sl] += weights


def finalize_same(acc: torch.Tensor, wsum: torch.Tensor, crop_start, labels: torch.Tensor,
                  probs: torch.Tensor | None = None):
    """argmax (and softmax) of acc / wsum over the block's crop of the accumulator."""
    sl = tuple(slice(a, a + b) for a, b in zip(crop_start, labels.shape))
    blended = acc[(slice(None),) + sl] / wsum[sl]
    labels.copy_(blended.argmax(0).to(torch.uint8))
    if probs is not None:
        probs.copy_(quantize(torch.softmax(blended, 0), probs.dtype))
