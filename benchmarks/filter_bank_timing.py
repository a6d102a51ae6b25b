"""Seconds per training iteration with and without the input filter bank (`--filters auto` vs
`none`), default 3D options, on ISBI and VNC, 2 threads: what the bank costs in training time.

    OMP_NUM_THREADS=2 python benchmarks/filter_bank_timing.py --out benchmarks/results/filter_bank_timing.json

40 iterations per setting; the first 10 (allocation, oneDNN warm-up) are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.real_data import cli_defaults, load, provenance  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--out")
    a = ap.parse_args()
    import torch

    from sparseseg.trainer.data import TrainingVolume
    from sparseseg.trainer.options import build_configs
    from sparseseg.trainer.train import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    load_before = os.getloadavg()
    out = {}
    for dataset, task in (("isbi", "membrane"), ("vnc", "all")):
        img, sparse, _, _, names, _ = load(dataset, task, "sparse")
        for filters in ("auto", "none"):
            o = cli_defaults()
            o.update(iterations=a.iterations, device="cpu", checkpoint_every=0, num_classes=len(names),
                     filters=filters)
            vols = [TrainingVolume(img[None], sparse, dataset)]
            mcfg, tcfg, _ = build_configs(vols, o)
            h = train(vols, mcfg, tcfg, names, progress=False).history
            per = (h[-1]["seconds"] - h[9]["seconds"]) / (len(h) - 10)
            out[f"{dataset} --filters {filters}"] = {"seconds_per_iteration": round(per, 3),
                                                      "filters": list(mcfg.filters)}
            print(dataset, filters, out[f"{dataset} --filters {filters}"], flush=True)
    rec = {"what": __doc__.splitlines()[0], "runs": out, **provenance(load_before)}
    if a.out:
        Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
