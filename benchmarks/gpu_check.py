"""The Python steps of benchmarks/gpu_check.sh, one per subcommand; each prints one JSON record
per line ("RECORD {...}") as soon as it is measured, so a step cut off by its time cap keeps
what it finished. Without a CUDA GPU every step but `versions` prints one record saying it was
skipped and why, and exits 0 (so the script can be tried on CPU up to its first CUDA need).

    python benchmarks/gpu_check.py versions|race|compare|paper|merge
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AGREEMENT = 0.999               # CPU vs CUDA labels, fp32 with TF32 off: near-ties may flip


def record(step: str, **fields) -> dict:
    rec = {"step": step, **fields}
    print("RECORD " + json.dumps(rec, default=str), flush=True)
    return rec


def cuda_or_skip(step: str) -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    record(step, skipped="needs a CUDA GPU (torch.cuda.is_available() is False)")
    return False


def _tiny_model(padding: str):
    import torch

    from sparseseg.model.network import SegmentationModel
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    model = SegmentationModel(tiny_config(depth=2, width=8, classes=3, padding=padding)).eval()
    with torch.no_grad():                   # weights that give all three classes
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _tiny_image():
    return (np.random.default_rng(5).random((20, 36, 44)) * 200).astype(np.float32)


def _tiny_run(padding: str) -> dict:
    return dict(tile=(12, 12, 12) if padding == "valid" else (8, 16, 16), block=(16, 16, 24), batch=3,
                backend="torch")


# ---------------------------------------------------------------- versions

def versions() -> None:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    for m in ("cupy", "onnxruntime", "tensorrt", "triton", "zarr", "dask", "distributed", "dask_cuda"):
        try:
            info[m] = getattr(importlib.import_module(m), "__version__", "?")
        except Exception as e:  # noqa: BLE001  (a missing or broken package is a finding, not a failure)
            info[m] = f"missing ({type(e).__name__})"
    if info.get("onnxruntime", "").split(" ")[0][:1].isdigit():
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    record("versions", **info)


# ---------------------------------------------------------------- race detectors

def race() -> None:
    """Labels overwritten with a sentinel (255) on the compute stream after they are computed,
    held there by a GPU sleep, then restored: a download not ordered after the compute copies
    sentinels. Then the stitch kernel's offsets (guard bytes around the labels) and indexing
    past 2^31 elements."""
    if not cuda_or_skip("race"):
        return
    import torch

    import sparseseg
    from sparseseg.engine import worker

    orig = worker.BlockRunner._compute

    def delayed(self, block, plan, region, staged):
        labels, probs = orig(self, block, plan, region, staged)
        if self.cuda:
            keep = labels.clone()
            labels.fill_(255)
            torch.cuda._sleep(100_000_000)
            labels.copy_(keep)
        return labels, probs

    for padding in ("valid", "same"):
        model, img = _tiny_model(padding), _tiny_image()
        cpu, _ = sparseseg.predict(model, img, device="cpu", **_tiny_run(padding))
        worker.BlockRunner._compute = delayed
        try:
            for kernels in ("torch", "cuda"):
                try:
                    got, _ = sparseseg.predict(model, img, device="cuda", kernels=kernels, **_tiny_run(padding))
                except Exception as e:  # noqa: BLE001  (recorded: the step goes on with the next case)
                    record("race", padding=padding, kernels=kernels, passed=False, error=f"{type(e).__name__}: {e}")
                    continue
                agree, sentinels = float((got == cpu).mean()), int((got == 255).sum())
                record("race", padding=padding, kernels=kernels, agreement=agree, sentinels=sentinels,
                       passed=sentinels == 0 and agree >= AGREEMENT)
        finally:
            worker.BlockRunner._compute = orig
    _kernel_detectors()


def _kernel_detectors() -> None:
    import torch

    from sparseseg.kernels import reference as ref

    try:
        from sparseseg.kernels import gpu
        ok = True
        for trial in range(20):
            n = 2 + trial % 3
            lg = torch.randn(n, 3, 8, 8, 8, device="cuda")
            dst, keep = [(8 * i, 0, 0) for i in range(n)], [(8, 8, 8)] * n
            guard = torch.full((3, 8 * n, 8, 8), 7, dtype=torch.uint8, device="cuda")
            want = torch.zeros((8 * n, 8, 8), dtype=torch.uint8, device="cuda")
            ref.stitch_valid(lg, dst, keep, want)
            gpu.stitch_valid(lg, dst, keep, guard[1])
            torch.cuda.synchronize()
            ok &= torch.equal(guard[1], want) and not bool((guard[0] != 7).any() or (guard[2] != 7).any())
        record("kernel_offsets", trials=20, passed=bool(ok))
        n = 1300                                            # 1300^3 > 2^31 elements
        region = torch.randint(0, 255, (1, n, n, n), dtype=torch.uint8, device="cuda")
        for origin in ((n - 16,) * 3, (n - 8,) * 3):
            a = (region, (0, 0, 0), [(0, 0, 0)], origin, (n, n, n), (16, 16, 16), None, torch.float32)
            record("kernel_gather_2_31", origin=origin, passed=bool(torch.equal(gpu.gather(*a), ref.gather(*a))))
        del region
        lab = torch.zeros((n, n, n), dtype=torch.uint8, device="cuda")
        lg = torch.randn(1, 3, 8, 8, 8, device="cuda")
        gpu.stitch_valid(lg, [(n - 8,) * 3], [(8, 8, 8)], lab)
        record("kernel_stitch_2_31", passed=bool(torch.equal(lab[-8:, -8:, -8:], lg[0].argmax(0).to(torch.uint8))))
    except Exception as e:  # noqa: BLE001
        record("kernel_detectors", passed=False, error=f"{type(e).__name__}: {str(e)[:300]}")


# ---------------------------------------------------------------- CPU vs CUDA labels

def compare() -> None:
    """Labels of a valid and a same-padding network, CPU vs CUDA, both --kernels, fp32 (TF32 off)."""
    if not cuda_or_skip("compare"):
        return
    import torch

    import sparseseg

    for padding in ("valid", "same"):
        model, img = _tiny_model(padding), _tiny_image()
        cpu, _ = sparseseg.predict(model, img, device="cpu", **_tiny_run(padding))
        for kernels in ("torch", "cuda"):
            try:
                got, _ = sparseseg.predict(model, img, device="cuda", kernels=kernels, precision="fp32",
                                           **_tiny_run(padding))
                agree = float((got == cpu).mean())
                record("compare", padding=padding, kernels=kernels, agreement=agree, classes=len(np.unique(cpu)),
                       tf32=bool(torch.backends.cudnn.allow_tf32), passed=agree >= AGREEMENT)
            except Exception as e:  # noqa: BLE001
                record("compare", padding=padding, kernels=kernels, passed=False, error=f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------- the paper network

PAPER_TILE = (28, 44, 44)


def paper() -> None:
    """Model-only and zarr -> zarr (uint8, several blocks) for fp32/tf32/fp16 at the default and
    the paper tile, best of two, with the reader and writer threads' busy time."""
    if not cuda_or_skip("paper"):
        return
    import torch
    import zarr

    from sparseseg.engine import worker
    from sparseseg.engine.measure import tile_cost
    from sparseseg.engine.run import run_inference
    from sparseseg.engine.tiling import tile_input
    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.config import plan_model
    from sparseseg.model.network import SegmentationModel

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    torch.manual_seed(0)
    model = SegmentationModel(plan_model("paper", 3, 3), mean=[100.0] * 3, std=[40.0] * 3)
    ck = save_checkpoint(work / "m.pt", model, None, ["a", "b", "c"], 255)
    shape = (128, 512, 512)                               # 4 default blocks of 128x256x256
    src = zarr.create_array(str(work / "in.zarr"), shape=(3,) + shape, chunks=(3, 64, 128, 128), dtype="uint8")
    src[...] = np.random.default_rng(0).integers(0, 256, (3,) + shape, dtype=np.uint8)
    busy = {"read": 0.0, "write": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                busy[key] += time.perf_counter() - t
        return wrapper

    worker.BlockRunner.stage = timed("read", worker.BlockRunner.stage)
    worker.write_block = timed("write", worker.write_block)
    geometry = model.cfg.geometry
    for precision in ("fp16", "tf32", "fp32"):            # fastest first: a cut-off step keeps the most
        for which in ("default", "paper"):
            tile = None if which == "default" else PAPER_TILE
            opts = dict(workers=0, device="cuda", precision=precision, tile=tile, progress=False, overwrite=True)
            try:
                plan = run_inference(ck, str(work / "in.zarr"), None, dry_run=True, **opts)
                tout = tuple(plan["tile_output"])
                _model_only(model, geometry, tout, plan["batch"], precision, tile_cost(
                    model.cfg.to_dict(), (1, 3) + tile_input(geometry, tout))[1], plan["tile_kept"])
                best = None
                for r in range(2):
                    busy.update(read=0.0, write=0.0)
                    t = time.perf_counter()
                    s = run_inference(ck, str(work / "in.zarr"), work / f"out_{precision}_{which}.zarr", **opts)
                    dt = time.perf_counter() - t
                    if best is None or dt < best["seconds"]:
                        best = {"seconds": round(dt, 3), "voxels_per_second": round(s["voxels"] / dt),
                                "reader_busy_s": round(busy["read"], 3), "writer_busy_s": round(busy["write"], 3)}
                record("paper_e2e", precision=precision, tile=which, tile_output=list(tout), batch=plan["batch"],
                       blocks=plan["blocks"], voxels=plan["voxels"], **best)
            except Exception as e:  # noqa: BLE001
                record("paper_e2e", precision=precision, tile=which, passed=False,
                       error=f"{type(e).__name__}: {str(e)[:300]}")


def _model_only(model, geometry, tout, batch, precision, flops, kept) -> None:
    import torch

    from sparseseg.engine.backends import TorchBackend, model_contract
    from sparseseg.engine.tiling import tile_input

    backend = TorchBackend(model, model_contract(model), "cuda", precision)
    x = torch.rand((batch, 3) + tile_input(geometry, tout), device="cuda") * 255
    times = []
    for _ in range(3):                                    # the first includes cudnn.benchmark's search
        torch.cuda.synchronize()
        t = time.perf_counter()
        backend.forward(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    dt = min(times[1:])
    record("paper_model_only", precision=precision, tile_output=list(tout), batch=batch, seconds=round(dt, 4),
           kept_voxels_per_second=round(batch * int(np.prod(kept)) / dt), tflops=round(batch * flops / dt / 1e12, 1))
    del backend, x
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- one JSON from the log

def merge(log: str, out: str, device: str) -> None:
    """Every RECORD line of the log, and each step's exit status ("=== rc=N name"), into one JSON."""
    records, steps = [], {}
    for line in Path(log).read_text(errors="replace").splitlines():
        if line.startswith("RECORD "):
            records.append(json.loads(line[7:]))
        elif line.startswith("=== rc="):
            rc, name = line[7:].split(" ", 1)
            steps[name] = int(rc)
    failed = [r for r in records if r.get("passed") is False] + [{"step": k, "rc": v} for k, v in steps.items() if v]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    Path(out).write_text(json.dumps({
        "command": "bash benchmarks/gpu_check.sh", "commit": commit.stdout.strip() or None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "device": device, "step_status": steps,
        "passed": not failed and any("skipped" not in r for r in records if r["step"] != "versions"),
        "failed": failed, "records": records}, indent=1))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    steps = {"versions": versions, "race": race, "compare": compare, "paper": paper}
    if cmd == "merge" and len(sys.argv) == 5:
        merge(*sys.argv[2:])
    elif cmd in steps and len(sys.argv) == 2:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        steps[cmd]()
    else:
        print(f"usage: gpu_check.py {'|'.join(steps)} | merge LOG OUT DEVICE", file=sys.stderr)
        sys.exit(2)
