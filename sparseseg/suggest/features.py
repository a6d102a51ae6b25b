"""Slice embeddings, offline only (nothing is ever downloaded).

`filterbank` (default, training-free): per slice, the responses of a small multi-scale filter
bank (Gaussian, gradient magnitude, Laplacian of Gaussian, both Hessian eigenvalues at sigma
1, 2, 4; ilastik's classic set) are pooled into histograms on a coarse spatial grid. Bin edges
are quantiles of each response over the plane, so bins are equally used on average; the
embedding is the square root of the normalized histograms, whose cosine is the mean
Bhattacharyya coefficient: texture composition where it sits in the slice.

`autoencoder`: a small convolutional autoencoder trained from scratch on the volume's own
slices (resized to 64x64) for a bounded number of steps and seconds, seeded; the embedding is
its rectified 4x4 bottleneck, as the paper embeds slices with an autoencoder (theirs starts
from ImageNet VGG-19 weights, which we do not download).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

FEATURES = ("filterbank", "autoencoder")


def _normalize(stack: np.ndarray) -> np.ndarray:
    """Per channel, robust scale over the whole plane (not per slice: a dark slice stays dark)."""
    out = np.empty_like(stack, dtype=np.float32)
    for c in range(stack.shape[1]):
        ch = stack[:, c]
        sample = ch[:: max(1, len(ch) // 64)]
        lo, hi = np.percentile(sample, [1, 99])
        out[:, c] = (ch - lo) / max(hi - lo, 1e-6)
    return out


def _responses(x: np.ndarray, sigmas) -> list[np.ndarray]:
    """x: (n, h, w) -> filter responses, each (n, h, w); filters act on the last two axes only."""
    from scipy import ndimage as ndi

    out = [x]
    for s in sigmas:
        sig = (0, s, s)
        out.append(ndi.gaussian_filter(x, sig))
        out.append(ndi.gaussian_gradient_magnitude(x, sig))
        out.append(ndi.gaussian_laplace(x, sig))
        hrr = ndi.gaussian_filter(x, sig, order=(0, 2, 0))
        hcc = ndi.gaussian_filter(x, sig, order=(0, 0, 2))
        hrc = ndi.gaussian_filter(x, sig, order=(0, 1, 1))
        mid, rad = (hrr + hcc) / 2, np.sqrt(((hrr - hcc) / 2) ** 2 + hrc ** 2)
        out += [mid + rad, mid - rad]
    return out


def filterbank_features(stack: np.ndarray, grid: int = 4, bins: int = 8, sigmas=(1.0, 2.0, 4.0),
                        chunk: int = 32) -> np.ndarray:
    """(N, C, h, w) -> (N, D) embedding; processed `chunk` slices at a time to bound memory."""
    stack = _normalize(stack)
    n, c, h, w = stack.shape
    gy, gx = min(grid, h), min(grid, w)
    cell = ((np.arange(h) * gy // h)[:, None] * gx + (np.arange(w) * gx // w)[None, :]).ravel()
    cell_size = np.bincount(cell, minlength=gy * gx).astype(np.float64)
    # Bin edges per (channel, response) from evenly spaced sample slices of the plane.
    sample = stack[np.linspace(0, n - 1, min(n, 16)).round().astype(int)]
    edges = []
    for ch in range(c):
        for r in _responses(sample[:, ch], sigmas):
            e = np.unique(np.quantile(r, np.linspace(0, 1, bins + 1)[1:-1]))
            edges.append(e)
    ncell = gy * gx
    feats = np.zeros((n, len(edges), ncell, bins), np.float64)
    for s0 in range(0, n, chunk):
        part = stack[s0:s0 + chunk]
        m = len(part)
        k = 0
        for ch in range(c):
            for r in _responses(part[:, ch], sigmas):
                b = np.searchsorted(edges[k], r.reshape(m, -1))  # (m, h*w) in [0, bins)
                flat = (np.arange(m)[:, None] * ncell + cell[None, :]) * bins + b
                feats[s0:s0 + m, k] = np.bincount(flat.ravel(), minlength=m * ncell * bins).reshape(m, ncell, bins)
                k += 1
    feats /= cell_size[None, None, :, None]
    return np.sqrt(feats).reshape(n, -1).astype(np.float32)


@dataclass(frozen=True)
class AutoencoderConfig:
    steps: int = 300
    seconds: float = 120.0
    size: int = 64
    batch: int = 32
    lr: float = 2e-3
    seed: int = 0
    # One thread: on a shared 2-core machine two threads made each step ~10x slower (contention).
    threads: int = 1


def _resize(stack: np.ndarray, size: int):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(_normalize(stack))
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _network(channels: int):
    from torch import nn

    def down(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    def up(i, o):
        return nn.Sequential(nn.ConvTranspose2d(i, o, 4, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    enc = nn.Sequential(down(channels, 16), down(16, 32), down(32, 64), down(64, 32))  # 64 -> 4x4x32
    dec = nn.Sequential(up(32, 64), up(64, 32), up(32, 16), nn.ConvTranspose2d(16, channels, 4, 2, 1))
    return enc, dec


def autoencoder_features(stacks: dict[str, np.ndarray], cfg: AutoencoderConfig = AutoencoderConfig()
                         ) -> tuple[dict[str, np.ndarray], dict]:
    """One autoencoder for all requested planes' slices; returns per-plane (N, 512) embeddings
    and a summary (steps run, seconds, final loss)."""
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        data = {p: _resize(s, cfg.size) for p, s in stacks.items()}
        allx = torch.cat(list(data.values()))
        channels = allx.shape[1]
        enc, dec = _network(channels)
        opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=cfg.lr)
        enc.train(), dec.train()
        t0, loss, step = time.perf_counter(), float("nan"), 0
        for step in range(1, cfg.steps + 1):
            idx = torch.randint(len(allx), (min(cfg.batch, len(allx)),), generator=gen)
            x = allx[idx]
            # Random flips: slices have no preferred orientation; keeps the code from memorizing layout alone.
            if torch.rand(1, generator=gen).item() < 0.5:
                x = x.flip(-1)
            if torch.rand(1, generator=gen).item() < 0.5:
                x = x.flip(-2)
            out = dec(enc(x))
            lossv = torch.nn.functional.mse_loss(out, x)
            opt.zero_grad()
            lossv.backward()
            opt.step()
            loss = lossv.item()
            if time.perf_counter() - t0 > cfg.seconds:
                log.warning("autoencoder stopped by the time bound after %d of %d steps", step, cfg.steps)
                break
        seconds = time.perf_counter() - t0
        log.info("autoencoder: %d steps in %.1f s, reconstruction MSE %.4f", step, seconds, loss)
        enc.eval()
        feats = {}
        with torch.no_grad():
            for p, x in data.items():
                feats[p] = torch.cat([enc(x[i:i + 256]).flatten(1) for i in range(0, len(x), 256)]).numpy()
        return feats, {"steps": step, "seconds": round(seconds, 2), "mse": loss}
    finally:
        torch.set_num_threads(old_threads)
