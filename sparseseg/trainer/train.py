"""The training loop, readable top to bottom.

`train()` prepares a `Run` (data views, held-out slices, sampler, model, optimizer), runs the
optional self-supervised phase (`trainer.pretrain`, fresh runs only), then repeats: one step,
validation when due, the run log, the caller's callback, checkpoints. Each concern is one small
function below; new features attach there, not inside the loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from sparseseg.engine.backends.select import resolve_device
from sparseseg.errors import SparsesegError
from sparseseg.eval.metrics import confusion, iou_from_confusion
from sparseseg.model import normalization as norm
from sparseseg.model.checkpoint import load_checkpoint, save_checkpoint
from sparseseg.model.config import ModelConfig
from sparseseg.model.network import SegmentationModel
from sparseseg.model.shapes import forward_work
from sparseseg.progress import progress_bar
from sparseseg.trainer import holdout
from sparseseg.trainer.augment import Augmenter
from sparseseg.trainer.budget import Budget
from sparseseg.trainer.config import TrainConfig, patch_output_size
from sparseseg.trainer.data import ImageView, LabelView, on_separate_sections, plane_views, read_reflected
from sparseseg.trainer.losses import balanced_class_weights, jaccard_classes, segmentation_loss
from sparseseg.trainer.pretrain import pretrain
from sparseseg.trainer.responses import RESPONSE_DROPOUT, volume_responses
from sparseseg.trainer.runlog import RunLog, draw_curve, sibling
from sparseseg.trainer.sampler import PatchSampler, index_labels
from sparseseg.trainer.schedule import lr_at, set_lr

log = logging.getLogger("sparseseg.train")

MAX_VALIDATION_TILES = 64    # a fixed subset bounds the cost of each validation
# The engine's fixed cost before its first block (export to the CPU backend and compilation):
# ~12 s per 75^3 crop end to end on the 2-core VM, most of it this start (docs/time_budget.md).
ENGINE_START_SECONDS = 10.0


@dataclass
class TrainResult:
    model: SegmentationModel
    checkpoint: str | None
    iterations: int
    seconds: float
    final_loss: float
    history: list
    best_checkpoint: str | None = None
    best_iou: float | None = None
    pretrain: dict | None = None      # the self-supervised phase (trainer.pretrain), when there was one
    plan: dict | None = None          # what the time budget bought (trainer.budget.Plan), when there was one


@dataclass
class Run:
    """Everything one training run holds; built once by `_prepare`."""
    cfg: TrainConfig
    model_cfg: ModelConfig
    class_names: list
    device: torch.device
    in_shape: tuple
    out_shape: tuple
    images: list                  # ImageView per volume (normalized per volume when the mode asks)
    train_labels: list            # LabelView per volume, held-out slices masked
    val_labels: list              # LabelView per volume, only the held-out slices
    held_out: list                # per volume {axis: [indices]}
    val_tiles: list               # (volume, output start) tiles over the held-out slices
    sampler: PatchSampler
    augmenter: Augmenter
    model: SegmentationModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype
    weights: torch.Tensor
    jaccard_classes: tuple
    rng: np.random.Generator
    spacing: tuple | None
    history: list = field(default_factory=list)
    pretrained: dict | None = None    # the self-supervised phase's summary, kept in checkpoints
    budget: Budget | None = None      # the time budget's planner; None with a pinned --iterations
    on_responses: bool = False        # images are the 3D bank's responses (trainer.responses)
    input_dropout: float = 0.0        # cfg.input_dropout, "auto" resolved for this network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network on training patches: after the bank when they are its responses."""
        return self.model.apply_net(x) if self.on_responses else self.model.sections(x)


def train(vols, model_cfg: ModelConfig, cfg: TrainConfig, class_names, out_path=None, resume: str | None = None,
          progress: bool | None = None, on_step=None, predict_shapes=(), preview=None) -> TrainResult:
    """Train `model_cfg` on TrainingVolumes with sparse labels; checkpoints go to `out_path`
    (the best by validation IoU beside it as `<stem>.best.pt`, with `<stem>.metrics.jsonl` and
    `<stem>.curve.png`). `on_step(entry)` is called after every iteration with its history
    entry (iteration, loss, lr, seconds, planned, and val_* when validated); returning True stops
    training cleanly, with the checkpoint written as at the end. Without a pinned
    `cfg.iterations` the count is planned from `cfg.time_budget` (trainer.budget), keeping time
    for predicting volumes of `predict_shapes` afterwards (densify). `preview` = (seconds, fn):
    `fn(model)` is called with the network in eval mode at most every `seconds` (the napari
    widget's live prediction); its time counts against the budget."""
    began = time.monotonic()
    torch.manual_seed(cfg.seed)
    run = _prepare(vols, model_cfg, cfg, class_names)
    start = _resume(run, resume) if resume else 0
    begun = time.time()
    if not cfg.iterations:       # a resumed run gets the budget afresh, from where it resumes
        run.budget = Budget(cfg.time_budget, _prediction_reserve(run, predict_shapes), start, began=began)
    if cfg.pretrain and start == 0:            # a resumed run has had its phase
        run.pretrained = pretrain(run, cfg.pretrain)
    runlog = RunLog(out_path, run.history)
    total = cfg.iterations or run.budget.total
    # The bar's total is unknown (None) until a time budget's first plan.
    bar = progress_bar(cfg.iterations or None, progress, initial=start, desc="train", unit="it")
    # The clock includes the self-supervised phase: it is part of what training costs.
    t0, offset = time.time(), (run.history[-1].get("seconds", 0.0) if run.history else
                               (run.pretrained or {}).get("seconds", 0.0))
    done, last_preview = start, time.monotonic()
    while done < total:
        entry = _step(run, done, total)
        done += 1
        entry["seconds"] = round(offset + time.time() - t0, 3)
        if run.budget is not None:
            run.budget.after_step(done)
            total = run.budget.total
            if run.budget.planned_once:
                entry["planned"] = total
        if _validation_due(run, done, total):
            entry.update(_validate(run))
            _keep_best(run, entry, out_path)
        run.history.append(entry)
        runlog.write(entry)
        _report(bar, entry, total, time.time() - t0, run.budget is not None and run.budget.planned_once)
        last_preview = _preview(run, preview, last_preview)
        if _stop_requested(on_step, entry) or _early_stop(run):
            break
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total:
            _save(run, out_path, done)
    bar.close()
    plan = run.budget.finish(done).to_dict() if run.budget is not None else None
    if cfg.bn_recalibrate and done > start:
        recalibrate_batchnorm(run, cfg.bn_recalibrate)
    path = _save(run, out_path, done)
    draw_curve(out_path, run.history)
    run.model.eval()
    best = _best_so_far(run.history)
    best_path = sibling(out_path, ".best.pt") if out_path is not None and best is not None else None
    final = run.history[-1]["loss"] if run.history else float("nan")
    return TrainResult(run.model, path, done, time.time() - begun, final, run.history,
                       str(best_path) if best_path else None, best, run.pretrained, plan)


# ------------------------------------------------------------------ preparation

def _patch_shapes(vols, model_cfg: ModelConfig, cfg: TrainConfig):
    """The largest valid output whose input fits every volume and the preset budget."""
    geom = model_cfg.geometry
    if cfg.patch_output:
        out_shape = tuple(int(v) for v in cfg.patch_output)
        if geom.input_for_output(out_shape) is None:
            raise SparsesegError(f"--patch {out_shape} is not a valid output size for this network")
    else:
        smallest = tuple(min(v.shape[a] for v in vols) for a in range(3))
        out_shape = patch_output_size(model_cfg, cfg.preset, smallest,
                                      sections=on_separate_sections(vols, cfg.ignore_label))
    in_shape = geom.input_for_output(out_shape)
    for v in vols:
        if any(o > n for o, n in zip(out_shape, v.shape)):
            raise SparsesegError(f"{v.name}: volume {v.shape} smaller than the training patch output {out_shape}; "
                                 "use a smaller --patch")
    return in_shape, out_shape


def _normalization(vols, cfg: TrainConfig):
    """(graph mean, graph std, per-volume stats or None): global statistics go into the graph;
    per-volume modes normalize each volume's crops and leave the graph an identity."""
    if cfg.normalization == "global":
        x = np.concatenate([norm.sample(v.image) for v in vols], axis=1)
        stats = norm.statistics_of_sample(x, "volume")
        return stats["mean"], stats["std"], [None] * len(vols)
    spec = norm.spec(cfg.normalization, percentiles=cfg.percentiles)
    return None, None, [norm.volume_statistics(v.image, spec) for v in vols]


def _calibration_sample(images, context: int, device, sections: int = 4, size: int = 256) -> torch.Tensor:
    """(N, C, 1, y, x) raw training input for the filter bank's response statistics: up to
    `sections` evenly spaced z-sections per volume, their central size x size (at least the bank's
    own footprint), read through the same views as training patches."""
    crops = []
    for im in images:
        _, z, h, w = im.shape
        side = [min(n, max(size, 2 * context + 1)) for n in (h, w)]
        side = min(side)
        y0, x0 = (h - side) // 2, (w - side) // 2
        for zi in sorted({int(v) for v in np.linspace(0, z - 1, sections)}):
            crops.append(im[(slice(None), slice(zi, zi + 1), slice(y0, y0 + side), slice(x0, x0 + side))])
    side = min(c.shape[-1] for c in crops)
    return torch.as_tensor(np.stack([c[..., :side, :side] for c in crops]), device=device)


def _validation_tiles(held, shapes, out_shape, val_labels, ignore_label, rng):
    """Output windows covering the held-out slices (an even grid in the slice's plane, centred
    on it across), those holding held-out labels, at most MAX_VALIDATION_TILES of them."""
    tiles = set()
    for vi, h in enumerate(held):
        n = shapes[vi]
        for axis, indices in h.items():
            for i in indices:
                ranges = []
                for a in range(3):
                    if a == axis:
                        ranges.append([min(max(0, i - out_shape[a] // 2), n[a] - out_shape[a])])
                    else:
                        ranges.append(sorted({min(s, n[a] - out_shape[a]) for s in range(0, n[a], out_shape[a])}))
                tiles.update((vi, (z, y, x)) for z in ranges[0] for y in ranges[1] for x in ranges[2])
    tiles = sorted(tiles)
    tiles = [t for t in tiles if (val_labels[t[0]][_window(t[1], out_shape)] != ignore_label).any()]
    if len(tiles) > MAX_VALIDATION_TILES:
        tiles = [tiles[i] for i in sorted(rng.choice(len(tiles), MAX_VALIDATION_TILES, replace=False))]
    return tiles


def _window(start, shape):
    return tuple(slice(s, s + n) for s, n in zip(start, shape))


def _class_weights(cfg: TrainConfig, counts, k: int) -> np.ndarray:
    """Per-class loss weights: "uniform", "balanced" (or empty: inverse frequency, bounded)
    or the given numbers."""
    if isinstance(cfg.class_weights, str) and cfg.class_weights not in ("uniform", "balanced"):
        raise SparsesegError(f"--class-weights must be balanced, uniform or numbers, got {cfg.class_weights!r}")
    if cfg.class_weights == "uniform":
        return np.ones(k, np.float32)
    if cfg.class_weights in ("balanced", ()):
        return balanced_class_weights(counts, cfg.max_weight_ratio)
    return np.asarray(cfg.class_weights, np.float32)


RESERVE_CUBE = 20   # output side of the block timed for the prediction reserve (all-planes networks)


def _prediction_reserve(run: Run, shapes) -> float:
    """Seconds to keep for predicting volumes of `shapes` after training (densify): the
    engine's start (export and backend compilation, ENGINE_START_SECONDS) plus the voxels its
    first layer will read (`forward_work`; each volume as one tile with its halo, at least 1.6
    input per output voxel as large-tile blocks read, PERF.md) at the speed of a timed forward
    pass. The budget scales it further if the steps slow down (trainer.budget)."""
    if not shapes:
        return 0.0
    cfg = run.model.cfg
    geometry = cfg.geometry       # what predicts: for all three planes, not the training patch's
    # For all three planes a cube of (at most) 20-voxel output: a training output's cube, three
    # passes, would cost a short budget a large share of its time just to be timed.
    out = (min(run.out_shape[1], RESERVE_CUBE),) * 3 if cfg.planes == 3 else run.out_shape
    in_shape = geometry.input_for_output(out)
    x = torch.zeros((1, run.model_cfg.in_channels, *in_shape), device=run.device)
    run.model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(3):                 # the first call pays for kernel selection
            t = time.monotonic()
            run.model(x)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.monotonic() - t)
    run.model.train()
    passes = 3 if cfg.planes == 3 else 1
    # Behind a 3D bank the planes' passes read its responses, without its margin; counting the
    # margin kept 31 s for a 40 s prediction of a 75^3 crop (docs/history.md).
    bank = run.model.filters.context if run.on_responses and not run.model.filters.same else 0
    work = 0.0
    for shape in shapes:
        whole = tuple(rule.output_at_least(int(n)) for rule, n in zip(geometry.axes, shape))
        work += max(forward_work(geometry, cfg.planes, whole, bank), 1.6 * passes * float(np.prod(shape)))
    return ENGINE_START_SECONDS + min(times[1:]) * work / forward_work(geometry, cfg.planes, out, bank)


def _optimizer(model, cfg: TrainConfig):
    if cfg.optimizer == "adam":
        # Decoupled decay (Loshchilov & Hutter): Adam's L2 term is rescaled per weight and barely acts.
        if cfg.weight_decay:
            return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise SparsesegError(f"unknown optimizer {cfg.optimizer!r} (adam or sgd)")


def _prepare(vols, model_cfg: ModelConfig, cfg: TrainConfig, class_names) -> Run:
    device = torch.device(resolve_device(cfg.device))
    rng = np.random.default_rng(cfg.seed)
    k = model_cfg.num_classes
    net_cfg = model_cfg
    on_responses = bool(model_cfg.filters) and model_cfg.filter_dims == 3
    model = None
    if on_responses:      # the network trains on the 3D bank's responses, computed here once
        mean, std, stats = _normalization(vols, cfg)
        model = SegmentationModel(net_cfg, mean, std, cfg.normalization, cfg.percentiles).to(device)
        vols = volume_responses(model, vols, stats, device)
    if model_cfg.planes == 3:
        # A 2D network for all three planes trains on sections of each painted plane, rotated
        # into xy: the run's shapes are the one-plane network's (model_cfg is what it predicts
        # with), without the bank when the patches are its responses.
        vols = plane_views(vols, cfg.ignore_label)
        model_cfg = replace(model_cfg, planes=1, filter_dims=2, filters=() if on_responses else model_cfg.filters)
    in_shape, out_shape = _patch_shapes(vols, model_cfg, cfg)

    # Held-out slices are masked out of everything training sees: sampler, augmentation reads,
    # class weights. Only validation reads them.
    held = holdout.choose_held_out(vols, cfg.ignore_label, cfg.val_slices, cfg.val_fraction, rng)
    train_labels = [LabelView(v.labels, h, cfg.ignore_label, "train") for v, h in zip(vols, held)]
    val_labels = [LabelView(v.labels, h, cfg.ignore_label, "val") for v, h in zip(vols, held)]
    indexed = [index_labels(view, cfg.ignore_label, k) for view in train_labels]
    counts = sum(c for _, c in indexed)
    sampler = PatchSampler(train_labels, [t for t, _ in indexed], out_shape, cfg.ignore_label, rng,
                           cfg.class_sampling)
    val_tiles = _validation_tiles(held, [v.shape for v in vols], out_shape, val_labels, cfg.ignore_label, rng)
    if any(held):
        log.info("held out for validation: %s (%d tiles)", holdout.describe(held), len(val_tiles))

    weights = _class_weights(cfg, counts, k)
    if len(weights) != k:
        raise SparsesegError(f"--class-weights needs {k} values, got {len(weights)}")
    log.info("patch in %s out %s, training voxels per class %s, weights %s", in_shape, out_shape, counts.tolist(),
             np.round(weights, 3).tolist())

    spacing = cfg.voxel_size or next((v.voxel_size for v in vols if v.voxel_size), None)
    augment = cfg.augment
    if net_cfg.planes == 3:
        # No turns: in the xz and yz views they swap z, which light microscopy resolves coarser,
        # for an in-plane axis (nuclei, fully automated IoU 0.287 with flips only against 0.252
        # with right-angle turns too; docs/history.md).
        augment = replace(augment, rotate=False)
    if on_responses:
        # Responses are z-scored already; gray-value changes of them are no image's responses
        # (measured: they wrecked training, docs/history.md), flips commute with them.
        images = [ImageView(v.image) for v in vols]
        gray = [0.0] * model.filters.out_channels
        augmenter = Augmenter(replace(augment, gray=False), spacing, model_cfg.ndim == 2, gray, [1.0] * len(gray),
                              cfg.seed, device)
    else:
        mean, std, stats = _normalization(vols, cfg)
        images = [ImageView(v.image, s) for v, s in zip(vols, stats)]
        gray_mean, gray_std = (mean, std) if mean is not None else ([0.0] * model_cfg.in_channels,
                                                                    [1.0] * model_cfg.in_channels)
        augmenter = Augmenter(augment, spacing, model_cfg.ndim == 2, gray_mean, gray_std, cfg.seed, device)
        model = SegmentationModel(net_cfg, mean, std, cfg.normalization, cfg.percentiles).to(device)
        if model.filters is not None:
            model.calibrate_filters(_calibration_sample(images, model.filters.context, device))
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    if not use_amp:
        amp_dtype = torch.float32
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return Run(cfg, model_cfg, list(class_names), device, in_shape, out_shape, images, train_labels, val_labels,
               held, val_tiles, sampler, augmenter, model, _optimizer(model, cfg), scaler, amp_dtype,
               torch.as_tensor(weights, device=device), jaccard_classes(counts), rng, spacing,
               on_responses=on_responses,
               input_dropout=cfg.input_dropout if cfg.input_dropout is not None else
               RESPONSE_DROPOUT * on_responses)


# ------------------------------------------------------------------ the step

def _batch(run: Run):
    xs, ys = [], []
    context = run.model_cfg.geometry.context
    for _ in range(run.cfg.batch_size):
        vi, out_start = run.sampler.sample()
        in_start = tuple(s - c for s, c in zip(out_start, context))
        x, y = run.augmenter.sample(run.images[vi], run.train_labels[vi], in_start, run.in_shape, context,
                                    run.out_shape, run.cfg.ignore_label)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def _step(run: Run, it: int, total: int) -> dict:
    cfg = run.cfg
    lr = lr_at(it, total, cfg.lr, cfg.schedule, cfg.warmup)
    set_lr(run.optimizer, lr)
    x, y = _batch(run)
    if run.input_dropout:          # whole channels of each patch (dropout3d): z-scored inputs drop to their mean
        x = torch.nn.functional.dropout3d(x, run.input_dropout)
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype != torch.float32):
        logits = run.forward(x)
    loss = segmentation_loss(logits, y, run.weights, cfg.ignore_label, cfg.dice_weight, cfg.loss,
                             run.jaccard_classes)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return {"iteration": it + 1, "loss": float(loss.detach()), "lr": lr}


def recalibrate_batchnorm(run: Run, patches: int) -> None:
    """Re-estimate every BatchNorm's running mean and variance as the plain average over
    `patches` un-augmented training windows, with the final weights.

    Why: with batch 1 the running statistics are an exponential average over augmented patches
    (gray-value changes, rotations) seen while the weights were still moving; inference then
    normalizes with statistics no real input has. Çiçek et al. used batch statistics at test
    time instead, which makes the result depend on the tile; averaging over fixed weights keeps
    inference deterministic and tile-independent."""
    bns = [m for m in run.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                  # cumulative moving average: equal weight per patch
    context = run.model_cfg.geometry.context
    state = run.rng.bit_generator.state    # do not disturb the sampler (resume stays exact)
    run.model.train()
    with torch.no_grad():
        for _ in range(patches):
            vi, out_start = run.sampler.sample()
            x = read_reflected(run.images[vi], [s - c for s, c in zip(out_start, context)], run.in_shape)
            run.forward(torch.from_numpy(np.ascontiguousarray(x))[None].to(run.device))
    run.rng.bit_generator.state = state
    for m, mom in zip(bns, saved):
        m.momentum = mom


# ------------------------------------------------------------------ validation, best, early stop

def _validation_due(run: Run, done: int, total: int) -> bool:
    return bool(run.val_tiles) and (done % run.cfg.val_every == 0 or done == total)


def _validate(run: Run) -> dict:
    """IoU per class on the held-out slices (annotated voxels only)."""
    k = run.model_cfg.num_classes
    context = run.model_cfg.geometry.context
    cm = np.zeros((k, k), np.int64)
    run.model.eval()
    with torch.inference_mode():
        for vi, start in run.val_tiles:
            x = read_reflected(run.images[vi], [s - c for s, c in zip(start, context)], run.in_shape)
            pred = run.forward(torch.from_numpy(np.ascontiguousarray(x))[None].to(run.device))[0].argmax(0)
            lab = run.val_labels[vi][_window(start, run.out_shape)]
            cm += confusion(pred.cpu().numpy(), lab, k, run.cfg.ignore_label)[:k, :k]
    run.model.train()
    res = iou_from_confusion(cm)
    log.info("validation IoU %s (mean foreground %.4f)", [None if v is None else round(v, 4) for v in res["iou"]],
             res["mean_foreground_iou"] or float("nan"))
    return {"val_iou": res["iou"], "val_mean_foreground_iou": res["mean_foreground_iou"]}


def _best_so_far(history, before: int | None = None):
    vals = [e["val_mean_foreground_iou"] for e in history[:before]
            if e.get("val_mean_foreground_iou") is not None]
    return max(vals) if vals else None


def _keep_best(run: Run, entry: dict, out_path) -> None:
    """Write `<stem>.best.pt` when this validation beats every earlier one."""
    iou, best = entry.get("val_mean_foreground_iou"), _best_so_far(run.history)
    if out_path is None or iou is None or (best is not None and iou <= best):
        return
    _save(run, sibling(out_path, ".best.pt"), entry["iteration"], history=run.history + [entry])
    entry["best"] = True


def _preview(run: Run, preview, last: float) -> float:
    """Call the caller's preview function with the current network when its interval has
    passed; the time it was last called."""
    if preview is None or time.monotonic() - last < preview[0]:
        return last
    run.model.eval()
    try:
        with torch.inference_mode():
            preview[1](run.model)
    finally:
        run.model.train()
    return time.monotonic()


def _stop_requested(on_step, entry: dict) -> bool:
    if on_step is not None and on_step(entry) is True:
        log.info("stopping at iteration %d: asked by the caller", entry["iteration"])
        return True
    return False


def _early_stop(run: Run) -> bool:
    """True after `early_stop` validations in a row without a better IoU."""
    if not run.cfg.early_stop:
        return False
    vals = [e["val_mean_foreground_iou"] for e in run.history if e.get("val_mean_foreground_iou") is not None]
    if len(vals) <= run.cfg.early_stop:
        return False
    if max(vals[-run.cfg.early_stop:]) > max(vals[:-run.cfg.early_stop]):
        return False
    log.info("early stopping: %d validations without a better IoU", run.cfg.early_stop)
    return True


# ------------------------------------------------------------------ checkpoints and resume

def _save(run: Run, path, iteration: int, history=None):
    if path is None:
        return None
    extra = {"optimizer": run.optimizer.state_dict(), "history": run.history if history is None else history,
             "torch_rng": torch.get_rng_state(), "aug_rng": run.augmenter.gen.get_state(),
             "sampler_rng": run.rng.bit_generator.state, "augment_rng": run.augmenter.rng.bit_generator.state,
             "patch_output": list(run.out_shape),
             "held_out": [{str(a): ix for a, ix in h.items()} for h in run.held_out]}
    if run.pretrained:
        extra["pretrain"] = run.pretrained
    if run.budget is not None:      # the budget, its plan and what ran so far
        extra["budget"] = {**run.budget.plan.to_dict(), "ran": iteration - run.budget.start}
    if run.scaler.is_enabled():     # AMP: the loss scale is part of an exact resume
        extra["grad_scaler"] = run.scaler.state_dict()
    run_cfg = replace(run.cfg, patch_output=tuple(run.out_shape),
                      class_weights=tuple(float(w) for w in run.weights.tolist()))
    return str(save_checkpoint(path, run.model, run_cfg, run.class_names, run.cfg.ignore_label, iteration,
                               run.spacing, extra))


def _resume(run: Run, path) -> int:
    """Restore weights, optimizer, loss scale, RNG states and history; the next iteration."""
    ck = load_checkpoint(path, device=run.device)
    if ck.model_config != run.model.cfg:
        raise SparsesegError(f"--resume {path}: its network configuration differs from this run's")
    if ck.normalization["mode"] != run.model.normalization_mode:
        raise SparsesegError(f"--resume {path}: it was trained with --normalization {ck.normalization['mode']}")
    run.model.load_state_dict(ck.model.state_dict())
    extra = ck.extra
    if "optimizer" in extra:
        run.optimizer.load_state_dict(extra["optimizer"])
    if "grad_scaler" in extra and run.scaler.is_enabled():
        run.scaler.load_state_dict(extra["grad_scaler"])
    if "torch_rng" in extra:
        torch.set_rng_state(extra["torch_rng"])
        run.augmenter.gen.set_state(extra["aug_rng"])
        run.rng.bit_generator.state = extra["sampler_rng"]
        run.augmenter.rng.bit_generator.state = extra["augment_rng"]
    run.history = list(extra.get("history", []))
    run.pretrained = extra.get("pretrain")
    log.info("resuming at iteration %d", ck.iteration)
    return ck.iteration


# ------------------------------------------------------------------ progress

def _report(bar, entry: dict, total: int, seconds: float, planned: bool = True) -> None:
    if bar.total != total and planned:
        bar.total = total
        bar.refresh()
    bar.update(1)
    bar.set_postfix(loss=f"{entry['loss']:.4f}")
    done = entry["iteration"]
    if bar.disable and planned and (done % max(1, total // 10) == 0 or done == total):
        log.info("iteration %d/%d loss %.4f lr %.2g (%.1f s)", done, total, entry["loss"], entry["lr"], seconds)
