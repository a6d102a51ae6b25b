"""One small interface over the engine kinds: `forward(x) -> logits` on torch tensors.

x is (N, C, Z, Y, X) on `backend.device` (a torch.device) in `backend.input_dtype`; the logits
(N, K, z, y, x) come back on the same device. So the block pipeline keeps everything on the
device from the upload to the argmax, whatever runs the network:

.pt    PyTorch (CPU, or CUDA with channels_last_3d, autocast fp16/bf16, cudnn.benchmark)
.onnx  ONNX Runtime (host tensors on CPU; IOBinding of device memory with its CUDA provider),
       or OpenVINO (CPU) when asked for, and for --precision bf16 on CPU
.plan  TensorRT, through `sparseseg.export.tensorrt.PlanRunner` (one context per thread)

On CPU a .pt engine runs through the fastest installed backend (`fastest_cpu_backend`:
OpenVINO (f32; a dependency), else ONNX Runtime), from an ONNX export made once
into a cache keyed by the checkpoint's sha256, unless the backend is pinned.
Each worker process loads its backend once (`cached_backend`) and reuses it for every block.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparseseg.errors import SparsesegError

log = logging.getLogger("sparseseg.engine")

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")


@dataclass(frozen=True)
class BackendSpec:
    engine: str
    device: str = "auto"        # auto | cpu | cuda
    precision: str = "fp32"     # fp32 | tf32 | fp16 | bf16: CUDA autocast for .pt; on CPU bf16 runs OpenVINO
    threads: int = 0            # CPU threads per worker (0: library default)
    backend: str = "auto"       # auto | torch | onnxruntime | openvino | tensorrt


class Backend(ABC):
    name = "base"

    def __init__(self, contract: dict):
        import torch

        self.contract = contract
        self.device = torch.device("cpu")
        self.input_dtype = torch.float32

    @abstractmethod
    def forward(self, x):
        """(N, C, Z, Y, X) tensor on self.device -> (N, K, z, y, x) logits on self.device."""


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def want_cuda(device: str) -> bool:
    """--device cpu never touches CUDA; auto uses it where present."""
    if device == "cpu":
        return False
    if device == "cuda":
        if not cuda_available():
            raise SparsesegError("--device cuda asked for, but no CUDA GPU is available")
        return True
    return cuda_available()


PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


@contextlib.contextmanager
def math_mode(precision: str):
    """cuDNN and matmul TF32 on only for --precision tf32 (torch enables it for cuDNN by default,
    so GPU fp32 labels would differ from CPU ones at near-ties); the caller's flags come back after."""
    import torch

    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
    before = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = precision == "tf32"
        yield
    finally:
        for f, b in zip(flags, before):
            f.allow_tf32 = b


def ort_cuda_provider(precision: str):
    """ONNX Runtime's CUDA provider with TF32 as --precision says (its default is on)."""
    return ("CUDAExecutionProvider", {"use_tf32": "1" if precision == "tf32" else "0"})


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, contract: dict, device: str = "auto", precision: str = "fp32", threads: int = 0,
                 owned: bool = False):
        """`owned`: the model is this backend's (loaded from a file); otherwise a copy runs, so
        the caller's model keeps its device, memory format and train/eval mode."""
        import torch

        super().__init__(contract)
        if threads:
            torch.set_num_threads(threads)
        cuda = want_cuda(device)
        self.device = torch.device("cuda" if cuda else "cpu")
        self.model = (model if owned else copy.deepcopy(model)).to(self.device).eval()
        self.precision = precision
        self.autocast = {"fp32": None, "tf32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.channels_last = False
        if cuda:
            torch.backends.cudnn.benchmark = True           # once per tile shape
            if model.cfg.ndim == 3:
                self.model = self.model.to(memory_format=torch.channels_last_3d)
                self.channels_last = True
        elif precision != "fp32":
            raise SparsesegError(f"--precision {precision} needs a CUDA device for .pt engines")
        self._torch = torch

    @classmethod
    def from_file(cls, spec: BackendSpec):
        from sparseseg.model.checkpoint import file_sha256, load_checkpoint
        from sparseseg.model.contract import contract_from_checkpoint

        ckpt = load_checkpoint(spec.engine)
        return cls(ckpt.model, contract_from_checkpoint(ckpt, file_sha256(spec.engine)), spec.device,
                   spec.precision, spec.threads, owned=True)

    def forward(self, x):
        torch = self._torch
        with torch.inference_mode(), math_mode(self.precision):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            if self.autocast is not None:
                with torch.autocast("cuda", dtype=self.autocast):
                    return self.model(x)
            return self.model(x)


def model_contract(model) -> dict:
    """The contract of an in-memory SegmentationModel (what `sparseseg.predict` needs). Its
    normalization is the model's own (`model.normalization`): "global" lives in the graph's
    buffers (in_graph true: the gather leaves the input raw); "volume"/"percentile" keep an
    identity in the graph (in_graph false: the gather applies the input volume's statistics,
    plan.gather_normalization). So it is applied exactly once, whichever backend runs."""
    from sparseseg.model.contract import INPUT_NAME, OUTPUT_NAME

    cfg = model.cfg
    return {"format": "sparseseg-engine", "in_channels": cfg.in_channels, "num_classes": cfg.num_classes,
            "class_names": [f"class_{k}" for k in range(cfg.num_classes)], "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME, "geometry": cfg.geometry.to_dict(), "model_config": cfg.to_dict(),
            "normalization": model.normalization}


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


class OnnxBackend(Backend):
    name = "onnxruntime"

    def __init__(self, spec: BackendSpec, contract: dict | None = None, path=None):
        import onnxruntime as ort
        import torch

        from sparseseg.model.contract import read_contract

        path = str(path or spec.engine)
        super().__init__(contract or read_contract(path))
        providers = ["CPUExecutionProvider"]
        cuda = False
        if want_cuda(spec.device):
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" in available:
                providers = [ort_cuda_provider(spec.precision)] + providers
                cuda = True
            elif spec.device == "cuda":
                raise SparsesegError("--device cuda with an .onnx engine needs onnxruntime-gpu (CUDA provider)")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if spec.threads:
            opts.intra_op_num_threads = spec.threads
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers)
        except Exception as e:
            raise SparsesegError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        self.device = torch.device("cuda" if cuda else "cpu")
        self.input = self.contract["input_name"]
        self.output = self.contract["output_name"]
        kind = _ORT_TYPES.get(self.session.get_inputs()[0].type, "float32")
        self.input_dtype = getattr(torch, kind)
        self._torch = torch

    def forward(self, x):
        torch = self._torch
        if self.device.type == "cpu":
            out = self.session.run([self.output], {self.input: x.contiguous().numpy()})[0]
            return torch.from_numpy(out)
        # Device memory in and out (IOBinding): no host round trip. ORT runs on its own stream, so
        # torch's pending work on x must finish first.
        from sparseseg.model.contract import geometry_of_contract

        x = x.contiguous()
        geom = geometry_of_contract(self.contract)
        out_shape = (x.shape[0], self.contract["num_classes"]) + geom.output_for_input(x.shape[2:])
        out = torch.empty(out_shape, dtype=torch.float32 if self.input_dtype == torch.float32 else self.input_dtype,
                          device=x.device)
        torch.cuda.current_stream().synchronize()
        bind = self.session.io_binding()
        dev = x.device.index or 0
        bind.bind_input(self.input, "cuda", dev, np.dtype(str(x.dtype).split(".")[1]), tuple(x.shape), x.data_ptr())
        bind.bind_output(self.output, "cuda", dev, np.dtype(str(out.dtype).split(".")[1]), tuple(out.shape),
                         out.data_ptr())
        self.session.run_with_iobinding(bind)
        return out


class OpenVinoBackend(Backend):
    """OpenVINO on CPU: reads the ONNX graph directly (an optional extra)."""

    name = "openvino"

    def __init__(self, spec: BackendSpec, contract: dict | None = None, path=None):
        try:
            import openvino as ov
        except ImportError:
            raise SparsesegError("--backend openvino needs the openvino package (pip install openvino)") \
                from None
        import torch

        from sparseseg.model.contract import read_contract

        path = str(path or spec.engine)
        super().__init__(contract or read_contract(path))
        if spec.device == "cuda":
            raise SparsesegError("--backend openvino runs on CPU only; use --device cpu")
        core = ov.Core()
        # f32 unless --precision bf16: on CPUs with bf16 units OpenVINO would otherwise pick bf16
        # by itself (labels 96% identical to fp32 on a small test network, measured).
        if spec.precision not in ("fp32", "bf16"):
            raise SparsesegError(f"--precision {spec.precision} needs a CUDA device; on CPU use fp32 or bf16")
        if spec.precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise SparsesegError("--precision bf16 on CPU needs bf16 units (AVX512-BF16 or AMX); this CPU has none")
        config = {"PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[spec.precision]}
        if spec.threads:
            config["INFERENCE_NUM_THREADS"] = spec.threads
        try:
            self.compiled = core.compile_model(core.read_model(path), "CPU", config)
        except Exception as e:
            raise SparsesegError(f"openvino cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        self._local = threading.local()
        self._torch = torch

    def forward(self, x):
        req = getattr(self._local, "req", None)
        if req is None:                      # one infer request per thread
            req = self._local.req = self.compiled.create_infer_request()
        out = req.infer({0: x.contiguous().numpy()})
        return self._torch.from_numpy(np.array(out[self.compiled.output(0)]))


class TensorRTBackend(Backend):
    """A thin wrapper over the export package's PlanRunner (execute_async_v3 on torch's current
    stream, one execution context per thread, checked set_input_shape/set_tensor_address)."""

    name = "tensorrt"

    def __init__(self, spec: BackendSpec):
        import torch

        if spec.device == "cpu":
            raise SparsesegError("a TensorRT .plan needs a CUDA device; --device cpu cannot run it")
        try:
            from sparseseg.export.tensorrt import PlanRunner
        except ImportError as e:
            raise SparsesegError(f"cannot run a TensorRT plan: {str(e).splitlines()[0]}") from None
        self.runner = PlanRunner(spec.engine)
        super().__init__(self.runner.contract)
        self.device = torch.device("cuda")
        self.input_dtype = self.runner.input_dtype

    def forward(self, x):
        return self.runner.forward(x.contiguous())


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSESEG_CACHE") or Path.home() / ".cache" / "sparseseg")


def cached_onnx(checkpoint) -> Path:
    """The ONNX export of a checkpoint, made once and kept under the cache keyed by its sha256
    (written to a temporary file and renamed, so parallel workers never read half a file)."""
    from sparseseg.model.checkpoint import file_sha256, load_checkpoint

    sha = file_sha256(checkpoint)
    path = cache_dir() / "onnx" / f"{sha}.onnx"
    if path.is_file():
        return path
    from sparseseg.export.onnx_export import export_onnx
    from sparseseg.fsutil import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        export_onnx(load_checkpoint(checkpoint), sha, tmp, "fp32", simplify=False)
    log.info("exported %s to %s for onnxruntime", checkpoint, path)
    return path


def resolve_backend(spec: BackendSpec) -> str:
    """The backend an engine file runs with: the pinned one, else by file type (a .pt on CPU runs
    through the fastest installed CPU backend; bf16 on CPU through OpenVINO)."""
    suffix = Path(spec.engine).suffix.lower()
    kinds = {".pt": "torch", ".pth": "torch", ".onnx": "onnxruntime", ".plan": "tensorrt", ".engine": "tensorrt",
             ".trt": "tensorrt"}
    if suffix not in kinds:
        raise SparsesegError(f"{spec.engine}: unknown engine type (expected .plan, .onnx or .pt)")
    native = kinds[suffix]
    if spec.backend not in BACKENDS:
        raise SparsesegError(f"unknown backend {spec.backend!r} (expected one of {', '.join(BACKENDS)})")
    if spec.precision not in PRECISIONS:
        raise SparsesegError(f"unknown precision {spec.precision!r} (expected {', '.join(PRECISIONS)})")
    if spec.precision != "fp32" and native != "tensorrt" and not want_cuda(spec.device):
        return reduced_cpu_backend(spec)
    if spec.backend == "auto":
        if native == "torch" and not want_cuda(spec.device):
            return fastest_cpu_backend()
        return native
    if native == "tensorrt" and spec.backend != "tensorrt" or spec.backend == "tensorrt" and native != "tensorrt":
        raise SparsesegError(f"--backend {spec.backend} cannot run {Path(spec.engine).name} "
                             "(TensorRT runs .plan files only, and .plan files only run with TensorRT)")
    if native == "onnxruntime" and spec.backend == "torch":
        raise SparsesegError("--backend torch needs a .pt checkpoint, not an .onnx file")
    return spec.backend


def reduced_cpu_backend(spec: BackendSpec) -> str:
    """On CPU reduced precision means bf16, through OpenVINO (on bf16 units: AMX or AVX512-BF16);
    ONNX Runtime and torch have no CPU path for it here."""
    import importlib.util

    if spec.precision != "bf16":
        raise SparsesegError(f"--precision {spec.precision} needs a CUDA device; on CPU use fp32 or bf16")
    if spec.backend not in ("auto", "openvino"):
        raise SparsesegError(f"--precision bf16 on CPU runs through OpenVINO, not --backend {spec.backend}")
    if importlib.util.find_spec("openvino") is None:
        raise SparsesegError("--precision bf16 on CPU needs the openvino package (pip install openvino)")
    return "openvino"


def fastest_cpu_backend() -> str:
    """The fastest installed CPU backend for a .pt engine or a model object.

    Measured on 2 cores: ONNX Runtime 1.7x torch (benchmarks/results/cpu_backends.json, demo
    network, fp32); OpenVINO 2.4x ONNX Runtime there, and 2.15x / 1.72x MONAI against ONNX
    Runtime's 1.15x / 0.89x on the whole ISBI stack in 1 / 4 blocks (monai_cpu_openvino.json).
    OpenVINO is skipped in threads Python did not start: run from the napari widget's Qt worker
    thread it crashed the process (segfault in tests/test_napari.py, 2026-11-23; cause not found).
    From a threading.Thread its labels equalled torch's (checked by hand); Dask worker threads
    with OpenVINO were not run."""
    import importlib.util

    foreign = isinstance(threading.current_thread(), threading._DummyThread)
    for name in (("onnxruntime",) if foreign else ("openvino", "onnxruntime")):
        if importlib.util.find_spec(name) is not None:
            return name
    return "torch"


def load_backend(spec: BackendSpec) -> Backend:
    if not Path(spec.engine).is_file():
        raise SparsesegError(f"no such engine file: {spec.engine}")
    kind = resolve_backend(spec)
    native_pt = Path(spec.engine).suffix.lower() in (".pt", ".pth")
    if kind == "torch":
        return TorchBackend.from_file(spec)
    if kind == "tensorrt":
        return TensorRTBackend(spec)
    path = cached_onnx(spec.engine) if native_pt else spec.engine
    if kind == "onnxruntime":
        return OnnxBackend(spec, path=path)
    return OpenVinoBackend(spec, path=path)


_CACHE: dict = {}
_LOCK = threading.Lock()


def cached_backend(spec: BackendSpec) -> Backend:
    """The backend for `spec`, loaded once per process."""
    with _LOCK:
        if spec not in _CACHE:
            _CACHE[spec] = load_backend(spec)
        return _CACHE[spec]
