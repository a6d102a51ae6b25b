"""The meta-model variant (Zheng et al. 2020): a 3D network whose input is the image plus the
averaged pseudo-label probabilities, trained against one pseudo-label per iteration.

Stage 1 (the first half of the iterations) fits a randomly chosen pseudo-label, stage 2 the
one nearest to the network's current output (cross-entropy distance, per patch). Annotated
voxels always use the real labels. The trainer's sampler, augmenter, losses and schedule are
reused; the loop is here because the trainer has one fixed target per volume.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from sparseseg.engine.backends.select import resolve_device
from sparseseg.errors import SparsesegError
from sparseseg.model.network import SegmentationModel
from sparseseg.selftrain.pseudo import dense_targets
from sparseseg.trainer.augment import Augmenter
from sparseseg.trainer.config import patch_output_size
from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.losses import balanced_class_weights, jaccard_classes, segmentation_loss
from sparseseg.trainer.options import build_configs
from sparseseg.trainer.sampler import PatchSampler, index_labels
from sparseseg.trainer.schedule import lr_at, set_lr

log = logging.getLogger("sparseseg.selftrain")

STAGE2_FROM = 0.5        # share of the iterations fitted to a random pseudo-label first


def sample_patch(aug: Augmenter, inputs: np.ndarray, labels: np.ndarray, start, in_shape, out_offset, out_shape,
                 channels: int):
    """One augmented patch: inputs (C + K, *in_shape) sampled trilinearly (gray values changed on
    the first `channels`, the image, only) and every label volume of `labels` (L, Z, Y, X) at the
    output window by nearest neighbour, outside the volume -1. The same coordinate field as
    `Augmenter.sample`, applied to several label volumes at once."""
    dev = aug.device
    coords = aug.coordinates(start, in_shape)
    size = torch.tensor(labels.shape[1:], dtype=torch.float32, device=dev)
    lo = torch.clamp(coords.reshape(-1, 3).amin(0).floor() - 1, min=0).long().tolist()
    hi = [int(v) for v in torch.minimum(coords.reshape(-1, 3).amax(0).ceil() + 2, size).long().tolist()]
    hi = [max(h, a + 1) for h, a in zip(hi, lo)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    img = torch.as_tensor(np.ascontiguousarray(inputs[(slice(None),) + crop]), dtype=torch.float32).to(dev)
    lab = torch.as_tensor(np.ascontiguousarray(labels[(slice(None),) + crop]).astype(np.float32)).to(dev)
    extent = torch.tensor([max(b - a - 1, 1) for a, b in zip(lo, hi)], dtype=torch.float32, device=dev)
    norm = (2 * (coords - torch.tensor(lo, dtype=torch.float32, device=dev)) / extent - 1).flip(-1)[None]
    x = F.grid_sample(img[None], norm, mode="bilinear", padding_mode="reflection", align_corners=True)[0]
    o = tuple(slice(a, a + n) for a, n in zip(out_offset, out_shape))
    y = F.grid_sample((lab + 1)[None], norm[:, o[0], o[1], o[2]], mode="nearest", padding_mode="zeros",
                      align_corners=True)[0] - 1
    if aug.cfg.gray:
        x = torch.cat([aug._gray(x[:channels]), x[channels:]])
    return x, y.long()


def _targets(y: torch.Tensor, ignore_label: int) -> torch.Tensor:
    """(L, ...) real labels + candidates -> (L - 1, ...) candidates with the real labels where
    annotated; outside the volume (-1) ignored."""
    real, cands = y[0], y[1:]
    t = torch.where(real != ignore_label, real, cands)
    return torch.where(t < 0, torch.full_like(t, ignore_label), t)


def train_meta(vols, means, candidates, options: dict, num_classes: int, image_mean, image_std, iterations: int,
               progress=None):
    """The meta-network (a SegmentationModel with C + K input channels), its TrainConfig, class
    names, and the training history. `means`: averaged probabilities per volume; `candidates`:
    per volume the hard pseudo-labels (uint8, one per base prediction)."""
    ignore, k = options["ignore_label"], num_classes
    c = vols[0].channels
    inputs = [np.concatenate([v.image, m.astype(np.float32)]) for v, m in zip(vols, means)]
    dense = [dense_targets(m, v.labels, ignore) for v, m in zip(vols, means)]
    stacks = [np.stack([v.labels] + list(cands)) for v, cands in zip(vols, candidates)]
    o = {**options, "num_classes": k, "iterations": iterations or options["iterations"], "ndim": 3}
    mcfg, tcfg, names = build_configs([TrainingVolume(x, d, v.name, v.voxel_size)
                                       for x, d, v in zip(inputs, dense, vols)], o)
    device = torch.device(resolve_device(tcfg.device))
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    geom = mcfg.geometry
    smallest = tuple(min(v.shape[a] for v in vols) for a in range(3))
    out_shape = tuple(tcfg.patch_output) or patch_output_size(mcfg, tcfg.preset, smallest)
    in_shape = geom.input_for_output(out_shape)
    if in_shape is None:
        raise SparsesegError(f"--patch {out_shape} is not a valid output size for this network")
    indexed = [index_labels(d, ignore, k) for d in dense]
    sampler = PatchSampler(dense, [t for t, _ in indexed], out_shape, ignore, rng, tcfg.class_sampling)
    counts = sum(cnt for _, cnt in indexed)
    weights = torch.as_tensor(np.asarray(tcfg.class_weights, np.float32) if tcfg.class_weights else
                              balanced_class_weights(counts, tcfg.max_weight_ratio), device=device)
    spacing = tcfg.voxel_size or next((v.voxel_size for v in vols if v.voxel_size), None)
    aug = Augmenter(tcfg.augment, spacing, False, image_mean, image_std, tcfg.seed, device)
    mean = list(image_mean) + [0.0] * k            # probabilities enter as they are
    std = list(image_std) + [1.0] * k
    model = SegmentationModel(mcfg, mean, std, "global").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay) \
        if tcfg.optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    jac = jaccard_classes(counts)
    stage2 = int(tcfg.iterations * STAGE2_FROM)
    history, t0 = [], time.time()
    log.info("meta-network: patch in %s out %s, stage 2 (nearest pseudo-label) from iteration %d",
             in_shape, out_shape, stage2 + 1)
    model.train()
    for it in range(tcfg.iterations):
        lr = lr_at(it, tcfg.iterations, tcfg.lr, tcfg.schedule, tcfg.warmup)
        set_lr(opt, lr)
        xs, ys = [], []
        for _ in range(tcfg.batch_size):
            vi, out_start = sampler.sample()
            x, y = sample_patch(aug, inputs[vi], stacks[vi], [s - ctx for s, ctx in zip(out_start, geom.context)],
                                in_shape, geom.context, out_shape, c)
            xs.append(x)
            ys.append(_targets(y, ignore))
        x, cands = torch.stack(xs), torch.stack(ys)             # cands: (N, P, *out)
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        if it < stage2:
            pick = torch.full((len(cands),), int(rng.integers(cands.shape[1])), device=device)
        else:
            with torch.no_grad():
                logp = torch.log_softmax(logits.float(), 1)
                dist = torch.stack([_ce(logp, cands[:, j], ignore) for j in range(cands.shape[1])], 1)
                pick = dist.argmin(1)
        target = cands[torch.arange(len(cands), device=device), pick]
        loss = segmentation_loss(logits, target, weights, ignore, tcfg.dice_weight, tcfg.loss, jac)
        loss.backward()
        opt.step()
        history.append({"iteration": it + 1, "loss": float(loss.detach()), "lr": lr,
                        "stage": 1 if it < stage2 else 2, "pseudo_label": pick.tolist(),
                        "seconds": round(time.time() - t0, 3)})
        if (it + 1) % max(1, tcfg.iterations // 10) == 0 or it + 1 == tcfg.iterations:
            log.info("meta-network iteration %d/%d loss %.4f (%.1f s)", it + 1, tcfg.iterations, history[-1]["loss"],
                     time.time() - t0)
    return model.eval(), tcfg, names, history


def _ce(logp: torch.Tensor, target: torch.Tensor, ignore: int) -> torch.Tensor:
    """Mean cross-entropy per sample over its non-ignored voxels."""
    valid = target != ignore
    nll = -logp.gather(1, torch.where(valid, target, 0).unsqueeze(1))[:, 0] * valid
    dims = tuple(range(1, nll.ndim))
    return nll.sum(dims) / valid.sum(dims).clamp(min=1)
