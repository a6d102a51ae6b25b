"""A fixed filter bank as the network's first layer: ilastik's features, inside the model.

Measured on ISBI 2012 (benchmarks/real_data.py, 3D small preset, 300 CPU iterations): the
network fed the 40 filter responses a random forest uses reached membrane IoU 0.577 where the
same network on the raw image reached 0.508 (the forest 0.568). Computing them inside the model
keeps that gain without a second input pipeline: checkpoints, ONNX graphs, TensorRT plans and
the engine's tiling see one module whose input is the raw image, as before.

Per input channel and per scale sigma, in the plane of each section (2D, as ilastik users filter
anisotropic serial-section EM), eight responses in the order of
benchmarks.baselines.forest._features: Gaussian smoothing, Laplacian of Gaussian, gradient
magnitude, difference of Gaussians G(sigma) - G(0.66 sigma), the two structure-tensor
eigenvalues (gradients at 0.5 sigma, products smoothed at sigma) and the two Hessian eigenvalues,
descending. Kernels are scipy.ndimage's sampled Gaussian derivatives truncated at 3 sigma, so a
response equals `scipy.ndimage` with truncate=3 wherever it is computed (tests check it).

Convolutions are valid (no padding): the bank consumes `bank_context(sigmas)` voxels per side in
y and x, which the shape rules (sparseseg.model.shapes.geometry_of) add to the network's context,
so tiles still reproduce a whole-volume pass exactly. With same padding the bank reflects the
border itself. The responses are z-scored with statistics fitted once on training data
(`calibrate`), kept as buffers, so every artifact carries them. The bank is not trained and
always runs in float32 (structure-tensor products of fp16 responses lose their small values).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sparseseg.model.shapes import FILTERS_PER_SIGMA, bank_context, kernel_radius


def gaussian_kernel1d(sigma: float, order: int, radius: int) -> np.ndarray:
    """scipy.ndimage's sampled Gaussian (derivative) kernel, as a convolution kernel."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * x ** 2 / sigma ** 2)
    phi /= phi.sum()
    if order == 0:
        return phi
    if order == 1:
        return -x / sigma ** 2 * phi
    if order == 2:
        return (x ** 2 / sigma ** 4 - 1 / sigma ** 2) * phi
    raise ValueError("order must be 0, 1 or 2")


def _eig2(a, b, c):
    """Eigenvalues (descending) of the symmetric 2x2 matrices [[a, b], [b, c]], element-wise."""
    mid = (a + c) / 2
    dev = torch.sqrt(((a - c) / 2) ** 2 + b ** 2)
    return mid + dev, mid - dev


def _conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """conv2d of single-channel images x (B, 1, H, W) with n kernels w (n, 1, kh, kw).

    oneDNN runs one-channel convolutions slowly: the bank on an ISBI training patch (30x138x138)
    took 1.6 s as one-channel convolutions and 0.38 s as depthwise ones (one thread, 2-core VM
    shared with another run, 2026-11-23), so the images become the channels of one depthwise
    convolution. An
    ONNX graph needs a fixed group count, so exports trace the plain convolution instead."""
    if torch.onnx.is_in_onnx_export() or x.device.type == "meta":
        return F.conv2d(x, w)
    b, n = x.shape[0], w.shape[0]
    y = F.conv2d(x.reshape(1, b, *x.shape[2:]), w.repeat(b, 1, 1, 1), groups=b)
    return y.reshape(b, n, *y.shape[2:])


def _crop(t: torch.Tensor, by: int) -> torch.Tensor:
    return t if by == 0 else t[..., by:-by, by:-by]


class FilterBank(nn.Module):
    """(N, C, Z, Y, X) -> (N, C * 8 * len(sigmas), Z, Y - 2r, X - 2r) z-scored responses (valid),
    r = bank_context(sigmas); with `same` the input is reflected by r first (same size out)."""

    dims = 2          # filters each section (sparseseg.model.volume_filters: the 3D bank)
    per_sigma = FILTERS_PER_SIGMA

    def __init__(self, in_channels: int, sigmas, padding: str = "valid"):
        super().__init__()
        self.sigmas = tuple(float(s) for s in sigmas)
        self.context = bank_context(self.sigmas)
        self.same = padding == "same"
        self.out_channels = in_channels * self.per_sigma * len(self.sigmas)
        for i, s in enumerate(self.sigmas):
            # Orders 0, 1, 2 at sigma; order 0 at 0.66 sigma (DoG); order 1 at 0.5 sigma (the
            # structure tensor's inner scale). Stored reversed: torch convolutions correlate.
            for name, sd, orders in (("s", s, (0, 1, 2)), ("d", 0.66 * s, (0,)), ("i", 0.5 * s, (0, 1))):
                r = kernel_radius(sd)
                k = np.stack([gaussian_kernel1d(sd, o, r)[::-1] for o in orders]).astype(np.float32)
                self.register_buffer(f"k{name}{i}", torch.from_numpy(k.copy()), persistent=False)
        self.register_buffer("mean", torch.zeros(self.out_channels))
        self.register_buffer("std", torch.ones(self.out_channels))

    @staticmethod
    def _separable(x: torch.Tensor, k: torch.Tensor, orders_y, orders_x) -> list[torch.Tensor]:
        """Valid responses of x (B, 1, Y, X) to k[oy] along y then k[ox] along x, per pair."""
        kk = k.shape[1]
        ys = _conv(x, k[:, None, :, None])                                # (B, n, Y', X)
        out = []
        for oy, ox in zip(orders_y, orders_x):
            out.append(_conv(ys[:, oy:oy + 1], k[ox].reshape(1, 1, 1, kk)))
        return out

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (not z-scored) responses, float32."""
        n, c, z, h, w = x.shape
        r_all = self.context
        if self.same:
            flat = x.reshape(n, c * z, h, w).float()
            x = F.pad(flat, (r_all,) * 4, mode="reflect").reshape(n, c, z, h + 2 * r_all, w + 2 * r_all)
            h, w = h + 2 * r_all, w + 2 * r_all
        b = x.permute(0, 2, 1, 3, 4).reshape(n * z * c, 1, h, w).float()    # sections as a batch
        feats = []
        for i in range(len(self.sigmas)):
            ks, kd, ki = getattr(self, f"ks{i}"), getattr(self, f"kd{i}"), getattr(self, f"ki{i}")
            rs, rd, ri = ((k.shape[1] - 1) // 2 for k in (ks, kd, ki))
            g, gy, gx, gyy, gxx, gxy = self._separable(b, ks, (0, 1, 0, 2, 0, 1), (0, 0, 1, 0, 2, 1))
            g, gy, gx, gyy, gxx, gxy = (_crop(t, r_all - rs) for t in (g, gy, gx, gyy, gxx, gxy))
            (gd,) = self._separable(b, kd, (0,), (0,))
            iy, ix = self._separable(b, ki, (1, 0), (0, 1))
            # Structure tensor: products of the inner-scale gradients, smoothed at sigma.
            prods = torch.cat([iy * iy, iy * ix, ix * ix], 0)
            syy, syx, sxx = _crop(torch.cat(self._separable(prods, ks, (0,), (0,)), 0),
                                  r_all - ri - rs).chunk(3, 0)
            st1, st2 = _eig2(syy, syx, sxx)
            h1, h2 = _eig2(gyy, gxy, gxx)
            grad = torch.sqrt(gy * gy + gx * gx)
            feats += [g, gyy + gxx, grad, g - _crop(gd, r_all - rd), st1, st2, h1, h2]
        out = torch.cat(feats, 1)                                         # (n*z*c, 8S, h', w')
        hh, ww = out.shape[-2:]
        # (n, z, c, 8S, ...) -> (n, c*8S, z, ...): channel-major, then filter, then scale order.
        out = out.reshape(n, z, c, len(self.sigmas), FILTERS_PER_SIGMA, hh, ww)
        return out.permute(0, 2, 3, 4, 1, 5, 6).reshape(n, self.out_channels, z, hh, ww)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):   # AMP: fp32 here
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._zscored(x)
        return self._zscored(x).to(x.dtype)               # (export and inference: no context)

    def _zscored(self, x: torch.Tensor) -> torch.Tensor:
        return (self.responses(x) - self.mean.view(1, -1, 1, 1, 1)) / self.std.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Fit the z-score of every response on (N, C, Z, Y, X) normalized training input."""
        f = self.responses(x).transpose(0, 1).reshape(self.out_channels, -1).double()
        self.mean.copy_(f.mean(1).float())
        self.std.copy_(f.std(1).clamp_min(1e-6).float())

