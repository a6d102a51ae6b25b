"""A backend from its spec, loaded once per worker process and reused for every block. A .pt
engine that runs on ONNX Runtime or OpenVINO runs its ONNX export, made once into a cache keyed
by the checkpoint's sha256."""

from __future__ import annotations

import threading
from pathlib import Path

from sparseseg.engine.backends.base import Backend, BackendSpec, cache_dir, log
from sparseseg.engine.backends.onnxruntime import OnnxBackend
from sparseseg.engine.backends.openvino import OpenVinoBackend
from sparseseg.engine.backends.select import resolve_backend
from sparseseg.engine.backends.tensorrt import TensorRTBackend
from sparseseg.engine.backends.torch import TorchBackend
from sparseseg.errors import SparsesegError
from sparseseg.fsutil import atomic_path
from sparseseg.model.onnx_graph import export_onnx


def cached_onnx(checkpoint) -> Path:
    """The ONNX export of a checkpoint, made once and kept under the cache keyed by its sha256
    (written to a temporary file and renamed, so parallel workers never read half a file)."""
    from sparseseg.model.checkpoint import file_sha256, load_checkpoint

    sha = file_sha256(checkpoint)
    path = cache_dir() / "onnx" / f"{sha}.onnx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        export_onnx(load_checkpoint(checkpoint), sha, tmp, "fp32", simplify=False)
    log.info("exported %s to %s for onnxruntime", checkpoint, path)
    return path


def load_backend(spec: BackendSpec) -> Backend:
    if not Path(spec.engine).is_file():
        raise SparsesegError(f"no such engine file: {spec.engine}")
    kind = resolve_backend(spec)
    native_pt = Path(spec.engine).suffix.lower() in (".pt", ".pth")
    if kind == "torch":
        return TorchBackend.from_file(spec)
    if kind == "tensorrt":
        return TensorRTBackend(spec)
    path = cached_onnx(spec.engine) if native_pt else spec.engine
    if kind == "onnxruntime":
        return OnnxBackend(spec, path=path)
    return OpenVinoBackend(spec, path=path)


_CACHE: dict = {}
_LOCK = threading.Lock()


def cached_backend(spec: BackendSpec) -> Backend:
    """The backend for `spec`, loaded once per process."""
    with _LOCK:
        if spec not in _CACHE:
            _CACHE[spec] = load_backend(spec)
        return _CACHE[spec]
