"""TensorRT plans from the exported ONNX model, with their contract in a sidecar JSON; the engine
runs them (engine/backends/tensorrt.py: the sidecar checks and PlanRunner).

Strongly typed builds only: TensorRT 11 removed the precision builder flags (FP16, BF16, INT8)
and the INT8 calibrators; a network's precision is the ONNX graph's (fp16/bf16 tensors, INT8 from
Q/DQ nodes). Sources: "Python Migration Patterns for TensorRT 11.x" and "Removed Python APIs and
Replacements" (docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-
python-api-patterns.html and ...-python-api-reference.html); the Builder page, where
NetworkDefinitionCreationFlag.STRONGLY_TYPED exists in 10.x and is "retained for API
compatibility but ignored" in 11.x (strong typing always on), so one code path serves both.
Every TensorRT name used here was checked against the tensorrt-cu13-bindings 11.4.0.106 wheel
(the report of the change lists them); TensorRT cannot be installed on the CI machines, so the
pure parts (profile shapes, sidecar, the builder's flags) are unit tested there and the build itself runs in tests marked
`tensorrt`, wherever `tensorrt` imports and a GPU is present.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sparseseg.engine.backends.base import cache_dir
from sparseseg.engine.backends.tensorrt import PlanRunner, import_tensorrt
from sparseseg.errors import SparsesegError
from sparseseg.model.contract import INPUT_NAME, sidecar_path

log = logging.getLogger("sparseseg.export.tensorrt")

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


# ------------------------------------------------------------------ pure parts: profile

def default_plan_tile(contract: dict, device: str = "cuda", budget: int | None = None) -> tuple[int, int, int]:
    """The output tile the engine would choose for this network on `device` for its default
    block, measured in the plan's precision: build and run agree."""
    from sparseseg.engine.tiling import default_tile, run_dtype

    return tuple(int(t) for t in default_tile(contract, device, budget=budget,
                                              dtype=run_dtype(contract.get("precision", "fp32"))))


def smallest_tile(geometry) -> tuple[int, int, int]:
    if geometry.padding == "valid":
        return tuple(r.output_at_least(r.step) for r in geometry.axes)
    return tuple(r.step for r in geometry.axes)


def profile_shapes(geometry, channels: int, tile, tile_min=None, tile_max=None, batch: int = 1) -> dict:
    """The optimization profile: input shapes (N, C, Z, Y, X) for min/opt/max, batch 1..`batch`,
    output tiles `tile_min` <= `tile` (opt) <= `tile_max` (default: the smallest valid tile and
    `tile`), and the output tiles themselves under "tiles"."""
    from sparseseg.engine.tiling import check_tile

    if batch < 1:
        raise SparsesegError(f"--batch must be >= 1, got {batch}")
    opt = check_tile(geometry, tile)
    lo = check_tile(geometry, tile_min) if tile_min is not None else smallest_tile(geometry)
    hi = check_tile(geometry, tile_max) if tile_max is not None else opt
    for axis, a, b, c in zip("zyx", lo, opt, hi):
        if not a <= b <= c:
            raise SparsesegError(f"the profile needs --tile-min <= --tile <= --tile-max along {axis}, "
                                 f"got {a}, {b}, {c}")

    def inp(t):
        return [t_ + 2 * c_ for t_, c_ in zip(t, geometry.context)]

    return {"min": [1, channels, *inp(lo)], "opt": [batch, channels, *inp(opt)], "max": [batch, channels, *inp(hi)],
            "tiles": {"min": list(lo), "opt": list(opt), "max": list(hi)}, "batch": batch}


# ------------------------------------------------------------------ pure parts: sidecar

def plan_contract(contract: dict, *, precision, profile, trt_version, gpu_name, compute_capability,
                  version_compatible: bool, workspace_gb: float, hardware_compatible: bool = False) -> dict:
    side = dict(contract)
    side.update({
        "precision": precision,
        "tensorrt_version": trt_version,
        "gpu_name": gpu_name,
        "compute_capability": list(compute_capability),
        "version_compatible": bool(version_compatible),
        "hardware_compatibility": "ampere_plus" if hardware_compatible else "same_compute_capability",
        "strongly_typed": True,
        "profile": profile,
        "workspace_gb": workspace_gb,
    })
    return side


def timing_cache_path() -> Path:
    return cache_dir() / "tensorrt-timing.cache"


# ------------------------------------------------------------------ build (needs TensorRT + GPU)

def configure_builder(config, trt, precision: str, *, version_compatible: bool, hardware_compatible: bool) -> None:
    """The builder flags: TF32 off for fp32 plans, and each compatibility only when asked for
    (AMPERE_PLUS drops Hopper-only tactics, so it is not implied by version compatibility)."""
    if precision == "fp32":
        # TF32 is on by default for float32 tensors; an fp32 plan is meant to match fp32 to 1e-4.
        config.clear_flag(trt.BuilderFlag.TF32)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS


def build_plan(onnx_path, plan_path: Path, contract: dict, profile: dict, *, workspace_gb=4.0,
               version_compatible=False, hardware_compatible=False) -> dict:
    """Build and serialize a strongly typed engine from an ONNX graph that carries its precision
    (contract["precision"]); returns the sidecar contract (written next to the plan)."""
    precision = contract.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise SparsesegError(f"the ONNX contract's precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise SparsesegError("building a TensorRT plan needs an NVIDIA GPU; none is visible to torch")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: every tensor's type comes from the graph (TensorRT 10.x); in 11.x the flag
    # is accepted and ignored because strong typing is always on.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SparsesegError(f"TensorRT could not parse {onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    configure_builder(config, trt, precision, version_compatible=version_compatible,
                      hardware_compatible=hardware_compatible)
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(INPUT_NAME, profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(trt_profile)

    cache_file = timing_cache_path()
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SparsesegError("TensorRT failed to build the engine (see the TensorRT messages above)")
    from sparseseg.fsutil import atomic_path

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_file) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))

    props = torch.cuda.get_device_properties(0)
    side = plan_contract(contract, precision=precision, profile=profile, trt_version=trt.__version__,
                         gpu_name=props.name, compute_capability=(props.major, props.minor),
                         version_compatible=version_compatible, workspace_gb=workspace_gb,
                         hardware_compatible=hardware_compatible)
    # The sidecar first: a plan never sits under its final name without its contract.
    with atomic_path(sidecar_path(plan_path)) as tmp:
        tmp.write_text(json.dumps(side, indent=2))
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    return side


def verify_plan(plan_path, ckpt, precision: str, calibration=None) -> tuple[float, float]:
    """The plan against the fp32 PyTorch model (on the GPU, TF32 off) on the verification
    tiles at the profile's opt tile, batch 1; bounds as for the ONNX graph of that precision."""
    import numpy as np
    import torch

    from sparseseg.export.onnx_export import check_parity, verification_tiles

    runner = PlanRunner(plan_path)
    model = ckpt.model.cuda().eval()
    worst = (0.0, 1.0)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for what, x in verification_tiles(ckpt, calibration, shape=runner.profile["opt"][2:],
                                          random_tile=precision != "int8"):
            xt = torch.from_numpy(np.ascontiguousarray(x)).cuda()
            with torch.inference_mode():
                ref = model(xt).float().cpu().numpy()
            got = runner.forward(xt).float().cpu().numpy()
            diff, agree = check_parity(ref, got, precision, f"{what} (TensorRT)")
            worst = (max(worst[0], diff), min(worst[1], agree))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        ckpt.model.cpu()
    return worst
