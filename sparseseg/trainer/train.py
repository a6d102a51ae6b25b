"""The training loop, readable top to bottom."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from sparseseg.errors import SparsesegError
from sparseseg.model.checkpoint import load_checkpoint, save_checkpoint
from sparseseg.model.config import ModelConfig
from sparseseg.model.network import SegmentationModel
from sparseseg.trainer.augment import Augmenter
from sparseseg.trainer.config import TrainConfig, patch_output_size
from sparseseg.trainer.data import channel_stats, class_counts
from sparseseg.trainer.losses import balanced_class_weights, segmentation_loss
from sparseseg.trainer.metrics import confusion, iou_from_confusion
from sparseseg.trainer.sampler import PatchSampler

log = logging.getLogger("sparseseg.train")


@dataclass
class TrainResult:
    model: SegmentationModel
    checkpoint: str | None
    iterations: int
    seconds: float
    final_loss: float
    history: list


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SparsesegError("--device cuda asked for, but no CUDA GPU is available to torch")
    if name not in ("cpu", "cuda"):
        raise SparsesegError(f"unknown device {name!r} (auto, cpu or cuda)")
    return torch.device(name)


def _validation_tiles(vols, context, out_shape, fraction, ignore_label, rng):
    """Hold out whole output tiles (on a grid, input inside the volume) holding annotations:
    neighbouring voxels of one slice are too correlated to validate on single voxels."""
    tiles = []
    for vi, v in enumerate(vols):
        ranges = [range(c, n - c - o + 1, o) for c, n, o in zip(context, v.labels.shape, out_shape)]
        for start in np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3):
            sl = tuple(slice(int(s), int(s) + o) for s, o in zip(start, out_shape))
            if (v.labels[sl] != ignore_label).any():
                tiles.append((vi, tuple(int(s) for s in start)))
    if fraction <= 0 or len(tiles) < 2:
        return []
    k = max(1, int(round(fraction * len(tiles))))
    pick = rng.choice(len(tiles), size=min(k, len(tiles) - 1), replace=False)
    return [tiles[i] for i in sorted(pick)]


def _validate(model, vols, tiles, context, out_shape, num_classes, ignore_label, device):
    model.eval()
    cm = np.zeros((num_classes, num_classes), np.int64)
    with torch.inference_mode():
        for vi, start in tiles:
            in_sl = tuple(slice(s - c, s + o + c) for s, c, o in zip(start, context, out_shape))
            out_sl = tuple(slice(s, s + o) for s, o in zip(start, out_shape))
            x = torch.from_numpy(np.ascontiguousarray(vols[vi].image[(slice(None),) + in_sl]))[None].to(device)
            pred = model(x)[0].argmax(0).cpu().numpy()
            cm += confusion(pred, vols[vi].labels[out_sl], num_classes, ignore_label)[:num_classes, :num_classes]
    model.train()
    return iou_from_confusion(cm)


def train(vols, model_cfg: ModelConfig, cfg: TrainConfig, class_names, out_path=None, resume: str | None = None,
          progress: bool | None = None, on_step=None) -> TrainResult:
    """Train `model_cfg` on TrainingVolumes with sparse labels; checkpoints go to `out_path`."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    k = model_cfg.num_classes
    geom = model_cfg.geometry
    context = geom.context

    # Patch size: the largest valid output whose input fits every volume and the preset budget.
    if cfg.patch_output:
        out_shape = tuple(int(v) for v in cfg.patch_output)
        if geom.input_for_output(out_shape) is None:
            raise SparsesegError(f"--patch {out_shape} is not a valid output size for this network")
    else:
        smallest = tuple(min(v.labels.shape[a] for v in vols) for a in range(3))
        out_shape = patch_output_size(model_cfg, cfg.preset, smallest)
    in_shape = geom.input_for_output(out_shape)
    for v in vols:
        if any(i > n for i, n in zip(in_shape, v.labels.shape)):
            raise SparsesegError(f"{v.name}: volume {v.labels.shape} too small for one valid patch without "
                                 f"padding (input {in_shape}); use --padding same or a smaller --patch")

    # Normalization and class weights come from the data, then live in the model/checkpoint.
    mean, std = channel_stats(vols)
    counts = class_counts(vols, k, cfg.ignore_label)
    weights = np.asarray(cfg.class_weights, np.float32) if cfg.class_weights else balanced_class_weights(counts)
    if len(weights) != k:
        raise SparsesegError(f"--class-weights needs {k} values, got {len(weights)}")
    log.info("patch in %s out %s, class voxels %s, weights %s", in_shape, out_shape, counts.tolist(),
             np.round(weights, 3).tolist())

    val_tiles = _validation_tiles(vols, context, out_shape, cfg.val_fraction, cfg.ignore_label, rng)
    exclude = None
    if val_tiles:
        exclude = [np.zeros(v.labels.shape, bool) for v in vols]
        for vi, start in val_tiles:
            exclude[vi][tuple(slice(s, s + o) for s, o in zip(start, out_shape))] = True
    sampler = PatchSampler([v.labels for v in vols], context, out_shape, cfg.ignore_label, rng, exclude)
    spacing = cfg.voxel_size or next((v.voxel_size for v in vols if v.voxel_size), None)
    augmenter = Augmenter(cfg.augment, spacing, model_cfg.ndim == 2, mean, std, cfg.seed, device)

    model = SegmentationModel(model_cfg, mean, std).to(device)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        raise SparsesegError(f"unknown optimizer {cfg.optimizer!r} (adam or sgd)")
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    weights_t = torch.as_tensor(weights, device=device)

    start_it, history = 0, []
    if resume:
        ck = load_checkpoint(resume, device=device)
        if ck.model_config != model_cfg:
            raise SparsesegError(f"--resume {resume}: its network configuration differs from this run's")
        model.load_state_dict(ck.model.state_dict())
        if "optimizer" in ck.extra:
            opt.load_state_dict(ck.extra["optimizer"])
        start_it, history = ck.iteration, list(ck.extra.get("history", []))
        if "torch_rng" in ck.extra:
            torch.set_rng_state(ck.extra["torch_rng"])
            augmenter.gen.set_state(ck.extra["aug_rng"])
            rng.bit_generator.state = ck.extra["sampler_rng"]
            augmenter.rng.bit_generator.state = ck.extra["augment_rng"]
        log.info("resuming at iteration %d", start_it)

    def checkpoint(it):
        if out_path is None:
            return None
        extra = {"optimizer": opt.state_dict(), "history": history, "torch_rng": torch.get_rng_state(),
                 "aug_rng": augmenter.gen.get_state(), "sampler_rng": rng.bit_generator.state,
                 "augment_rng": augmenter.rng.bit_generator.state, "patch_output": list(out_shape)}
        run_cfg = replace(cfg, patch_output=tuple(out_shape), class_weights=tuple(float(w) for w in weights))
        return str(save_checkpoint(out_path, model, run_cfg, class_names, cfg.ignore_label, it, spacing, extra))

    show = sys.stderr.isatty() if progress is None else progress
    from tqdm import tqdm

    bar = tqdm(total=cfg.iterations, initial=start_it, disable=not show, desc="train", unit="it")
    t0 = time.time()
    model.train()
    loss_value = float("nan")
    out_offset = context
    done = start_it
    for it in range(start_it, cfg.iterations):
        xs, ys = [], []
        for _ in range(cfg.batch_size):
            vi, in_start, _ = sampler.sample()
            x, y = augmenter.sample(vols[vi].image, vols[vi].labels, in_start, in_shape, out_offset, out_shape,
                                    cfg.ignore_label)
            xs.append(x)
            ys.append(y)
        x, y = torch.stack(xs), torch.stack(ys)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            logits = model(x)
        loss = segmentation_loss(logits, y, weights_t, cfg.ignore_label, cfg.dice_weight)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss_value = float(loss.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = it + 1
        if not show and (done % max(1, cfg.iterations // 10) == 0 or done == cfg.iterations):
            log.info("iteration %d/%d loss %.4f (%.1f s)", done, cfg.iterations, loss_value, time.time() - t0)
        entry = {"iteration": done, "loss": loss_value}
        if val_tiles and (done % cfg.val_every == 0 or done == cfg.iterations):
            val = _validate(model, vols, val_tiles, context, out_shape, k, cfg.ignore_label, device)
            entry["val_mean_foreground_iou"] = val["mean_foreground_iou"]
            log.info("iteration %d validation IoU %s (mean foreground %.4f)", done, val["iou"],
                     val["mean_foreground_iou"] or float("nan"))
        history.append(entry)
        if on_step is not None and on_step(entry):    # the caller (e.g. napari's cancel) stops cleanly
            log.info("stopped at iteration %d on request", done)
            break
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.iterations:
            checkpoint(done)
    bar.close()
    path = checkpoint(done)
    model.eval()
    return TrainResult(model, path, done, time.time() - t0, loss_value, history)
