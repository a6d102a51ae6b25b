"""One small interface over the engine kinds, one module each: `forward(x) -> logits` on torch
tensors on the backend's device.

base.py         BackendSpec, Backend, the contract of an in-memory model
select.py       the whole choice of backend, device and precision
torch.py        .pt: PyTorch (CPU, or CUDA with channels_last_3d, autocast fp16/bf16)
onnxruntime.py  .onnx: ONNX Runtime (host tensors on CPU; IOBinding with its CUDA provider)
openvino.py     .onnx (or a .pt's export) on CPU, fp32 or bf16
tensorrt.py     .plan: TensorRT
load.py         a backend from its spec, once per worker process

The names below are the package's public ones (tests, benchmarks and users import them here).
"""

from sparseseg.engine.backends.base import Backend, BackendSpec, cache_dir, model_contract
from sparseseg.engine.backends.load import cached_backend, cached_onnx, load_backend
from sparseseg.engine.backends.onnxruntime import OnnxBackend, ort_cuda_provider
from sparseseg.engine.backends.openvino import OpenVinoBackend
from sparseseg.engine.backends.select import (BACKENDS, PRECISIONS, cuda_available, fastest_cpu_backend,
                                              model_backend_kind, reduced_cpu_backend, resolve_backend,
                                              resolve_device, want_cuda)
from sparseseg.engine.backends.tensorrt import TensorRTBackend
from sparseseg.engine.backends.torch import TorchBackend, math_mode

__all__ = ["BACKENDS", "PRECISIONS", "Backend", "BackendSpec", "OnnxBackend", "OpenVinoBackend", "TensorRTBackend",
           "TorchBackend", "cache_dir", "cached_backend", "cached_onnx", "cuda_available", "fastest_cpu_backend",
           "load_backend", "math_mode", "model_backend_kind", "model_contract", "ort_cuda_provider",
           "reduced_cpu_backend", "resolve_backend", "resolve_device", "want_cuda"]
