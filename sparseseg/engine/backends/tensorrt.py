"""TensorRT: run a plan on torch tensors. The plan's sidecar contract is checked against this GPU
and TensorRT first; `PlanRunner` enqueues execute_async_v3 on torch's current stream, with one
execution context per thread and checked set_input_shape/set_tensor_address. Building plans is
export's (export/tensorrt.py); the runner's shape/dtype/context logic is unit tested with a fake
engine (tests/test_tensorrt.py), the rest runs in tests marked `tensorrt`.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sparseseg.engine.backends.base import Backend, BackendSpec
from sparseseg.errors import SparsesegError
from sparseseg.model.contract import INPUT_NAME, read_contract

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


# ------------------------------------------------------------------ run

def load_plan(plan_path):
    """Deserialize a plan after checking its sidecar against this GPU and TensorRT, and the
    engine's profile against the sidecar's."""
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


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, spec: BackendSpec):
        import torch

        if spec.device == "cpu":
            raise SparsesegError("a TensorRT .plan needs a CUDA device; --device cpu cannot run it")
        self.runner = PlanRunner(spec.engine)
        super().__init__(self.runner.contract)
        self.device = torch.device("cuda")
        self.input_dtype = self.runner.input_dtype

    def forward(self, x):
        return self.runner.forward(x.contiguous())
