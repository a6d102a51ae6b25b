"""Figures people look at.

* `draw_figure`: the paper's qualitative figure on orthogonal slices, two rows: the predicted
  classes in per-class colours (the same colours the OME-Zarr label images and napari use), and
  true positives, false negatives and false positives of the foreground classes on annotated
  voxels only.
* `draw_annotated_slices`: the annotated slices beside the prediction.
* `draw_curve`: loss and validation IoU against iterations (PNG).
"""

from __future__ import annotations

import numpy as np

from sparseseg.labels_zarr import label_colours

COLOURS = {"true positive": (0.1, 0.8, 0.2), "false negative": (0.2, 0.4, 1.0), "false positive": (1.0, 0.15, 0.1)}


def class_colours(num_classes: int) -> np.ndarray:
    """(K, 4) RGBA in 0..1, as in sparseseg.labels_zarr (background transparent)."""
    return np.asarray(label_colours(max(num_classes, 2)), np.float64) / 255


def _gray(gray):
    g = gray.astype(np.float64)
    lo, hi = np.percentile(g, (1, 99)) if g.size else (0, 1)
    g = np.clip((g - lo) / max(hi - lo, 1e-9), 0, 1)
    return np.repeat(g[..., None], 3, axis=-1) * 0.8


def _overlay(gray, pred, lab, ignore_label):
    rgb = _gray(gray)
    annotated = lab != ignore_label
    fg_true, fg_pred = annotated & (lab != 0), annotated & (pred != 0)
    cases = {"true positive": fg_true & (pred == lab), "false negative": fg_true & (pred != lab),
             "false positive": fg_pred & (pred != lab) & ~fg_true}
    for name, mask in cases.items():
        rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(COLOURS[name])
    return rgb


def _classes(gray, values, num_classes, skip=None):
    """Label values in their class colours over the image (`skip`: values left uncoloured)."""
    rgb = _gray(gray)
    colours = class_colours(num_classes)
    v = values.astype(np.int64)
    mask = (v < len(colours)) & (v != (skip if skip is not None else -1))
    c = colours[np.where(mask, v, 0)]
    alpha = 0.55 * c[..., 3:] * mask[..., None]
    return rgb * (1 - alpha) + c[..., :3] * alpha


def _best_slice(annotated: np.ndarray, axis: int) -> int:
    """The slice with the most scored voxels (nearest the centre on ties): the centre slice may
    be one that was annotated for training and hence excluded from scoring."""
    other = tuple(a for a in range(3) if a != axis)
    counts = annotated.sum(axis=other)
    n = annotated.shape[axis]
    order = sorted(range(n), key=lambda i: (-counts[i], abs(i - n // 2)))
    return order[0]


def _views(labels, ignore_label):
    z, y, x = (_best_slice(labels != ignore_label, axis) for axis in range(3))
    return [("xy (z=%d)" % z, np.s_[z, :, :]), ("xz (y=%d)" % y, np.s_[:, y, :]), ("yz (x=%d)" % x, np.s_[:, :, x])]


def class_count(pred, labels, ignore_label, class_names) -> int:
    """Classes to draw: every value present, every name given, at least two."""
    top = max(int(pred.max(initial=0)), int(labels[labels != ignore_label].max(initial=0)))
    return max(len(class_names or []), top + 1, 2)


def _class_legend(num_classes, class_names):
    from matplotlib.patches import Patch

    colours = class_colours(num_classes)
    names = list(class_names or []) + [f"class {i}" for i in range(len(class_names or []), num_classes)]
    return [Patch(color=colours[i][:3], label=names[i]) for i in range(1, num_classes)]


def draw_figure(path, pred, labels, ignore_label=255, image=None, title=None, class_names=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    gray = image[0] if image is not None else np.zeros(pred.shape, np.float32)
    k = class_count(pred, labels, ignore_label, class_names)
    views = _views(labels, ignore_label)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.6))
    for col, (name, sl) in enumerate(views):
        axes[0, col].imshow(_classes(gray[sl], pred[sl], k, skip=0), interpolation="nearest", aspect="auto")
        axes[0, col].set_title(f"prediction, {name}")
        axes[1, col].imshow(_overlay(gray[sl], pred[sl], labels[sl], ignore_label), interpolation="nearest",
                            aspect="auto")
        axes[1, col].set_title(f"vs annotation, {name}")
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 2].legend(handles=_class_legend(k, class_names), loc="upper left", bbox_to_anchor=(1.0, 1.0),
                      fontsize=8, frameon=False)
    axes[1, 2].legend(handles=[Patch(color=c, label=n) for n, c in COLOURS.items()], loc="upper left",
                      bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def draw_annotated_slices(path, pred, labels, ignore_label=255, image=None, class_names=None, per_axis=2):
    """The most annotated slices of each axis: the annotation beside the prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gray = image[0] if image is not None else np.zeros(pred.shape, np.float32)
    k = class_count(pred, labels, ignore_label, class_names)
    annotated = labels != ignore_label
    rows = []
    for axis, name in enumerate(("z", "y", "x")):
        other = tuple(a for a in range(3) if a != axis)
        counts = annotated.sum(axis=other)
        for i in [int(i) for i in np.argsort(-counts, kind="stable")[:per_axis] if counts[i] > 0]:
            sl = tuple(i if a == axis else slice(None) for a in range(3))
            rows.append((f"{name}={i} ({int(counts[i])} annotated voxels)", sl))
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 3.2 * len(rows)), squeeze=False)
    for r, (name, sl) in enumerate(rows):
        lab = np.where(annotated[sl], labels[sl], 255)
        axes[r, 0].imshow(_classes(gray[sl], lab, k), interpolation="nearest", aspect="auto")
        axes[r, 0].set_title(f"annotation, {name}", fontsize=9)
        axes[r, 1].imshow(_classes(gray[sl], pred[sl], k, skip=0), interpolation="nearest", aspect="auto")
        axes[r, 1].set_title("prediction", fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.legend(handles=_class_legend(k, class_names), loc="lower center", ncol=min(k, 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def draw_curve(path, history):
    """Training loss (and validation IoU where recorded) against iterations, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot([h["iteration"] for h in history], [h["loss"] for h in history], lw=1, color="tab:blue")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss", color="tab:blue")
    val = [h for h in history if h.get("val_mean_foreground_iou") is not None]
    if val:
        av = ax.twinx()
        av.plot([h["iteration"] for h in val], [h["val_mean_foreground_iou"] for h in val], "o-", ms=3,
                color="tab:orange")
        av.set_ylabel("validation mean foreground IoU", color="tab:orange")
        av.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
