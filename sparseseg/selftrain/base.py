"""The base networks of self-training, trained on the sparse labels with the ordinary trainer:
the sparse 3D network, and one 2D network on slices of every usable plane."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sparseseg.selftrain.planes import in_memory, plane_volume, usable_planes
from sparseseg.trainer.options import build_configs
from sparseseg.trainer.train import train

log = logging.getLogger("sparseseg.selftrain")


@dataclass
class BaseModels:
    model3d: object
    model2d: object
    planes: list            # planes the 2D network was trained on (and predicts along)
    class_names: list
    checkpoints: dict       # "3d"/"2d" -> path or None
    seconds: dict           # "3d"/"2d" -> training seconds
    iterations: dict        # "3d"/"2d" -> iterations run


def train_base(vols, options: dict, paths: dict, progress=None) -> BaseModels:
    """`paths`: {"3d": path or None, "2d": path or None} for the base checkpoints."""
    mcfg3, tcfg3, names = build_configs(vols, {**options, "ndim": 3})
    log.info("self-training: base 3D network (%s)", _count(tcfg3))
    res3 = train(vols, mcfg3, tcfg3, names, out_path=paths.get("3d"), progress=progress)

    # The 2D network is planned on the xy slices; --patch (a 3D patch) applies to the 3D networks.
    mcfg2, tcfg2, _ = build_configs(vols, {**options, "ndim": 2, "planes": "xy", "patch": None})
    if in_memory(vols):
        planes = usable_planes(vols, mcfg2, tcfg2.preset)
    else:
        planes = ["xy"]
        log.info("2D base network: xy plane only (volumes read lazily: no transposed views of a store)")
    views = list(vols) + [plane_volume(v, p) for p in planes if p != "xy" for v in vols]
    log.info("self-training: base 2D network on planes %s (%s)", ",".join(planes), _count(tcfg2))
    res2 = train(views, mcfg2, tcfg2, names, out_path=paths.get("2d"), progress=progress)
    return BaseModels(res3.model.eval(), res2.model.eval(), planes, names,
                      {"3d": res3.checkpoint, "2d": res2.checkpoint}, {"3d": res3.seconds, "2d": res2.seconds},
                      {"3d": res3.iterations, "2d": res2.iterations})


def _count(tcfg) -> str:
    return f"{tcfg.iterations} iterations" if tcfg.iterations else f"{tcfg.time_budget:g} min"
