"""Training options (as the CLI parses them, one dict) -> the frozen ModelConfig and TrainConfig.

The CLI only parses; this turns the options and the data into configurations, so the Python
API, `sparseseg-densify` and `sparseseg-train` build them the same way.
"""

from __future__ import annotations

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.model.config import ILASTIK_SIGMAS, plan_model
from sparseseg.model.defaults import DEFAULTS
from sparseseg.model.shapes import bank_context
from sparseseg.model.volume_filters import FILTERS_PER_SIGMA_3D
from sparseseg.trainer.config import AugmentConfig, TrainConfig
from sparseseg.trainer.data import check_pair, infer_num_classes, on_orthogonal_planes, on_separate_sections
from sparseseg.trainer.responses import RESPONSE_BYTES, check_fits, response_bytes


def parse_filters(value, plane_size: int | None = None) -> tuple:
    """--filters: "none" (or empty), "ilastik" (the forest's scales), "auto" (those of them whose
    margin is at most 1/8 of the smallest in-plane extent `plane_size`, so that a small volume
    keeps room for patches: all five from 184 voxels on) or comma-separated sigmas."""
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


def bank_kind(o: dict, vols, planes: int, plane_size: int) -> tuple[tuple, int]:
    """(scales, filter_dims) from --filters and --filter-dims. A 3D bank trains on responses
    computed once per volume (trainer.responses), so "auto" scales need no patch room there: all
    of ilastik's that fit in memory, from the smallest; auto dims: 3 on all planes where one fits."""
    dims = str(o.get("filter_dims") or "auto")
    if dims not in ("auto", "2", "3"):
        raise SparsesegError(f"--filter-dims must be auto, 2 or 3, got {dims}")
    if dims == "3" and planes != 3:
        raise SparsesegError("--filter-dims 3 applies to 2D networks on all three planes (--planes all)")
    auto = str(o["filters"]).strip().lower() == "auto"
    if planes == 3 and dims != "2":
        shapes, per_scale = [v.shape for v in vols], vols[0].channels * FILTERS_PER_SIGMA_3D
        scales = parse_filters("ilastik" if auto else o["filters"])
        if auto:
            scales = scales[:RESPONSE_BYTES // response_bytes(shapes, per_scale)]
        if dims == "3" and scales:
            check_fits(shapes, per_scale * len(scales))
        if scales and response_bytes(shapes, per_scale * len(scales)) <= RESPONSE_BYTES:
            return scales, 3
    return parse_filters(o["filters"], plane_size), 2


def parse_input_dropout(value) -> float | None:
    """--input-dropout: "auto" (None: the trainer's choice for the network) or a share in [0, 1)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        p = float(value)
    except ValueError:
        raise SparsesegError(f"--input-dropout must be auto or a number in [0, 1), got {value!r}") from None
    if not 0.0 <= p < 1.0:
        raise SparsesegError(f"--input-dropout must be in [0, 1), got {p}")
    return p


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


def network_kind(vols, o: dict, ignore: int) -> tuple[int, int]:
    """(ndim, planes) from --ndim/--planes: "auto" picks a 2D network on all three planes when
    the labels lie on painted slices of two or three orientations of volumes in memory (each
    step then computes one labelled section; docs/time_budget.md), else the 3D network."""
    ndim, planes = str(o.get("ndim") or "auto"), str(o.get("planes") or "auto")
    if ndim not in ("auto", "2", "3") or planes not in ("auto", "xy", "all"):
        raise SparsesegError(f"--ndim must be auto, 2 or 3 and --planes auto, xy or all (got {ndim}, {planes})")
    if ndim == "3" and planes == "all":
        raise SparsesegError("--planes all applies to 2D networks: give --ndim 2 (or auto)")
    lazy = any(not isinstance(v.image, np.ndarray) for v in vols)
    orthogonal = "auto" in (ndim, planes) and not lazy and on_orthogonal_planes(vols, ignore)
    if ndim == "auto":
        ndim = "2" if orthogonal or planes == "all" else "3"
    if planes == "auto":
        planes = "all" if ndim == "2" and orthogonal else "xy"
    return int(ndim), 3 if planes == "all" else 1


def build_configs(vols, o: dict):
    """ModelConfig and TrainConfig from the parsed options and the data (`patch` and `voxel_size`:
    Z,Y,X tuples or None, as the CLI parses them)."""
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
    voxel = tuple(o["voxel_size"]) if o["voxel_size"] else next((v.voxel_size for v in vols if v.voxel_size), None)
    smallest = tuple(min(v.shape[a] for v in vols) for a in range(3))
    arch = o.get("arch") or "unet"
    # "auto" means: where it applies (the U-Net); asking for a bank elsewhere is an error.
    ndim, planes = network_kind(vols, o, ignore)
    filters, filter_dims = ((), 2) if arch != "unet" and str(o["filters"]).lower() == "auto" else \
        bank_kind(o, vols, planes, min(smallest[1:]))
    if planes == 3:                      # every axis is in-plane for two of the planes
        smallest = (min(smallest),) * 3
    mcfg = plan_model(o["preset"], vols[0].channels, k, ndim=ndim, planes=planes, padding=o["padding"],
                      batchnorm=o["batchnorm"], base_width=o["base_width"], depth=o["depth"],
                      voxel_size=voxel, shape=smallest, arch=arch,
                      factorized=bool(o.get("factorized")), feature_augment=bool(o.get("feature_augment")),
                      feature_augment_t=int(o.get("feature_augment_t") or 4), filters=filters,
                      filter_dims=filter_dims, sections=on_separate_sections(vols, ignore))
    weights = parse_class_weights(o["class_weights"], k)
    budget = DEFAULTS["time_budget"] if o["time_budget"] is None else o["time_budget"]
    aug = AugmentConfig.mode("none" if o["no_augment"] else (o["augment"] or "full"))
    tcfg = TrainConfig(
        preset=o["preset"], iterations=int(o["iterations"] or 0), time_budget=float(budget),
        batch_size=o["batch_size"], optimizer=o["optimizer"], lr=o["lr"], weight_decay=float(o["weight_decay"]),
        patch_output=tuple(o["patch"] or ()),
        class_weights=weights,
        dice_weight=o["dice_weight"], ignore_label=ignore, seed=o["seed"], device=o["device"],
        amp=not o["no_amp"], val_fraction=o["val_fraction"], val_every=o["val_every"],
        checkpoint_every=o["checkpoint_every"], voxel_size=tuple(voxel) if voxel else (), augment=aug,
        schedule=o["schedule"], warmup=o["warmup"], loss=o["loss"],
        normalization=o["normalization"] or DEFAULTS["normalization"],
        val_slices=o["val_slices"], early_stop=o["early_stop"], max_weight_ratio=o["max_weight_ratio"],
        bn_recalibrate=o["bn_recalibrate"], class_sampling=o["class_sampling"],
        input_dropout=parse_input_dropout(o["input_dropout"]),
        pretrain=o["pretrain"])
    return mcfg, tcfg, names
