"""Pseudo-labels of volumes read lazily (too large for memory), block-wise through the engine.

The 3D base network and the 2D one (along xy: the other planes need transposed reads, which
the engine's stores do not offer) run through `run_inference` as `sparseseg-infer` would, with
float16 probabilities into temporary OME-Zarr stores; their mean becomes dense targets slab by
slab, written to a uint8 zarr array that the trainer reads lazily like any label volume.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sparseseg.engine.run import run_inference
from sparseseg.selftrain.pseudo import dense_targets
from sparseseg.trainer.data import SLAB_VOXELS, read_labels
from sparseseg.volume import open_volume

log = logging.getLogger("sparseseg.selftrain")


def lazy_targets(vol, checkpoints: dict, workdir, ignore_label: int, threshold: float, device: str):
    """(the dense targets as a lazily read Volume, names of the predictions averaged)."""
    import zarr

    workdir = Path(workdir)
    probs, names = [], []
    for name, key in (("3d", "3d"), ("2d-xy", "2d")):
        out = workdir / f"{Path(vol.name).stem}-{name}.zarr"
        run_inference(checkpoints[key], vol.image.source, str(out), workers=0, probabilities="float16",
                      device=device, progress=False)
        probs.append(zarr.open_group(str(out), mode="r")["probabilities"])
        names.append(name)
    z, y, x = vol.shape
    step = max(1, min(z, SLAB_VOXELS // max(1, y * x)))
    path = workdir / f"{Path(vol.name).stem}-targets.zarr"
    target = zarr.create_array(str(path), shape=(z, y, x), chunks=(step, min(y, 1024), min(x, 1024)),
                               dtype="uint8", fill_value=ignore_label)
    for z0 in range(0, z, step):
        region = (slice(z0, min(z, z0 + step)), slice(None), slice(None))
        mean = sum(np.asarray(p[(slice(None),) + region], np.float32) for p in probs) / len(probs)
        target[region] = dense_targets(mean, read_labels(vol.labels, region), ignore_label, threshold)
    log.info("self-training: pseudo-labels of %s averaged block-wise over %s", vol.name, ", ".join(names))
    return open_volume(path), names
