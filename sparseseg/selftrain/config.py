"""Self-training options, parsed once at the edge (CLI, benchmark) into a frozen config."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sparseseg.errors import SparsesegError

MODES = ("distill", "meta")


@dataclass(frozen=True)
class SelfTrainConfig:
    mode: str = "distill"        # distill: one plain 3D network; meta: Zheng's meta-model, one ONNX engine file
    iterations: int = 0          # iterations of the final network; 0: as many as the base networks
    threshold: float = 0.0       # averaged max probability below which a pseudo-labelled voxel is ignored
    backend: str = "auto"        # the engine backend the pseudo-labels are predicted with

    def __post_init__(self):
        if self.mode not in MODES:
            raise SparsesegError(f"unknown --self-train-mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.iterations < 0:
            raise SparsesegError(f"--self-train-iterations must be >= 0, got {self.iterations}")
        if not 0.0 <= self.threshold < 1.0:
            raise SparsesegError(f"--self-train-threshold must lie in [0, 1), got {self.threshold}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_options(options: dict, resume=None, mode: str = "distill") -> None:
    """Training options self-training cannot honour, refused before any training starts."""
    if mode == "meta" and (options.get("normalization") or "global") != "global":
        # The composed engine file takes raw intensities: every part normalizes inside itself.
        raise SparsesegError("--self-train-mode meta supports --normalization global only")
    if resume:
        raise SparsesegError("--resume does not apply to --self-train (it trains several networks)")
    if str(options.get("ndim") or "auto") not in ("auto", "3") or str(options.get("planes") or "auto") != "auto":
        raise SparsesegError("--self-train trains its own 2D base network: leave --ndim and --planes at auto")
    if options.get("val_slices") or options.get("val_fraction"):
        # Held-out slices would be masked in the base networks but learnt back through the
        # pseudo-labels of the final one: the validation IoU would no longer be held out.
        raise SparsesegError("--self-train does not support --val-slices/--val-fraction "
                             "(held-out slices would leak through the pseudo-labels)")


def check_output_name(st: SelfTrainConfig, out) -> None:
    """The meta-model is one ONNX engine file (the composed module is no checkpoint)."""
    if out is not None and st.mode == "meta" and not str(out).lower().endswith(".onnx"):
        raise SparsesegError(f"--self-train-mode meta writes one ONNX engine file: name it .onnx, not {out}")
