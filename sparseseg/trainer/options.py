"""Training options (as the CLI parses them, one dict) -> the frozen ModelConfig and TrainConfig.

The CLI only parses; this turns the options and the data into configurations, so the Python
API, `sparseseg-densify` and `sparseseg-train` build them the same way.
"""

from __future__ import annotations

from sparseseg.errors import SparsesegError
from sparseseg.model.config import plan_model
from sparseseg.trainer.config import AugmentConfig, TrainConfig
from sparseseg.trainer.data import check_pair, infer_num_classes, on_separate_sections

ARCH_KEYS = ["arch", "factorized", "feature_augment", "feature_augment_t"]   # see sparseseg.model.cheng
OPTION_KEYS = ARCH_KEYS + ["preset", "iterations", "batch_size", "lr", "optimizer", "patch", "padding", "ndim", "base_width", "depth", "batchnorm", "num_classes", "class_names", "class_weights", "dice_weight", "ignore_label", "voxel_size", "augment", "no_augment", "val_fraction", "val_every", "checkpoint_every", "seed", "device", "no_amp", "schedule", "warmup", "loss", "normalization", "val_slices", "early_stop", "max_weight_ratio", "bn_recalibrate", "filters",
               "class_sampling", "pretrain"]

# Every option's default, in one place: the CLI, the napari widget, the benchmarks and options
# dicts from older callers (a missing key means its default) all read it.
# Why each default is what it is (measurements, result files): docs/history.md and docs/design/training.md.
DEFAULTS = {
    "arch": "unet", "factorized": False, "feature_augment": False, "feature_augment_t": 4,
    "preset": "small", "iterations": 3000, "batch_size": 1, "lr": 1e-3, "optimizer": "adam",
    "patch": None, "padding": "valid", "ndim": "3", "base_width": None, "depth": None, "batchnorm": None,
    "num_classes": None, "class_names": None, "class_weights": "uniform", "dice_weight": 0.0,
    "ignore_label": 255, "voxel_size": None, "augment": "lossless", "no_augment": False,
    "val_fraction": 0.0, "val_every": 100, "checkpoint_every": 500, "seed": 0, "device": "auto",
    "no_amp": False, "schedule": "poly", "warmup": 0, "loss": "ce+jaccard", "normalization": "global",
    "val_slices": 0, "early_stop": 0, "max_weight_ratio": 10.0, "bn_recalibrate": 0,
    "filters": "auto", "class_sampling": 0.33, "pretrain": 0,
}
assert set(DEFAULTS) == set(OPTION_KEYS)


def parse_triple(value, name, cast=int):
    """"Z,Y,X" -> a tuple of three positive numbers (None stays None)."""
    if value is None:
        return None
    try:
        parts = tuple(cast(v) for v in str(value).split(","))
    except ValueError:
        raise SparsesegError(f"{name} must be three comma-separated numbers Z,Y,X, got {value!r}") from None
    if len(parts) != 3 or any(p <= 0 for p in parts):
        raise SparsesegError(f"{name} must be three positive numbers Z,Y,X, got {value!r}")
    return parts


def parse_filters(value, plane_size: int | None = None) -> tuple:
    """--filters: "none" (or empty), "ilastik" (the forest's scales), "auto" (those of them whose
    margin is at most 1/8 of the smallest in-plane extent `plane_size`, so that a small volume
    keeps room for patches: all five from 184 voxels on) or comma-separated sigmas."""
    from sparseseg.model.config import ILASTIK_SIGMAS
    from sparseseg.model.shapes import bank_context

    text = str(value or "none").strip().lower()
    if text in ("none", "", "0"):
        return ()
    if text == "ilastik":
        return ILASTIK_SIGMAS
    if text == "auto":
        fit = [s for s in ILASTIK_SIGMAS if plane_size is None or 8 * bank_context((s,)) <= plane_size]
        return tuple(fit)
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SparsesegError(f"--filters must be auto, ilastik, none or comma-separated scales, got {value!r}") \
            from None


def parse_class_weights(value, num_classes: int) -> tuple:
    """--class-weights: "balanced" (inverse frequency, bounded by --max-weight-ratio; returned
    as () so the trainer computes it from the training voxels), "uniform" (1 per class), or
    comma-separated numbers."""
    text = str(value or "balanced").strip().lower()
    if text == "balanced":
        return ()
    if text == "uniform":
        return (1.0,) * num_classes
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise SparsesegError(f"--class-weights must be balanced, uniform or numbers, got {value!r}") from None


def build_configs(vols, o: dict):
    """ModelConfig and TrainConfig from the parsed options and the data."""
    o = {**DEFAULTS, **o}
    ignore = o["ignore_label"]
    for v in vols:
        check_pair(v, None, ignore)
    k = o["num_classes"] or infer_num_classes(vols, ignore)
    for v in vols:
        check_pair(v, k, ignore)
    names = o["class_names"].split(",") if o["class_names"] else [f"class {i}" for i in range(k)]
    if len(names) != k:
        raise SparsesegError(f"--class-names has {len(names)} names for {k} classes")
    voxel = parse_triple(o["voxel_size"], "--voxel-size", float) or next(
        (v.voxel_size for v in vols if v.voxel_size), None)
    smallest = tuple(min(v.shape[a] for v in vols) for a in range(3))
    arch = o.get("arch") or "unet"
    # "auto" means: where it applies (the U-Net); asking for a bank elsewhere is an error.
    filters = () if arch != "unet" and str(o["filters"]).lower() == "auto" else \
        parse_filters(o["filters"], min(smallest[1:]))
    mcfg = plan_model(o["preset"], vols[0].channels, k, ndim=int(o["ndim"]), padding=o["padding"],
                      batchnorm=o["batchnorm"], base_width=o["base_width"], depth=o["depth"],
                      voxel_size=voxel, shape=smallest, arch=arch,
                      factorized=bool(o.get("factorized")), feature_augment=bool(o.get("feature_augment")),
                      feature_augment_t=int(o.get("feature_augment_t") or 4), filters=filters,
                      sections=on_separate_sections(vols, ignore))
    weights = parse_class_weights(o["class_weights"], k)
    aug = AugmentConfig.mode("none" if o["no_augment"] else (o["augment"] or "full"))
    tcfg = TrainConfig(
        preset=o["preset"], iterations=o["iterations"], batch_size=o["batch_size"], optimizer=o["optimizer"],
        lr=o["lr"], patch_output=parse_triple(o["patch"], "--patch") or (), class_weights=weights,
        dice_weight=o["dice_weight"], ignore_label=ignore, seed=o["seed"], device=o["device"],
        amp=not o["no_amp"], val_fraction=o["val_fraction"], val_every=o["val_every"],
        checkpoint_every=o["checkpoint_every"], voxel_size=tuple(voxel) if voxel else (), augment=aug,
        schedule=o["schedule"], warmup=o["warmup"], loss=o["loss"], normalization=o["normalization"],
        val_slices=o["val_slices"], early_stop=o["early_stop"], max_weight_ratio=o["max_weight_ratio"],
        bn_recalibrate=o["bn_recalibrate"], class_sampling=o["class_sampling"],
        pretrain=o["pretrain"])
    return mcfg, tcfg, names
