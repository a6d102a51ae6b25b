"""A teravoxel plan: `sparseseg-infer --dry-run` over a 10,000^3 uint8 zarr array that holds only
its metadata (every chunk absent = fill value), timed end to end as a user runs it, plus what the
reads cost against that store (bytes per output voxel, chunk requests) and projected times.

The network is the `small` preset 3D U-Net with random weights (a plan needs its shapes, not its
weights). The per-GPU throughput is an ASSUMPTION passed on the command line (no GPU was
available to measure one): the default derives it from PERF.md's FLOP bound at 989 TFLOP/s
(H100 SXM dense fp16) times 21%, the share of peak MLPerf's TensorRT 3D-UNet reaches.

    python benchmarks/teravoxel_plan.py --out benchmarks/results/teravoxel_plan.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/teravoxel_plan.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import record  # noqa: E402

H100_FP16_DENSE = 989e12
MLPERF_SHARE_OF_PEAK = 0.21


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=10_000)
    ap.add_argument("--chunks", default="128,256,256", help="input zarr chunks Z,Y,X")
    ap.add_argument("--device", default="cpu",
                    help="the device the plan is made for (its tile/batch defaults; cuda needs a GPU present)")
    ap.add_argument("--voxels-per-second", type=float, help="assumed per-GPU throughput (default: see docstring)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch
    import zarr

    from sparseseg.engine.run import run_inference
    from sparseseg.engine.store import read_cost
    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.config import plan_model
    from sparseseg.model.contract import geometry_of_contract, read_contract
    from sparseseg.model.network import SegmentationModel

    load = os.getloadavg()
    shape = (args.side,) * 3
    chunks = tuple(int(c) for c in args.chunks.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = SegmentationModel(plan_model("small", 1, 2), mean=[128.0], std=[40.0])
        engine = save_checkpoint(tmp / "small.pt", model, None, ["background", "foreground"], 255)
        store = tmp / "tera.zarr"
        zarr.create_array(str(store), shape=shape, chunks=chunks, dtype="uint8", fill_value=0, zarr_format=3)
        stored = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())

        # 1. as a user runs it: the CLI, in a fresh process (imports included)
        cli = [sys.executable, "-m", "sparseseg.cli", "infer", "--engine", str(engine), str(store), "--dry-run",
               "--json", "--device", args.device]
        t0 = time.perf_counter()
        r = subprocess.run(cli, capture_output=True, text=True, timeout=600)
        cli_seconds = time.perf_counter() - t0
        cli_ok = r.returncode == 0
        cli_note = None if cli_ok else (r.stderr.strip().splitlines() or ["?"])[-1]

        # 2. the plan in this process (what --dry-run computes), and the read cost
        t0 = time.perf_counter()
        plan = run_inference(engine, str(store), dry_run=True, device=args.device, progress=False)
        plan_seconds = time.perf_counter() - t0
        geometry = geometry_of_contract(read_contract(engine))
        t0 = time.perf_counter()
        cost = read_cost(geometry, shape, plan["block"], plan["tile_output"], plan["overlap"], chunks, 1)
        cost_seconds = time.perf_counter() - t0

    rate = args.voxels_per_second
    rate_note = "given on the command line (assumed)"
    if not rate:
        rate = MLPERF_SHARE_OF_PEAK * H100_FP16_DENSE / plan["flops_per_output_voxel"]
        rate_note = (f"assumed, not measured: {MLPERF_SHARE_OF_PEAK:.0%} of H100 SXM dense fp16 peak "
                     f"({H100_FP16_DENSE / 1e12:.0f} TFLOP/s) / {plan['flops_per_output_voxel']:.0f} FLOP per "
                     f"output voxel of this plan (PERF.md; MLPerf's TensorRT 3D-UNet reaches ~21% of peak)")
    voxels = plan["voxels"]
    projection = {f"{gpus} GPUs": round(voxels / (gpus * rate) / 3600, 2) for gpus in (1, 8, 128)}
    result = {
        "benchmark": "teravoxel dry-run plan (metadata-only 10,000^3 uint8 zarr)",
        **record(),
        "load_average_before": [round(x, 2) for x in load],
        "input": {"shape": list(shape), "chunks": list(chunks), "dtype": "uint8", "bytes_on_disk": stored},
        "cli_dry_run_seconds_including_imports": round(cli_seconds, 2), "cli_ok": cli_ok, "cli_note": cli_note,
        "plan_seconds_in_process": round(plan_seconds, 3), "read_cost_seconds": round(cost_seconds, 3),
        "plan": plan, "read_cost": cost,
        "assumed_voxels_per_second_per_gpu": round(rate), "throughput_source": rate_note,
        "projected_hours": projection,
        "projection_note": "compute only at the assumed rate, perfect scaling: 8 GPUs = one 8-GPU node, "
                           "128 GPUs = 16 such nodes; reading and writing must keep up (see read_cost)",
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
