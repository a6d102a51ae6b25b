import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from sparseseg.cli import main
from sparseseg.engine.blocks import Block, block_size, make_blocks, read_plan
from sparseseg.engine.run import run_inference
from sparseseg.engine.tiling import pad_region
from sparseseg.errors import SparsesegError
from sparseseg.model.checkpoint import load_checkpoint, save_checkpoint
from sparseseg.model.network import SegmentationModel
from sparseseg.volume import open_volume
from tests.helpers import tiny_config

ODD = (61, 75, 83)


def make_engine(tmp_path, padding="valid", depth=3, name="m.pt"):
    torch.manual_seed(0)
    cfg = tiny_config(padding=padding, depth=depth, width=4, classes=3)
    model = SegmentationModel(cfg, mean=[100.0], std=[30.0])
    return save_checkpoint(tmp_path / name, model, None, ["a", "b", "c"], 255)


def volume(tmp_path, shape=ODD, name="vol.npy", seed=0):
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 200).astype(np.float32)
    np.save(tmp_path / name, data)
    return tmp_path / name, data


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A .pt engine and its exported .onnx twin (onnxruntime is several times faster on CPU)."""
    d = tmp_path_factory.mktemp("engines")
    ck = make_engine(d)
    assert CliRunner().invoke(main, ["export", str(ck)]).exit_code == 0
    return ck, d / "m.onnx"


def whole_pass(ckpt_path, data):
    model = load_checkpoint(ckpt_path).model
    g = model.cfg.geometry
    outs = [r.output_at_least(n) for r, n in zip(g.axes, data.shape)]
    padded = pad_region(data[None], g.context, [o - n + c for o, n, c in zip(outs, data.shape, g.context)])
    with torch.no_grad():
        logits = model(torch.from_numpy(padded[None]))[0].numpy()
    return logits[(slice(None),) + tuple(slice(0, n) for n in data.shape)]


def assert_matches_whole_pass(labels, logits):
    ref = logits.argmax(0)
    agree = (labels == ref).mean()
    assert agree >= 0.9999, agree
    if agree < 1:
        top2 = np.sort(logits, axis=0)[-2:]
        margin = (top2[1] - top2[0])[labels != ref]
        assert (margin <= 1e-4).all()


def test_blocks_tile_the_volume():
    geom = tiny_config(depth=3).geometry
    blk = block_size(geom, (10, 30, 17), ODD)
    assert all(b % s == 0 for b, s in zip(blk, geom.step))
    blocks = make_blocks(ODD, blk)
    cover = np.zeros(ODD, int)
    for b in blocks:
        cover[b.slices] += 1
    assert (cover == 1).all()


def test_read_plan_gathers_like_whole_volume_padding():
    """A border block's tiles, gathered from its read region on the device, equal the same
    windows of a reflect-padded whole volume."""
    from sparseseg.kernels.torch_ops import gather
    from sparseseg.engine.tiling import tile_input

    geom = tiny_config(depth=3).geometry
    data = (np.random.default_rng(1).random((1, 9, 11, 13)) * 255).astype(np.uint8)
    block = Block((0, 0, 0), (0, 4, 8), (9, 7, 5))
    tile = (4, 4, 4)
    plan = read_plan(block, data.shape[1:], geom, tile, 0.5)
    region = torch.from_numpy(data[(slice(None),) + plan.region])
    tin = tile_input(geom, tile)
    got = gather(region, plan.region_start, plan.offsets, plan.origin, data.shape[1:], tin).numpy()
    big = np.pad(data.astype(np.float32), [(0, 0)] + [(60, 60)] * 3, mode="reflect")
    for n, off in enumerate(plan.offsets):
        starts = [o + f + 60 for o, f in zip(plan.origin, off)]
        want = big[(slice(None),) + tuple(slice(s, s + t) for s, t in zip(starts, tin))]
        assert np.array_equal(got[n], want)


@pytest.mark.parametrize("engine_kind", ["pt", "onnx"])
def test_valid_network_equals_one_pass_any_block_and_tile(tmp_path, engines, engine_kind):
    ck, onnx_engine = engines
    path, data = volume(tmp_path)
    logits = whole_pass(ck, data)
    engine = ck if engine_kind == "pt" else onnx_engine
    configs = [((16, 32, 24), (4, 8, 12)), ((64, 80, 88), None), ((8, 40, 16), (8, 20, 12))]
    for i, (block, tile) in enumerate(configs if engine_kind == "onnx" else configs[1:2]):
        out = tmp_path / f"o{i}.zarr"
        s = run_inference(engine, path, out, workers=0, block=block, tile=tile, progress=False)
        assert s["blocks_computed"] == s["blocks"] > 0
        assert_matches_whole_pass(open_volume(out).read_labels(), logits)


def test_dask_workers_give_the_same_result(tmp_path, engines):
    ck, onnx_engine = engines
    path, data = volume(tmp_path)
    s = run_inference(onnx_engine, path, tmp_path / "o.zarr", workers=2, block=(16, 40, 40), tile=(8, 20, 20),
                      progress=False, probabilities="uint8")
    assert s["blocks_computed"] == 24 and s["backend"] == "onnxruntime"
    assert_matches_whole_pass(open_volume(tmp_path / "o.zarr").read_labels(), whole_pass(ck, data))
    g = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    probs = g["probabilities"][...]
    assert probs.shape == (3,) + ODD and probs.dtype == np.uint8
    assert np.abs(probs.astype(int).sum(0) - 255).max() <= 2


def test_ome_zarr_output_metadata(tmp_path):
    ck = make_engine(tmp_path)
    path, _ = volume(tmp_path, shape=(20, 30, 40))
    run_inference(ck, path, tmp_path / "o.zarr", workers=0, block=(8, 16, 16), progress=False)
    g = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    assert g.metadata.zarr_format == 3
    ms = g.attrs["ome"]["multiscales"][0]
    assert g.attrs["ome"]["version"] == "0.5" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    arr = g[ms["datasets"][0]["path"]]
    assert arr.dtype == np.uint8 and arr.shape == (20, 30, 40) and arr.chunks == (8, 16, 16)
    assert g.attrs["sparseseg_run"]["engine_sha256"]


def independent_blend(model, data, tile, overlap=0.5):
    """One Gaussian-blended pass over the whole volume, written here with plain numpy/torch:
    tiles at multiples of the stride (tile * (1 - overlap), a multiple of the grid step 4), the
    last one ending past the volume on reflect padding, weights exp(-x^2 / 2 (t/8)^2) per axis
    normalized to max 1 and floored at 1e-3."""
    stride = [max(4, int(t * (1 - overlap)) // 4 * 4) for t in tile]
    counts = [int(np.ceil(max(n - t, 0) / s)) + 1 for n, t, s in zip(data.shape, tile, stride)]
    ext = [(c - 1) * s + t for c, s, t in zip(counts, stride, tile)]
    padded = np.pad(data, [(0, e - n) for e, n in zip(ext, data.shape)], mode="reflect")
    w = np.ones(tile, np.float32)
    for axis, t in enumerate(tile):
        x = np.arange(t) - (t - 1) / 2
        g = np.exp(-0.5 * (x / (t / 8)) ** 2).astype(np.float32)
        w = w * g.reshape([t if a == axis else 1 for a in range(3)])
    w = np.maximum(w / w.max(), 1e-3).astype(np.float32)
    acc = np.zeros((3,) + tuple(ext), np.float32)
    wsum = np.zeros(ext, np.float32)
    for k in np.ndindex(*counts):
        sl = tuple(slice(i * s, i * s + t) for i, s, t in zip(k, stride, tile))
        with torch.no_grad():
            lg = model(torch.from_numpy(padded[sl][None, None].astype(np.float32)))[0].numpy()
        acc[(slice(None),) + sl] += lg * w
        wsum[sl] += w
    crop = tuple(slice(0, n) for n in data.shape)
    blended = acc[(slice(None),) + crop] / wsum[crop]
    return blended.argmax(0), torch.softmax(torch.from_numpy(blended), 0).numpy()


def test_same_padding_blends_per_block_without_seams(tmp_path):
    """Blocks blend the global tile grid, so the result equals one blended pass over the whole
    volume (computed independently in the test) for any block size, 0 or 2 workers."""
    ck = make_engine(tmp_path, padding="same", depth=2)
    path, data = volume(tmp_path, shape=(30, 37, 41))
    model = load_checkpoint(ck).model
    ref, ref_p = independent_blend(model, data, (8, 16, 16))
    for i, (block, workers, batch) in enumerate([((16, 16, 16), 0, 1), ((8, 24, 40), 0, 3), ((32, 40, 48), 0, 2),
                                                 ((16, 24, 24), 2, 2)]):
        run_inference(ck, path, tmp_path / f"o{i}.zarr", workers=workers, block=block, tile=(8, 16, 16),
                      progress=False, probabilities="float16", batch=batch, backend="torch")
        got = open_volume(tmp_path / f"o{i}.zarr").read_labels()
        assert (got == ref).mean() >= 0.9999
        probs = zarr.open_group(str(tmp_path / f"o{i}.zarr"), mode="r")["probabilities"][...]
        assert np.abs(probs.astype(np.float32) - ref_p).max() < 2e-3          # float16 storage


def _cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "sparseseg.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            start_new_session=True)


def test_resume_after_kill_recomputes_only_unfinished_blocks(tmp_path):
    ck = make_engine(tmp_path)
    path, _ = volume(tmp_path, shape=(24, 48, 48))
    args = ["infer", "--engine", ck, path, "--block", "8,16,16", "--workers", "0", "--json"]
    ref = _cli(*args, "--output", tmp_path / "ref.zarr")
    assert ref.wait(120) == 0, ref.stderr.read()
    p = _cli(*args, "--output", tmp_path / "o.zarr", env={"SPARSESEG_BLOCK_DELAY": "0.3"})
    done_dir = tmp_path / "o.zarr" / ".sparseseg" / "done"
    deadline = time.time() + 60
    while time.time() < deadline and (not done_dir.exists() or len(list(done_dir.iterdir())) < 4):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    finished = len(list(done_dir.iterdir()))
    assert 4 <= finished < 27
    r = _cli(*args, "--output", tmp_path / "o.zarr")          # no --resume: refused, untouched
    assert r.wait(60) == 1 and "--resume" in r.stderr.read()
    assert len(list(done_dir.iterdir())) == finished
    r = _cli(*args, "--output", tmp_path / "o.zarr", "--resume")
    assert r.wait(120) == 0
    summary = json.loads(r.stdout.read().strip().splitlines()[-1])
    assert summary["blocks_skipped"] == finished and summary["blocks_computed"] == 27 - finished
    assert np.array_equal(open_volume(tmp_path / "o.zarr").read_labels(), open_volume(tmp_path / "ref.zarr").read_labels())


def test_worker_killed_mid_run_loses_nothing(tmp_path, monkeypatch):
    import threading

    import psutil

    ck = make_engine(tmp_path)
    path, data = volume(tmp_path, shape=(24, 48, 48))
    monkeypatch.setenv("SPARSESEG_BLOCK_DELAY", "0.4")
    result = {}

    def go():
        result["s"] = run_inference(ck, path, tmp_path / "o.zarr", workers=2, block=(8, 16, 16), progress=False,
                                    group_size=1)

    t = threading.Thread(target=go)
    t.start()
    done_dir = tmp_path / "o.zarr" / ".sparseseg" / "done"
    deadline = time.time() + 90
    while time.time() < deadline and (not done_dir.exists() or len(list(done_dir.iterdir())) < 3):
        time.sleep(0.05)
    # worker processes are spawned children of this process (the nannies run in it)
    workers = [c for c in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
    assert workers, "no dask worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    t.join(180)
    assert result["s"]["blocks_computed"] == 27
    assert_matches_whole_pass(open_volume(tmp_path / "o.zarr").read_labels(), whole_pass(ck, data))


MAKE_ZARR = """
import sys, numpy as np, zarr
shape = tuple(int(v) for v in sys.argv[2].split(","))
a = zarr.create_array(sys.argv[1], shape=shape, chunks=(16, 128, 128), dtype="float32")
rng = np.random.default_rng(0)
for z in range(0, shape[0], 16):
    a[z:z + 16] = rng.random((min(16, shape[0] - z),) + shape[1:], dtype=np.float32) * 200
"""

# VmHWM, not ru_maxrss: the latter keeps the parent's (pytest's) high-water mark across fork+exec.
MEASURE = """
import sys
from sparseseg.engine.backends import BackendSpec, cached_backend
from sparseseg.engine.run import run_inference

def peak():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])

cached_backend(BackendSpec(sys.argv[1], "auto", "fp32"))          # imports and engine load: the baseline
before = peak()
run_inference(sys.argv[1], sys.argv[2], sys.argv[3], workers=0, block=(32, 128, 128), progress=False)
print(before, peak())
"""


def test_peak_memory_does_not_grow_with_volume(tmp_path):
    """Same blocks, 4x the voxels (8 M -> 32 M, 32 -> 128 MB of float32 input): peak RSS stays
    within 1.3x, and so does its growth above the baseline (imports and engine), which a run
    that held the volume in memory would multiply."""
    # A one-level network: the test is about memory, not about the network.
    torch.manual_seed(0)
    model = SegmentationModel(tiny_config(depth=1, width=2), mean=[100.0], std=[30.0])
    ck = save_checkpoint(tmp_path / "cheap.pt", model, None, ["a", "b"], 255)
    assert CliRunner().invoke(main, ["export", str(ck)]).exit_code == 0
    onnx_engine = tmp_path / "cheap.onnx"
    peaks, growth = [], []
    for shape in ("32,512,512", "128,512,512"):
        store = tmp_path / f"v{shape.split(',')[0]}.zarr"
        subprocess.run([sys.executable, "-c", MAKE_ZARR, str(store), shape], check=True, timeout=300)
        r = subprocess.run([sys.executable, "-c", MEASURE, str(onnx_engine), str(store), str(store) + ".out.zarr"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        before, peak = map(int, r.stdout.split()[-2:])
        peaks.append(peak)
        growth.append(peak - before)
    print("peak RSS KiB", peaks, "growth above baseline KiB", growth)
    assert peaks[1] <= 1.3 * peaks[0], peaks
    assert growth[1] <= 1.3 * growth[0] + 16_000, growth      # KiB; 16 MB slack for allocator noise


def test_infer_error_paths(tmp_path):
    ck = make_engine(tmp_path)
    path, data = volume(tmp_path, shape=(12, 20, 20))

    def err(args, text):
        r = CliRunner().invoke(main, ["infer", *map(str, args)])
        assert r.exit_code == 1 and r.output.startswith("error: ") and text in r.output, r.output
        assert r.output.count("\n") == 1, r.output

    base = ["--workers", "0"]
    err(["--engine", ck, tmp_path / "missing.zarr", *base], "no such file")
    (tmp_path / "corrupt.zarr").mkdir()
    (tmp_path / "corrupt.zarr" / "zarr.json").write_text("{not json")
    err(["--engine", ck, tmp_path / "corrupt.zarr", *base], "cannot open zarr store")
    np.save(tmp_path / "two.npy", np.zeros((2, 12, 20, 20), np.float32))
    err(["--engine", ck, tmp_path / "two.npy", *base], "engine expects 1")
    np.save(tmp_path / "cplx.npy", np.zeros((12, 20, 20), np.complex64))
    err(["--engine", ck, tmp_path / "cplx.npy", *base], "unsupported dtype")
    bad = data.copy()
    bad[11, 19, 19] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    # a bad block is retried, then recorded while the others go on: one line per failed block
    r = CliRunner().invoke(main, ["infer", "--engine", str(ck), str(tmp_path / "inf.npy"), "--block", "8,16,16",
                                  *base])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "Traceback" not in r.output, r.output
    assert "block 0_0_0 (z 0:8, y 0:16, x 0:16): NaN or Inf in the input of block 0_0_0 (z 0:8" in r.output
    (tmp_path / "fake.onnx").write_bytes(b"garbage")
    err(["--engine", tmp_path / "fake.onnx", path, *base], "not a readable ONNX model")
    (tmp_path / "fake.pt").write_bytes(b"garbage")
    err(["--engine", tmp_path / "fake.pt", path, *base], "checkpoint")
    err(["--engine", tmp_path / "x.txt", path, *base], "no such engine")
    (tmp_path / "x.txt").write_text("x")
    err(["--engine", tmp_path / "x.txt", path, *base], "unknown engine type")
    out = tmp_path / "o.zarr"
    r = CliRunner().invoke(main, ["infer", "--engine", str(ck), str(path), "--output", str(out), *base])
    assert r.exit_code == 0, r.output
    before = open_volume(out).read_labels()
    err(["--engine", ck, path, "--output", out, *base], "exists")
    other = make_engine(tmp_path, depth=2, name="other.pt")
    err(["--engine", other, path, "--output", out, "--resume", *base], "different engine")
    err(["--engine", ck, path, "--output", out, "--resume", "--block", "4,8,8", *base], "different --block")
    assert np.array_equal(open_volume(out).read_labels(), before)
    err(["--engine", ck, path, "--output", tmp_path / "o2.zarr", "--scheduler", "tcp://127.0.0.1:9"],
        "cannot reach the Dask scheduler")
    err(["--engine", ck, path, "--tile", "5,5,5", *base], "nearest valid")


def test_dry_run_figures_match_a_hand_count(tmp_path):
    """--dry-run on a small case: blocks, tiles, voxels read (reflected ranges counted with
    np.pad), FLOPs from torch's flop counter on a real forward; nothing is written."""
    from torch.utils.flop_counter import FlopCounterMode

    ck = make_engine(tmp_path)
    path, _ = volume(tmp_path, shape=(20, 30, 40))
    tile, block = (4, 8, 8), (8, 16, 16)
    s = run_inference(ck, path, tmp_path / "o.zarr", block=block, tile=tile, batch=2, device="cpu", dry_run=True)
    assert not (tmp_path / "o.zarr").exists()
    model = load_checkpoint(ck).model
    ctx = model.cfg.geometry.context
    tin = tuple(t + 2 * c for t, c in zip(tile, ctx))
    tiles, read = 1, 1
    for n, b, t, c in zip((20, 30, 40), block, tile, ctx):
        starts = range(0, n, b)
        counts = [-(-min(b, n - s) // t) for s in starts]          # stride = tile (a multiple of the step 4)
        tiles *= sum(counts)
        coords = np.pad(np.arange(n), 200, mode="reflect")
        read *= sum(len(np.unique(coords[200 + s - c:200 + s - c + k * t + 2 * c])) for s, k in zip(starts, counts))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros((1, 1) + tin))
    assert s["blocks"] == 3 * 2 * 3 and s["tiles"] == tiles and s["batch"] == 2
    assert s["tile_input"] == list(tin) and s["tile_output"] == list(tile)
    assert s["input_voxels_per_output_voxel"] == round(read / 24000, 4)
    assert s["flops_per_output_voxel"] == round(tiles * fc.get_total_flops() / 24000, 1)
    assert s["recomputed_fraction"] == 0
    # same padding: tiles of the global grid touching two blocks are counted as recomputed
    ck_same = make_engine(tmp_path, padding="same", depth=2, name="same.pt")
    s = run_inference(ck_same, path, None, block=(8, 32, 40), tile=(8, 16, 16), device="cpu", dry_run=True)
    # z: global tiles at 0, 4, 8, 12 (stride 4, last ends at 20); blocks [0,8) [8,16) [16,20) touch
    # tiles {0,4}, {4,8,12}, {12} -> 6 computations of 4 unique; y and x: one block each
    unique_yx = (1 + -(-(30 - 16) // 8)) * (1 + -(-(40 - 16) // 8))
    assert s["tiles"] == 6 * unique_yx and s["recomputed_fraction"] == round(1 - 4 / 6, 4)


def test_json_prints_one_object(tmp_path):
    ck = make_engine(tmp_path)
    path, _ = volume(tmp_path, shape=(12, 20, 20))
    for extra in (["--dry-run", "--assume-voxels-per-second", "1000"], ["--output", str(tmp_path / "o.zarr")]):
        r = CliRunner().invoke(main, ["infer", "--engine", str(ck), str(path), "--workers", "0", "--device", "cpu",
                                      "--json", *extra])
        assert r.exit_code == 0, r.output
        obj = json.loads(r.stdout)                  # the whole of stdout is one JSON object
        assert isinstance(obj, dict) and obj["tile_output" if "--dry-run" in extra else "output"]
    assert obj["blocks_computed"] == 1
    r = CliRunner().invoke(main, ["infer", "--engine", str(ck), str(path), "--dry-run", "--device", "cpu",
                                  "--assume-voxels-per-second", "1000"])
    assert "projected wall time" in r.stdout and "MFLOP per output voxel" in r.stdout


def test_out_of_memory_halves_the_batch_then_names_the_options(monkeypatch):
    """An injected CUDA out-of-memory error: one retry with half the batch (same result), then a
    one-line error naming --tile and --batch."""
    import sparseseg
    from sparseseg.engine import backends
    from sparseseg.errors import SparsesegError

    torch.manual_seed(0)
    model = SegmentationModel(tiny_config(depth=2, width=4), mean=[100.0], std=[30.0]).eval()
    image = (np.random.default_rng(0).random((12, 40, 40)) * 200).astype(np.float32)
    run = dict(tile=(4, 8, 8), batch=4, device="cpu", backend="torch")     # the patched backend
    want, _ = sparseseg.predict(model, image, **run)
    forward = backends.TorchBackend.forward
    seen = []

    def limited(self, x, limit):
        seen.append(len(x))
        if len(x) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, x)

    monkeypatch.setattr(backends.TorchBackend, "forward", lambda self, x: limited(self, x, 2))
    got, _ = sparseseg.predict(model, image, **run)
    assert np.array_equal(got, want) and seen[0] == 4 and max(seen[1:]) == 2
    monkeypatch.setattr(backends.TorchBackend, "forward", lambda self, x: limited(self, x, 0))
    with pytest.raises(SparsesegError, match="out of device memory.*--tile or --batch"):
        sparseseg.predict(model, image, **run)


def _one_pass(model, image):
    """One forward over the whole reflect-padded (C, Z, Y, X) image, cropped to it: what a
    valid network's tiled prediction must equal."""
    g = model.cfg.geometry
    outs = [r.output_at_least(n) for r, n in zip(g.axes, image.shape[1:])]
    padded = pad_region(image, g.context, [o - n + c for o, n, c in zip(outs, image.shape[1:], g.context)])
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(padded, np.float32))[None])[0]
    return torch.softmax(logits, 0).numpy()[(slice(None),) + tuple(slice(0, n) for n in image.shape[1:])]


def test_predict_model_object_runs_the_engines_cpu_backend():
    """A model object on CPU runs through the engine's CPU default for a .pt (OpenVINO where
    installed, else ONNX Runtime), agrees with torch, and is exported again when its weights
    change (no stale cache)."""
    import importlib.util

    import sparseseg
    from sparseseg.engine.backends.select import model_backend_kind
    from sparseseg.engine.predict import model_backend

    fastest = "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    assert model_backend_kind("cpu", "fp32", "auto") == fastest
    assert model_backend_kind("cpu", "fp32", "torch") == "torch"
    torch.manual_seed(0)
    model = SegmentationModel(tiny_config(depth=2, width=4, classes=3), mean=[100.0], std=[30.0]).eval()
    image = (np.random.default_rng(1).random((14, 30, 30)) * 200).astype(np.float32)
    seen = []
    for step in range(2):
        with torch.no_grad():                   # "train" it: each prediction must follow the weights
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        lab, prob = sparseseg.predict(model, image, device="cpu", probabilities=True)
        assert model_backend(model, "cpu").name == fastest
        lab_t, prob_t = sparseseg.predict(model, image, device="cpu", backend="torch", probabilities=True)
        assert (lab == lab_t).mean() >= 0.999 and np.abs(prob - prob_t).max() < 1e-3
        assert len(np.unique(lab_t)) > 1
        seen.append(lab_t)
    assert (seen[0] != seen[1]).mean() > 0.01           # so a stale export would have failed above


@pytest.mark.parametrize("mode", ["volume", "percentile"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "engine file"])
def test_per_volume_normalization_is_applied_exactly_once(tmp_path, monkeypatch, mode, backend):
    """'volume'/'percentile' models keep an identity in the graph and the engine applies the
    input volume's statistics in the gather: the result equals one pass over the normalized
    volume, and differs clearly from normalizing twice or not at all."""
    import sparseseg
    from sparseseg.model.normalization import apply, volume_statistics

    monkeypatch.setenv("SPARSESEG_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = SegmentationModel(tiny_config(depth=2, width=4, classes=3), normalization=mode).eval()
    rng = np.random.default_rng(2)
    image = (rng.random((1, 14, 30, 30)) * 800 + 3000).astype(np.float32)
    image[0, 3, 4, 5:9] = 60000.0                      # saturated pixels: the percentile clip matters
    stats = volume_statistics(image, model.normalization)
    once = apply(image, stats)
    want = _one_pass(model, once)
    if backend == "engine file":
        source = save_checkpoint(tmp_path / "m.pt", model, None, ["a", "b", "c"], 255)   # .pt: ONNX Runtime
        _, got = sparseseg.predict(source, image[0], device="cpu", probabilities="float32")
    else:
        _, got = sparseseg.predict(model, image[0], device="cpu", backend=backend, probabilities="float32")
    assert np.abs(got - want).max() < 1e-4
    for wrong in (image, apply(once, stats)):          # not at all / twice: far outside that bound
        assert np.abs(_one_pass(model, wrong) - want).max() > 2e-3


def test_resume_reuses_the_recorded_tile_when_the_default_changes(tmp_path, monkeypatch):
    """The default tile/batch depend on free GPU memory: a resume must take the recorded block,
    tile and batch, not today's defaults (simulated by patching the planner), and an explicitly
    different --tile is refused in one line."""
    from sparseseg.engine import tiling
    from sparseseg.errors import SparsesegError

    ck = make_engine(tmp_path)
    path, data = volume(tmp_path, shape=(12, 30, 30))
    out = tmp_path / "o.zarr"
    first = run_inference(ck, path, out, workers=0, block=(8, 16, 16), tile=(4, 12, 12), batch=2, progress=False,
                          device="cpu")
    want = open_volume(out).read_labels()
    done_dir = out / ".sparseseg" / "done"
    labels = zarr.open_group(str(out), mode="r+")["0"]
    for marker in sorted(done_dir.iterdir())[:3]:          # as if killed before these were finished
        start, shape = (json.loads(part) for part in marker.read_text().replace("] [", "]|[").split("|"))
        labels[tuple(slice(a, a + b) for a, b in zip(start, shape))] = 0
        marker.unlink()
    other = (12, 20, 20) if tuple(first["tile"]) != (12, 20, 20) else (4, 20, 20)
    monkeypatch.setattr(tiling, "default_tile", lambda *a, **k: other)
    monkeypatch.setattr(tiling, "default_batch", lambda *a, **k: 5)
    again = run_inference(ck, path, out, workers=0, resume=True, progress=False, device="cpu")
    assert again["tile"] == first["tile"] and again["batch"] == 2 and again["block"] == [8, 16, 16]
    assert again["blocks_skipped"] == first["blocks"] - 3 and again["blocks_computed"] == 3
    assert np.array_equal(open_volume(out).read_labels(), want)
    with pytest.raises(SparsesegError) as e:
        run_inference(ck, path, out, workers=0, resume=True, tile=other, progress=False, device="cpu")
    assert "different --tile (4x12x12, not" in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(main, ["infer", "--engine", str(ck), str(path), "--output", str(out), "--resume",
                                  "--tile", ",".join(map(str, other)), "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("error: cannot resume")
    assert len(list(done_dir.iterdir())) == first["blocks"]        # nothing lost by the refusals


def test_cpu_default_skips_openvino_in_threads_python_did_not_start():
    # OpenVINO crashed the process from napari's Qt worker thread (a thread Python did not
    # start); Python's own threads (Dask workers) keep the fastest backend.
    import _thread
    import importlib.util
    import threading

    from sparseseg.engine.backends import fastest_cpu_backend

    got, done = [], threading.Event()

    def foreign():
        got.append(fastest_cpu_backend())
        done.set()

    _thread.start_new_thread(foreign, ())
    assert done.wait(30)
    t = threading.Thread(target=lambda: got.append(fastest_cpu_backend()))
    t.start()
    t.join()
    assert got == ["onnxruntime", "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"]


def test_cpu_bf16_runs_openvino_and_says_so_otherwise(monkeypatch):
    """On CPU reduced precision is bf16 through OpenVINO: fp16, or bf16 pinned to another
    backend, or bf16 without the openvino package, is a one-line SparsesegError."""
    import importlib.util

    from sparseseg.engine.backends import BackendSpec, model_backend_kind, resolve_backend

    for precision, backend, says in [("fp16", "auto", "needs a CUDA device"),
                                     ("bf16", "onnxruntime", "not --backend onnxruntime"),
                                     ("bf16", "torch", "not --backend torch")]:
        with pytest.raises(SparsesegError, match=says):
            resolve_backend(BackendSpec("m.pt", "cpu", precision, backend=backend))
    assert resolve_backend(BackendSpec("m.plan", "cpu", "bf16", backend="auto")) == "tensorrt"  # refused later
    if importlib.util.find_spec("openvino"):
        assert model_backend_kind("cpu", "bf16", "auto") == "openvino"
        assert resolve_backend(BackendSpec("m.onnx", "cpu", "bf16")) == "openvino"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    with pytest.raises(SparsesegError, match="needs the openvino package"):
        model_backend_kind("cpu", "bf16", "auto")


def test_cpu_bf16_labels_agree_with_fp32():
    """bf16 on a CPU with bf16 units (OpenVINO) keeps >= 99.5% of the fp32 labels on a network
    whose labels are not all one class (the issue's accuracy bar for reduced precision); on a
    CPU without them it is a one-line error."""
    import openvino as ov       # a dependency

    import sparseseg

    torch.manual_seed(0)
    model = SegmentationModel(tiny_config(depth=2, width=8, classes=3), mean=[100.0], std=[30.0]).eval()
    image = (np.random.default_rng(2).random((14, 40, 40)) * 200).astype(np.float32)
    image[:, :20] *= 0.3                                   # two textures, so that labels vary
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(SparsesegError, match="needs bf16 units"):
            sparseseg.predict(model, image, device="cpu", precision="bf16")
        return
    fp32, p32 = sparseseg.predict(model, image, device="cpu", backend="openvino", probabilities=True)
    bf16, p16 = sparseseg.predict(model, image, device="cpu", precision="bf16", probabilities=True)
    assert len(np.unique(fp32)) > 1
    assert (fp32 == bf16).mean() >= 0.995 and 0 < np.abs(p32 - p16).max() < 0.05   # bf16 really ran
