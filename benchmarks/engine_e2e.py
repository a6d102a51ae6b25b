"""End-to-end zarr -> zarr voxels/s of `sparseseg-infer --engine model.pt` (in process, CPU,
default tile, block and backend) for the demo and paper networks, for any checkout of sparseseg
(to compare before/after a change: `--code /path/to/other/checkout`).

The networks have random weights (speed only). The input is uint8, written once per shape.

    python benchmarks/engine_e2e.py --network demo --shape 48,192,192 --out benchmarks/results/engine_e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/engine_e2e.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import record  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--network", choices=["demo", "paper"], default="demo")
    ap.add_argument("--shape", default="48,192,192")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="sparseseg checkout to time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up run (0: time one cold run)")
    ap.add_argument("--out", default=None, help="append the result to this JSON list")
    a = ap.parse_args()
    sys.path.insert(0, a.code)
    import numpy as np
    import torch
    import zarr

    from sparseseg.engine.run import run_inference
    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.config import plan_model
    from sparseseg.model.network import SegmentationModel

    torch.set_num_threads(a.threads)
    shape = tuple(int(v) for v in a.shape.split(","))
    torch.manual_seed(0)
    if a.network == "demo":      # as sparseseg-demo trains it: small preset, width 8, 3 channels
        cfg, channels = plan_model("small", 3, 3, base_width=8), 3
    else:                        # the paper's network: 4 levels, 32..512 channels, 3 channels, 3 classes
        cfg, channels = plan_model("paper", 3, 3), 3
    work = Path(tempfile.mkdtemp(prefix="sparseseg-e2e-"))
    ck = save_checkpoint(work / "model.pt", SegmentationModel(cfg, mean=[100.0] * channels, std=[40.0] * channels),
                         None, ["a", "b", "c"], 255)
    vol = zarr.create_array(str(work / "in.zarr"), shape=(channels,) + shape, chunks=(channels, 64, 128, 128),
                            dtype="uint8")
    vol[...] = (np.random.default_rng(0).random((channels,) + shape) * 255).astype(np.uint8)
    times, summary = [], None
    for i in range(a.repeats + 1):
        t0 = time.perf_counter()
        summary = run_inference(ck, str(work / "in.zarr"), work / f"o{i}.zarr", workers=0, device="cpu",
                                progress=False)
        if i or not a.repeats:
            times.append(time.perf_counter() - t0)
    voxels = int(np.prod(shape))
    result = {"network": a.network, "shape": list(shape), "code": a.code, **record(), "threads": a.threads,
              "load_average": list(os.getloadavg()), "seconds": times, "voxels_per_second": voxels / min(times),
              "backend": summary.get("backend"), "tile": summary.get("tile"), "block": summary.get("block")}
    print(json.dumps(result))
    if a.out:
        p = Path(a.out)
        rows = json.loads(p.read_text()) if p.exists() else []
        p.write_text(json.dumps(rows + [result], indent=2))


if __name__ == "__main__":
    main()
