"""Self-supervised pretraining on the whole volume: inpaint masked blocks of the raw image.

Sparse annotation leaves most voxels unlabelled; this puts them to work before the supervised
steps. Each step reads an input window anywhere in the training volumes, hides a random share
of square in-plane blocks of it (each z-section drawn independently), and trains the network,
through a temporary head (one output per input channel), to predict the hidden normalized
intensities in its output window (mean squared error on hidden voxels only). Then the class
head's final convolution is put back, untouched (the Cheng network's normalization and PReLU
before it are trained with the body), and supervised training starts from the learnt features.

Why in-plane blocks, per section: a block hidden on one section is often visible on its
neighbours, so a 3D network can learn to read across sections (the context the 2D baseline
lacks), while in-plane context alone must guess the block from its surroundings. The blocks are
larger than a membrane is wide, so copying a neighbouring pixel does not solve the task.
Hidden voxels take the normalization's mean (0 after normalizing), before the filter bank, so
the bank's responses do not leak them.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from sparseseg.engine.tiling import reflect_index
from sparseseg.errors import SparsesegError
from sparseseg.trainer.data import read_reflected
from sparseseg.trainer.schedule import lr_at, set_lr

log = logging.getLogger("sparseseg.train")

BLOCK = 8           # side of a hidden in-plane square, voxels
HIDDEN = 0.3        # share of blocks hidden per section


def hide_blocks(shape, rng: np.random.Generator, block: int = BLOCK, share: float = HIDDEN,
                index=None) -> np.ndarray:
    """Boolean (Z, Y, X) mask: True where hidden; squares of `block` on a grid with a random
    phase, `share` of them per z-section, drawn independently per section.

    `index`: the volume coordinate of every window position per axis (three arrays; default
    0..n-1). A window reflected past the volume border repeats voxels; the mask follows the
    volume coordinate, so a hidden voxel's mirror copy is hidden too and cannot be copied."""
    index = index or [np.arange(n) for n in shape]
    iz, iy, ix = (np.asarray(i) for i in index)
    oy, ox = (int(v) for v in rng.integers(block, size=2))
    by, bx = (iy + oy) // block, (ix + ox) // block
    sections, zi = np.unique(iz, return_inverse=True)
    grid = rng.random((len(sections), int(by.max()) + 1, int(bx.max()) + 1)) < share
    return grid[zi][:, by][:, :, bx]


def _final_conv(net: nn.Module):
    """(container, attribute) of the network's last 1x1 convolution, the class head."""
    head = getattr(net, "head", None)
    if isinstance(head, nn.Sequential):
        return head, str(len(head) - 1)
    if head is None:
        raise SparsesegError("--pretrain needs a network with a class head (unet or cheng)")
    return net, "head"


def _window(image, start, shape, rng):
    """A raw input window at `start` (reflected past the border) and its hidden-voxel mask,
    both flipped alike in-plane at random."""
    x = read_reflected(image, start, shape)
    index = [reflect_index(np.arange(s, s + n), size) for s, n, size in zip(start, shape, image.shape[1:])]
    hidden = hide_blocks(shape, rng, index=index)
    for axis in (2, 3):
        if rng.random() < 0.5:
            x, hidden = np.flip(x, axis), np.flip(hidden, axis - 1)
    return np.ascontiguousarray(x), np.ascontiguousarray(hidden)


def pretrain(run, iterations: int) -> dict:
    """Inpainting steps on `run.model` (weights changed in place; the class head left as it was).
    Returns {"iterations", "first_loss" and "loss" (means of the first and last 10% of the
    steps' inpainting losses), "seconds"}."""
    if run.on_responses:
        raise SparsesegError("--pretrain inpaints the raw image, but this network trains on its 3D filter "
                             "bank's responses: give --filter-dims 2 or --pretrain 0")
    model, device, geom = run.model, run.device, run.model_cfg.geometry
    owner, name = _final_conv(model.net)
    class_head = getattr(owner, name)
    channels = run.model_cfg.in_channels
    recon = type(class_head)(class_head.in_channels, channels, 1).to(device)
    setattr(owner, name, recon)
    # The phase's own Adam at the run's rate, poly decay, whatever --optimizer says: its state is
    # not carried into the supervised steps, which start with a fresh optimizer.
    optimizer = torch.optim.Adam(model.parameters(), lr=run.cfg.lr)
    rng = np.random.default_rng([run.cfg.seed, 1])      # its own stream: the sampler's is untouched
    sizes = np.array([float(np.prod(im.shape[1:])) for im in run.images])
    fill = model.mean.view(1, -1, 1, 1, 1)
    out = tuple(slice(c, c + n) for c, n in zip(geom.context, run.out_shape))
    bf16 = run.amp_dtype == torch.bfloat16
    tenth = max(1, iterations // 10)
    losses, t0 = [], time.time()
    model.train()
    try:
        for it in range(iterations):
            set_lr(optimizer, lr_at(it, iterations, run.cfg.lr, "poly", run.cfg.warmup))
            vi = int(rng.choice(len(sizes), p=sizes / sizes.sum()))
            shape = run.images[vi].shape[1:]
            start = [int(rng.integers(0, n - o + 1)) - c
                     for n, o, c in zip(shape, run.out_shape, geom.context)]
            x, hidden = _window(run.images[vi], start, run.in_shape, rng)
            x, hidden = torch.from_numpy(x)[None].to(device), torch.from_numpy(hidden).to(device)
            target = model.normalize(x)[:, :, out[0], out[1], out[2]]
            # bf16 needs no loss scaling; fp16 (older GPUs) and the CPU run in float32 here.
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                pred = model.sections(torch.where(hidden, fill, x))
            mask = hidden[out]
            loss = ((pred.float() - target) ** 2)[:, :, mask].mean() if bool(mask.any()) else pred.sum() * 0.0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if (it + 1) % tenth == 0:
                log.info("pretraining %d/%d inpainting loss %.4f", it + 1, iterations,
                         float(np.mean(losses[-tenth:])))
    finally:
        setattr(owner, name, class_head)
    return {"iterations": iterations, "first_loss": round(float(np.mean(losses[:tenth])), 5),
            "loss": round(float(np.mean(losses[-tenth:])), 5), "seconds": round(time.time() - t0, 2)}
