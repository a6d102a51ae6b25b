"""The distillation variant: one plain 3D network trained on the dense pseudo-labels, so the
result is an ordinary checkpoint (sparseseg-infer, export and the engine use it unchanged)."""

from __future__ import annotations

from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.options import build_configs
from sparseseg.trainer.train import train


def train_distilled(vols, targets, options: dict, num_classes: int, iterations: int, out_path=None,
                    progress=None):
    """Train on `targets` (dense uint8 labels per volume, the ignore value where left out)."""
    dense = [TrainingVolume(v.image, t, v.name, v.voxel_size) for v, t in zip(vols, targets)]
    # The number of classes is the base networks' (a class the pseudo-labels never predict
    # still has its output channel, so the model's contract matches the annotation).
    o = {**options, "num_classes": num_classes, "iterations": iterations or options["iterations"], "ndim": 3}
    mcfg, tcfg, names = build_configs(dense, o)
    return train(dense, mcfg, tcfg, names, out_path=out_path, progress=progress)
