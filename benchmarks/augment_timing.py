"""Seconds per training patch cut by the augmenter, one torch thread: flips and right-angle turns
gathered (the default "lossless" mode) against the same patches interpolated by grid_sample (as
before 2026-12-03), beside "none" and "full"; results/augment_timing.json.

    python benchmarks/augment_timing.py
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.record import commit, record  # noqa: E402
from sparseseg.trainer.augment import Augmenter  # noqa: E402
from sparseseg.trainer.config import AugmentConfig  # noqa: E402

torch.set_num_threads(1)
started, load0 = commit(), os.getloadavg()
rng = np.random.default_rng(0)
image = rng.random((1, 75, 200, 200)).astype(np.float32)
labels = rng.integers(0, 3, image.shape[1:]).astype(np.uint8)
# (name, input, output offset, output): the 3D patch of a 75^3 crop and a one-section 2D/EM patch.
PATCHES = [("3d 60x74x74 -> 20x20x20", (60, 74, 74), (20, 27, 27), (20, 20, 20), False),
           ("section 1x186x186 -> 1x132x132", (1, 186, 186), (0, 27, 27), (1, 132, 132), True)]
rows = []
for name, shape, off, out, planar in PATCHES:
    for mode, gathered in (("none", True), ("lossless", True), ("lossless", False), ("full", False)):
        aug = Augmenter(AugmentConfig.mode(mode), None, planar, [0.5], [0.3], 0, "cpu")
        aug.integral = aug.integral and gathered
        starts = [(int(rng.integers(0, 75 - shape[0] + 1)), int(rng.integers(-10, 30)), int(rng.integers(-10, 30)))
                  for _ in range(30)]
        aug.sample(image, labels, starts[0], shape, off, out, 255)
        t = time.perf_counter()
        for s in starts:
            aug.sample(image, labels, s, shape, off, out, 255)
        ms = (time.perf_counter() - t) / len(starts) * 1000
        rows.append({"patch": name, "mode": mode, "path": "gather" if aug.integral else "grid_sample",
                     "ms_per_patch": round(ms, 2)})
        print(rows[-1])
res = {"rows": rows, **record(commit_at_start=started, load_before=load0)}
out = ROOT / "benchmarks" / "results" / "augment_timing.json"
out.write_text(json.dumps(res, indent=1) + "\n")
print("wrote", out)
