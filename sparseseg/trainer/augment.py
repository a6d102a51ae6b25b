"""On-the-fly augmentation on the training device, as one sampling pass per patch.

For every voxel of the network's input patch we compute where to read it in the volume:
flips, an in-plane (y, x) rotation and a scaling about the patch centre, plus the paper's
smooth dense deformation (random vectors from N(0, sigma) on a grid of 32-voxel spacing,
interpolated with cubic B-splines). Affine and elastic are summed into one coordinate field
and the volume is sampled once: image trilinearly, labels by nearest neighbour. The label
target is the same field at the output window, so labels stay aligned with what the valid
network sees. Points outside the volume become ignored: nothing outside is ever labelled,
and ignored voxels stay ignored. Gray values (brightness, contrast, gamma) come last.

Anisotropic stacks: sigma and grid spacing are given in units of the finest axis and scaled
per axis by the voxel size, so a stack 12x coarser in z is barely deformed along z.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from sparseseg.engine.tiling import reflect_index
from sparseseg.trainer.config import AugmentConfig


def _bspline3(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


@lru_cache(maxsize=64)
def bspline_matrix(length: int, spacing: float) -> np.ndarray:
    """(length, n_ctrl) matrix mapping values at control points (spacing apart, one extra
    point beyond each end) to a dense line by cubic B-spline *interpolation*: the values are
    first turned into spline coefficients (B^-1), so the field passes through them."""
    n = int(math.ceil((length - 1) / spacing)) + 3
    nodes = (np.arange(n) - 1) * spacing            # control point positions in voxels
    dense = np.arange(length, dtype=np.float64)
    j = np.arange(n)
    at_nodes = _bspline3((nodes[:, None] - nodes[None, :]) / spacing)   # (n, n), tridiagonal
    at_dense = _bspline3(dense[:, None] / spacing - (j[None, :] - 1))   # (length, n)
    return (at_dense @ np.linalg.inv(at_nodes)).astype(np.float32)


def elastic_field(shape, sigma, grid, generator, device) -> torch.Tensor:
    """Dense displacement (3, Z, Y, X) in voxels: N(0, sigma_a) vectors on a grid of spacing
    grid_a, B-spline interpolated. Axes with sigma 0 get no displacement."""
    mats = [torch.from_numpy(bspline_matrix(int(n), float(max(g, 1.0)))).to(device) for n, g in zip(shape, grid)]
    field = torch.zeros((3,) + tuple(shape), device=device)
    for axis in range(3):
        if sigma[axis] <= 0:
            continue
        ctrl = torch.randn(tuple(m.shape[1] for m in mats), generator=generator, device="cpu").to(device)
        # One axis at a time: three small matrix products instead of a 4-way einsum.
        v = torch.tensordot(ctrl, mats[2], dims=([2], [1]))          # (i, j, X)
        v = torch.tensordot(mats[1], v, dims=([1], [1]))             # (Y, i, X)
        v = torch.tensordot(mats[0], v, dims=([1], [1]))             # (Z, Y, X)
        field[axis] = v * sigma[axis]
    return field


class Augmenter:
    """Cuts augmented (image, label) patch pairs from whole volumes."""

    def __init__(self, cfg: AugmentConfig, spacing, planar: bool, mean, std, seed: int, device):
        self.cfg = cfg
        self.device = torch.device(device)
        s = np.asarray(spacing if spacing else (1.0, 1.0, 1.0), dtype=np.float64)
        rel = s.min() / s                      # 1 on the finest axis, < 1 on coarse ones
        self.sigma = cfg.elastic_sigma * rel
        self.grid = cfg.elastic_grid * rel
        if planar:                             # a 2D network sees single slices: no z motion
            self.sigma[0] = 0.0
        self.planar = planar
        # Flips and right-angle turns move every voxel to an integer position: gathered, not interpolated.
        self.integral = not cfg.elastic and not cfg.scale and (not cfg.rotate or cfg.right_angles)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    # -- coordinates -------------------------------------------------------------------
    def _affine(self) -> np.ndarray:
        """3x3 matrix acting on (z, y, x) offsets from the patch centre."""
        a = np.eye(3)
        c = self.cfg
        if c.rotate:
            if c.right_angles:
                k = int(self.rng.integers(4))
                # Exact entries (no cos(pi/2) = 6e-17), so coordinates stay integers.
                c_, s_ = [(1, 0), (0, 1), (-1, 0), (0, -1)][k]
            else:
                t = self.rng.uniform(0, 2 * np.pi)
                c_, s_ = np.cos(t), np.sin(t)
            a[1:, 1:] = [[c_, -s_], [s_, c_]]
        if c.scale:
            a = a * self.rng.uniform(*c.scale)
        if c.flip:
            flips = self.rng.random(3) < 0.5
            if self.planar:
                flips[0] = False
            a = a @ np.diag(np.where(flips, -1.0, 1.0))
        return a

    def _draw(self):
        """This patch's affine matrix, or None when it is left as stored (1 - probability)."""
        return None if self.rng.random() >= self.cfg.probability else self._affine()

    def coordinates(self, start, in_shape) -> torch.Tensor:
        """Volume coordinates (Z, Y, X, 3) to read each input-patch voxel from."""
        dev = self.device
        axes = [torch.arange(n, dtype=torch.float32, device=dev) for n in in_shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)          # patch-local
        # Right-angle turns about an integer centre keep integer coordinates (no resampling).
        half = [(n - 1) // 2 if self.cfg.right_angles else (n - 1) / 2 for n in in_shape]
        centre = torch.tensor(half, dtype=torch.float32, device=dev)
        a = self._draw()
        if a is None:
            return grid + torch.tensor(start, dtype=torch.float32, device=dev)
        a = torch.tensor(a, dtype=torch.float32, device=dev)
        coords = (grid - centre) @ a.T + centre
        if self.cfg.elastic:
            coords = coords + elastic_field(in_shape, self.sigma, self.grid, self.gen, dev).movedim(0, -1)
        return coords + torch.tensor(start, dtype=torch.float32, device=dev)

    # -- sampling ----------------------------------------------------------------------
    def sample(self, image: np.ndarray, labels: np.ndarray, start, in_shape, out_offset, out_shape,
               ignore_label: int):
        """image (C, Z, Y, X) raw, labels (Z, Y, X); returns torch (C, *in_shape) float32 and
        (out_shape) int64 labels of the output window at `out_offset` inside the patch."""
        if self.integral:
            x, y = self._gather(image, labels, self._draw(), start, in_shape, out_offset, out_shape, ignore_label)
            return (self._gray(x) if self.cfg.gray else x), y
        coords = self.coordinates(start, in_shape)
        size = torch.tensor(labels.shape, dtype=torch.float32, device=self.device)
        lo = torch.clamp(coords.reshape(-1, 3).amin(0).floor() - 1, min=0).long().tolist()
        hi = [int(v) for v in torch.minimum(coords.reshape(-1, 3).amax(0).ceil() + 2, size).long().tolist()]
        hi = [max(h, lo_ + 1) for h, lo_ in zip(hi, lo)]
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        img = torch.as_tensor(np.ascontiguousarray(image[(slice(None),) + crop]), dtype=torch.float32)
        lab = torch.as_tensor(np.ascontiguousarray(labels[crop]).astype(np.float32))
        img, lab = img.to(self.device), lab.to(self.device)
        extent = torch.tensor([max(b - a - 1, 1) for a, b in zip(lo, hi)], dtype=torch.float32,
                              device=self.device)
        local = coords - torch.tensor(lo, dtype=torch.float32, device=self.device)
        # grid_sample wants (x, y, z) in [-1, 1] (align_corners=True: -1 is index 0).
        norm = (2 * local / extent - 1).flip(-1)[None]
        x = F.grid_sample(img[None], norm, mode="bilinear", padding_mode="reflection", align_corners=True)[0]
        o = tuple(slice(a, a + n) for a, n in zip(out_offset, out_shape))
        # Labels shifted by +1 so that zero padding (outside the crop/volume) means "ignored".
        y = F.grid_sample((lab + 1)[None, None], norm[:, o[0], o[1], o[2]], mode="nearest",
                          padding_mode="zeros", align_corners=True)[0, 0]
        y = torch.where(y == 0, torch.full_like(y, ignore_label + 1), y) - 1
        if self.cfg.gray:
            x = self._gray(x)
        return x, y.long()

    def _gather(self, image, labels, a, start, in_shape, out_offset, out_shape, ignore_label: int):
        """The integer case (flips and right-angle turns: `a` a signed permutation, or None for
        an untouched patch) as one index per axis and a transpose: the voxels interpolation gives,
        without its cost (a 60x74x74 patch: 17 against 131 ms on one core, results/augment_timing.json). The image
        is reflected at the volume border by the engine's rule; labels outside it are ignored."""
        a = np.eye(3, dtype=np.int64) if a is None else np.rint(a).astype(np.int64)
        half = [(n - 1) // 2 for n in in_shape]
        src_of = [int(np.flatnonzero(a[:, j])[0]) for j in range(3)]      # output axis j walks source axis i
        index = [None] * 3                    # source axis i: its index at each position of output axis j
        for j, i in enumerate(src_of):
            index[i] = a[i, j] * (np.arange(in_shape[j]) - half[j]) + half[i] + int(start[i])
        order = (0,) + tuple(1 + i for i in src_of)
        src = _read_indexed(image, [reflect_index(ix, n) for ix, n in zip(index, labels.shape)], channels=True)
        x = torch.as_tensor(np.ascontiguousarray(src.transpose(order)), dtype=torch.float32, device=self.device)
        window = [None] * 3
        for j, i in enumerate(src_of):
            window[i] = index[i][out_offset[j]:out_offset[j] + out_shape[j]]
        inside = [(ix >= 0) & (ix < n) for ix, n in zip(window, labels.shape)]
        lab = _read_indexed(labels, [np.clip(ix, 0, n - 1) for ix, n in zip(window, labels.shape)]).astype(np.int64)
        lab[~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])] = ignore_label
        return x, torch.as_tensor(np.ascontiguousarray(lab.transpose(src_of)), device=self.device)

    def _gray(self, x: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and gamma in normalized units, mapped back to raw intensities."""
        if self.rng.random() >= self.cfg.probability:
            return x
        m = torch.as_tensor(self.mean, device=x.device).view(-1, 1, 1, 1)
        s = torch.as_tensor(self.std, device=x.device).view(-1, 1, 1, 1)
        z = (x - m) / s
        z = z * self.rng.uniform(0.75, 1.25) + self.rng.uniform(-0.2, 0.2)
        lo, hi = z.amin(), z.amax()
        if float(hi - lo) > 1e-6:
            gamma = float(np.exp(self.rng.uniform(-0.3, 0.3)))
            z = ((z - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
        return z * s + m


def _read_indexed(array, index, channels: bool = False) -> np.ndarray:
    """array[(:,) ix_(*index)] through one box read (arrays and the trainer's lazy views take slices only)."""
    box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in index)
    block = np.asarray(array[((slice(None),) if channels else ()) + box])
    local = [ix - b.start for ix, b in zip(index, box)]
    return block[np.ix_(*([np.arange(block.shape[0])] if channels else []), *local)]
