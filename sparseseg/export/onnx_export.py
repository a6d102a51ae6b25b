"""Verification of the exported ONNX graph (model/onnx_graph.py builds it) against PyTorch, and
the report of an export."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparseseg.errors import SparsesegError
from sparseseg.model.contract import INPUT_NAME, OUTPUT_NAME
from sparseseg.model.onnx_graph import export_module

# fp32 must match PyTorch to 1e-4 (the bound). Reduced precisions are compared with the
# fp32 PyTorch model: rounding of ~20 layers of half-precision activations; the bound is relative
# to the logit range so that it holds for any intensity scale. bf16 keeps 8 mantissa bits against
# fp16's 11, hence its looser bound. int8 logits are not bounded, only the labels (the same
# agreement as fp16): a calibrated int8 model moves logits by more than rounding does.
FP32_ATOL = 1e-4
RTOL = {"fp16": 2e-2, "bf16": 1e-1}
ARGMAX_FP16_MIN_AGREEMENT = 0.99


@dataclass
class ExportReport:
    path: str
    checker: bool
    max_abs_diff: float | None
    argmax_agreement: float | None
    real_tile: bool
    simplified: str | None
    precision: str = "fp32"

    def line(self) -> str:
        if self.max_abs_diff is None:
            return f"exported {self.path} ({self.precision}, verification skipped)"
        tile = "a real tile" if self.precision == "int8" else \
            "random and real tiles" if self.real_tile else "a random tile"
        # onnxruntime has no bf16 Conv on CPU: the exported bf16 module is what ran
        runner = "PyTorch bf16 module" if self.precision == "bf16" else f"onnxruntime ({self.precision})"
        return (f"exported {self.path}: onnx.checker ok, {runner} vs PyTorch fp32 on {tile}: max |logit diff| "
                f"{self.max_abs_diff:.2e}, argmax agreement {100 * self.argmax_agreement:.3f}%"
                + (f", simplified with {self.simplified}" if self.simplified else ""))


def ort_session(path, providers=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(max |logit difference|, argmax agreement fraction)."""
    diff = float(np.abs(reference - candidate).max())
    agree = float((reference.argmax(1) == candidate.argmax(1)).mean())
    return diff, agree


def check_parity(reference, candidate, precision: str, what: str):
    """Raise unless `candidate` (logits) is within the bound of `precision` of `reference`."""
    diff, agree = compare(reference, candidate)
    if precision == "fp32":
        # Agreement, not identical argmax: within 1e-4 an exact tie may still flip.
        ok = diff <= FP32_ATOL and agree >= ARGMAX_FP16_MIN_AGREEMENT
        bound = f"max |diff| <= {FP32_ATOL:g} and >= {100 * ARGMAX_FP16_MIN_AGREEMENT:g}% argmax"
    elif precision == "int8":
        ok = agree >= ARGMAX_FP16_MIN_AGREEMENT
        bound = f">= {100 * ARGMAX_FP16_MIN_AGREEMENT:g}% argmax"
    else:
        rtol = RTOL[precision]
        scale = float(np.abs(reference).max()) or 1.0
        ok = diff <= rtol * scale and agree >= ARGMAX_FP16_MIN_AGREEMENT
        bound = f"max |diff| <= {rtol:g} x max|logit| and >= {100 * ARGMAX_FP16_MIN_AGREEMENT:g}% argmax"
    if not ok:
        raise SparsesegError(f"verification failed on {what}: max |logit diff| {diff:.3e}, argmax agreement "
                             f"{100 * agree:.3f}% (required: {bound}); rerun with --no-verify to keep it anyway")
    return diff, agree


def verification_tiles(ckpt, calibration=None, seed: int = 0, shape=None, random_tile: bool = True):
    """A random tile in the model's normalized intensity range (unless `random_tile` is False:
    int8 scales are calibrated on real images, noise is outside what they cover), and a real
    tile from the middle of the calibration volume when given; `shape` (Z, Y, X) defaults to a
    small valid input."""
    cfg = ckpt.model_config
    geom = cfg.geometry
    shape = tuple(shape) if shape else geom.input_for_output(tuple(r.output_at_least(r.step + 1) for r in geom.axes))
    rng = np.random.default_rng(seed)
    mean = np.asarray(ckpt.normalization["mean"], np.float32).reshape(-1, 1, 1, 1)
    std = np.asarray(ckpt.normalization["std"], np.float32).reshape(-1, 1, 1, 1)
    tiles = []
    if random_tile:
        tiles.append(("a random tile", rng.normal(size=(1, cfg.in_channels) + shape).astype(np.float32) * std + mean))
    if calibration is not None:
        from sparseseg.volume import check_finite, open_volume

        vol = open_volume(calibration)
        if vol.channels != cfg.in_channels:
            raise SparsesegError(f"--calibration {calibration} has {vol.channels} channels, the model "
                                 f"expects {cfg.in_channels}")
        start = [max(0, (n - s) // 2) for n, s in zip(vol.shape, shape)]
        region = tuple(slice(a, a + s) for a, s in zip(start, shape))
        real = np.array(vol.read(region, dtype=np.float32))   # writable copy, not a read-only memmap
        check_finite(real, f"--calibration {calibration}")
        if real.shape[1:] != shape:
            from sparseseg.engine.tiling import pad_region

            real = pad_region(real, (0, 0, 0), [s - n for s, n in zip(shape, real.shape[1:])])
        tiles.append(("a real tile", real[None]))
    return tiles


def verify_onnx(path, ckpt, precision: str, calibration=None) -> tuple[float, float, bool]:
    """onnx.checker, then the graph under onnxruntime against the fp32 PyTorch model. bf16:
    onnxruntime has no bfloat16 Conv on CPU, so the exported bf16 module runs in PyTorch instead
    (the graph itself is checked by the TensorRT build and verify_plan on the GPU)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise SparsesegError(f"onnx.checker rejected the exported model: {str(e).splitlines()[0]}") from None
    if precision == "bf16":
        module = export_module(ckpt, "bf16")

        def run(x):
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()
    else:
        sess = ort_session(path)

        def run(x):
            return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    model = ckpt.model.cpu().eval()
    worst_diff, worst_agree = 0.0, 1.0
    tiles = verification_tiles(ckpt, calibration, random_tile=precision != "int8")
    if not tiles:
        raise SparsesegError("verifying an int8 model needs --calibration (real images)")
    for what, x in tiles:
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        diff, agree = check_parity(ref, run(x), precision, what)
        worst_diff, worst_agree = max(worst_diff, diff), min(worst_agree, agree)
    return worst_diff, worst_agree, any(what == "a real tile" for what, _ in tiles)
