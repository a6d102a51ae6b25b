"""The composed meta-model as one ONNX engine file, with the engine contract and a parity check
against PyTorch (the same export and verification as `sparseseg-export`)."""

from __future__ import annotations

import logging
from pathlib import Path

from sparseseg.export.onnx_export import verify_onnx
from sparseseg.fsutil import atomic_path
from sparseseg.model.checkpoint import Checkpoint, file_sha256
from sparseseg.model.onnx_graph import export_onnx, write_contract
from sparseseg.version import __version__

log = logging.getLogger("sparseseg.selftrain")


def export_composed(composed, class_names, ignore_label: int, voxel_size, meta_checkpoint, out_path, info: dict) -> str:
    import onnx

    ckpt = Checkpoint(composed, composed.cfg, None, list(class_names), ignore_label, 0, voxel_size, __version__, {})
    with atomic_path(out_path) as tmp:
        written, contract, _ = export_onnx(ckpt, file_sha256(meta_checkpoint), Path(tmp), "fp32")
        # Say what the graph is: model_config is only the 3D base network's (the engine's
        # tile-memory estimate), the geometry is the composed module's.
        contract["self_train"] = {**info, "composed": "2D base along planes + 3D base -> mean probabilities "
                                                      "-> meta-network on image + probabilities",
                                  "meta_checkpoint": str(meta_checkpoint)}
        proto = onnx.load(str(written))
        write_contract(proto, contract)
        onnx.save(proto, str(written))
        diff, agree, _ = verify_onnx(written, ckpt, "fp32")
    log.info("wrote %s: onnxruntime vs PyTorch max |logit diff| %.2e, argmax agreement %.3f%%", out_path, diff,
             100 * agree)
    return str(out_path)
