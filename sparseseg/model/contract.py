"""The contract every engine file carries, so `sparseseg-infer --engine X` needs nothing else:
tile geometry rules, channels, classes, ignore value, normalization, provenance.

Where it lives: ONNX `metadata_props` (key `sparseseg.contract`, JSON), a TensorRT plan's
sidecar `<plan>.json`, or the checkpoint itself for `.pt` engines.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparseseg.errors import SparsesegError
from sparseseg.model.checkpoint import file_sha256, load_checkpoint
from sparseseg.model.shapes import NetGeometry
from sparseseg.version import __version__

CONTRACT_KEY = "sparseseg.contract"
CONTRACT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def contract_from_checkpoint(ckpt, checkpoint_sha256: str, precision: str = "fp32") -> dict:
    cfg = ckpt.model_config
    return {
        "format": "sparseseg-engine",
        "contract_version": CONTRACT_VERSION,
        "sparseseg_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "layout": "NCZYX",
        "input": "raw float32 intensities; normalization is inside the graph" if ckpt.normalization["in_graph"]
        else f"float32 intensities normalized per input volume ({ckpt.normalization['mode']}): see normalization",
        "output": "float32 class logits",
        "in_channels": cfg.in_channels,
        "num_classes": cfg.num_classes,
        "class_names": list(ckpt.class_names),
        "ignore_label": ckpt.ignore_label,
        "normalization": ckpt.normalization,
        "voxel_size": ckpt.voxel_size,
        "model_config": cfg.to_dict(),
        "geometry": cfg.geometry.to_dict(),
        "precision": precision,
    }


def geometry_of_contract(contract: dict):
    return NetGeometry.from_dict(contract["geometry"])


def _check(contract, source) -> dict:
    if not isinstance(contract, dict) or contract.get("format") != "sparseseg-engine":
        raise SparsesegError(f"{source}: no sparseseg contract in this file (was it exported by sparseseg-export?)")
    if int(contract.get("contract_version", 0)) > CONTRACT_VERSION:
        raise SparsesegError(f"{source}: contract version {contract['contract_version']} is newer than this "
                             f"sparseseg ({__version__}) reads; upgrade sparseseg")
    return contract


def read_contract(path) -> dict:
    """The contract of any engine file: .onnx, .plan/.engine (sidecar JSON) or .pt checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise SparsesegError(f"no such engine file: {p}")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        import onnx

        try:
            model = onnx.load(str(p), load_external_data=False)
        except Exception as e:
            raise SparsesegError(f"{p} is not a readable ONNX model ({str(e).splitlines()[0][:120]})") from None
        props = {m.key: m.value for m in model.metadata_props}
        if CONTRACT_KEY not in props:
            raise SparsesegError(f"{p}: no sparseseg contract in this file (was it exported by sparseseg-export?)")
        return _check(json.loads(props[CONTRACT_KEY]), p)
    if suffix in (".plan", ".engine", ".trt"):
        side = sidecar_path(p)
        if not side.is_file():
            raise SparsesegError(f"{p}: its contract {side.name} is missing (keep the .json next to the plan)")
        try:
            return _check(json.loads(side.read_text()), side)
        except json.JSONDecodeError:
            raise SparsesegError(f"{side} is not valid JSON") from None
    if suffix in (".pt", ".pth"):
        return contract_from_checkpoint(load_checkpoint(p), file_sha256(p))
    raise SparsesegError(f"{p}: unknown engine type (expected .plan, .onnx or .pt)")


def sidecar_path(plan_path) -> Path:
    p = Path(plan_path)
    return p.with_name(p.name + ".json")
