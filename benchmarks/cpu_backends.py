"""CPU backends side by side: one forward pass at the engine's default CPU tile, for the demo and
paper networks (random weights), fp32, through torch, ONNX Runtime and OpenVINO (f32, and bf16
where the CPU has it), with label agreement against torch. Runs alternate (A B C A B C ...) so
machine drift hits every backend alike; the median is reported.

    python benchmarks/cpu_backends.py --out benchmarks/results/cpu_backends.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import sys

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/cpu_backends.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import record  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", default="demo,paper")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import numpy as np
    import torch

    from sparseseg.engine.backends import BackendSpec, OnnxBackend, OpenVinoBackend, TorchBackend, cached_onnx
    from sparseseg.engine.tiling import default_tile, tile_input
    from sparseseg.model.checkpoint import file_sha256, load_checkpoint, save_checkpoint
    from sparseseg.model.config import plan_model
    from sparseseg.model.contract import contract_from_checkpoint
    from sparseseg.model.network import SegmentationModel

    torch.set_num_threads(a.threads)
    os.environ.setdefault("SPARSESEG_CACHE", tempfile.mkdtemp(prefix="sparseseg-cache-"))
    rows = []
    for net in a.networks.split(","):
        torch.manual_seed(0)
        cfg = plan_model("small", 3, 3, base_width=8) if net == "demo" else plan_model("paper", 3, 3)
        work = Path(tempfile.mkdtemp(prefix="sparseseg-backends-"))
        ck = save_checkpoint(work / "m.pt", SegmentationModel(cfg, mean=[100.0] * 3, std=[40.0] * 3), None,
                             ["a", "b", "c"], 255)
        ckpt = load_checkpoint(ck)
        contract = contract_from_checkpoint(ckpt, file_sha256(ck))
        tile = default_tile(contract, "cpu", extent=(128, 256, 256))
        x = torch.from_numpy((np.random.default_rng(0).random((1, 3) + tile_input(cfg.geometry, tile)) * 255)
                             .astype(np.float32))
        onnx = cached_onnx(ck)
        spec = BackendSpec(str(ck), "cpu", threads=a.threads)
        backends = {"torch": TorchBackend(ckpt.model, contract, "cpu", threads=a.threads),
                    "onnxruntime": OnnxBackend(spec, path=onnx)}
        try:
            backends["openvino f32"] = OpenVinoBackend(spec, path=onnx)
            backends["openvino bf16"] = OpenVinoBackend(replace(spec, precision="bf16"), path=onnx)
        except Exception as e:  # noqa: BLE001  (not installed: reported, not fatal)
            print("openvino:", str(e).splitlines()[0])
        times = {k: [] for k in backends}
        labels = {}
        for name, b in backends.items():            # warm-up, and the labels
            labels[name] = b.forward(x).float().argmax(1)
        for _ in range(a.repeats):
            for name, b in backends.items():
                t0 = time.perf_counter()
                b.forward(x)
                times[name].append(time.perf_counter() - t0)
        out_vox = int(np.prod(tile))
        for name in backends:
            med = statistics.median(times[name])
            row = {"network": net, "backend": name, "tile_output": list(tile), "seconds_per_tile": times[name],
                   "median_seconds": med, "output_voxels_per_second": out_vox / med,
                   "labels_identical_to_torch": float((labels[name] == labels["torch"]).float().mean())}
            rows.append(row)
            print(f"{net:6s} {name:14s} tile {tile} {med:8.2f} s {out_vox / med:10.0f} out voxels/s  labels "
                  f"{100 * row['labels_identical_to_torch']:.3f}% = torch")
    result = {**record(), "threads": a.threads,
              "load_average_after": list(os.getloadavg()), "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
