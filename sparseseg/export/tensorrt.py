"""TensorRT 10 engines from the exported ONNX model, with their contract in a sidecar JSON.

Written against the documented TensorRT 10 Python API (Builder, OnnxParser, IBuilderConfig,
IOptimizationProfile, ITimingCache, Runtime). TensorRT's builder cannot be installed on this
project's CI machines: the pure parts (profile shapes, sidecar, compatibility checks, error
paths) are unit tested there, the build itself runs in tests marked `tensorrt`, which run
wherever `tensorrt` imports and a GPU is present.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.model.contract import INPUT_NAME, sidecar_path

log = logging.getLogger("sparseseg.export.tensorrt")

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_TILE_INPUT = (116, 132, 132)   # the paper's tile; engines are built for large tiles
INSTALL_HINT = ("TensorRT is not installed: on a machine with an NVIDIA GPU, `pip install tensorrt` "
                "(wheels come from NVIDIA's package index) or use NVIDIA's TensorRT container")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise SparsesegError(INSTALL_HINT) from None
    if not hasattr(trt, "Builder"):  # the registry's placeholder package has no API
        raise SparsesegError(INSTALL_HINT)
    return trt


# ------------------------------------------------------------------ pure parts

def default_plan_tile(geometry) -> tuple[int, int, int]:
    """The largest valid output tile whose input fits the paper's 116x132x132 tile."""
    out = []
    for rule, budget in zip(geometry.axes, DEFAULT_TILE_INPUT):
        if geometry.padding == "valid":
            m = rule.output_at_most(budget - 2 * rule.context)
            out.append(m if m and m >= rule.step else rule.output_at_least(rule.step))
        else:
            out.append(max(rule.step, budget // rule.step * rule.step))
    return tuple(out)


def profile_shapes(geometry, channels: int, tiles, batch: int) -> dict:
    """min/opt/max input shapes (N, C, Z, Y, X) of the optimization profile: batch 1..N at the
    given output tile sizes (the first is the one to optimize for)."""
    from sparseseg.engine.tiling import check_tile

    if batch < 1:
        raise SparsesegError(f"--batch must be >= 1, got {batch}")
    inputs = []
    for tile in tiles:
        tile = check_tile(geometry, tile)
        inputs.append(tuple(t + 2 * c for t, c in zip(tile, geometry.context)))
    lo = tuple(min(s[a] for s in inputs) for a in range(3))
    hi = tuple(max(s[a] for s in inputs) for a in range(3))
    return {"min": [1, channels, *lo], "opt": [batch, channels, *inputs[0]], "max": [batch, channels, *hi],
            "tiles": [list(t) for t in tiles]}


def plan_contract(contract: dict, *, precision, profile, trt_version, gpu_name, compute_capability,
                  version_compatible: bool, workspace_gb: float) -> dict:
    side = dict(contract)
    side.update({
        "precision": precision,
        "tensorrt_version": trt_version,
        "gpu_name": gpu_name,
        "compute_capability": list(compute_capability),
        "version_compatible": bool(version_compatible),
        "hardware_compatibility": "ampere_plus" if version_compatible else "same_gpu",
        "profile": profile,
        "workspace_gb": workspace_gb,
    })
    return side


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).split(".")[:3] if p.isdigit())


def check_plan_compatible(sidecar: dict, trt_version: str, gpu_name: str, compute_capability) -> None:
    """Refuse a plan built for another GPU or TensorRT version (engines are not portable),
    unless it was built version- and hardware-compatible."""
    built_v, built_gpu = sidecar.get("tensorrt_version"), sidecar.get("gpu_name")
    built_cc = tuple(sidecar.get("compute_capability", ()))
    cc = tuple(compute_capability)
    if sidecar.get("version_compatible"):
        if _version_tuple(trt_version)[:1] != _version_tuple(built_v)[:1] or \
                _version_tuple(trt_version) < _version_tuple(built_v):
            raise SparsesegError(f"plan was built with TensorRT {built_v}; a version-compatible plan runs on the "
                                 f"same major version, same or newer (this is {trt_version}); rebuild it")
        if cc < (8, 0):
            raise SparsesegError(f"plan was built for Ampere and newer GPUs; this GPU ({gpu_name}) has compute "
                                 f"capability {cc[0]}.{cc[1]}")
        return
    if _version_tuple(trt_version) != _version_tuple(built_v):
        raise SparsesegError(f"plan was built with TensorRT {built_v}, this is TensorRT {trt_version}: engines are "
                             "not portable; rebuild it here with sparseseg-export (or build with --version-compatible)")
    if cc != built_cc or gpu_name != built_gpu:
        raise SparsesegError(f"plan was built on {built_gpu} (compute capability {'.'.join(map(str, built_cc))}), "
                             f"this is {gpu_name} ({'.'.join(map(str, cc))}): engines are not portable; rebuild it "
                             "here with sparseseg-export (or build with --version-compatible)")


def timing_cache_path() -> Path:
    root = Path(os.environ.get("SPARSESEG_CACHE", Path.home() / ".cache" / "sparseseg"))
    return root / "tensorrt-timing.cache"


def calibration_batches(volume_path, shape, batch: int, max_batches: int = 16, seed: int = 0):
    """Random input tiles (N, C, Z, Y, X) from a volume for INT8 calibration."""
    from sparseseg.engine.tiling import pad_region
    from sparseseg.volume import check_finite, open_volume

    vol = open_volume(volume_path)
    if vol.channels != shape[1]:
        raise SparsesegError(f"--calibration has {vol.channels} channels, the model expects {shape[1]}")
    rng = np.random.default_rng(seed)
    spatial = shape[2:]
    for _ in range(max_batches):
        tiles = []
        for _ in range(batch):
            start = [int(rng.integers(0, max(1, n - s + 1))) for n, s in zip(vol.shape, spatial)]
            t = vol.read(tuple(slice(a, a + s) for a, s in zip(start, spatial)), dtype=np.float32)
            check_finite(t, "--calibration volume")
            if t.shape[1:] != tuple(spatial):
                t = pad_region(t, (0, 0, 0), [s - n for s, n in zip(spatial, t.shape[1:])])
            tiles.append(t)
        yield np.ascontiguousarray(np.stack(tiles))


# ------------------------------------------------------------------ build (needs TensorRT + GPU)

def _make_calibrator(trt, batches, cache_file: Path):
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self._batches = iter(batches)
            self._current = None
            self._size = None

        def get_batch_size(self):
            return self._size or 1

        def get_batch(self, names):
            try:
                x = next(self._batches)
            except StopIteration:
                return None
            self._size = x.shape[0]
            self._current = torch.from_numpy(x).cuda()   # keep alive until the next call
            return [int(self._current.data_ptr())]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.exists() else None

        def write_calibration_cache(self, cache):
            cache_file.write_bytes(bytes(cache))

    return EntropyCalibrator()


def build_plan(onnx_path, plan_path: Path, contract: dict, *, precision="fp16", tiles=None, batch=1, workspace_gb=4.0,
               calibration=None, version_compatible=False) -> dict:
    """Build and serialize an engine; returns the sidecar contract (written next to the plan)."""
    if precision not in PRECISIONS:
        raise SparsesegError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if precision == "int8" and calibration is None:
        raise SparsesegError("--precision int8 needs --calibration VOLUME (representative images)")
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise SparsesegError("building a TensorRT plan needs an NVIDIA GPU; none is visible to torch")
    from sparseseg.model.contract import geometry_of_contract

    geometry = geometry_of_contract(contract)
    tiles = tiles or [default_plan_tile(geometry)]
    profile_dims = profile_shapes(geometry, contract["in_channels"], tiles, batch)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)            # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SparsesegError(f"TensorRT could not parse {onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)      # layers INT8 cannot run fall back to FP16
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, profile_dims["min"], profile_dims["opt"], profile_dims["max"])
    config.add_optimization_profile(profile)
    if precision == "int8":
        cal_profile = builder.create_optimization_profile()
        opt = profile_dims["opt"]
        cal_profile.set_shape(INPUT_NAME, opt, opt, opt)
        config.set_calibration_profile(cal_profile)
        config.int8_calibrator = _make_calibrator(
            trt, calibration_batches(calibration, opt, batch), Path(str(plan_path) + ".calib"))

    cache_file = timing_cache_path()
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SparsesegError("TensorRT failed to build the engine (see the TensorRT messages above)")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))

    props = torch.cuda.get_device_properties(0)
    side = plan_contract(contract, precision=precision, profile=profile_dims, trt_version=trt.__version__,
                         gpu_name=props.name, compute_capability=(props.major, props.minor),
                         version_compatible=version_compatible, workspace_gb=workspace_gb)
    _write_atomic(plan_path, bytes(serialized))
    _write_atomic(sidecar_path(plan_path), json.dumps(side, indent=2).encode())
    return side


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_plan(plan_path):
    """Deserialize a plan after checking its sidecar against this GPU and TensorRT."""
    from sparseseg.model.contract import read_contract

    side = read_contract(plan_path)
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise SparsesegError("a TensorRT plan needs an NVIDIA GPU; none is visible")
    props = torch.cuda.get_device_properties(0)
    check_plan_compatible(side, trt.__version__, props.name, (props.major, props.minor))
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if side.get("version_compatible"):
        runtime.engine_host_code_allowed = True    # version-compatible plans embed a lean runtime
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise SparsesegError(f"{plan_path}: TensorRT could not deserialize this plan")
    return engine, side


def run_plan(engine, x: np.ndarray) -> np.ndarray:
    """One forward pass of a deserialized engine on a host array (tests and verification; the
    engine's fast path keeps buffers on the GPU)."""
    import torch

    from sparseseg.model.contract import OUTPUT_NAME

    context = engine.create_execution_context()
    inp = torch.from_numpy(np.ascontiguousarray(x, np.float32)).cuda()
    context.set_input_shape(INPUT_NAME, tuple(inp.shape))
    out = torch.empty(tuple(context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device="cuda")
    context.set_tensor_address(INPUT_NAME, inp.data_ptr())
    context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise SparsesegError("TensorRT execution failed")
    stream.synchronize()
    return out.cpu().numpy()


def verify_plan(plan_path, onnx_path, ckpt, precision: str, calibration=None) -> tuple[float, float]:
    """The plan against onnxruntime (fp32 ONNX) on the same tiles as the ONNX check; fp16/bf16
    and int8 use the loose bound (int8 is reported, its bound is the fp16 one)."""
    from sparseseg.export.onnx_export import check_parity, ort_session, verification_tiles
    from sparseseg.model.contract import INPUT_NAME as IN
    from sparseseg.model.contract import OUTPUT_NAME as OUT

    engine, side = load_plan(plan_path)
    sess = ort_session(onnx_path)
    worst = (0.0, 1.0)
    for what, x in verification_tiles(ckpt, calibration, shape=side["profile"]["opt"][2:]):
        ref = sess.run([OUT], {IN: x})[0]
        got = run_plan(engine, x)
        diff, agree = check_parity(ref, got, "fp32" if precision == "fp32" else "fp16", f"{what} (TensorRT)")
        worst = (max(worst[0], diff), min(worst[1], agree))
    return worst
