"""The GPU paths' ordering and bookkeeping, checked on CPU with recording fakes of torch.cuda
(issue 25: each test here fails on the code before its fix)."""

import contextlib
import weakref

import numpy as np
import pytest
import torch

from sparseseg.engine import worker
from sparseseg.errors import SparsesegError
from tests.helpers import tiny_config


# ---------------------------------------------------------------- a recording fake of torch.cuda

class FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.log.append(("wait_event", self.name))

    def __repr__(self):
        return f"<stream {self.name}>"


class FakeCuda:
    """current_stream()/stream(s) as torch.cuda has them (the default stream until one is entered)."""

    def __init__(self):
        self.log = []
        self.current = FakeStream(self.log, "default")
        outer = self

        class Event:
            def record(self):
                outer.log.append(("record", outer.current.name))

            def synchronize(self):
                outer.log.append(("synchronize",))

        self.Event = Event

    def current_stream(self, device=None):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        before, self.current = self.current, s
        try:
            yield
        finally:
            self.current = before


class FakeTorch:
    """Real torch except for .cuda and pinned host buffers (CPU tensors stand in for both)."""

    def __init__(self):
        self.cuda = FakeCuda()

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *shape, pin_memory=False, **kw):
        if pin_memory:
            return FakeHost(self.cuda, torch.empty(*shape, **kw))
        return torch.empty(*shape, **kw)


class FakeHost:
    def __init__(self, cuda, t):
        self.cuda, self.t = cuda, t

    def copy_(self, src, non_blocking=False):
        self.cuda.log.append(("copy", self.cuda.current.name))
        self.t.copy_(src.t if isinstance(src, FakeDevice) else src)

    def numpy(self):
        return self.t.numpy()


class FakeDevice:
    """A device tensor: records the streams it is used on."""

    def __init__(self, cuda, t):
        self.cuda, self.t, self.shape, self.dtype = cuda, t, t.shape, t.dtype

    def record_stream(self, s):
        self.cuda.log.append(("record_stream", s.name))


def _fake_runner(backend=None):
    fake = FakeTorch()
    r = object.__new__(worker.BlockRunner)
    r.torch, r.cuda = fake, True
    r.upload_stream = FakeStream(fake.cuda.log, "upload")
    r.compute_stream = FakeStream(fake.cuda.log, "compute")
    r.download_stream = FakeStream(fake.cuda.log, "download")
    return r, fake.cuda


def test_download_waits_on_the_compute_stream_before_copying():
    """Defect 1: inside `with torch.cuda.stream(download)` the current stream is the download
    stream; the copy must be ordered after the compute stream, not after itself."""
    runner, cuda = _fake_runner()
    cuda.current = runner.compute_stream           # the labels were computed there
    labels = FakeDevice(cuda, torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4))
    finish = runner.start_download(labels, None)
    log = cuda.log
    first_copy = log.index(("copy", "download"))
    waits = [e for e in log[:first_copy] if e[0] == "wait_stream"]
    assert waits == [("wait_stream", "download", "compute")], log
    assert ("record_stream", "download") in log[:first_copy]
    out, probs = finish()
    assert probs is None and np.array_equal(out, labels.t.numpy())


def test_compute_runs_on_its_own_stream():
    """Defect 4: the forward (and so TensorRT's execute_async_v3, which takes torch's current
    stream) is enqueued on the compute stream, never the legacy default stream."""
    from sparseseg.engine.blocks import make_blocks, read_plan
    from sparseseg.engine.tiling import tile_input
    from sparseseg.kernels.select import TorchOps
    from sparseseg.model.shapes import NetGeometry

    seen = []
    cfg = tiny_config(depth=2)
    geometry = cfg.geometry

    class Backend:
        input_dtype = torch.float32

        def forward(self, x):
            seen.append(runner.torch.cuda.current_stream().name)
            n = x.shape[0]
            return torch.zeros((n, 2) + tuple(s - 2 * c for s, c in zip(x.shape[2:], geometry.context)))

    runner, cuda = _fake_runner()
    shape, tile = (12, 16, 16), (12, 12, 12)
    runner.job = worker.BlockJob("<m>", "<m>", None, geometry.to_dict(), shape, tile, 0.5, 2, None)
    runner.backend, runner.geometry = Backend(), NetGeometry.from_dict(geometry.to_dict())
    runner.device, runner.num_classes, runner.prob_dtype = torch.device("cpu"), 2, None
    runner.tile_in, runner.batch, runner.norm, runner.weights = tile_input(geometry, tile), 2, None, None
    runner.ops, runner.halved = TorchOps(), False
    block = make_blocks(shape, shape)[0]
    plan = read_plan(block, shape, geometry, tile, 0.5)
    region = torch.zeros((1,) + plan.region_shape)
    labels, _ = runner.compute(block, plan, region, None)
    assert seen and set(seen) == {"compute"} and labels.shape == shape
    assert cuda.current.name == "default"           # left as it was found


def test_dask_tasks_of_one_run_reuse_the_worker_runner(monkeypatch, tmp_path):
    """Defect 8: every task (run_group) of a run in one worker process gets the same BlockRunner
    instead of building streams, weights and buffers again."""
    from sparseseg.engine import schedule
    from sparseseg.engine.backends import BackendSpec
    from sparseseg.engine.blocks import make_blocks
    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.network import SegmentationModel
    from sparseseg.volume import open_volume

    torch.manual_seed(0)
    ck = save_checkpoint(tmp_path / "m.pt", SegmentationModel(tiny_config()), None, ["a", "b"], 255)
    np.save(tmp_path / "v.npy", np.random.default_rng(0).random((8, 16, 32)).astype(np.float32))
    built = []
    init = worker.BlockRunner.__init__
    monkeypatch.setattr(worker.BlockRunner, "__init__", lambda self, *a: (built.append(1), init(self, *a))[1])
    written = []
    monkeypatch.setattr(worker, "write_block", lambda job, block, labels, probs: written.append(block.key))
    monkeypatch.setattr(worker, "open_io", lambda job: (open_volume(str(tmp_path / "v.npy")), None))
    geometry = tiny_config().geometry
    job = worker.BlockJob(str(tmp_path / "v.npy"), "unused", BackendSpec(str(ck), "cpu", backend="torch"),
                          geometry.to_dict(), (8, 16, 32), (12, 12, 12), 0.5, 1, None, run_id="r")
    blocks = make_blocks((8, 16, 32), (8, 16, 16))
    for group in ([blocks[0]], [blocks[1]]):
        finished, error, _ = schedule.run_group(job, group)
        assert error is None and len(finished) == 1
    assert len(built) == 1 and written == [b.key for b in blocks]


# ---------------------------------------------------------------- kernel launchers (a fake launch)

def _record_launches(monkeypatch):
    """Replace the CuPy launch by a recorder that checks, at the launch, that every tensor the
    launcher uploaded is still alive and that no two pointer arguments alias."""
    from sparseseg.kernels import gpu

    uploaded, launches = [], []
    real = gpu._upload_i64

    def upload(values, device):
        t = real(values, device)
        uploaded.append(weakref.ref(t))
        return t

    def launch(fn, total, args):
        alive = [r() for r in uploaded]
        assert all(t is not None for t in alive), "an argument tensor was freed before the launch"
        ptrs = [a for a in args if isinstance(a, int) and not isinstance(a, np.integer) and a]
        assert len(ptrs) == len(set(ptrs)), f"aliased pointer arguments {ptrs}"
        launches.append((fn, int(total)))
        uploaded.clear()                             # what a finished launch used may go now

    monkeypatch.setattr(gpu, "_upload_i64", upload)
    monkeypatch.setattr(gpu, "_launch", launch)
    monkeypatch.setattr(gpu, "kernel", lambda name, function: function)
    return launches


def test_launchers_keep_every_argument_alive_until_the_launch(monkeypatch):
    """Defect 2: the offset tensors passed as raw pointers must outlive the launch (a temporary
    freed before the next allocation lets the caching allocator hand `keep` the same block)."""
    from sparseseg.kernels import gpu
    from sparseseg.engine.tiling import gaussian_weights

    launches = _record_launches(monkeypatch)
    logits = torch.randn(3, 2, 4, 5, 6)
    gpu.stitch_valid(logits, [(0, 0, 0), (4, 0, 0), (0, 5, 0)], [(4, 5, 6), (2, 5, 6), (4, 3, 6)],
                     torch.zeros((8, 10, 6), dtype=torch.uint8))
    acc, wsum = torch.zeros((2, 8, 10, 8)), torch.zeros((8, 10, 8))
    gpu.accumulate_same(logits, torch.from_numpy(gaussian_weights((4, 5, 6))), [(0, 0, 0), (2, 3, 1), (4, 5, 2)],
                        acc, wsum)
    region = torch.zeros((1, 9, 9, 9), dtype=torch.uint8)
    gpu.gather(region, (0, 0, 0), [(0, 0, 0), (2, 2, 2)], (-1, -1, -1), (9, 9, 9), (5, 5, 5))
    assert [f for f, _ in launches][:1] == ["stitch_valid_f32"] and "gather_u8_f32" in [f for f, _ in launches]


def test_same_padding_accumulate_launches_over_each_tile_not_the_region(monkeypatch):
    """Defect 6: the accumulate's work is the tiles' voxels (one launch per tile, in order), not
    one thread per accumulator voxel looping over every tile of the batch."""
    from sparseseg.kernels import gpu
    from sparseseg.engine.tiling import gaussian_weights

    launches = _record_launches(monkeypatch)
    logits = torch.randn(3, 2, 4, 5, 6)
    acc, wsum = torch.zeros((2, 20, 20, 20)), torch.zeros((20, 20, 20))
    gpu.accumulate_same(logits, torch.from_numpy(gaussian_weights((4, 5, 6))), [(0, 0, 0), (2, 3, 1), (9, 9, 9)],
                        acc, wsum)
    assert [t for _, t in launches] == [4 * 5 * 6] * 3


# ---------------------------------------------------------------- precision and the caller's model

def test_fp32_on_cuda_runs_with_tf32_off_and_tf32_is_its_own_precision(monkeypatch):
    """Defect 5: fp32 means fp32 (cuDNN and matmul TF32 off during the forward, the caller's
    flags restored after); tf32 turns them on."""
    from sparseseg.engine.backends import TorchBackend, math_mode, model_contract
    from sparseseg.model.network import SegmentationModel

    model = SegmentationModel(tiny_config()).eval()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((torch.backends.cudnn.allow_tf32,
                                                             torch.backends.cuda.matmul.allow_tf32)))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    b = TorchBackend(model, model_contract(model), "cpu", "fp32")
    b.forward(torch.zeros(1, 1, 100, 100, 100)[..., :92, :92, :92].contiguous())
    own = b.model
    assert seen == [(False, False)]
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    with math_mode("tf32"):
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert own is not model


def test_torch_backend_leaves_the_callers_model_alone():
    """Defect 8: sparseseg.predict must not switch the user's model to eval, move it, or change
    its memory format."""
    import sparseseg
    from sparseseg.model.network import SegmentationModel

    model = SegmentationModel(tiny_config())
    model.train()
    before = {k: (v.data_ptr(), v.device) for k, v in model.state_dict().items()}
    sparseseg.predict(model, np.zeros((12, 20, 20), np.float32), device="cpu", backend="torch")
    assert model.training
    assert {k: (v.data_ptr(), v.device) for k, v in model.state_dict().items()} == before


def test_onnxruntime_cuda_provider_follows_the_precision():
    from sparseseg.engine.backends import ort_cuda_provider

    assert ort_cuda_provider("fp32") == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert ort_cuda_provider("tf32") == ("CUDAExecutionProvider", {"use_tf32": "1"})


# ---------------------------------------------------------------- tiles: the export default and the 2^31 cap

def test_export_default_plan_tile_is_the_engine_tile_of_its_default_block():
    """Defect 3: without --tile the plan's opt tile was searched up to 2^20 per axis and the
    meta-device measure overflowed; it is now the tile the engine picks for its default block."""
    from sparseseg.engine.tiling import DEFAULT_BLOCK, default_tile
    from sparseseg.export.tensorrt import default_plan_tile
    from sparseseg.model.config import plan_model
    from sparseseg.model.contract import geometry_of_contract
    from sparseseg.model.network import SegmentationModel
    from sparseseg.engine.backends import model_contract

    contract = model_contract(SegmentationModel(plan_model("paper", 3, 3)))
    geometry = geometry_of_contract(contract)
    for budget in (2 << 30, 40 << 30):
        got = default_plan_tile(contract, "cuda", budget=budget)
        block = tuple(-(-b // r.step) * r.step for b, r in zip(DEFAULT_BLOCK, geometry.axes))
        assert got == default_tile(contract, "cuda", extent=block, budget=budget)
        assert default_tile(contract, "cuda", budget=budget) == got          # no extent: the default block
        assert all(t <= r.output_at_least(b) for t, b, r in zip(got, block, geometry.axes))


def test_default_tile_keeps_every_activation_below_2_31_elements():
    """Defect 7: a huge budget (an H200 and a large --block) must not give a tile whose largest
    activation reaches cuDNN's 2^31-element limit; measured in the run's precision."""
    from sparseseg.engine.backends import model_contract
    from sparseseg.engine.measure import largest_activation
    from sparseseg.engine.tiling import MAX_ACTIVATION_ELEMENTS, default_tile, tile_input
    from sparseseg.model.config import plan_model
    from sparseseg.model.network import SegmentationModel

    assert MAX_ACTIVATION_ELEMENTS == 2 ** 31
    contract = model_contract(SegmentationModel(plan_model("paper", 3, 3)))
    geometry = SegmentationModel(plan_model("paper", 3, 3)).cfg.geometry
    extent = (512, 1024, 1024)
    tiles = {}
    for dtype in ("float32", "float16"):
        tiles[dtype] = t = default_tile(contract, "cuda", extent=extent, budget=1 << 45, dtype=dtype)
        n = largest_activation(contract["model_config"], (1, 3) + tile_input(geometry, t), dtype)
        assert n < 2 ** 31
        bigger = default_tile(contract, "cuda", extent=tuple(v + 64 for v in t), budget=1 << 45, dtype=dtype)
        assert bigger == t                                  # the cap, not the extent, decided
    small = {d: default_tile(contract, "cuda", extent=extent, budget=6 << 30, dtype=d) for d in ("float32", "float16")}
    assert np.prod(small["float16"]) > np.prod(small["float32"])      # half the bytes: a larger tile


def test_a_tile_above_the_activation_cap_is_a_one_line_error(tmp_path):
    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.network import SegmentationModel
    from tests.helpers import run_cli

    ck = save_checkpoint(tmp_path / "m.pt", SegmentationModel(tiny_config(width=8)), None, ["a", "b"], 255)
    np.save(tmp_path / "v.npy", np.zeros((8, 16, 16), np.float32))
    code, out = run_cli("infer", "--engine", str(ck), str(tmp_path / "v.npy"), "--device", "cpu", "--dry-run",
                        "--tile", "1004,1004,1004")
    assert code == 1 and out.count("\n") == 1 and "2^31" in out


def test_client_free_memory_comes_from_nvml_not_a_cuda_context(monkeypatch):
    """Defect 8: the client sizes the default tile without creating a CUDA context (which would
    hold memory on the GPU its workers use)."""
    from sparseseg.engine import tiling

    def no_context():
        raise AssertionError("the client opened a CUDA context")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_context)
    monkeypatch.setattr(tiling, "nvml_free_bytes", lambda: 10 << 30)
    assert tiling.memory_budget("cuda") == int((10 << 30) * tiling.GPU_BUDGET_FRACTION)


def test_nvml_query_is_none_without_a_driver(monkeypatch):
    from sparseseg.engine import tiling

    monkeypatch.setattr(tiling, "NVML_LIBRARY", "libnvidia-ml-does-not-exist.so.1")
    assert tiling.nvml_free_bytes() is None


# ---------------------------------------------------------------- TensorRT: pure parts

def test_plan_gpu_check_is_by_compute_capability_not_name():
    from sparseseg.engine.backends.tensorrt import check_plan_compatible
    from sparseseg.export.tensorrt import plan_contract

    side = plan_contract({"format": "sparseseg-engine"}, precision="fp16", profile={}, trt_version="10.13.0",
                         gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), version_compatible=False,
                         workspace_gb=4.0)
    check_plan_compatible(side, "10.13.0", "NVIDIA H100 PCIe", (9, 0))
    check_plan_compatible(side, "10.13.0", "NVIDIA H200", (9, 0))
    with pytest.raises(SparsesegError, match="compute capability 9.0"):
        check_plan_compatible(side, "10.13.0", "NVIDIA A100-SXM4-80GB", (8, 0))


class _Flags:
    def __init__(self):
        self.set, self.cleared, self.hardware_compatibility_level = [], [], "NONE"

    def set_flag(self, f):
        self.set.append(f)

    def clear_flag(self, f):
        self.cleared.append(f)


class _Trt:
    class BuilderFlag:
        TF32, VERSION_COMPATIBLE = "TF32", "VERSION_COMPATIBLE"

    class HardwareCompatibilityLevel:
        AMPERE_PLUS = "AMPERE_PLUS"


def test_version_compatible_keeps_hopper_tactics_unless_hardware_compatibility_is_asked():
    from sparseseg.export.tensorrt import configure_builder

    config = _Flags()
    configure_builder(config, _Trt, "fp16", version_compatible=True, hardware_compatible=False)
    assert config.set == ["VERSION_COMPATIBLE"] and config.hardware_compatibility_level == "NONE"
    config = _Flags()
    configure_builder(config, _Trt, "fp32", version_compatible=False, hardware_compatible=True)
    assert config.cleared == ["TF32"] and config.hardware_compatibility_level == "AMPERE_PLUS"


def test_fp32_parity_uses_the_agreement_rule_not_identical_argmax():
    """Defect 8: an fp32 plan within 1e-4 whose argmax flips at an exact tie is not a failure."""
    from sparseseg.export.onnx_export import check_parity

    ref = np.zeros((1, 2, 10, 10, 10), np.float32)
    ref[:, 0] = 1.0
    ref[0, :, 0, 0, 0] = 0.5                                   # a tie: argmax 0
    got = ref.copy()
    got[0, 1, 0, 0, 0] += 1e-6                                 # argmax 1 there, 99.9% agree
    diff, agree = check_parity(ref, got, "fp32", "test")
    assert agree == pytest.approx(0.999)
    with pytest.raises(SparsesegError, match="verification failed"):
        check_parity(ref, ref + 1e-3, "fp32", "test")


# ---------------------------------------------------------------- the plan's throughput arithmetic

def test_dry_run_reports_the_cost_per_kept_voxel_of_the_paper_tile(tmp_path):
    """The paper tile keeps 24x40x40 of its 28x44x44 output on the grid of spacing 8: ~13.9
    MFLOP per kept voxel (533 GFLOP / 38,400), not the 9.84 per output voxel of one tile."""
    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.config import plan_model
    from sparseseg.model.network import SegmentationModel
    from tests.helpers import run_cli

    ck = save_checkpoint(tmp_path / "m.pt", SegmentationModel(plan_model("paper", 3, 3)), None, ["a", "b", "c"], 255)
    np.save(tmp_path / "v.npy", np.zeros((3, 64, 96, 96), np.uint8))
    code, out = run_cli("infer", "--engine", str(ck), str(tmp_path / "v.npy"), "--device", "cpu", "--dry-run",
                        "--tile", "28,44,44")
    assert code == 0, out
    line = next(ln for ln in out.splitlines() if "per kept voxel" in ln)
    assert "keeps 24x40x40 of 28x44x44" in line
    assert 13.6 <= float(line.split(": ")[-1].split()[0]) <= 14.2


# ---------------------------------------------------------------- a GPU engine run against the CPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_run_inference_on_cuda_equals_cpu(tmp_path, backend, padding):
    """The whole engine (zarr in, zarr out, several blocks at the volume border) on CUDA, fp32
    with TF32 off, against the same run on CPU: labels agree on >= 99.9% of voxels (near-ties
    may flip). onnxruntime runs its CUDA provider through IOBinding on device memory."""
    import zarr

    from sparseseg.engine.run import run_inference
    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.network import SegmentationModel
    from sparseseg.volume import open_volume

    if backend == "onnxruntime":
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDA provider here (onnxruntime-gpu not installed)")
    torch.manual_seed(0)
    model = SegmentationModel(tiny_config(depth=2, width=8, classes=3, padding=padding))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    ck = save_checkpoint(tmp_path / "m.pt", model, None, ["a", "b", "c"], 255)
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=(1, 20, 36, 44), chunks=(1, 16, 16, 16), dtype="uint8")
    z[...] = (np.random.default_rng(5).random((1, 20, 36, 44)) * 255).astype(np.uint8)
    tile = (12, 12, 12) if padding == "valid" else (8, 16, 16)
    runs = {}
    for device, kind in (("cpu", "torch"), ("cuda", backend)):
        out = tmp_path / f"{device}.zarr"
        s = run_inference(ck, str(tmp_path / "in.zarr"), out, workers=0, device=device, backend=kind,
                          block=(16, 16, 24), tile=tile, batch=3, progress=False)
        assert s["device"].startswith(device) and s["blocks_failed"] == 0
        runs[device] = open_volume(str(out)).read_labels()
    assert len(np.unique(runs["cpu"])) == 3
    assert (runs["cpu"] == runs["cuda"]).mean() >= 0.999
