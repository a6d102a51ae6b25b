"""sparseseg: dense 3D segmentation from a few annotated slices.

Imports stay light: torch is only imported when a model is loaded.
"""

from sparseseg.version import __version__

__all__ = ["__version__", "load_model", "predict"]


def load_model(path, device="cpu"):
    """Load a checkpoint as an eval-mode torch module.

    The module maps raw float32 intensities (N, C, Z, Y, X) to class logits; it applies the
    checkpoint's normalization itself, so an exported graph is self-contained.
    """
    from sparseseg.model.checkpoint import load_checkpoint

    return load_checkpoint(path, device=device).model


def predict(model_or_engine_file, array, **options):
    """Dense labels for an in-memory (Z, Y, X) or (C, Z, Y, X) array through the engine's block
    pipeline (the same code as `sparseseg-infer`); returns (labels, probabilities or None).
    See `sparseseg.engine.predict.predict` for the options (tile, batch, block, device,
    precision, probabilities, backend)."""
    from sparseseg.engine.predict import predict as _predict

    return _predict(model_or_engine_file, array, **options)
