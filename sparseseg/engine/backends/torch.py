"""PyTorch: CPU, or CUDA with channels_last_3d, autocast fp16/bf16 and cudnn.benchmark."""

from __future__ import annotations

import contextlib
import copy

from sparseseg.engine.backends.base import Backend, BackendSpec
from sparseseg.engine.backends.select import want_cuda
from sparseseg.errors import SparsesegError
from sparseseg.model.contract import contract_from_checkpoint


@contextlib.contextmanager
def math_mode(precision: str):
    """cuDNN and matmul TF32 on only for --precision tf32 (torch enables it for cuDNN by default,
    so GPU fp32 labels would differ from CPU ones at near-ties); the caller's flags come back after."""
    import torch

    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
    before = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = precision == "tf32"
        yield
    finally:
        for f, b in zip(flags, before):
            f.allow_tf32 = b


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, contract: dict, device: str = "auto", precision: str = "fp32", threads: int = 0,
                 owned: bool = False):
        """`owned`: the model is this backend's (loaded from a file); otherwise a copy runs, so
        the caller's model keeps its device, memory format and train/eval mode."""
        import torch

        super().__init__(contract)
        if threads:
            torch.set_num_threads(threads)
        cuda = want_cuda(device)
        self.device = torch.device("cuda" if cuda else "cpu")
        self.model = (model if owned else copy.deepcopy(model)).to(self.device).eval()
        self.precision = precision
        self.autocast = {"fp32": None, "tf32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.channels_last = False
        if cuda:
            torch.backends.cudnn.benchmark = True           # once per tile shape
            if model.cfg.ndim == 3:
                self.model = self.model.to(memory_format=torch.channels_last_3d)
                self.channels_last = True
        elif precision != "fp32":
            raise SparsesegError(f"--precision {precision} needs a CUDA device for .pt engines")
        self._torch = torch

    @classmethod
    def from_file(cls, spec: BackendSpec):
        from sparseseg.model.checkpoint import file_sha256, load_checkpoint

        ckpt = load_checkpoint(spec.engine)
        return cls(ckpt.model, contract_from_checkpoint(ckpt, file_sha256(spec.engine)), spec.device,
                   spec.precision, spec.threads, owned=True)

    def forward(self, x):
        torch = self._torch
        with torch.inference_mode(), math_mode(self.precision):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            if self.autocast is not None:
                with torch.autocast("cuda", dtype=self.autocast):
                    return self.model(x)
            return self.model(x)
