"""bf16 against fp32 on CPU (OpenVINO) with networks trained on real data: label agreement, IoU
of each, and seconds, for checkpoints saved by `real_data.py --save`. The issue's bar for reduced
precision: labels >= 99.5% identical to fp32.

    python benchmarks/cpu_precision.py --dataset isbi --checkpoint ck.pt [--checkpoint ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as `python benchmarks/cpu_precision.py`
    sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["isbi", "vnc"], required=True)
    ap.add_argument("--checkpoint", action="append", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_precision.jsonl"))
    a = ap.parse_args()
    import torch

    import sparseseg
    from benchmarks.real_data import load, provenance
    from sparseseg.eval.metrics import iou_per_class

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    load_before = os.getloadavg()
    _, _, te_img, te_lab, names, proto = load(a.dataset, "all" if a.dataset == "vnc" else "membrane", "sparse")
    for ck in a.checkpoint:
        row = {"dataset": a.dataset, "checkpoint": ck, "protocol": proto}
        labels = {}
        for precision in ("fp32", "bf16"):
            t0 = time.time()
            labels[precision], _ = sparseseg.predict(ck, te_img[None], device="cpu", precision=precision,
                                                     backend="openvino")
            row[precision] = {"seconds": round(time.time() - t0, 1),
                              **iou_per_class(labels[precision], te_lab, len(names), 255)}
        row["labels_identical"] = float((labels["fp32"] == labels["bf16"]).mean())
        row.update(provenance(load_before))
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("checkpoint", "labels_identical")}),
              {p: (row[p]["iou"], row[p]["seconds"]) for p in ("fp32", "bf16")})


if __name__ == "__main__":
    main()
