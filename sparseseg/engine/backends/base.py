"""What every backend shares: the spec a worker loads a backend from, the interface
`forward(x) -> logits` on torch tensors, and the contract of an in-memory model.

x is (N, C, Z, Y, X) on `backend.device` (a torch.device) in `backend.input_dtype`; the logits
(N, K, z, y, x) come back on the same device, so the block pipeline keeps everything on the
device from the upload to the argmax, whatever runs the network.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from sparseseg.model.contract import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger("sparseseg.engine")


@dataclass(frozen=True)
class BackendSpec:
    engine: str
    device: str = "auto"        # auto | cpu | cuda
    precision: str = "fp32"     # fp32 | tf32 | fp16 | bf16: CUDA autocast for .pt; on CPU bf16 runs OpenVINO
    threads: int = 0            # CPU threads per worker (0: library default)
    backend: str = "auto"       # auto | torch | onnxruntime | openvino | tensorrt


class Backend(ABC):
    name = "base"

    def __init__(self, contract: dict):
        import torch

        self.contract = contract
        self.device = torch.device("cpu")
        self.input_dtype = torch.float32

    @abstractmethod
    def forward(self, x):
        """(N, C, Z, Y, X) tensor on self.device -> (N, K, z, y, x) logits on self.device."""


def model_contract(model) -> dict:
    """The contract of an in-memory SegmentationModel (what `sparseseg.predict` needs). Its
    normalization is the model's own (`model.normalization`): "global" lives in the graph's
    buffers (in_graph true: the gather leaves the input raw); "volume"/"percentile" keep an
    identity in the graph (in_graph false: the gather applies the input volume's statistics,
    plan.gather_normalization). So it is applied exactly once, whichever backend runs."""
    cfg = model.cfg
    return {"format": "sparseseg-engine", "in_channels": cfg.in_channels, "num_classes": cfg.num_classes,
            "class_names": [f"class_{k}" for k in range(cfg.num_classes)], "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME, "geometry": cfg.geometry.to_dict(), "model_config": cfg.to_dict(),
            "normalization": model.normalization}


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSESEG_CACHE") or Path.home() / ".cache" / "sparseseg")
