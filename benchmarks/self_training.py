"""Sparse 3D network alone vs self-training vs full labels, at slice budgets, on real EM.

One run per call (one method, one budget), appended as a JSON line with machine, date, load
and the CPU seconds it took. Protocol (both datasets): train on the half x < X/2, score IoU on
the half x >= X/2 (all sections, nobody annotated them). A budget of P% annotates
ceil(P% of the sections) z-sections of the training half, chosen by `--selection`:
equal-interval (centres of equal parts, sparseseg.trainer.sparse.evenly_spaced; the default),
representative (`sparseseg-suggest`'s greedy max-cover on filter-bank features of the training
half's xy sections, what a user would be told to paint) or random (`--seed`). "full" trains on
every section of that half.

    python benchmarks/self_training.py --dataset isbi --method sparse --budget 10 --iterations 1000
    python benchmarks/self_training.py --dataset isbi --method selftrain --budget 10 --iterations 1000
    python benchmarks/self_training.py --dataset isbi --method full --iterations 1000
    python benchmarks/self_training.py --dataset isbi --method forest --budget 10
    python benchmarks/self_training.py --dataset vnc --method sparse --budget 20 --selection random --seed 1

Data loading reuses benchmarks/real_data.py `load` (and its option defaults and forest).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as `python benchmarks/self_training.py`
    sys.path.insert(0, str(ROOT))

from benchmarks.real_data import cli_defaults, code_version, load, parse_overrides, provenance, run_forest  # noqa: E402


def dense_halves(dataset: str, task: str):
    """(train image, dense train labels, test image, dense test labels, class names), x split."""
    if dataset == "isbi":
        img, sparse, _, test, names, _ = load("isbi", task, "full")
        dense = np.where(test == 255, sparse, test)        # load() masks the annotated sections in test
        half = dense.shape[2] // 2
        return (np.ascontiguousarray(img[:, :, :half]), np.ascontiguousarray(dense[:, :, :half]),
                np.ascontiguousarray(img[:, :, half:]), np.ascontiguousarray(dense[:, :, half:]), names)
    tr_img, tr_lab, te_img, te_lab, names, _ = load("vnc", task, "full")
    return tr_img, tr_lab, te_img, te_lab, names


def budget_slices(image: np.ndarray, percent: float, selection: str = "equal", seed: int = 0) -> list[int]:
    """The z-sections of `image` (Z, Y, X) a budget of `percent` annotates, by `selection`."""
    sections = image.shape[0]
    k = max(1, math.ceil(sections * percent / 100 - 1e-9))
    if selection == "equal":
        from sparseseg.trainer.sparse import evenly_spaced

        return evenly_spaced(sections, k)
    if selection == "random":
        return sorted(np.random.default_rng(seed).choice(sections, k, replace=False).tolist())
    import tempfile

    from sparseseg.suggest.run import SuggestConfig, suggest

    with tempfile.TemporaryDirectory() as tmp:       # suggest() reads a stored image, as the CLI does
        path = Path(tmp) / "train_half.npy"
        np.save(path, image)
        res = suggest(str(path), SuggestConfig(budget=k, planes=("xy",)))
    return sorted(int(s["index"]) for s in res["planes"]["xy"]["suggested"])


def options(names, iterations, overrides) -> dict:
    o = cli_defaults()
    o.update(overrides)
    o.update(iterations=iterations, device="cpu", checkpoint_every=0, num_classes=len(names))
    return o


def run_method(method, tr_img, tr_lab, te_img, te_lab, names, o, st_cfg):
    import torch

    from sparseseg import predict
    from sparseseg.trainer.data import TrainingVolume
    from sparseseg.eval.metrics import iou_per_class

    if method == "forest":
        return run_forest(tr_img, tr_lab, te_img, te_lab, names)
    vols = [TrainingVolume(tr_img[None], tr_lab, "train")]
    extra = {}
    if method == "selftrain":
        from sparseseg.selftrain.run import self_train

        res = self_train(vols, o, st_cfg, progress=False)
        extra = {"self_train": st_cfg.to_dict(), "planes": res.planes, "predictions": res.predictions,
                 "stage_seconds": res.seconds}
        model = res.model
    else:
        from sparseseg.trainer.options import build_configs
        from sparseseg.trainer.train import train

        mcfg, tcfg, _ = build_configs(vols, o)
        model = train(vols, mcfg, tcfg, names, progress=False).model
    with torch.inference_mode():
        pred, _ = predict(model, te_img[None], device="cpu")
    return {**extra, "predicted_fraction": np.bincount(pred.ravel(), minlength=len(names)).astype(float).tolist(),
            **iou_per_class(pred, te_lab, len(names), 255)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["isbi", "vnc"], required=True)
    ap.add_argument("--task", choices=["all", "membrane", "mito"], default="all", help="vnc only")
    ap.add_argument("--method", choices=["sparse", "selftrain", "full", "forest"], required=True)
    ap.add_argument("--budget", type=float, default=10.0, help="percent of the sections annotated (not for full)")
    ap.add_argument("--selection", choices=["equal", "representative", "random"], default="equal",
                    help="how the budget's sections are chosen")
    ap.add_argument("--seed", type=int, default=0, help="for --selection random")
    ap.add_argument("--iterations", type=int, default=500, help="per network trained")
    ap.add_argument("--self-train-mode", default="distill")
    ap.add_argument("--self-train-iterations", type=int, default=0, help="final network (0: --iterations)")
    ap.add_argument("--self-train-threshold", type=float, default=0.0)
    ap.add_argument("--crop", type=int, default=0, help="smoke test: use only the first N voxels along y and x")
    ap.add_argument("--set", action="append", default=[], help="training option override key=value")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "self_training.jsonl"))
    a = ap.parse_args()
    import torch

    from sparseseg.selftrain.config import SelfTrainConfig
    from sparseseg.trainer.sparse import sparsify

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    overrides = parse_overrides(a.set)
    st_cfg = SelfTrainConfig(mode=a.self_train_mode, iterations=a.self_train_iterations,
                             threshold=a.self_train_threshold)
    load_before, commit = os.getloadavg(), code_version()
    tr_img, tr_dense, te_img, te_lab, names = dense_halves(a.dataset, a.task)
    if a.crop:
        c = (slice(None), slice(0, a.crop), slice(0, a.crop))
        tr_img, tr_dense, te_img, te_lab = (np.ascontiguousarray(x[c]) for x in (tr_img, tr_dense, te_img, te_lab))
    if a.method == "full":
        slices, tr_lab, budget = list(range(tr_dense.shape[0])), tr_dense, 100.0
    else:
        slices, budget = budget_slices(tr_img, a.budget, a.selection, a.seed), a.budget
        tr_lab = sparsify(tr_dense, [(0, z) for z in slices], 255)
    o = options(names, a.iterations, overrides)
    t0, c0 = time.time(), time.process_time()
    r = run_method(a.method, tr_img, tr_lab, te_img, te_lab, names, o, st_cfg)
    rec = {"dataset": a.dataset, "task": a.task if a.dataset == "vnc" else "membrane", "method": a.method,
           "budget_percent": budget,
           "selection": "all" if a.method == "full" else a.selection,
           **({"selection_seed": a.seed} if a.selection == "random" and a.method != "full" else {}),
           "annotated_sections": slices, "sections": int(tr_dense.shape[0]),
           "protocol": f"train x<{tr_dense.shape[2]} of the volume, test the other half, all sections",
           "iterations": a.iterations if a.method != "forest" else None, "overrides": overrides, "tag": a.tag,
           "crop": a.crop or None, "classes": names, **r,
           "cpu_seconds": round(time.process_time() - c0, 1), "wall_seconds": round(time.time() - t0, 1),
           **provenance(load_before, commit)}
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec.get(k) for k in ("dataset", "task", "method", "budget_percent", "annotated_sections",
                                              "iou", "cpu_seconds", "wall_seconds")}))


if __name__ == "__main__":
    main()
