"""`sparseseg.predict`: the engine's block pipeline on an in-memory array, in this process.

The same code as `sparseseg-infer` (plan, tiles, gather, forward, stitch), with the store
replaced by the array and, for a model object, the engine file replaced by the model.
"""

from __future__ import annotations

import numpy as np

from sparseseg.errors import SparsesegError


class ArrayVolume:
    """The part of volume.Volume the worker reads: shape, channels, read(region)."""

    def __init__(self, array: np.ndarray):
        self.array = array if array.ndim == 4 else array[None]
        self.shape = tuple(self.array.shape[1:])
        self.channels = self.array.shape[0]
        self.dtype = self.array.dtype

    def read(self, region=None, dtype=None):
        out = self.array[(slice(None),) + tuple(region or (slice(None),) * 3)]
        return out.astype(dtype, copy=False) if dtype is not None else out


def predict(model_or_engine_file, array, *, tile=None, batch=None, block=None, overlap: float = 0.5,
            device: str = "auto", precision: str = "fp32", probabilities=None, backend: str = "auto"):
    """Dense labels (Z, Y, X) uint8 for an in-memory (Z, Y, X) or (C, Z, Y, X) array, and
    probabilities (K, Z, Y, X) when asked for (`probabilities`: "uint8" (p*255), "float16",
    "float32" or True = float32), else None.

    `model_or_engine_file`: a SegmentationModel (e.g. `sparseseg.load_model(...)` or a model
    just trained), or an engine file (.pt, .onnx, .plan) run with the backend `sparseseg-infer`
    would pick."""
    from pathlib import Path

    from sparseseg.engine.backends import BackendSpec, TorchBackend, cached_backend, model_contract
    from sparseseg.engine.blocks import make_blocks
    from sparseseg.engine.plan import choose, gather_normalization
    from sparseseg.engine.worker import BlockJob, process_blocks

    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise SparsesegError(f"predict needs a (Z, Y, X) or (C, Z, Y, X) array, got shape {array.shape}")
    if probabilities is True:
        probabilities = "float32"
    if probabilities not in (None, False, "uint8", "float16", "float32"):
        raise SparsesegError(f"probabilities must be uint8, float16 or float32, not {probabilities!r}")
    probabilities = probabilities or None
    vol = ArrayVolume(array)
    if isinstance(model_or_engine_file, (str, Path)):
        spec = BackendSpec(str(Path(model_or_engine_file).resolve()), device, precision, backend=backend)
        engine = cached_backend(spec)
    else:
        contract = model_contract(model_or_engine_file)
        engine = TorchBackend(model_or_engine_file, contract, device, precision)
        spec = BackendSpec("<in-memory model>", device, precision, backend="torch")
    contract = engine.contract
    if vol.channels != contract["in_channels"]:
        raise SparsesegError(f"the array has {vol.channels} channel(s), the model expects {contract['in_channels']}")
    blk, tile, batch = choose(contract, vol.shape, device=engine.device.type, block=block, tile=tile, batch=batch,
                              overlap=overlap)
    from sparseseg.model.contract import geometry_of_contract

    job = BlockJob("<memory>", "<memory>", spec, geometry_of_contract(contract).to_dict(), vol.shape, tile, overlap,
                   batch, probabilities, normalization=gather_normalization(contract, vol))
    labels = np.zeros(vol.shape, np.uint8)
    probs = (np.zeros((contract["num_classes"],) + vol.shape, np.dtype(probabilities)) if probabilities else None)

    def write(block, lab, prob):
        labels[block.slices] = lab
        if probs is not None:
            probs[(slice(None),) + block.slices] = prob

    process_blocks(job, make_blocks(vol.shape, blk), io=(vol, write), backend=engine)
    return labels, probs
