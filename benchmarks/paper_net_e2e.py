"""End-to-end zarr -> zarr voxels/s of the engine on the paper's network: the old default tile
(12^3 output from 100^3 input) against the current default
(from the device's memory budget: at least the 132^3 -> 44^3 tile unless one smaller tile
covers the block), through `run_inference`
exactly as `sparseseg-infer --engine model.pt` runs it (in process, default block and backend).

The network is the `paper` preset (4 levels, 32..512 channels, valid convolutions, 3 input
channels, 3 classes) with RANDOM weights: the figures are speed only, the labels mean nothing.
The input is a generated uint8 zarr volume. Each tile setting first runs once on a small
volume (ONNX export into the cache, session creation, cuDNN autotuning), then `--repeats`
timed runs on the full volume. Besides voxels/s it records, from the run's own plan
(`--dry-run` figures): input voxels read per output voxel, tile input voxels per output voxel
(what the tile costs), FLOPs per output voxel (counted from the network), tile and batch.

The same script runs unchanged on a GPU (`--device cuda`; `--kernels cuda` for the CUDA
gather/stitch kernels).

    OMP_NUM_THREADS=2 python benchmarks/paper_net_e2e.py --shape 32,64,64 \
        --out benchmarks/results/paper_net_e2e_cpu.json

The old tile is expensive on purpose: it keeps 8^3 of each 12^3 output (the tile grid's step),
so it runs 1953 input voxels and ~379 MFLOP per output voxel; 32x64x64 is 256 such tiles
(~50 TFLOP), a few minutes on 2 cores. The tile settings run through today's engine, so the
difference is the tile alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/paper_net_e2e.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import record  # noqa: E402

OLD_DEFAULT_TILE = (12, 12, 12)     # the engine's default for this network before engine v2


def _triple(text):
    return tuple(int(v) for v in text.split(","))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="32,64,64", help="generated volume Z,Y,X (uint8, 3 channels)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--backend", default="auto",
                    help="auto (the engine's choice), torch, onnxruntime, openvino")
    ap.add_argument("--kernels", choices=["torch", "cuda"], default="torch")
    ap.add_argument("--tiles", default="old,default",
                    help="comma list of: old (12^3 out), default (the engine's), or Z:Y:X output tiles")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (ONNX Runtime uses its own pool)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per tile setting (the best is kept)")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]),
                    help="sparseseg checkout to time")
    ap.add_argument("--out", default=None, help="append the result to this JSON list")
    a = ap.parse_args()
    sys.path.insert(0, a.code)
    work = Path(tempfile.mkdtemp(prefix="sparseseg-paper-e2e-"))
    os.environ.setdefault("SPARSESEG_CACHE", str(work / "cache"))    # the ONNX export cache stays here

    import numpy as np
    import torch
    import zarr

    from sparseseg.engine.run import run_inference
    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.config import plan_model
    from sparseseg.model.network import SegmentationModel

    torch.set_num_threads(a.threads)
    shape = _triple(a.shape)
    torch.manual_seed(0)
    cfg = plan_model("paper", 3, 3)
    ck = save_checkpoint(work / "model.pt", SegmentationModel(cfg, mean=[100.0] * 3, std=[40.0] * 3), None,
                         ["a", "b", "c"], 255)
    rng = np.random.default_rng(0)

    def make_volume(name, vshape):
        vol = zarr.create_array(str(work / name), shape=(3,) + vshape, chunks=(3, 64, 128, 128),
                                dtype="uint8")
        vol[...] = (rng.random((3,) + vshape) * 255).astype(np.uint8)
        return str(work / name)

    big = make_volume("in.zarr", shape)
    small = make_volume("warm.zarr", tuple(min(n, 16) for n in shape))
    opts = dict(workers=0, device=a.device, backend=a.backend, progress=False, kernels=a.kernels)
    voxels = int(np.prod(shape))
    runs = []
    for name in a.tiles.split(","):
        tile = (OLD_DEFAULT_TILE if name == "old" else None if name == "default"
                else _triple(name.replace(":", ",")))
        plan = run_inference(ck, big, None, tile=tile, dry_run=True, **opts)
        # warm-up: ONNX export into the cache, session creation, cuDNN autotuning
        run_inference(ck, small, work / f"warm_{name}.zarr", tile=tuple(plan["tile_output"]), **opts)
        seconds, summary = [], None
        for i in range(max(1, a.repeats)):
            t0 = time.perf_counter()
            summary = run_inference(ck, big, work / f"out_{name}_{i}.zarr", tile=tile, **opts)
            seconds.append(time.perf_counter() - t0)
        run = {"tile_setting": name, "tile_input": plan["tile_input"], "tile_output": plan["tile_output"],
               "batch": summary["batch"], "block": summary["block"], "blocks": summary["blocks"],
               "backend": summary["backend"], "device": summary["device"], "seconds": seconds,
               "voxels_per_second": voxels / min(seconds),
               "input_voxels_per_output_voxel": plan["input_voxels_per_output_voxel"],
               "tile_input_voxels_per_output_voxel": plan["tile_input_voxels_per_output_voxel"],
               "flops_per_output_voxel": plan["flops_per_output_voxel"]}
        runs.append(run)
        x = "x".join
        print(f"{name:8s} tile {x(map(str, run['tile_input']))} -> {x(map(str, run['tile_output']))} batch"
              f" {run['batch']}: {min(seconds):8.1f} s, {run['voxels_per_second']:10.4g} voxels/s, "
              f"{run['tile_input_voxels_per_output_voxel']:.4g} tile input voxels and "
              f"{run['flops_per_output_voxel'] / 1e6:.4g} MFLOP per output voxel ({run['backend']} on "
              f"{run['device']})", flush=True)
    by = {r["tile_setting"]: r for r in runs}
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else None
    result = {"what": "run_inference (sparseseg-infer --engine model.pt), uint8 zarr -> zarr, paper network "
                      "with random weights (speed only)",
              "shape": list(shape), "code": a.code, "kernels": a.kernels,
              **record(), "threads": a.threads, "device_name": gpu,
              "load_average_after": list(os.getloadavg()), "runs": runs}
    if "old" in by and "default" in by:
        result["default_vs_old_speedup"] = by["default"]["voxels_per_second"] / by["old"]["voxels_per_second"]
        print(f"default tile vs old default: {result['default_vs_old_speedup']:.2f}x")
    print(json.dumps(result))
    if a.out:
        p = Path(a.out)
        rows = json.loads(p.read_text()) if p.exists() else []
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rows + [result], indent=2))


if __name__ == "__main__":
    main()
