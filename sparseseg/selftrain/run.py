"""Self-training end to end: base networks, pseudo-labels, the final network; what
`sparseseg-train --self-train` and `sparseseg-densify --self-train` call."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sparseseg.selftrain.config import SelfTrainConfig, check_options

log = logging.getLogger("sparseseg.selftrain")


@dataclass
class SelfTrainResult:
    model: object            # the final SegmentationModel
    checkpoint: str | None
    iterations: int
    final_loss: float
    planes: list             # planes the 2D base network used
    predictions: list        # names of the pseudo-label predictions averaged
    seconds: dict            # base3d, base2d, pseudo, final, total
    base_checkpoints: dict


def base_paths(out_path) -> dict:
    """model.pt -> model.base3d.pt and model.base2d.pt beside it (None without an out_path)."""
    if out_path is None:
        return {"3d": None, "2d": None}
    p = Path(out_path)
    return {"3d": str(p.with_name(p.stem + ".base3d.pt")), "2d": str(p.with_name(p.stem + ".base2d.pt"))}


def self_train(vols, options: dict, st: SelfTrainConfig, out_path=None, progress=None) -> SelfTrainResult:
    """Train with self-training on TrainingVolumes held in memory (sparse labels, the ignore
    value elsewhere). `options`: the training options as `build_configs` takes them; they
    apply to every network trained. Checkpoints: the final one at `out_path`, the base ones
    beside it (see `base_paths`)."""
    from sparseseg.selftrain.base import train_base
    from sparseseg.selftrain.distill import train_distilled
    from sparseseg.selftrain.planes import in_memory
    from sparseseg.selftrain.pseudo import average, dense_targets

    check_options(options)
    in_memory(vols)
    t0 = time.time()
    base = train_base(vols, options, base_paths(out_path), progress)
    t1 = time.time()
    ignore, targets, names = options["ignore_label"], [], []
    k = base.model3d.cfg.num_classes
    for v in vols:
        mean, names = average(v.image, base.model3d, base.model2d, base.planes, options["device"], st.backend)
        targets.append(dense_targets(mean, v.labels, ignore, st.threshold))
        del mean
    log.info("self-training: pseudo-labels averaged over %s (%.1f s)", ", ".join(names), time.time() - t1)
    t2 = time.time()
    res = train_distilled(vols, targets, options, k, st.iterations, out_path, progress)
    t3 = time.time()
    info = {**st.to_dict(), "planes": base.planes, "predictions": names, "base_checkpoints": base.checkpoints}
    if res.checkpoint:
        _record(res.checkpoint, info)
    seconds = {"base3d": round(base.seconds["3d"], 2), "base2d": round(base.seconds["2d"], 2),
               "pseudo": round(t2 - t1, 2), "final": round(t3 - t2, 2), "total": round(t3 - t0, 2)}
    return SelfTrainResult(res.model, res.checkpoint, res.iterations, res.final_loss, base.planes, names, seconds,
                           base.checkpoints)


def _record(path, info: dict) -> None:
    """Note in the checkpoint how it was made (its `extra` holds "self_train")."""
    from sparseseg.model.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(path)
    save_checkpoint(path, ck.model, ck.train_config, ck.class_names, ck.ignore_label, ck.iteration, ck.voxel_size,
                    {**ck.extra, "self_train": info})
