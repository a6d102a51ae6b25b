"""ONNX Runtime: host tensors on CPU; IOBinding of device memory with its CUDA provider."""

from __future__ import annotations

import numpy as np

from sparseseg.engine.backends.base import Backend, BackendSpec
from sparseseg.engine.backends.select import want_cuda
from sparseseg.errors import SparsesegError
from sparseseg.model.contract import geometry_of_contract, read_contract

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def ort_cuda_provider(precision: str):
    """ONNX Runtime's CUDA provider with TF32 as --precision says (its default is on)."""
    return ("CUDAExecutionProvider", {"use_tf32": "1" if precision == "tf32" else "0"})


class OnnxBackend(Backend):
    name = "onnxruntime"

    def __init__(self, spec: BackendSpec, contract: dict | None = None, path=None):
        import onnxruntime as ort
        import torch

        path = str(path or spec.engine)
        super().__init__(contract or read_contract(path))
        providers = ["CPUExecutionProvider"]
        cuda = False
        if want_cuda(spec.device):
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" in available:
                providers = [ort_cuda_provider(spec.precision)] + providers
                cuda = True
            elif spec.device == "cuda":
                raise SparsesegError("--device cuda with an .onnx engine needs onnxruntime-gpu (CUDA provider)")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if spec.threads:
            opts.intra_op_num_threads = spec.threads
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers)
        except Exception as e:
            raise SparsesegError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        self.device = torch.device("cuda" if cuda else "cpu")
        self.input = self.contract["input_name"]
        self.output = self.contract["output_name"]
        kind = _ORT_TYPES.get(self.session.get_inputs()[0].type, "float32")
        self.input_dtype = getattr(torch, kind)
        self._torch = torch

    def forward(self, x):
        torch = self._torch
        if self.device.type == "cpu":
            out = self.session.run([self.output], {self.input: x.contiguous().numpy()})[0]
            return torch.from_numpy(out)
        # Device memory in and out (IOBinding): no host round trip. ORT runs on its own stream, so
        # torch's pending work on x must finish first.
        x = x.contiguous()
        geom = geometry_of_contract(self.contract)
        out_shape = (x.shape[0], self.contract["num_classes"]) + geom.output_for_input(x.shape[2:])
        out = torch.empty(out_shape, dtype=torch.float32 if self.input_dtype == torch.float32 else self.input_dtype,
                          device=x.device)
        torch.cuda.current_stream().synchronize()
        bind = self.session.io_binding()
        dev = x.device.index or 0
        bind.bind_input(self.input, "cuda", dev, np.dtype(str(x.dtype).split(".")[1]), tuple(x.shape), x.data_ptr())
        bind.bind_output(self.output, "cuda", dev, np.dtype(str(out.dtype).split(".")[1]), tuple(out.shape),
                         out.data_ptr())
        self.session.run_with_iobinding(bind)
        return out
