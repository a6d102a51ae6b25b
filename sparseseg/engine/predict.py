"""`sparseseg.predict`: the engine's block pipeline on an in-memory array, in this process.

The same code as `sparseseg-infer` (plan, tiles, gather, forward, stitch), with the store
replaced by the array and, for a model object, the engine file replaced by the model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import threading
from pathlib import Path

import numpy as np

from sparseseg.version import __version__
from sparseseg.engine.backends import cached_backend
from sparseseg.engine.backends.base import BackendSpec, model_contract
from sparseseg.engine.backends.onnxruntime import OnnxBackend
from sparseseg.engine.backends.openvino import OpenVinoBackend
from sparseseg.engine.backends.select import model_backend_kind
from sparseseg.engine.backends.torch import TorchBackend
from sparseseg.engine.blocks import make_blocks
from sparseseg.engine.job import plan_job
from sparseseg.engine.worker import process_blocks
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


def model_digest(model) -> str:
    """sha256 of what decides a model's outputs: configuration, normalization and every tensor
    of its state (weights change between two calls during training)."""
    h = hashlib.sha256(json.dumps([model.cfg.to_dict(), model.normalization], sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


_MODEL_CACHE: dict = {}       # (digest, kind, device, precision) -> backend: repeated calls on one model export once
_MODEL_LOCK = threading.Lock()    # e.g. the napari widget's worker thread beside the caller's


def model_backend(model, device: str = "auto", precision: str = "fp32", backend: str = "auto"):
    """The backend for an in-memory SegmentationModel. ONNX Runtime / OpenVINO run the model's
    fp32 ONNX export (the same export as `backends.load.cached_onnx` makes of a .pt file), written to
    a temporary directory and loaded once; the last model's backend is kept for the next call
    while its weights are unchanged."""
    contract = model_contract(model)
    kind = model_backend_kind(device, precision, backend)
    if kind == "torch":
        return TorchBackend(model, contract, device, precision)
    digest = model_digest(model)
    with _MODEL_LOCK:
        key = (digest, kind, device, precision)
        if key not in _MODEL_CACHE:
            engine = _exported_backend(model, contract, digest, kind, device, precision)
            _MODEL_CACHE.clear()
            _MODEL_CACHE[key] = engine
        return _MODEL_CACHE[key]


def _exported_backend(model, contract, digest, kind, device, precision):
    from sparseseg.model.checkpoint import Checkpoint
    from sparseseg.model.onnx_graph import export_onnx

    cpu_model = copy.deepcopy(model).cpu().eval()         # the caller's model stays where it is
    cfg = cpu_model.cfg
    ckpt = Checkpoint(cpu_model, cfg, None, list(contract["class_names"]), 255, 0, None, __version__, {})
    spec = BackendSpec("<in-memory model>", device, precision, backend=kind)
    with tempfile.TemporaryDirectory(prefix="sparseseg-predict-") as tmp:
        path = Path(tmp) / "model.onnx"
        written, _, _ = export_onnx(ckpt, digest, path, "fp32", simplify=False)
        # Both runtimes read the whole graph when the session is made: the file may go after.
        return OnnxBackend(spec, contract, path=written) if kind == "onnxruntime" else \
            OpenVinoBackend(spec, contract, path=written)


def predict(model_or_engine_file, array, *, tile=None, batch=None, block=None, overlap: float = 0.5,
            device: str = "auto", precision: str = "fp32", probabilities=None, backend: str = "auto",
            kernels: str | None = None):
    """Dense labels (Z, Y, X) uint8 for an in-memory (Z, Y, X) or (C, Z, Y, X) array, and
    probabilities (K, Z, Y, X) when asked for (`probabilities`: "uint8" (p*255), "float16",
    "float32" or True = float32), else None.

    `model_or_engine_file`: a SegmentationModel (e.g. `sparseseg.load_model(...)` or a model
    just trained), or an engine file (.pt, .onnx, .plan). Both run with the backend
    `sparseseg-infer` would pick for them (a model object as a .pt file: the fastest installed
    CPU backend on CPU, torch on CUDA), unless `backend` pins one ("torch", "onnxruntime",
    "openvino"). `precision`: "fp32" (TF32 off on CUDA), "tf32" (CUDA), or "fp16"/"bf16" (torch autocast
    on CUDA; on CPU bf16
    through OpenVINO, where the CPU has bf16 units). `kernels`:
    "torch" (default, or $SPARSESEG_KERNELS) or "cuda" for the CUDA gather/stitch kernels."""
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise SparsesegError(f"predict needs a (Z, Y, X) or (C, Z, Y, X) array, got shape {array.shape}")
    probabilities = _probabilities_option(probabilities)
    vol = ArrayVolume(array)
    engine, spec = _backend_and_spec(model_or_engine_file, device, precision, backend)
    contract = engine.contract
    if vol.channels != contract["in_channels"]:
        raise SparsesegError(f"the array has {vol.channels} channel(s), the model expects {contract['in_channels']}")
    plan = plan_job(contract, vol.shape, spec, engine.device.type, kernels=kernels, block=block, tile=tile,
                    batch=batch, overlap=overlap)
    job = plan.block_job(vol, "<memory>", "<memory>", probabilities)
    labels = np.zeros(vol.shape, np.uint8)
    probs = (np.zeros((contract["num_classes"],) + vol.shape, np.dtype(probabilities)) if probabilities else None)

    def write(block, lab, prob):
        labels[block.slices] = lab
        if probs is not None:
            probs[(slice(None),) + block.slices] = prob

    process_blocks(job, make_blocks(vol.shape, plan.block), io=(vol, write), backend=engine)
    return labels, probs


def _probabilities_option(probabilities):
    if probabilities is True:
        probabilities = "float32"
    if probabilities not in (None, False, "uint8", "float16", "float32"):
        raise SparsesegError(f"probabilities must be uint8, float16 or float32, not {probabilities!r}")
    return probabilities or None


def _backend_and_spec(model_or_engine_file, device, precision, backend):
    """(the loaded backend, its spec): an engine file's cached backend, or a model object's."""
    if isinstance(model_or_engine_file, (str, Path)):
        spec = BackendSpec(str(Path(model_or_engine_file).resolve()), device, precision, backend=backend)
        return cached_backend(spec), spec
    engine = model_backend(model_or_engine_file, device, precision, backend)
    return engine, BackendSpec("<in-memory model>", device, precision, backend=engine.name)
