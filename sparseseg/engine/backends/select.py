"""The whole choice of backend, device and precision, in one place: which backend runs an engine
file or a model object, on which device, and which precisions each can run. Nothing here loads
a network; CUDA is touched only when the user did not say cpu.

By file type: .pt runs with torch on CUDA and through the fastest installed CPU backend on CPU
(`fastest_cpu_backend`), .onnx with ONNX Runtime (or OpenVINO when pinned), .plan with TensorRT;
reduced precision on CPU means bf16 through OpenVINO (`reduced_cpu_backend`).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

from sparseseg.engine.backends.base import BackendSpec
from sparseseg.errors import SparsesegError

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
KINDS = {".pt": "torch", ".pth": "torch", ".onnx": "onnxruntime", ".plan": "tensorrt", ".engine": "tensorrt",
         ".trt": "tensorrt"}


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def want_cuda(device: str) -> bool:
    """--device cpu never touches CUDA; auto uses it where present."""
    if device == "cpu":
        return False
    if device == "cuda":
        if not cuda_available():
            raise SparsesegError("--device cuda asked for, but no CUDA GPU is available")
        return True
    return cuda_available()


def resolve_device(device: str, engine=None) -> str:
    """cpu or cuda for --device auto|cpu|cuda (a TensorRT plan always runs on cuda): the one rule
    of training and inference."""
    if device not in DEVICES:
        raise SparsesegError(f"unknown device {device!r} (auto, cpu or cuda)")
    if engine is not None and KINDS.get(Path(str(engine)).suffix.lower()) == "tensorrt":
        return "cuda"
    return "cuda" if want_cuda(device) else "cpu"


def resolve_backend(spec: BackendSpec) -> str:
    """The backend an engine file runs with: the pinned one, else by file type (a .pt on CPU runs
    through the fastest installed CPU backend; bf16 on CPU through OpenVINO)."""
    suffix = Path(spec.engine).suffix.lower()
    if suffix not in KINDS:
        raise SparsesegError(f"{spec.engine}: unknown engine type (expected .plan, .onnx or .pt)")
    native = KINDS[suffix]
    if spec.backend not in BACKENDS:
        raise SparsesegError(f"unknown backend {spec.backend!r} (expected one of {', '.join(BACKENDS)})")
    if spec.precision not in PRECISIONS:
        raise SparsesegError(f"unknown precision {spec.precision!r} (expected {', '.join(PRECISIONS)})")
    if spec.precision != "fp32" and native != "tensorrt" and not want_cuda(spec.device):
        return reduced_cpu_backend(spec)
    if spec.backend == "auto":
        if native == "torch" and not want_cuda(spec.device):
            return fastest_cpu_backend()
        return native
    if native == "tensorrt" and spec.backend != "tensorrt" or spec.backend == "tensorrt" and native != "tensorrt":
        raise SparsesegError(f"--backend {spec.backend} cannot run {Path(spec.engine).name} "
                             "(TensorRT runs .plan files only, and .plan files only run with TensorRT)")
    if native == "onnxruntime" and spec.backend == "torch":
        raise SparsesegError("--backend torch needs a .pt checkpoint, not an .onnx file")
    return spec.backend


def model_backend_kind(device: str, precision: str, backend: str) -> str:
    """The backend a model object runs with: the rule for a .pt engine file (`resolve_backend`):
    on CPU the fastest installed one, on CUDA torch; `backend` pins one ("torch", "onnxruntime",
    "openvino")."""
    if backend not in BACKENDS:
        raise SparsesegError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if backend == "tensorrt":
        raise SparsesegError("--backend tensorrt runs .plan files only; export the model with "
                             "sparseseg-export --plan")
    if backend == "auto" and precision != "fp32" and want_cuda(device):
        return "torch"              # fp16/bf16 of a model object on CUDA: torch autocast
    return resolve_backend(BackendSpec("model.pt", device, precision, backend=backend))


def reduced_cpu_backend(spec: BackendSpec) -> str:
    """On CPU reduced precision means bf16, through OpenVINO (on bf16 units: AMX or AVX512-BF16);
    ONNX Runtime and torch have no CPU path for it here."""
    if spec.precision != "bf16":
        raise SparsesegError(f"--precision {spec.precision} needs a CUDA device; on CPU use fp32 or bf16")
    if spec.backend not in ("auto", "openvino"):
        raise SparsesegError(f"--precision bf16 on CPU runs through OpenVINO, not --backend {spec.backend}")
    if importlib.util.find_spec("openvino") is None:
        raise SparsesegError("--precision bf16 on CPU needs the openvino package (pip install openvino)")
    return "openvino"


def fastest_cpu_backend() -> str:
    """The fastest installed CPU backend for a .pt engine or a model object: OpenVINO, else ONNX
    Runtime, else torch (benchmarks/results/cpu_backends.json, monai_cpu_openvino.json; the
    figures are in docs/design/engine.md). OpenVINO is skipped in threads Python did not start:
    run from the napari widget's Qt worker thread it crashed the process."""
    foreign = isinstance(threading.current_thread(), threading._DummyThread)
    for name in (("onnxruntime",) if foreign else ("openvino", "onnxruntime")):
        if importlib.util.find_spec(name) is not None:
            return name
    return "torch"
