"""Which slices to annotate: representative selection (filter-bank or autoencoder features,
greedy max-cover) against equal-interval and random selection at the same budget, on fully
labelled EM stacks (ISBI 2012, Drosophila VNC).

Two cheap measures, both from the true labels of the whole stack:
1. label coverage, every plane: mean over all slices of the distance (in a label-layout
   descriptor: class fractions on an 8x8 grid) to the nearest selected slice: the k-medoids
   cost of the selection in label space (lower = the selection represents the labels better);
   and the L1 error of the selected slices' class frequencies against the whole stack's.
2. a downstream proxy, xy plane: a small pixel classifier (MLP on 16 filter-bank responses per
   pixel) trained on the selected sections only, mean foreground IoU on all other sections.
   The same classifier seed for every selection, so the slices are the only difference.
Random selection: 10 seeds (mean, std, min, max).

    OMP_NUM_THREADS=2 python benchmarks/suggest_selection.py --out benchmarks/results/suggest_selection_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from sparseseg.suggest.cover import cosine_similarity, lazy_greedy_max_cover
from sparseseg.suggest.features import (
    AutoencoderConfig,
    _responses,
    autoencoder_features,
    filterbank_features,
)
from sparseseg.suggest.planes import PLANES, reduce_volume
from sparseseg.eval.metrics import iou_per_class
from sparseseg.volume import open_volume

import sys

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/suggest_selection.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import data_dir, record  # noqa: E402

DATA = data_dir()
SETS = {
    "isbi2012": ("isbi2012_em/isbi2012_train_image_zyx.tif", "isbi2012_em/isbi2012_train_label_zyx.tif"),
    "vnc": ("drosophila_vnc/vnc_stack1_image_zyx.tif", "drosophila_vnc/vnc_stack1_labels_zyx.tif"),
}
BUDGETS = (0.05, 0.10, 0.20)
RANDOM_SEEDS = 10


def equal_interval(n, k):
    return sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)})


def label_descriptors(labels, plane, k, grid=8):
    """Per slice of `plane`: class fractions on a grid x grid layout, (N, k * grid^2)."""
    lab = np.moveaxis(labels, PLANES[plane], 0)
    n, h, w = lab.shape
    cy = np.minimum(np.arange(h) * grid // h, grid - 1)
    cx = np.minimum(np.arange(w) * grid // w, grid - 1)
    cell = (cy[:, None] * grid + cx[None, :]).ravel()
    size = np.bincount(cell, minlength=grid * grid)
    out = np.zeros((n, grid * grid, k))
    flat = lab.reshape(n, -1)
    for c in range(k):
        for i in range(n):
            out[i, :, c] = np.bincount(cell, weights=(flat[i] == c), minlength=grid * grid) / np.maximum(size, 1)
    return out.reshape(n, -1)


def label_scores(desc, freq_slices, sel):
    from scipy.spatial.distance import cdist

    d = cdist(desc, desc[sel]).min(axis=1)
    f_all = freq_slices.sum(0) / freq_slices.sum()
    f_sel = freq_slices[sel].sum(0) / freq_slices[sel].sum()
    return {"medoid_cost": float(d.mean()), "class_freq_l1": float(np.abs(f_sel - f_all).sum())}


def pixel_features(image, step):
    """(Z, h, w, 16) filter-bank responses of every xy section at 1/step resolution, float16."""
    x = image[:, ::step, ::step].astype(np.float32)
    lo, hi = np.percentile(x[:: max(1, len(x) // 8)], [1, 99])
    x = (x - lo) / max(hi - lo, 1e-6)
    feats = np.stack(_responses(x, (1.0, 2.0, 4.0)), axis=-1)
    mu, sd = feats.reshape(-1, feats.shape[-1]).mean(0), feats.reshape(-1, feats.shape[-1]).std(0) + 1e-6
    return ((feats - mu) / sd).astype(np.float16)


def classifier_iou(feats, labels, sel, k, seed=0, steps=300, per_slice=20000):
    """Train a small MLP on pixels of the selected sections, IoU on every other section."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for z in sel:
        idx = rng.choice(feats[z].shape[0] * feats[z].shape[1], per_slice, replace=False)
        xs.append(feats[z].reshape(-1, feats.shape[-1])[idx])
        ys.append(labels[z].ravel()[idx])
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32))
    y = torch.from_numpy(np.concatenate(ys).astype(np.int64))
    counts = torch.bincount(y, minlength=k).float()
    weight = torch.where(counts > 0, counts.sum() / (k * counts.clamp(min=1)), torch.zeros_like(counts))
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, k))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = torch.randint(len(x), (4096,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[b]), y[b], weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rest = [z for z in range(len(labels)) if z not in set(sel)]
    with torch.no_grad():
        pred = np.stack([net(torch.from_numpy(feats[z].reshape(-1, feats.shape[-1]).astype(np.float32)))
                         .argmax(1).numpy().reshape(labels[z].shape) for z in rest])
    r = iou_per_class(pred.astype(np.uint8), labels[rest], k, 255)
    return {"iou": r["iou"], "mean_foreground_iou": r["mean_foreground_iou"]}


def summarize(values):
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def run_set(name, data, ae_steps, step):
    img_p, lab_p = SETS[name]
    vol = open_volume(data / img_p)
    labels = open_volume(data / lab_p).read_labels()
    k = int(labels.max()) + 1
    log = {"dataset": name, "shape": list(vol.shape), "classes": k}
    t = time.perf_counter()
    stacks = reduce_volume(vol, ("xy", "xz", "yz"), size=256)
    fb = {p: filterbank_features(s) for p, s in stacks.items()}
    log["filterbank_seconds"] = round(time.perf_counter() - t, 1)
    ae, info = autoencoder_features(stacks, AutoencoderConfig(steps=ae_steps, seconds=600))
    log["autoencoder"] = info
    orders = {"filterbank": {}, "autoencoder": {}}
    for p in stacks:
        n = len(stacks[p])
        kmax = max(1, round(max(BUDGETS) * n))
        for fname, feats in (("filterbank", fb), ("autoencoder", ae)):
            orders[fname][p] = [pk.index for pk in lazy_greedy_max_cover(cosine_similarity(feats[p]), kmax)]
    pix = pixel_features(vol.read()[0], step)
    lab_small = labels[:, ::step, ::step]
    results = []
    for p in ("xy", "xz", "yz"):
        n = labels.shape[PLANES[p]]
        desc = label_descriptors(labels, p, k)
        axes = tuple(a for a in range(3) if a != PLANES[p])
        freq = np.stack([(labels == c).sum(axis=axes) for c in range(k)], axis=1).astype(float)
        for frac in BUDGETS:
            kb = max(1, round(frac * n))
            sels = {"filterbank": sorted(orders["filterbank"][p][:kb]),
                    "autoencoder": sorted(orders["autoencoder"][p][:kb]),
                    "equal_interval": equal_interval(n, kb)}
            row = {"plane": p, "slices": n, "budget_fraction": frac, "budget": kb, "methods": {}}
            for m, sel in sels.items():
                sc = label_scores(desc, freq, sel)
                if p == "xy":
                    sc.update(classifier_iou(pix, lab_small, sel, k))
                row["methods"][m] = {"selected": sel, **sc}
            rnd = []
            for seed in range(RANDOM_SEEDS):
                sel = sorted(np.random.default_rng(seed).choice(n, kb, replace=False).tolist())
                sc = label_scores(desc, freq, sel)
                if p == "xy":
                    sc.update(classifier_iou(pix, lab_small, sel, k))
                rnd.append({"selected": sel, **sc})
            row["methods"]["random"] = {
                "runs": rnd, **{key: summarize([r[key] for r in rnd])
                                for key in ("medoid_cost", "class_freq_l1", "mean_foreground_iou") if key in rnd[0]}}
            results.append(row)
            print(name, p, kb, {m: (round(v["medoid_cost"]["mean"] if isinstance(v["medoid_cost"], dict)
                                          else v["medoid_cost"], 4),
                                    v.get("mean_foreground_iou") if not isinstance(v.get("mean_foreground_iou"), dict)
                                    else round(v["mean_foreground_iou"]["mean"], 4))
                                for m, v in row["methods"].items()}, flush=True)
    log["results"] = results
    return log


def figure(out_png, sets):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4))
    for ax, s in zip(np.atleast_1d(axes), sets):
        rows = [r for r in s["results"] if r["plane"] == "xy"]
        xs = np.arange(len(rows))
        for j, m in enumerate(("filterbank", "autoencoder", "equal_interval", "random")):
            vals = [r["methods"][m]["mean_foreground_iou"] for r in rows]
            mean = [v["mean"] if isinstance(v, dict) else v for v in vals]
            err = [v["std"] if isinstance(v, dict) else 0 for v in vals]
            ax.bar(xs + (j - 1.5) * 0.2, mean, 0.2, yerr=err, label=m)
        ax.set_xticks(xs, [f"{r['budget']} of {r['slices']}" for r in rows])
        ax.set_title(f"{s['dataset']}: pixel-classifier IoU on the other sections")
        ax.set_ylabel("mean foreground IoU")
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--sets", default="isbi2012,vnc")
    ap.add_argument("--ae-steps", type=int, default=300)
    ap.add_argument("--step", type=int, default=2, help="pixel-classifier resolution: every step-th pixel")
    ap.add_argument("--out", default="benchmarks/results/suggest_selection_cpu.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    sets = [run_set(s, Path(args.data), args.ae_steps, args.step) for s in args.sets.split(",")]
    out = {"benchmark": "suggest_selection", **record(), "threads": 1,
           "load_average_start": [round(v, 2) for v in load0],
           "load_average_end": [round(v, 2) for v in os.getloadavg()],
           "seconds": round(time.perf_counter() - t0, 1), "budgets": list(BUDGETS), "random_seeds": RANDOM_SEEDS,
           "pixel_step": args.step, "sets": sets}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    figure(str(Path(args.out).with_suffix(".png")), sets)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
