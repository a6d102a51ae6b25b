"""Overlap-tile prediction of one region held in memory (the engine runs it per block).

Valid-padding networks: tiles of output size T are placed at offsets that are multiples of the
stride S = floor(T / step) * step, where step = 2^poolings (per axis). Each tile keeps its first
S output voxels. Because every tile offset is a multiple of the grid step, the max-pooling
phase is the same as in one pass over the whole padded volume, so stitching is a copy and the
result equals that single pass (a step of T itself would not: 44 is not a multiple of 8).

Same-padding networks: tiles overlap by a fraction and are blended with a Gaussian importance
map (sigma = T/8, as nnU-Net), accumulated only over the region at hand.

Pure numpy around a `forward(batch) -> logits` callable, so every backend (torch, ONNX
Runtime, TensorRT) shares it; the GPU path replaces gather/stitch with CUDA kernels.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from sparseseg.errors import SparsesegError

DEFAULT_TILE_INPUT = (64, 96, 96)   # a CPU-friendly default; engines may carry their own


def default_tile_output(geometry, shape, budget=DEFAULT_TILE_INPUT) -> tuple[int, int, int]:
    """A valid tile output size per axis: one tile when the region fits the budget, else the
    largest valid size within it; never below one grid step (so the stride is never 0)."""
    out = []
    for rule, n, b in zip(geometry.axes, shape, budget):
        if geometry.padding == "valid":
            cap = b - 2 * rule.context
            m = rule.output_at_least(n) if n <= cap else (rule.output_at_most(cap) or rule.min_output)
            m = max(m, rule.output_at_least(rule.step))
        else:
            m = max(rule.step, (min(b, max(n, 1)) + rule.step - 1) // rule.step * rule.step)
        out.append(m)
    return tuple(out)


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


def tile_layout(geometry, out_shape, tile_out, overlap: float = 0.5):
    """Tile offsets (in output coordinates) and the input extent the region must provide,
    counted from `-context` (valid) or 0 (same)."""
    stride = tile_stride(geometry, tile_out, overlap)
    counts = []
    for n, t, s in zip(out_shape, tile_out, stride):
        if geometry.padding == "valid":
            counts.append(max(1, math.ceil(n / s)))
        else:
            counts.append(max(1, math.ceil(max(n - t, 0) / s) + 1))
    offsets = [[i * s for i in range(c)] for c, s in zip(counts, stride)]
    ctx = geometry.context
    extent = tuple((c - 1) * s + t + 2 * x for c, s, t, x in zip(counts, stride, tile_out, ctx))
    return offsets, stride, extent


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


def predict_padded(forward, padded: np.ndarray, geometry, out_shape, tile_out, batch: int = 1,
                   overlap: float = 0.5, probabilities: bool = False, num_classes: int | None = None):
    """Predict `out_shape` voxels from `padded` (C, ...) whose index 0 is output position
    -context; `padded` must span at least `tile_layout(...)[2]`. Returns uint8 labels and,
    if asked, float32 softmax probabilities (K, ...)."""
    offsets, stride, extent = tile_layout(geometry, out_shape, tile_out, overlap)
    if any(p < e for p, e in zip(padded.shape[1:], extent)):
        raise ValueError(f"padded region {padded.shape[1:]} smaller than the tile layout needs {extent}")
    ctx = geometry.context
    in_tile = tuple(t + 2 * c for t, c in zip(tile_out, ctx))
    valid = geometry.padding == "valid"
    labels = np.zeros(tuple(out_shape), np.uint8)
    probs = None
    acc = wsum = weights = None
    if not valid:
        acc_shape = tuple(extent)
        weights = gaussian_weights(tile_out)
        wsum = np.zeros(acc_shape, np.float32)
    positions = list(itertools.product(*offsets))
    for first in range(0, len(positions), batch):
        group = positions[first:first + batch]
        x = np.stack([padded[(slice(None),) + tuple(slice(o, o + t) for o, t in zip(pos, in_tile))]
                      for pos in group]).astype(np.float32, copy=False)
        logits = np.asarray(forward(x), dtype=np.float32)
        if num_classes is None:
            num_classes = logits.shape[1]
        if valid:
            if probabilities and probs is None:
                probs = np.zeros((num_classes,) + tuple(out_shape), np.float32)
            for pos, lg in zip(group, logits):
                keep = tuple(slice(0, min(s, n - o)) for s, n, o in zip(stride, out_shape, pos))
                dst = tuple(slice(o, o + k.stop) for o, k in zip(pos, keep))
                lg = lg[(slice(None),) + keep]
                labels[dst] = lg.argmax(0)
                if probabilities:
                    probs[(slice(None),) + dst] = softmax(lg)
        else:
            if acc is None:
                acc = np.zeros((num_classes,) + tuple(extent), np.float32)
            for pos, lg in zip(group, logits):
                dst = tuple(slice(o, o + t) for o, t in zip(pos, tile_out))
                acc[(slice(None),) + dst] += lg * weights
                wsum[dst] += weights
    if not valid:
        crop = tuple(slice(0, n) for n in out_shape)
        blended = acc[(slice(None),) + crop] / wsum[crop]
        labels[...] = blended.argmax(0)
        if probabilities:
            probs = softmax(blended)
    return labels, probs


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def pad_region(image: np.ndarray, before, after) -> np.ndarray:
    """numpy 'reflect' padding of (C, Z, Y, X); an axis of length 1 repeats its only slice."""
    widths = [(0, 0)] + [(int(b), int(a)) for b, a in zip(before, after)]
    if all(n > 1 or (b == 0 and a == 0) for n, (b, a) in zip(image.shape[1:], widths[1:])):
        return np.pad(image, widths, mode="reflect")
    out = image
    for axis, (b, a) in enumerate(widths[1:], start=1):
        if b or a:
            out = np.pad(out, [(0, 0)] * axis + [(b, a)] + [(0, 0)] * (out.ndim - axis - 1),
                         mode="reflect" if out.shape[axis] > 1 else "edge")
    return out


def predict_array(forward, image: np.ndarray, geometry, tile_out=None, batch: int = 1, overlap: float = 0.5,
                  probabilities: bool = False):
    """Predict a whole (C, Z, Y, X) array held in memory (reflect padding at its border)."""
    shape = image.shape[1:]
    tile_out = check_tile(geometry, tile_out or default_tile_output(geometry, shape))
    _, _, extent = tile_layout(geometry, shape, tile_out, overlap)
    before = geometry.context
    after = tuple(e - n - c for e, n, c in zip(extent, shape, before))
    padded = pad_region(image, before, after)
    return predict_padded(forward, padded, geometry, shape, tile_out, batch, overlap, probabilities)


def torch_forward(model, device="cpu"):
    """Wrap an eval-mode torch module as a numpy forward function (in-memory use; the engine's
    TorchBackend adds CUDA autocast)."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return run
