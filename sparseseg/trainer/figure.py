"""The paper's qualitative figure: orthogonal slices with true positives, false negatives and
false positives of the foreground classes coloured, on annotated voxels only."""

from __future__ import annotations

import numpy as np

COLOURS = {"true positive": (0.1, 0.8, 0.2), "false negative": (0.2, 0.4, 1.0), "false positive": (1.0, 0.15, 0.1)}


def _overlay(gray, pred, lab, ignore_label):
    g = gray.astype(np.float64)
    lo, hi = np.percentile(g, (1, 99)) if g.size else (0, 1)
    g = np.clip((g - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.repeat(g[..., None], 3, axis=-1) * 0.8
    annotated = lab != ignore_label
    fg_true, fg_pred = annotated & (lab != 0), annotated & (pred != 0)
    cases = {"true positive": fg_true & (pred == lab), "false negative": fg_true & (pred != lab),
             "false positive": fg_pred & (pred != lab) & ~fg_true}
    for name, mask in cases.items():
        rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(COLOURS[name])
    return rgb


def _best_slice(annotated: np.ndarray, axis: int) -> int:
    """The slice with the most scored voxels (nearest the centre on ties): the centre slice may
    be one that was annotated for training and hence excluded from scoring."""
    other = tuple(a for a in range(3) if a != axis)
    counts = annotated.sum(axis=other)
    n = annotated.shape[axis]
    order = sorted(range(n), key=lambda i: (-counts[i], abs(i - n // 2)))
    return order[0]


def draw_figure(path, pred, labels, ignore_label=255, image=None, title=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    gray = image[0] if image is not None else np.zeros(pred.shape, np.float32)
    z, y, x = (_best_slice(labels != ignore_label, axis) for axis in range(3))
    views = [("xy (z=%d)" % z, np.s_[z, :, :]), ("xz (y=%d)" % y, np.s_[:, y, :]), ("yz (x=%d)" % x, np.s_[:, :, x])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, sl) in zip(axes, views):
        ax.imshow(_overlay(gray[sl], pred[sl], labels[sl], ignore_label), interpolation="nearest", aspect="auto")
        ax.set_title(name)
        ax.axis("off")
    fig.legend(handles=[Patch(color=c, label=n) for n, c in COLOURS.items()], loc="lower center", ncol=3)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
