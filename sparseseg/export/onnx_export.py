"""Checkpoint -> self-contained ONNX model, validated against PyTorch.

The graph takes raw float32 intensities (N, C, Z, Y, X) and returns float32 logits; BatchNorm
is folded into the convolutions, normalization is the graph's first op, batch and spatial axes
are dynamic (any valid size, so a whole volume can also run in one pass).

The graph carries its precision, because TensorRT builds strongly typed networks (TensorRT 11
removed the FP16/BF16/INT8 builder flags; see the 10.x -> 11.x migration guide,
docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-patterns.html):
fp16/bf16 graphs keep float32 inputs and outputs, normalize in float32 and run the first
convolution in float32 (raw uint16 intensities overflow fp16, and the normalized input keeps its
resolution), then compute in half precision; int8 graphs are fp32 graphs with Q/DQ nodes
(export/quantize.py).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparseseg.errors import SparsesegError
from sparseseg.model.contract import CONTRACT_KEY, INPUT_NAME, OUTPUT_NAME, contract_from_checkpoint

log = logging.getLogger("sparseseg.export")

OPSET = 18
# fp32 must match PyTorch to 1e-4 (the bound). Reduced precisions are compared with the
# fp32 PyTorch model: rounding of ~20 layers of half-precision activations; the bound is relative
# to the logit range so that it holds for any intensity scale. bf16 keeps 8 mantissa bits against
# fp16's 11, hence its looser bound. int8 logits are not bounded, only the labels (the same
# agreement as fp16): a calibrated int8 model moves logits by more than rounding does.
FP32_ATOL = 1e-4
RTOL = {"fp16": 2e-2, "bf16": 1e-1}
ARGMAX_FP16_MIN_AGREEMENT = 0.99


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every BatchNorm (eval statistics) folded into the convolution before it."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, (nn.Conv2d, nn.Conv3d)) and isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d)):
                scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
                shape = (-1,) + (1,) * (conv.weight.dim() - 1)
                with torch.no_grad():
                    conv.weight.mul_(scale.view(shape))
                    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
                    new_bias = (bias - bn.running_mean) * scale + bn.bias.detach()
                    if conv.bias is None:
                        conv.bias = nn.Parameter(new_bias)
                    else:
                        conv.bias.copy_(new_bias)
                module._modules[b] = nn.Identity()
    return model


class _FirstLayerFloat(nn.Module):
    """The first convolution in float32 on the float32 normalized input, its output cast down."""

    def __init__(self, conv: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.conv = conv.float()
        self.dtype = dtype

    def forward(self, x):
        return self.conv(x.float()).to(self.dtype)


class ReducedPrecision(nn.Module):
    """float32 in -> normalize (and filter bank) in float32 -> first convolution in float32 ->
    the rest of the network in `dtype` (float16 or bfloat16) -> float32 logits. Exported as is,
    so the ONNX graph states every tensor's type and a strongly typed TensorRT build follows it."""

    def __init__(self, model, dtype: torch.dtype):
        super().__init__()
        self.model = model
        first = copy.deepcopy(model.net.down[0][0])
        model.net.to(dtype)
        model.net.down[0][0] = _FirstLayerFloat(first, dtype)

    def forward(self, x):
        return self.model.apply_net(self.model.prepare(x.float())).float()


def export_module(ckpt, precision: str) -> nn.Module:
    """The module that is exported for `precision` (int8 starts from the fp32 graph)."""
    model = fold_batchnorm(ckpt.model.cpu())
    if precision in ("fp16", "bf16"):
        model = ReducedPrecision(model, torch.float16 if precision == "fp16" else torch.bfloat16)
    return model.eval()


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


def export_onnx(ckpt, ckpt_sha256: str, out: Path, precision: str = "fp32", simplify: bool = True) -> tuple:
    """Write the ONNX model (fp32, fp16 or bf16) to `out` and return (out, contract, simplifier).
    Callers that put it under a final name pass the temporary of `fsutil.atomic_path`, so it is
    renamed into place only after verification."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise SparsesegError(f"ONNX precision must be fp32, fp16 or bf16 here, got {precision}")
    model = export_module(ckpt, precision)
    geom = ckpt.model_config.geometry
    dummy = torch.zeros((1, ckpt.model_config.in_channels) + geom.min_input)
    tmp = Path(out)
    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: dynamic spatial axes through the crop arithmetic of the skip
        # connections, in a fraction of a second (the dynamo exporter takes ~15 s here).
        torch.onnx.export(model, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {k: f"out_{v}" for k, v in axes.items()}})
    import onnx

    proto = onnx.load(str(tmp))
    simplified = None
    if simplify:
        proto, simplified = _simplify(proto)
    contract = contract_from_checkpoint(ckpt, ckpt_sha256, precision)
    contract["opset"] = OPSET
    write_contract(proto, contract)
    onnx.save(proto, str(tmp))
    return tmp, contract, simplified


def write_contract(proto, contract: dict):
    """Replace the model's metadata with the contract (also after quantization rewrote it)."""
    del proto.metadata_props[:]
    for key, value in ((CONTRACT_KEY, json.dumps(contract)), ("sparseseg.version", contract["sparseseg_version"]),
                       ("sparseseg.checkpoint_sha256", contract["checkpoint_sha256"])):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "sparseseg"


def _simplify(proto):
    """onnxslim or onnxsim when installed; the export does not depend on them."""
    try:
        import onnxslim

        return onnxslim.slim(proto), "onnxslim"
    except ImportError:
        pass
    except Exception as e:  # a simplifier bug must not fail the export: keep the plain graph
        log.warning("onnxslim failed (%s); keeping the unsimplified graph", e)
        return proto, None
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(proto)
        return (simplified, "onnxsim") if ok else (proto, None)
    except ImportError:
        return proto, None
    except Exception as e:
        log.warning("onnxsim failed (%s); keeping the unsimplified graph", e)
        return proto, None


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
