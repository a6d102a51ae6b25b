"""One export run: the ONNX model, and a TensorRT plan built from it.

Everything cheap is checked first; outputs are written to temporary files, verified, then
renamed into place, so a failed or interrupted export leaves nothing half-written.

The ONNX file is the graph a plan is built from: it carries the precision (fp16/bf16 tensors,
or int8 Q/DQ nodes calibrated on --calibration), because TensorRT builds strongly typed networks.
"""

from __future__ import annotations

from pathlib import Path

from sparseseg.errors import SparsesegError


def run_export(model, onnx_path, plan_path, precision, tile, batch, workspace, calibration, version_compatible,
               verify: bool, simplify: bool, force: bool, tile_min=None, tile_max=None,
               hardware_compatible: bool = False) -> list[str]:
    from sparseseg.engine.tiling import check_tile
    from sparseseg.export.onnx_export import ExportReport, verify_onnx
    from sparseseg.model.onnx_graph import export_onnx
    from sparseseg.fsutil import atomic_path, temporary_sibling
    from sparseseg.model.checkpoint import file_sha256, load_checkpoint
    from sparseseg.model.contract import contract_from_checkpoint

    ckpt = load_checkpoint(model)
    onnx_out = Path(onnx_path) if onnx_path else Path(model).with_suffix(".onnx")
    plan_out = Path(plan_path) if plan_path else None
    geometry = ckpt.model_config.geometry
    tiles_given = [t for t in (tile, tile_min, tile_max) if t is not None]
    if plan_out is None:
        precision = precision or "fp32"
        if precision == "bf16":
            raise SparsesegError("bf16 ONNX models are for TensorRT plans (--plan): onnxruntime has no bfloat16 "
                                 "convolution on CPU")
        if tiles_given:
            raise SparsesegError("--tile/--tile-min/--tile-max apply to TensorRT plans (--plan); ONNX models take "
                                 "any valid size")
    else:
        precision = precision or "fp16"
        from sparseseg.engine.backends.tensorrt import import_tensorrt

        import_tensorrt()                  # fail before writing anything when it is missing
    if precision == "int8" and calibration is None:
        raise SparsesegError("--precision int8 needs --calibration VOLUME (representative images to calibrate "
                             "the int8 scales)")
    for t in tiles_given:
        check_tile(geometry, t)
    from sparseseg.volume import check_output, open_volume

    for out in (onnx_out, plan_out):
        if out is not None:
            check_output(out, force, "--force")
    if calibration is not None:
        open_volume(calibration)           # a missing calibration volume fails before the export
    sha = file_sha256(model)
    profile = None
    if plan_out is not None:
        from sparseseg.export.tensorrt import default_plan_tile, profile_shapes

        opt = tile or default_plan_tile(contract_from_checkpoint(ckpt, sha, precision), "cuda")
        profile = profile_shapes(geometry, ckpt.model_config.in_channels, opt, tile_min, tile_max, batch)

    with atomic_path(onnx_out) as tmp:          # renamed into place only once verified
        _, contract, simplified = export_onnx(ckpt, sha, tmp, "fp32" if precision == "int8" else precision,
                                              simplify=simplify)
        qtmp = temporary_sibling(tmp)           # scratch of the int8 rewrite
        try:
            if precision == "int8":
                contract = _quantize(tmp, qtmp, contract, ckpt, calibration)
            report = ExportReport(str(onnx_out), False, None, None, False, simplified, precision)
            if verify:
                diff, agree, real = verify_onnx(tmp, ckpt, precision, calibration)
                report = ExportReport(str(onnx_out), True, diff, agree, real, simplified, precision)
        finally:
            qtmp.unlink(missing_ok=True)
    lines = [report.line()]
    if plan_out is not None:
        from sparseseg.engine.backends.tensorrt import describe_profile
        from sparseseg.export.tensorrt import build_plan, verify_plan

        side = build_plan(onnx_out, plan_out, contract, profile, workspace_gb=workspace,
                          version_compatible=version_compatible, hardware_compatible=hardware_compatible)
        line = (f"built {plan_out} ({precision}, strongly typed, TensorRT {side['tensorrt_version']}, "
                f"{side['gpu_name']}; profile {describe_profile(profile)})")
        if verify:
            diff, agree = verify_plan(plan_out, ckpt, precision, calibration)
            line += f": vs PyTorch fp32 max |logit diff| {diff:.2e}, argmax agreement {100 * agree:.3f}%"
        lines.append(line)
    return lines


def _quantize(fp32_tmp: Path, q_tmp: Path, contract: dict, ckpt, calibration) -> dict:
    """Replace the fp32 graph at `fp32_tmp` by its Q/DQ int8 version; returns the new contract."""
    import onnx

    from sparseseg.model.onnx_graph import write_contract
    from sparseseg.export.quantize import calibration_shape, calibration_tiles, quantize_int8

    tiles = calibration_tiles(calibration, ckpt.model_config.in_channels, calibration_shape(ckpt.model_config.geometry))
    info = quantize_int8(fp32_tmp, q_tmp, tiles)
    contract = dict(contract, precision="int8", quantization=dict(info, calibration=str(calibration)))
    proto = onnx.load(str(q_tmp))
    write_contract(proto, contract)
    onnx.save(proto, str(fp32_tmp))
    return contract
