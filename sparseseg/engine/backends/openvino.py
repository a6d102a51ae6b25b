"""OpenVINO on CPU: reads the ONNX graph directly; fp32, or bf16 on CPUs with bf16 units."""

from __future__ import annotations

import threading

import numpy as np

from sparseseg.engine.backends.base import Backend, BackendSpec
from sparseseg.errors import SparsesegError
from sparseseg.model.contract import read_contract


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, spec: BackendSpec, contract: dict | None = None, path=None):
        try:
            import openvino as ov
        except ImportError:
            raise SparsesegError("--backend openvino needs the openvino package (pip install openvino)") \
                from None
        import torch

        path = str(path or spec.engine)
        super().__init__(contract or read_contract(path))
        if spec.device == "cuda":
            raise SparsesegError("--backend openvino runs on CPU only; use --device cpu")
        core = ov.Core()
        # f32 unless --precision bf16: on CPUs with bf16 units OpenVINO would otherwise pick bf16
        # by itself (labels 96% identical to fp32 on a small test network, measured).
        if spec.precision not in ("fp32", "bf16"):
            raise SparsesegError(f"--precision {spec.precision} needs a CUDA device; on CPU use fp32 or bf16")
        if spec.precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise SparsesegError("--precision bf16 on CPU needs bf16 units (AVX512-BF16 or AMX); this CPU has none")
        config = {"PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[spec.precision]}
        if spec.threads:
            config["INFERENCE_NUM_THREADS"] = spec.threads
        try:
            self.compiled = core.compile_model(core.read_model(path), "CPU", config)
        except Exception as e:
            raise SparsesegError(f"openvino cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        self._local = threading.local()
        self._torch = torch

    def forward(self, x):
        req = getattr(self._local, "req", None)
        if req is None:                      # one infer request per thread
            req = self._local.req = self.compiled.create_infer_request()
        out = req.infer({0: x.contiguous().numpy()})
        return self._torch.from_numpy(np.array(out[self.compiled.output(0)]))
