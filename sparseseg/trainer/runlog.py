"""Per-run metrics beside the checkpoint: `<stem>.metrics.jsonl` (one JSON object per
iteration: iteration, loss, lr, seconds, and val_iou / val_mean_foreground_iou when validated)
and `<stem>.curve.png` (loss and validation IoU against iteration)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("sparseseg.train")


def sibling(out_path, suffix: str) -> Path:
    """model.pt -> model<suffix> (e.g. model.best.pt, model.metrics.jsonl)."""
    p = Path(out_path)
    return p.with_name(p.stem + suffix)


class RunLog:
    """Writes history entries as JSON lines; on resume, the file is rewritten from the
    checkpoint's history first so that it never holds iterations the model has not seen."""

    def __init__(self, out_path, history):
        self.path = sibling(out_path, ".metrics.jsonl") if out_path is not None else None
        if self.path is not None:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in history)

    def write(self, entry: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


def draw_curve(out_path, history) -> Path | None:
    """Training loss (and validation IoU, right axis) against iteration, as a PNG."""
    if out_path is None or not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = sibling(out_path, ".curve.png")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    its = [e["iteration"] for e in history]
    ax.plot(its, [e["loss"] for e in history], lw=0.6, color="0.6", label="loss")
    if len(its) >= 20:       # a running mean makes the trend readable through per-patch noise
        import numpy as np

        k = max(5, len(its) // 50)
        smooth = np.convolve([e["loss"] for e in history], np.ones(k) / k, mode="valid")
        ax.plot(its[k - 1:], smooth, color="k", lw=1.2, label=f"loss (mean of {k})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    val = [(e["iteration"], e["val_mean_foreground_iou"]) for e in history
           if e.get("val_mean_foreground_iou") is not None]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:red", ms=3, label="validation IoU (mean foreground)")
        ax2.set_ylabel("validation IoU on held-out slices")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
