"""TensorRT plans from the exported ONNX model, with their contract in a sidecar JSON, and the
runner that executes them on torch tensors.

Strongly typed builds only: TensorRT 11 removed the precision builder flags (FP16, BF16, INT8)
and the INT8 calibrators; a network's precision is the ONNX graph's (fp16/bf16 tensors, INT8 from
Q/DQ nodes). Sources: "Python Migration Patterns for TensorRT 11.x" and "Removed Python APIs and
Replacements" (docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-
python-api-patterns.html and ...-python-api-reference.html); the Builder page, where
NetworkDefinitionCreationFlag.STRONGLY_TYPED exists in 10.x and is "retained for API
compatibility but ignored" in 11.x (strong typing always on), so one code path serves both.
Every TensorRT name used here was checked against the tensorrt-cu13-bindings 11.4.0.106 wheel
(the report of the change lists them); TensorRT cannot be installed on the CI machines, so the
pure parts (profile shapes, sidecar, compatibility checks, the runner's shape/dtype/context
logic with a fake engine) are unit tested there and the build itself runs in tests marked
`tensorrt`, wherever `tensorrt` imports and a GPU is present.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from sparseseg.errors import SparsesegError
from sparseseg.model.contract import INPUT_NAME, sidecar_path

log = logging.getLogger("sparseseg.export.tensorrt")

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
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


def describe_profile(profile: dict) -> str:
    t = profile.get("tiles")
    if isinstance(t, dict):
        fmt = "x".join
        return (f"output tiles {fmt(map(str, t['min']))} .. {fmt(map(str, t['max']))} (opt {fmt(map(str, t['opt']))}), "
                f"batch 1..{profile['max'][0]}")
    return f"input shapes {profile['min']} .. {profile['max']}"


def check_in_profile(shape, profile: dict) -> None:
    """A one-line error when an input shape (N, C, Z, Y, X) is outside the plan's profile."""
    shape = tuple(int(s) for s in shape)
    lo, hi = profile["min"], profile["max"]
    if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
        raise SparsesegError(f"input shape {list(shape)} is outside this plan's optimization profile "
                             f"({describe_profile(profile)}; inputs {lo} .. {hi}); choose a tile and batch in "
                             "that range or rebuild the plan with sparseseg-export --tile/--tile-min/--tile-max")


def check_engine_profile(engine_shapes, profile: dict) -> None:
    """The deserialized engine's profile (min, opt, max) must be the one its sidecar records."""
    got = [[int(d) for d in s] for s in engine_shapes]
    want = [list(profile[k]) for k in ("min", "opt", "max")]
    if got != want:
        raise SparsesegError(f"the plan's optimization profile {got} is not the one its sidecar records {want}; "
                             "the .json belongs to another plan: rebuild both with sparseseg-export")


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


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).split(".")[:3] if p.isdigit())


def check_plan_compatible(sidecar: dict, trt_version: str, gpu_name: str, compute_capability) -> None:
    """Refuse a plan built for another TensorRT version (unless built version-compatible: then
    the same major, same or newer) or another compute capability (unless built
    hardware-compatible: then any Ampere or newer GPU). GPUs of one compute capability (H100 SXM
    and PCIe, H200) run each other's plans, so the GPU's name is not compared."""
    built_v, built_gpu = sidecar.get("tensorrt_version"), sidecar.get("gpu_name")
    built_cc = tuple(sidecar.get("compute_capability", ()))
    cc = tuple(compute_capability)
    if sidecar.get("version_compatible"):
        if _version_tuple(trt_version)[:1] != _version_tuple(built_v)[:1] or \
                _version_tuple(trt_version) < _version_tuple(built_v):
            raise SparsesegError(f"plan was built with TensorRT {built_v}; a version-compatible plan runs on the "
                                 f"same major version, same or newer (this is {trt_version}); rebuild it")
    elif _version_tuple(trt_version) != _version_tuple(built_v):
        raise SparsesegError(f"plan was built with TensorRT {built_v}, this is TensorRT {trt_version}: engines are "
                             "not portable; rebuild it here with sparseseg-export (or build with --version-compatible)")
    if sidecar.get("hardware_compatibility") == "ampere_plus":
        if cc < (8, 0):
            raise SparsesegError(f"plan was built for Ampere and newer GPUs; this GPU ({gpu_name}) has compute "
                                 f"capability {cc[0]}.{cc[1]}")
    elif cc != built_cc:
        raise SparsesegError(f"plan was built on {built_gpu} (compute capability {'.'.join(map(str, built_cc))}), "
                             f"this is {gpu_name} ({'.'.join(map(str, cc))}): engines are not portable; rebuild it "
                             "here with sparseseg-export (or build with --hardware-compatible)")


def timing_cache_path() -> Path:
    root = Path(os.environ.get("SPARSESEG_CACHE") or Path.home() / ".cache" / "sparseseg")
    return root / "tensorrt-timing.cache"


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


# ------------------------------------------------------------------ run

def load_plan(plan_path):
    """Deserialize a plan after checking its sidecar against this GPU and TensorRT, and the
    engine's profile against the sidecar's."""
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
    if "profile" in side:
        check_engine_profile(engine.get_tensor_profile_shape(side.get("input_name", INPUT_NAME), 0), side["profile"])
    return engine, side


_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                 "INT32": "int32", "INT64": "int64", "BOOL": "bool"}


def torch_dtype(trt_dtype):
    """The torch dtype of a tensorrt.DataType member (by its name, so it is testable without TensorRT)."""
    import torch

    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in _TORCH_DTYPES:
        raise SparsesegError(f"TensorRT tensor type {name} has no torch equivalent here")
    return getattr(torch, _TORCH_DTYPES[name])


class PlanRunner:
    """A deserialized plan that runs on CUDA torch tensors: `forward(x)` takes (N, C, Z, Y, X)
    on the GPU and returns the logits as a new CUDA tensor, enqueued with execute_async_v3 on
    torch's current stream (no synchronization: the caller's stream orders it).

    One execution context per thread: a context holds the input shape and tensor addresses of
    one call, so threads (a Dask worker's) must not share one. Each context owns its activation
    memory, so N threads cost N times the plan's activation memory."""

    def __init__(self, plan_path, engine=None, contract=None):
        if engine is None:
            engine, contract = load_plan(plan_path)
        self.path = str(plan_path)
        self.engine = engine
        self.contract = contract
        self.input_name = contract.get("input_name", INPUT_NAME)
        self.output_name = contract.get("output_name", "logits")
        self.profile = contract.get("profile")
        self.input_dtype = torch_dtype(engine.get_tensor_dtype(self.input_name))
        self.output_dtype = torch_dtype(engine.get_tensor_dtype(self.output_name))
        self._local = threading.local()

    def context(self):
        ctx = getattr(self._local, "context", None)
        if ctx is None:
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise SparsesegError(f"{self.path}: TensorRT could not create an execution context "
                                     "(out of GPU memory?)")
            self._local.context = ctx
        return ctx

    @staticmethod
    def _check_device(x):
        import torch

        if not (isinstance(x, torch.Tensor) and x.is_cuda):
            raise SparsesegError("a TensorRT plan runs on CUDA tensors; move the input to the GPU first")

    @staticmethod
    def _stream_handle(x) -> int:
        import torch

        return torch.cuda.current_stream(x.device).cuda_stream

    def forward(self, x):
        import torch

        self._check_device(x)
        if self.profile is not None:
            check_in_profile(x.shape, self.profile)
        x = x.to(self.input_dtype).contiguous()
        ctx = self.context()
        if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
            raise SparsesegError(f"TensorRT rejected input shape {list(x.shape)} for {self.path}"
                                 + (f" (profile: {describe_profile(self.profile)})" if self.profile else ""))
        shape = tuple(int(d) for d in ctx.get_tensor_shape(self.output_name))
        if any(d < 0 for d in shape):
            raise SparsesegError(f"TensorRT could not infer the output shape for input {list(x.shape)}")
        out = torch.empty(shape, dtype=self.output_dtype, device=x.device)
        for name, t in ((self.input_name, x), (self.output_name, out)):
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise SparsesegError(f"TensorRT rejected the address of tensor {name!r} ({self.path})")
        if not ctx.execute_async_v3(self._stream_handle(x)):
            raise SparsesegError(f"TensorRT execution failed for input {list(x.shape)} ({self.path})")
        return out

    __call__ = forward


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
