"""The 3D filter bank's responses, computed once per training volume.

A 2D network on all three planes trains on single sections; the 3D bank in front of it reads
`bank_context` sections above and below each one (23 for ilastik's scales), so computing it inside
every training patch would repeat a 47-section 3D filtering at each step. The trainer instead
filters every training volume once, reflected at its border as the engine pads it, fits the
bank's z-scores on those responses, and trains the network after the bank on them
(`SegmentationModel.apply_net`). The model keeps the bank: checkpoints, ONNX graphs and the
engine read raw images as before, and tests check that they see the same responses.
"""

from __future__ import annotations

import numpy as np
import torch

from sparseseg.errors import SparsesegError
from sparseseg.trainer.data import ImageView, TrainingVolume, read_reflected

# --input-dropout "auto" on responses: fifty z-scored responses are redundant enough to lose a fifth
# of them per patch, which keeps a few slices from being learnt by heart (docs/history.md).
RESPONSE_DROPOUT = 0.2
RESPONSE_BYTES = 4 << 30          # float32 responses of all training volumes held in memory
SLAB_VOXELS = 1 << 22             # input voxels filtered at a time (bounds the bank's buffers)
STAT_VOXELS = 1 << 21             # voxels per volume the z-scores are fitted on (an even grid)


def response_bytes(shapes, channels: int) -> int:
    return int(sum(np.prod(s) for s in shapes)) * channels * 4


def check_fits(shapes, channels: int) -> None:
    need = response_bytes(shapes, channels)
    if need > RESPONSE_BYTES:
        raise SparsesegError(f"the 3D filter responses of the training volumes need {need / 2 ** 30:.1f} GiB "
                             f"(at most {RESPONSE_BYTES / 2 ** 30:.0f}); give fewer --filters scales or "
                             "--filter-dims 2")


@torch.no_grad()
def volume_responses(model, vols, stats, device) -> list:
    """TrainingVolumes of `model`'s z-scored 3D bank responses to each of `vols` (normalized with
    the per-volume `stats` where the mode has them, then by the model's own buffers), in float32
    on the host; fits the bank's z-score buffers on them first."""
    bank = model.filters
    check_fits([v.shape for v in vols], bank.out_channels)
    r = bank.context
    raw = []
    for v, s in zip(vols, stats):
        view = ImageView(v.image, s)
        z, y, x = v.shape
        out = np.empty((bank.out_channels, z, y, x), np.float32)
        step = max(2 * r, 1, SLAB_VOXELS // ((y + 2 * r) * (x + 2 * r)) - 2 * r)   # halo at most half
        for z0 in range(0, z, step):
            n = min(step, z - z0)
            slab = read_reflected(view, (z0 - r, -r, -r), (n + 2 * r, y + 2 * r, x + 2 * r))
            t = model.normalize(torch.from_numpy(np.ascontiguousarray(slab))[None].to(device))
            out[:, z0:z0 + n] = bank.valid_responses(t)[0].cpu().numpy()
        raw.append(out)
    _fit_zscores(bank, raw)
    mean, std = (b.cpu().numpy()[:, None, None, None] for b in (bank.mean, bank.std))
    for out in raw:
        out -= mean
        out /= std
    return [TrainingVolume(out, v.labels, v.name, v.voxel_size) for out, v in zip(raw, vols)]


def _fit_zscores(bank, raw) -> None:
    samples = []
    for out in raw:
        stride = max(1, int(np.ceil((np.prod(out.shape[1:]) / STAT_VOXELS) ** (1 / 3))))
        samples.append(out[:, ::stride, ::stride, ::stride].reshape(out.shape[0], -1))
    f = np.concatenate(samples, 1).astype(np.float64)
    bank.mean.copy_(torch.from_numpy(f.mean(1)).float())
    bank.std.copy_(torch.from_numpy(f.std(1, ddof=1)).clamp_min(1e-6).float())
