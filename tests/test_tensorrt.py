"""TensorRT plans: the runner's logic with a fake engine (CPU, in CI), and plans built and run
end to end through the engine (marked `tensorrt`: only where tensorrt imports and a GPU is)."""

import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sparseseg.cli import main
from sparseseg.errors import SparsesegError
from sparseseg.engine.backends.tensorrt import PlanRunner, check_engine_profile, check_in_profile, torch_dtype
from sparseseg.export.tensorrt import default_plan_tile, profile_shapes
from sparseseg.engine.tiling import profile_tiles
from sparseseg.model.config import ModelConfig
from tests.helpers import tiny_config

GEOM = ModelConfig(1, 2).geometry           # the paper-style valid network, context 44 per side


def _contract(geometry=GEOM, **profile_kw):
    prof = profile_shapes(geometry, 1, profile_kw.pop("tile", (28, 44, 44)), batch=profile_kw.pop("batch", 2),
                          **profile_kw)
    return {"format": "sparseseg-engine", "contract_version": 1, "input_name": "image", "output_name": "logits",
            "geometry": geometry.to_dict(), "in_channels": 1, "num_classes": 2, "profile": prof}


# ------------------------------------------------------------------ a fake TensorRT engine

class FakeDType:
    def __init__(self, name):
        self.name = name


class FakeContext:
    """Records what the runner asks; computes the output shape of a valid network by its context."""

    def __init__(self, engine):
        self.engine = engine
        self.shape = None
        self.addresses = {}
        self.calls = []

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, tuple(shape)))
        if self.engine.reject_shape:
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if self.engine.unknown_output:
            return (-1, 2, -1, -1, -1)
        n, _, *sp = self.shape
        return (n, 2, *[s - 2 * c for s, c in zip(sp, GEOM.context)])

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return name != self.engine.reject_address

    def execute_async_v3(self, stream):
        self.calls.append(("execute_async_v3", stream))
        return not self.engine.fail_execute


class FakeEngine:
    def __init__(self, input_dtype="FLOAT", output_dtype="FLOAT"):
        self.dtypes = {"image": FakeDType(input_dtype), "logits": FakeDType(output_dtype)}
        self.contexts = []
        self.reject_shape = self.unknown_output = self.fail_execute = False
        self.reject_address = None

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class CPURunner(PlanRunner):
    """The real runner with its two CUDA touch points replaced, so its logic runs on CPU."""

    @staticmethod
    def _check_device(x):
        pass

    @staticmethod
    def _stream_handle(x):
        return 1234


def _runner(engine=None, contract=None):
    return CPURunner("fake.plan", engine or FakeEngine(), contract or _contract())


def _opt_input(batch=1):
    return torch.zeros((batch, 1, 116, 132, 132))


def test_runner_sets_shape_addresses_and_enqueues_on_the_stream():
    engine = FakeEngine()
    r = _runner(engine)
    assert r.input_dtype == torch.float32 and r.output_dtype == torch.float32
    x = _opt_input(2)
    out = r.forward(x)
    assert out.shape == (2, 2, 28, 44, 44) and out.dtype == torch.float32
    ctx = engine.contexts[0]
    assert ctx.calls == [("set_input_shape", "image", (2, 1, 116, 132, 132)), ("execute_async_v3", 1234)]
    assert ctx.addresses == {"image": x.data_ptr(), "logits": out.data_ptr()}


def test_runner_casts_to_the_input_binding_dtype():
    engine = FakeEngine(input_dtype="HALF", output_dtype="HALF")
    r = _runner(engine)
    assert r.input_dtype == torch.float16
    out = r.forward(torch.zeros((1, 1, 100, 100, 100), dtype=torch.uint8))
    assert out.dtype == torch.float16 and out.shape == (1, 2, 12, 12, 12)


def test_runner_one_context_per_thread():
    engine = FakeEngine()
    r = _runner(engine)
    r.forward(_opt_input())
    r.forward(_opt_input())
    assert len(engine.contexts) == 1                 # reused within a thread
    seen = []

    def work():
        r.forward(_opt_input())
        seen.append(id(r.context()))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(engine.contexts) == 4 and len(set(seen)) == 3


def test_runner_shape_outside_profile_names_the_profile():
    r = _runner()
    for shape in ((3, 1, 116, 132, 132), (1, 1, 124, 132, 132), (1, 1, 84, 92, 92), (1, 1, 116, 132)):
        with pytest.raises(SparsesegError, match=r"outside this plan's optimization profile \(output tiles "
                                                 r"12x12x12 \.\. 28x44x44 \(opt 28x44x44\), batch 1\.\.2"):
            r.forward(torch.zeros(shape))


def test_runner_checks_tensorrt_return_values():
    engine = FakeEngine()
    r = _runner(engine)
    engine.reject_shape = True
    with pytest.raises(SparsesegError, match=r"TensorRT rejected input shape \[1, 1, 116, 132, 132\].*profile: "):
        r.forward(_opt_input())
    engine.reject_shape = False
    engine.unknown_output = True
    with pytest.raises(SparsesegError, match="could not infer the output shape"):
        r.forward(_opt_input())
    engine.unknown_output = False
    engine.reject_address = "logits"
    with pytest.raises(SparsesegError, match="rejected the address of tensor 'logits'"):
        r.forward(_opt_input())
    engine.reject_address = None
    engine.fail_execute = True
    with pytest.raises(SparsesegError, match="TensorRT execution failed"):
        r.forward(_opt_input())
    broken = FakeEngine()
    broken.create_execution_context = lambda: None
    with pytest.raises(SparsesegError, match="could not create an execution context"):
        _runner(broken).forward(_opt_input())


def test_runner_refuses_host_tensors():
    r = PlanRunner("fake.plan", FakeEngine(), _contract())
    with pytest.raises(SparsesegError, match="runs on CUDA tensors"):
        r.forward(_opt_input())


def test_dtype_mapping():
    assert torch_dtype(FakeDType("FLOAT")) == torch.float32
    assert torch_dtype(FakeDType("HALF")) == torch.float16
    assert torch_dtype(FakeDType("BF16")) == torch.bfloat16
    assert torch_dtype(FakeDType("INT8")) == torch.int8


    class NamelessEnum:                     # older bindings: only str() gives "DataType.HALF"
        def __str__(self):
            return "DataType.HALF"

    assert torch_dtype(NamelessEnum()) == torch.float16
    with pytest.raises(SparsesegError, match="FP4 has no torch equivalent"):
        torch_dtype(FakeDType("FP4"))


def test_profile_tiles_from_the_sidecar():
    c = _contract(tile=(28, 44, 44), tile_min=(12, 20, 20), tile_max=(36, 52, 60), batch=4)
    assert profile_tiles(c) == {"min": (12, 20, 20), "opt": (28, 44, 44), "max": (36, 52, 60), "batch": 4}
    old = dict(c, profile={k: c["profile"][k] for k in ("min", "opt", "max")})   # sidecars without "tiles"
    assert profile_tiles(old) == profile_tiles(c)
    same = ModelConfig(1, 2, padding="same").geometry
    assert profile_tiles(_contract(same, tile=(64, 64, 64)))["opt"] == (64, 64, 64)
    with pytest.raises(SparsesegError, match="records no optimization profile"):
        profile_tiles({k: v for k, v in c.items() if k != "profile"})


def test_engine_profile_must_match_its_sidecar():
    p = _contract()["profile"]
    check_engine_profile([tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])], p)
    with pytest.raises(SparsesegError, match="belongs to another plan"):
        check_engine_profile([p["min"], p["opt"], p["opt"]], dict(p, max=[2, 1, 124, 140, 140]))


def test_check_in_profile_accepts_the_range():
    p = _contract(tile_min=(12, 20, 20))["profile"]
    check_in_profile((1, 1, 100, 108, 108), p)
    check_in_profile((2, 1, 116, 132, 132), p)
    with pytest.raises(SparsesegError, match="inputs"):
        check_in_profile((1, 1, 99, 108, 108), p)


def test_default_plan_tile_follows_the_engine_rule(monkeypatch):
    import sparseseg.engine.tiling as tiling

    contract = _contract()
    monkeypatch.setattr(tiling, "default_tile", lambda c, device, **k: (36, 52, 60))
    assert default_plan_tile(contract, "cuda") == (36, 52, 60)


# ------------------------------------------------------------------ end to end (GPU + TensorRT)


def _run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
def test_plan_built_and_run_through_run_inference(tmp_path, precision):
    from sparseseg.engine.run import run_inference
    from sparseseg.model.contract import read_contract
    from sparseseg.volume import open_volume
    from tests.helpers import blobs
    from tests.test_export import trained_checkpoint

    ck = trained_checkpoint(tmp_path / "m.pt")
    image = blobs(shape=(24, 40, 40), seed=7)[0]
    np.save(tmp_path / "img.npy", image)
    code, out = _run("export", ck, "--plan", tmp_path / "u.plan", "--precision", precision, "--tile", "4,8,8",
                     "--tile-max", "8,16,16", "--batch", "2", "--calibration", tmp_path / "img.npy")
    assert code == 0, out
    assert "vs PyTorch fp32" in out and "strongly typed" in out
    side = read_contract(tmp_path / "u.plan")
    assert side["precision"] == precision and side["strongly_typed"]
    assert profile_tiles(side)["opt"] == (4, 8, 8) and profile_tiles(side)["max"] == (8, 16, 16)
    assert read_contract(tmp_path / "m.onnx")["precision"] == precision    # the graph the plan was built from

    s = run_inference(tmp_path / "u.plan", tmp_path / "img.npy", tmp_path / "p.zarr", workers=0, device="cuda",
                      progress=False)
    assert s["backend"] == "tensorrt"
    run_inference(ck, tmp_path / "img.npy", tmp_path / "t.zarr", workers=0, device="cpu", progress=False)
    got, ref = open_volume(tmp_path / "p.zarr").read_labels(), open_volume(tmp_path / "t.zarr").read_labels()
    agree = (got == ref).mean()
    assert agree == 1.0 if precision == "fp32" else agree >= 0.99, agree
    # a tile outside the plan's profile is a one-line error naming the profile
    with pytest.raises(SparsesegError, match="profile"):
        run_inference(tmp_path / "u.plan", tmp_path / "img.npy", tmp_path / "q.zarr", workers=0, device="cuda",
                      tile=(12, 24, 24), progress=False)
    # two threads, one runner: each gets its own context and the same answer
    runner = PlanRunner(tmp_path / "u.plan")
    x = torch.from_numpy(np.random.default_rng(0).normal(100, 30, [1] + side["profile"]["opt"][1:])).float().cuda()
    results = [None, None]

    def work(i):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            results[i] = runner.forward(x)
        stream.synchronize()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(results[0], results[1])


def test_profile_of_the_end_to_end_arguments():
    """What `--tile 4,8,8 --tile-max 8,16,16 --batch 2` (the end-to-end test's export) builds for the
    checkpoint it trains: input shapes are the tiles plus the context on each side, min is the
    smallest valid tile at batch 1, and a tile off the network's grid or an inverted range is refused."""
    from sparseseg.export.tensorrt import smallest_tile

    geom = tiny_config(depth=2, width=4).geometry
    prof = profile_shapes(geom, 1, (4, 8, 8), tile_max=(8, 16, 16), batch=2)

    def inp(tile):
        return [a + 2 * c for a, c in zip(tile, geom.context)]

    assert prof["opt"] == [2, 1, *inp((4, 8, 8))] and prof["max"] == [2, 1, *inp((8, 16, 16))]
    assert prof["min"] == [1, 1, *inp(smallest_tile(geom))]
    assert prof["tiles"] == {"min": list(smallest_tile(geom)), "opt": [4, 8, 8], "max": [8, 16, 16]}
    with pytest.raises(SparsesegError):
        profile_shapes(geom, 1, (5, 8, 8))                        # not on the network's grid
    with pytest.raises(SparsesegError, match="--tile-min <= --tile <= --tile-max"):
        profile_shapes(geom, 1, (8, 16, 16), tile_max=(4, 8, 8))
    with pytest.raises(SparsesegError, match="--batch"):
        profile_shapes(geom, 1, (4, 8, 8), batch=0)


# ------------------------------------------------------------------ the build call sequence, with a fake TensorRT

class _Recorder:
    def __init__(self, log, name):
        self._log, self._name = log, name

    def __getattr__(self, attr):
        def call(*args, **kw):
            self._log.append((self._name, attr, args, kw))
            return _RESULTS.get((self._name, attr), _Recorder(self._log, attr))
        return call


_RESULTS = {}


def _fake_tensorrt(log):
    """A module with the names build_plan uses; every method call is recorded."""
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.4.0.106"
    enum = lambda *names: types.SimpleNamespace(**{n: f"{n}" for n in names})  # noqa: E731
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = enum("WORKSPACE")
    trt.BuilderFlag = enum("TF32", "VERSION_COMPATIBLE")       # 11.x: no FP16/BF16/INT8 flags
    trt.HardwareCompatibilityLevel = enum("AMPERE_PLUS")

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level):
            pass

    class Parser(_Recorder):
        num_errors = 0

        def parse_from_file(self, path):
            log.append(("parser", "parse_from_file", (path,), {}))
            return True

    class Serialized(bytes):
        pass

    class Builder(_Recorder):
        def __init__(self, logger):
            super().__init__(log, "builder")

        def build_serialized_network(self, network, config):
            log.append(("builder", "build_serialized_network", (), {}))
            return Serialized(b"PLAN")

    class Cache:
        def serialize(self):
            return b"CACHE"

    _RESULTS[("config", "get_timing_cache")] = Cache()
    _RESULTS[("builder", "create_builder_config")] = _Recorder(log, "config")
    trt.Logger, trt.Builder = Logger, Builder
    trt.OnnxParser = lambda network, logger: Parser(log, "parser")
    return trt


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_plan_is_strongly_typed_and_writes_plan_with_its_profile(tmp_path, monkeypatch, precision):
    import json
    import sys
    import types

    from sparseseg.export.tensorrt import build_plan
    from sparseseg.model.contract import read_contract

    log = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(log))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0))
    monkeypatch.setenv("SPARSESEG_CACHE", str(tmp_path / "cache"))
    contract = dict(_contract(), precision=precision, sparseseg_version="0", checkpoint_sha256="x")
    profile = contract.pop("profile")
    side = build_plan(tmp_path / "m.onnx", tmp_path / "u.plan", contract, profile, workspace_gb=2.0)
    calls = [(who, what) for who, what, *_ in log]
    create = next(a for who, what, a, _ in log if what == "create_network")
    assert create == (1,)                                                   # 1 << STRONGLY_TYPED
    flags = [a[0] for who, what, a, _ in log if who == "config" and what in ("set_flag", "clear_flag")]
    assert flags == (["TF32"] if precision == "fp32" else [])              # no precision flags, ever
    set_shape = next(a for who, what, a, _ in log if what == "set_shape")
    assert set_shape == ("image", profile["min"], profile["opt"], profile["max"])
    assert calls.index(("builder", "build_serialized_network")) > calls.index(("config", "add_optimization_profile"))
    assert (tmp_path / "u.plan").read_bytes() == b"PLAN"
    assert (tmp_path / "cache" / "tensorrt-timing.cache").read_bytes() == b"CACHE"
    assert read_contract(tmp_path / "u.plan") == json.loads(json.dumps(side))
    assert side["precision"] == precision and side["strongly_typed"] and side["tensorrt_version"] == "11.4.0.106"
    assert profile_tiles(side)["opt"] == (28, 44, 44)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "u.plan", "u.plan.json"]
