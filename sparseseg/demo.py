"""`sparseseg-demo`: the paper's semi-automated use case end to end on synthetic tubules.

Generates a 3-channel volume of branching tubules, keeps 3+3+2 orthogonal slices as the only
annotation, trains the `small` preset on CPU, densifies the volume, and measures IoU on the
voxels that were *not* annotated. Everything lands in the work dir.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from sparseseg import predict
from sparseseg.errors import SparsesegError
from sparseseg.eval.figure import draw_figure
from sparseseg.eval.metrics import iou_per_class
from sparseseg.model.config import plan_model
from sparseseg.synthetic import CLASS_NAMES, tubules
from sparseseg.trainer.config import TrainConfig
from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.sparse import annotated_mask, orthogonal_slices, sparsify
from sparseseg.trainer.train import train
from sparseseg.volume import write_ome_zarr

log = logging.getLogger("sparseseg.demo")

SHAPE = (48, 96, 96)
SLICES = (2, 3, 3)          # annotated slices normal to z, y, x (the paper's "3,3,2")
ITERATIONS = 300


def run_demo(workdir, iterations=None, seed: int = 0, shape=SHAPE) -> dict:
    import torch

    work = Path(workdir)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SparsesegError(f"cannot create work dir {work}: {e.strerror}") from None
    t_start = time.time()
    image, dense = tubules(shape, seed=seed)
    slices = orthogonal_slices(dense.shape, SLICES)
    sparse = sparsify(dense, slices, 255)
    for name, arr in (("image.zarr", image), ("labels_dense.zarr", dense), ("labels_sparse.zarr", sparse)):
        write_ome_zarr(work / name, arr, name=name, overwrite=True)
    log.info("synthetic volume %s, %d annotated slices (%.1f%% of voxels)", shape, len(slices),
             100 * (sparse != 255).mean())

    mcfg = plan_model("small", image.shape[0], len(CLASS_NAMES), base_width=8, shape=shape)
    tcfg = TrainConfig(preset="small", iterations=iterations or ITERATIONS, lr=3e-3, seed=seed, device="cpu",
                       patch_output=(24, 28, 28), checkpoint_every=0, dice_weight=1.0)
    torch.manual_seed(seed)
    res = train([TrainingVolume(image, sparse, "demo")], mcfg, tcfg, CLASS_NAMES, out_path=work / "model.pt")

    t0 = time.time()
    pred, _ = predict(res.model, image, device="cpu")      # the engine's block pipeline, in process
    predict_seconds = time.time() - t0
    write_ome_zarr(work / "prediction.zarr", pred, name="prediction", overwrite=True)

    held_out = dense.copy()
    held_out[annotated_mask(dense, slices)] = 255          # score only what nobody annotated
    scores = iou_per_class(pred, held_out, len(CLASS_NAMES), 255)
    draw_figure(work / "figure.png", pred, held_out, 255, image,
                title=f"sparseseg demo: mean foreground IoU {scores['mean_foreground_iou']:.3f} on unannotated voxels")
    summary = {
        "shape": list(shape), "annotated_slices": [list(s) for s in slices],
        "annotated_fraction": float((sparse != 255).mean()),
        "iou": scores["iou"], "class_names": CLASS_NAMES, "mean_foreground_iou": scores["mean_foreground_iou"],
        "iterations": res.iterations, "seconds_train": res.seconds, "seconds_predict": predict_seconds,
        "seconds_total": time.time() - t_start, "torch_threads": torch.get_num_threads(),
        "files": ["image.zarr", "labels_dense.zarr", "labels_sparse.zarr", "model.pt", "prediction.zarr",
                  "figure.png", "summary.json"],
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
