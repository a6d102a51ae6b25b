"""The export command's logic: check everything cheap first, write to temporary files, verify,
then rename into place, so a failed or interrupted export leaves nothing half-written."""

from __future__ import annotations

import os
from pathlib import Path

from sparseseg.errors import SparsesegError


def run_export(model, onnx_path, plan_path, precision, tiles, batch, workspace, calibration, version_compatible,
               verify: bool, simplify: bool, force: bool) -> list[str]:
    from sparseseg.engine.tiling import check_tile
    from sparseseg.export.onnx_export import ExportReport, export_onnx, verify_onnx
    from sparseseg.model.checkpoint import file_sha256, load_checkpoint

    ckpt = load_checkpoint(model)
    onnx_out = Path(onnx_path) if onnx_path else Path(model).with_suffix(".onnx")
    plan_out = Path(plan_path) if plan_path else None
    if plan_out is None:
        precision = precision or "fp32"
        if precision not in ("fp32", "fp16"):
            raise SparsesegError(f"ONNX models are exported in fp32 or fp16; --precision {precision} is for --plan")
        if tiles:
            raise SparsesegError("--tile applies to TensorRT plans (--plan); ONNX models take any valid size")
        onnx_precision = precision
    else:
        precision = precision or "fp16"
        onnx_precision = "fp32"           # TensorRT chooses reduced precision itself from an fp32 graph
        from sparseseg.export.tensorrt import import_tensorrt

        import_tensorrt()                  # fail before writing anything when it is missing
    for t in tiles:
        check_tile(ckpt.model_config.geometry, t)
    from sparseseg.volume import check_output, open_volume

    for out in (onnx_out, plan_out):
        if out is not None:
            check_output(out, force, "--force")
    if calibration is not None:
        open_volume(calibration)           # a missing calibration volume fails before the export

    sha = file_sha256(model)
    tmp, contract, simplified = export_onnx(ckpt, sha, onnx_out, onnx_precision, simplify=simplify)
    try:
        report = ExportReport(str(onnx_out), False, None, None, False, simplified)
        if verify:
            diff, agree, real = verify_onnx(tmp, ckpt, onnx_precision, calibration)
            report = ExportReport(str(onnx_out), True, diff, agree, real, simplified)
        os.replace(tmp, onnx_out)
    finally:
        if tmp.exists():
            tmp.unlink()
    lines = [report.line()]
    if plan_out is not None:
        from sparseseg.export.tensorrt import build_plan, verify_plan

        side = build_plan(onnx_out, plan_out, contract, precision=precision, tiles=tiles or None, batch=batch,
                          workspace_gb=workspace, calibration=calibration, version_compatible=version_compatible)
        line = f"built {plan_out} ({precision}, TensorRT {side['tensorrt_version']}, {side['gpu_name']})"
        if verify:
            diff, agree = verify_plan(plan_out, onnx_out, ckpt, precision, calibration)
            line += f": vs onnxruntime max |logit diff| {diff:.2e}, argmax agreement {100 * agree:.3f}%"
        lines.append(line)
    return lines
