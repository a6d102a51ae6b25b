"""Checkpoint -> self-contained ONNX model: what export writes and the engine runs (a .pt engine
on ONNX Runtime or OpenVINO runs this graph), so it lives below both; export/onnx_export.py
verifies it against PyTorch.

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
from pathlib import Path

import torch
from torch import nn

from sparseseg.errors import SparsesegError
from sparseseg.model.contract import CONTRACT_KEY, INPUT_NAME, OUTPUT_NAME, contract_from_checkpoint

log = logging.getLogger("sparseseg.export")

OPSET = 18


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
        # The model's own forward, so a 2D network on all three planes keeps its three passes.
        return self.model(x.float()).float()


def export_module(ckpt, precision: str) -> nn.Module:
    """The module that is exported for `precision` (int8 starts from the fp32 graph)."""
    model = fold_batchnorm(ckpt.model.cpu())
    if precision in ("fp16", "bf16"):
        model = ReducedPrecision(model, torch.float16 if precision == "fp16" else torch.bfloat16)
    return model.eval()


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
