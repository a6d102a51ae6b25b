"""THE training defaults: one dict that the CLI (its options are generated from it), the Python
API (`TrainConfig`'s field defaults), the napari widget and the benchmarks all read.

Why each default is what it is, with the measurements and result files, is in
docs/history.md ("Training defaults"). `PAPER` keeps Çiçek et al.'s own choices by name.
"""

from __future__ import annotations

# Minutes a default training may take, prediction included for densify: the trainer measures
# its step time and plans the iteration count (sparseseg.trainer.budget). `iterations` pins an
# exact count instead (None: planned from the budget).
TIME_BUDGET_MINUTES = 10.0

DEFAULTS = {
    "arch": "unet", "factorized": False, "feature_augment": False, "feature_augment_t": 4,
    "preset": "small", "iterations": None, "time_budget": TIME_BUDGET_MINUTES, "batch_size": 1, "lr": 1e-3,
    "optimizer": "adam", "weight_decay": 0.0, "patch": None, "padding": "valid", "ndim": "auto", "planes": "auto",
    "base_width": None, "depth": None,
    "batchnorm": None, "num_classes": None, "class_names": None, "class_weights": "uniform", "dice_weight": 0.0,
    "ignore_label": 255, "voxel_size": None, "augment": "lossless", "no_augment": False,
    "val_fraction": 0.0, "val_every": 100, "checkpoint_every": 500, "seed": 0, "device": "auto",
    "no_amp": False, "schedule": "poly", "warmup": 0, "loss": "ce+jaccard", "normalization": "volume",
    "val_slices": 0, "early_stop": 0, "max_weight_ratio": 10.0, "bn_recalibrate": 0,
    "filters": "auto", "filter_dims": "auto", "class_sampling": 0.33, "pretrain": 0,
    "input_dropout": "auto",
}

# input_dropout "auto": 0.2 for a network trained on a 3D bank's responses, else 0 (an image's one
# channel has nothing to spare).

# normalization "volume" (nnU-Net's per-image z-score): a volume imaged brighter than the training
# one is read on the same scale (nuclei crop b is ~4x brighter than a: fully automated mean
# foreground IoU 0.168 against 0.106 with "global", semi-automated equal; results/nuclei_levers.jsonl).

# Çiçek et al. 2016's choices where ours differ: a constant rate, balanced class weights, the
# elastic deformation with rotations and scaling, plain weighted cross-entropy, no forced classes.
PAPER = {"schedule": "constant", "class_weights": "balanced", "augment": "full", "loss": "ce",
         "class_sampling": 0.0, "filters": "none", "normalization": "global"}
