"""Semi-automated protocol on real EM data (ISBI 2012, 30 x 512 x 512, membranes).

Annotate every 6th section, train on those sections only, predict the whole stack, and score
IoU on the sections nobody annotated; the 3D network against the 2D baseline (the same
network in 2D, applied per section) on the same annotation. Voxel size is not in the TIFF,
so the 3D network's anisotropy is planned from the stack's shape, as a user would get it.

    python benchmarks/isbi_semi_automated.py --iterations 600 --out benchmarks/results/isbi_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from sparseseg.model.config import plan_model
from sparseseg import predict
from sparseseg.eval.metrics import iou_per_class
from sparseseg.trainer.config import TrainConfig
from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.sparse import annotated_mask, sparsify
from sparseseg.trainer.train import train
from sparseseg.volume import open_volume

import sys

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/isbi_semi_automated.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import data_dir, record  # noqa: E402

DATA = data_dir() / "isbi2012_em"


def run(ndim: int, image, dense, slices, iterations: int, seed: int, device: str, preset: str):
    sparse = sparsify(dense, slices, 255)
    cfg = plan_model(preset, 1, 2, ndim=ndim, shape=dense.shape)
    tcfg = TrainConfig(preset=preset, iterations=iterations, lr=1e-3, seed=seed, device=device, checkpoint_every=0,
                       dice_weight=0.5)
    res = train([TrainingVolume(image, sparse, "isbi")], cfg, tcfg, ["interior", "membrane"])
    t0 = time.time()
    pred, _ = predict(res.model, image, device=device)
    held_out = dense.copy()
    held_out[annotated_mask(dense, slices)] = 255
    scores = iou_per_class(pred, held_out, 2, 255)
    return {"ndim": ndim, "kernel_sizes": [list(k) for k in cfg.kernel_sizes],
            "pool_sizes": [list(p) for p in cfg.pool_sizes], "iou": scores["iou"],
            "membrane_iou": scores["iou"][1], "accuracy": scores["accuracy"],
            "train_seconds": round(res.seconds, 1), "predict_seconds": round(time.time() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--every", type=int, default=6, help="annotate every N-th section")
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/isbi_semi_automated.json")
    a = ap.parse_args()
    image = open_volume(Path(a.data) / "isbi2012_train_image_zyx.tif").read(dtype=np.float32)
    dense = open_volume(Path(a.data) / "isbi2012_train_label_zyx.tif").read_labels()
    slices = [(0, z) for z in range(0, dense.shape[0], a.every)]
    results = {"protocol": f"annotate sections {[s[1] for s in slices]} of {dense.shape[0]}; IoU on the others",
               **record(), "threads": torch.get_num_threads(), "device": a.device,
               "iterations": a.iterations, "preset": a.preset, "runs": []}
    for ndim in (3, 2):
        r = run(ndim, image, dense, slices, a.iterations, a.seed, a.device, a.preset)
        print(json.dumps(r))
        results["runs"].append(r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"3D membrane IoU {results['runs'][0]['membrane_iou']:.4f} vs 2D {results['runs'][1]['membrane_iou']:.4f}"
          f" -> {a.out}")


if __name__ == "__main__":
    main()
