"""TensorRT: a thin wrapper over the export package's PlanRunner (execute_async_v3 on torch's
current stream, one execution context per thread, checked set_input_shape/set_tensor_address)."""

from __future__ import annotations

from sparseseg.engine.backends.base import Backend, BackendSpec
from sparseseg.errors import SparsesegError


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, spec: BackendSpec):
        import torch

        if spec.device == "cpu":
            raise SparsesegError("a TensorRT .plan needs a CUDA device; --device cpu cannot run it")
        try:
            from sparseseg.export.tensorrt import PlanRunner
        except ImportError as e:
            raise SparsesegError(f"cannot run a TensorRT plan: {str(e).splitlines()[0]}") from None
        self.runner = PlanRunner(spec.engine)
        super().__init__(self.runner.contract)
        self.device = torch.device("cuda")
        self.input_dtype = self.runner.input_dtype

    def forward(self, x):
        return self.runner.forward(x.contiguous())
