"""The semi-automated use case: train on a volume's own sparse labels, predict it densely."""

from __future__ import annotations

import logging
import time

from sparseseg.engine.run import run_inference
from sparseseg.selftrain.run import self_train as run_self_train
from sparseseg.trainer.data import load_pairs
from sparseseg.trainer.options import build_configs
from sparseseg.trainer.train import train


log = logging.getLogger("sparseseg.densify")


def densify(image_path, labels_path, out, options: dict, model_out=None, tile=None, overwrite=False,
            pyramid=0, self_train=None) -> dict:
    """Train on the volume's own sparse labels, then predict it with the engine (in this
    process): the same blocked, exact path as `sparseseg-infer`, so any volume size works.
    `self_train` (a SelfTrainConfig): train with sparseseg.selftrain instead of the plain trainer
    (its base checkpoints go beside `model_out`)."""
    import tempfile
    from pathlib import Path

    vols = load_pairs([image_path], [labels_path], options["ignore_label"])
    mcfg, tcfg, names = build_configs(vols, options)
    with tempfile.TemporaryDirectory(prefix="sparseseg-densify-") as tmp:
        meta = self_train is not None and self_train.mode == "meta"        # one ONNX engine file
        ckpt = Path(model_out) if model_out else Path(tmp) / ("model.onnx" if meta else "model.pt")
        if self_train is not None:
            res = run_self_train(vols, options, self_train, out_path=ckpt)
            train_seconds = res.seconds["total"]
        else:
            # The budget covers the prediction too: keep time for the whole volume.
            res = train(vols, mcfg, tcfg, names, out_path=ckpt, predict_shapes=[v.shape for v in vols])
            train_seconds = res.seconds
        del vols                                  # the engine reads the volume block by block
        t0 = time.time()
        summary = run_inference(ckpt, image_path, out, workers=0, tile=tile, overwrite=overwrite,
                                device=options["device"], pyramid=pyramid)
    log.info("wrote %s", out)
    return {"output": summary["output"], "train_seconds": train_seconds, "predict_seconds": time.time() - t0,
            "model": res.model}
