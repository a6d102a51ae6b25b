"""Would the network add anything to copying the painted planes? Nuclei semi-automated case
(crop a, N,N,N orthogonal slices): train the default network once for a pinned iteration count,
then score its probabilities fused with the image-blind interpolation (each voxel the nearest
painted voxel's label, benchmarks/baselines/interpolation.py) by several rules; one JSON line to
results/nuclei_fusion.jsonl. A measurement, not a feature.

    python benchmarks/nuclei_fusion.py ITERATIONS [SLICES=5]
"""
import json, os, sys, time
from pathlib import Path

import numpy as np
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from scipy import ndimage as ndi
from benchmarks.nuclei import load_crop
from benchmarks.record import data_dir, record, commit
from benchmarks.baselines.interpolation import nearest_label
from sparseseg.trainer.sparse import orthogonal_slices, sparsify, annotated_mask
from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.options import build_configs
from sparseseg.trainer.train import train
from sparseseg.eval.metrics import iou_per_class
import sparseseg
its = int(sys.argv[1]); counts = int(sys.argv[2]) if len(sys.argv) > 2 else 5
started, load0 = commit(), os.getloadavg()
ia, la = load_crop("a", data_dir())
sl = orthogonal_slices(la.shape, (counts,) * 3)
sp = sparsify(la, sl)
vol = TrainingVolume(ia[None], sp, "a")
mcfg, tcfg, _ = build_configs([vol], {"checkpoint_every": 0, "device": "cpu", "iterations": its})
t = time.time()
res = train([vol], mcfg, tcfg, ["bg", "interior", "boundary"], progress=False)
tt = time.time() - t
_, prob = sparseseg.predict(res.model.eval(), ia, device="cpu", backend="torch", probabilities=True)
prob = np.asarray(prob, np.float32)          # (K, Z, Y, X)
target = la.copy(); target[annotated_mask(la, sl)] = 255
interp = nearest_label(sp)
onehot = np.stack([(interp == c) for c in range(3)]).astype(np.float32)
dist = ndi.distance_transform_edt(sp == 255)
# soft interpolation: per class, exp(-distance to the class's nearest painted voxel / tau)
dc = np.stack([ndi.distance_transform_edt(sp != c) for c in range(3)])
def score(p):
    r = iou_per_class(np.argmax(p, 0).astype(np.uint8), target, 3, 255)
    return round(r["mean_foreground_iou"], 4), [round(v, 4) for v in r["iou"]]
rows = {"net": score(prob), "interpolation": score(onehot)}
# a: the network's share; lam: the interpolation's weight falls as exp(-distance to the nearest
# painted voxel / lam); tau: a product of the network with a soft interpolation.
for a in (0.3, 0.5, 0.7):
    rows[f"mix a={a}"] = score(a * prob + (1 - a) * onehot)
for lam in (2, 4, 8):
    w = np.exp(-dist / lam)[None]
    rows[f"distance-weighted lam={lam}"] = score((1 - w) * prob + w * onehot)
for tau in (2, 4, 8):
    soft = np.exp(-dc / tau); soft /= soft.sum(0, keepdims=True)
    rows[f"product soft tau={tau}"] = score(prob * soft)
row = {"experiment": "nuclei semi: net probabilities fused with the painted planes' interpolation (offline, not a feature)",
       "slices": counts, "iterations": res.iterations, "train_s": round(tt, 1), "scores": rows,
       **record(commit_at_start=started, load_before=load0)}
print(json.dumps(row, indent=1))
with open(ROOT / "benchmarks" / "results" / "nuclei_fusion.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
