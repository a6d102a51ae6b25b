"""One small interface over the three engine kinds: `forward(batch) -> logits` on numpy arrays
(N, C, Z, Y, X) float32 -> (N, K, z, y, x) float32, plus the engine's contract.

.pt    PyTorch (CPU, or CUDA in fp32/fp16/bf16)
.onnx  onnxruntime (CPU; CUDA or TensorRT execution providers where installed)
.plan  TensorRT (execute_async_v3 on the current CUDA stream)

Each worker process loads its backend once (`cached_backend`) and reuses it for every block.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparseseg.errors import SparsesegError

log = logging.getLogger("sparseseg.engine")


@dataclass(frozen=True)
class BackendSpec:
    engine: str
    device: str = "auto"        # auto | cpu | cuda
    precision: str = "fp32"     # .pt on CUDA: fp32 | fp16 | bf16
    threads: int = 0            # CPU threads per worker (0: library default)


class Backend(ABC):
    name = "base"
    device = "cpu"

    def __init__(self, contract: dict):
        self.contract = contract

    @abstractmethod
    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, C, Z, Y, X) float32 raw intensities -> (N, K, z, y, x) float32 logits."""


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _want_cuda(device: str) -> bool:
    if device == "cuda":
        if not _cuda_available():
            raise SparsesegError("--device cuda asked for, but no CUDA GPU is available")
        return True
    return device == "auto" and _cuda_available()


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, spec: BackendSpec):
        import torch

        from sparseseg.model.checkpoint import file_sha256, load_checkpoint
        from sparseseg.model.contract import contract_from_checkpoint

        if spec.threads:
            torch.set_num_threads(spec.threads)
        ckpt = load_checkpoint(spec.engine)
        super().__init__(contract_from_checkpoint(ckpt, file_sha256(spec.engine)))
        self.device = "cuda" if _want_cuda(spec.device) else "cpu"
        self.model = ckpt.model.to(self.device).eval()
        self.dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True
            if self.model.cfg.ndim == 3:
                self.model = self.model.to(memory_format=torch.channels_last_3d)
        elif self.dtype is not None:
            raise SparsesegError("--precision fp16/bf16 needs a CUDA device for .pt engines")
        self._torch = torch

    def forward(self, x):
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device, non_blocking=True)
            if self.dtype is not None:
                with torch.autocast("cuda", dtype=self.dtype):
                    return self.model(t).float().cpu().numpy()
            return self.model(t).cpu().numpy()


class OnnxBackend(Backend):
    name = "onnxruntime"

    def __init__(self, spec: BackendSpec):
        import onnxruntime as ort

        from sparseseg.model.contract import read_contract

        super().__init__(read_contract(spec.engine))
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if spec.device != "cpu":
            gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
            if spec.device == "cuda" and not gpu:
                raise SparsesegError("--device cuda with an .onnx engine needs onnxruntime-gpu (CUDA provider)")
            providers = gpu + providers
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if spec.threads:
            opts.intra_op_num_threads = spec.threads
        try:
            self.session = ort.InferenceSession(str(spec.engine), opts, providers=providers)
        except Exception as e:
            raise SparsesegError(f"onnxruntime cannot load {spec.engine}: {str(e).splitlines()[0][:200]}") from None
        self.device = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"
        self.input = self.contract["input_name"]
        self.output = self.contract["output_name"]

    def forward(self, x):
        return self.session.run([self.output], {self.input: np.ascontiguousarray(x, np.float32)})[0]


class TensorRTBackend(Backend):
    name = "tensorrt"
    device = "cuda"

    def __init__(self, spec: BackendSpec):
        from sparseseg.export.tensorrt import load_plan

        engine, side = load_plan(spec.engine)
        super().__init__(side)
        self.engine = engine
        self.context = engine.create_execution_context()
        import torch

        self._torch = torch

    def forward(self, x):
        torch = self._torch
        inp = torch.from_numpy(np.ascontiguousarray(x, np.float32)).cuda(non_blocking=True)
        name_in, name_out = self.contract["input_name"], self.contract["output_name"]
        self.context.set_input_shape(name_in, tuple(inp.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(name_out)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(name_in, inp.data_ptr())
        self.context.set_tensor_address(name_out, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise SparsesegError("TensorRT execution failed")
        return out.cpu().numpy()


def load_backend(spec: BackendSpec) -> Backend:
    suffix = Path(spec.engine).suffix.lower()
    if not Path(spec.engine).is_file():
        raise SparsesegError(f"no such engine file: {spec.engine}")
    if suffix in (".pt", ".pth"):
        return TorchBackend(spec)
    if suffix == ".onnx":
        return OnnxBackend(spec)
    if suffix in (".plan", ".engine", ".trt"):
        return TensorRTBackend(spec)
    raise SparsesegError(f"{spec.engine}: unknown engine type (expected .plan, .onnx or .pt)")


_CACHE: dict = {}
_LOCK = threading.Lock()


def cached_backend(spec: BackendSpec) -> Backend:
    """The backend for `spec`, loaded once per process."""
    with _LOCK:
        if spec not in _CACHE:
            _CACHE[spec] = load_backend(spec)
        return _CACHE[spec]
