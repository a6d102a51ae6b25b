"""The semi-automated use case: train on a volume's own sparse labels, predict it densely."""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger("sparseseg.densify")


def predict_volume(model, image: np.ndarray, tile=None, batch: int = 1, device="cpu", probabilities=False):
    """Dense labels for an in-memory (C, Z, Y, X) image with a trained SegmentationModel."""
    from sparseseg.engine.tiling import predict_array, torch_forward

    model = model.to(device).eval()
    return predict_array(torch_forward(model, device), image, model.cfg.geometry, tile_out=tile, batch=batch,
                         probabilities=probabilities)


def densify(image_path, labels_path, out, options: dict, model_out=None, tile=None, overwrite=False) -> dict:
    from sparseseg.cli import build_configs
    from sparseseg.trainer.data import load_pairs
    from sparseseg.trainer.train import resolve_device, train
    from sparseseg.volume import write_ome_zarr

    vols = load_pairs([image_path], [labels_path], options["ignore_label"])
    mcfg, tcfg, names = build_configs(vols, options)
    res = train(vols, mcfg, tcfg, names, out_path=model_out)
    t0 = time.time()
    device = resolve_device(options["device"])
    labels, _ = predict_volume(res.model, vols[0].image, tile=tile, device=device)
    predict_seconds = time.time() - t0
    write_ome_zarr(out, labels, voxel_size=vols[0].voxel_size, overwrite=overwrite)
    log.info("wrote %s", out)
    return {"output": str(out), "train_seconds": res.seconds, "predict_seconds": predict_seconds,
            "model": res.model, "labels": labels}
