"""The references of the CUDA kernels: the engine's own torch functions (engine/tensor_ops.py),
which run on any device. The launchers in `sparseseg.kernels.gpu` take the same arguments; the
`gpu` tests compare them bit for bit (labels, accumulators) and to one quantization step (uint8
probabilities)."""

from sparseseg.engine.tensor_ops import accumulate_same, finalize_same, gather, stitch_valid

__all__ = ["gather", "stitch_valid", "accumulate_same", "finalize_same"]
