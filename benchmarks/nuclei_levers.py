"""One training lever on the light-microscopy nuclei crops: train on crop a's N,N,N orthogonal
slices (classes background / interior / boundary), score semi (a's unannotated voxels) and auto
(all of crop b); one JSON line to results/nuclei_levers.jsonl. Without iterations=N the run has
the default time budget (time_budget=M to change it), keeping time to predict crop a as densify does.
THREADS 0: torch's default (every core). dense=1 trains on every voxel of crop a (a fit check: how
well the network can learn these labels at all; semi then scores voxels it was trained on).

features=3d feeds the network the forest's 3D filter responses (benchmarks/baselines/forest.py) instead
of the image, with its own filter bank off (feature_sigmas=0.7,1.0,1.6: other scales than the forest's;
feature_truncate=3 and feature_mode=mirror: scipy.ndimage's kernel truncation and border mode).

    python benchmarks/nuclei_levers.py THREADS [iterations=300] [option=value ...] [slices=5] [dense=1] [features=3d]
"""
import json, os, sys, time
from pathlib import Path

import numpy as np, torch
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # `python benchmarks/nuclei_levers.py` imports benchmarks.nuclei
    sys.path.insert(0, str(ROOT))
from benchmarks.nuclei import load_crop
from benchmarks.record import commit, data_dir, record
from sparseseg.trainer.sparse import orthogonal_slices, sparsify, annotated_mask
from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.options import build_configs
from sparseseg.trainer.train import train
from sparseseg.eval.metrics import confusion, iou_per_class
import sparseseg
def load(n):
    return load_crop(n, data_dir())   # classes background / interior / boundary (benchmarks/nuclei.py)
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
started, load0 = commit(), os.getloadavg()
over = {}
for a in sys.argv[2:]:
    k, v = a.split("=")
    try: v = float(v) if "." in v else int(v)
    except ValueError: pass
    over[k] = v
counts = over.pop("slices", 5)
dense = bool(over.pop("dense", 0))
features = over.pop("features", None)
sigmas = over.pop("feature_sigmas", None)
feature_kw = {k: over.pop("feature_" + k) for k in ("truncate", "mode") if "feature_" + k in over}
ia, la = load("a"); ib, lb = load("b")
if features == "3d":
    # The forest's 3D filter responses as the network's input channels (its own bank off): does
    # 3D context at the input close the gap to the 3D forest? Computed once per crop, untimed.
    from benchmarks.baselines.forest import SIGMAS, _features
    sig = tuple(float(v) for v in str(sigmas).split(",")) if sigmas is not None else SIGMAS
    t = time.time()
    ia, ib = _features(ia, sig, **feature_kw), _features(ib, sig, **feature_kw)
    over["features_s"], over["feature_sigmas"] = round(time.time() - t, 1), list(sig)
    over.update({"feature_" + k: v for k, v in feature_kw.items()})
    over.setdefault("filters", "none")
elif features is not None:
    raise SystemExit(f"features must be 3d, got {features!r}")
else:
    ia, ib = ia[None], ib[None]
sl = orthogonal_slices(la.shape, (counts,) * 3)
vol = TrainingVolume(ia, la if dense else sparsify(la, sl), "a")
o = {"checkpoint_every": 0, "device": "cpu", **over}
mcfg, tcfg, names = build_configs([vol], o)
t = time.time()
res = train([vol], mcfg, tcfg, ["bg", "interior", "boundary"], progress=False,
            predict_shapes=[] if tcfg.iterations else [ia.shape[1:]])
tt = time.time() - t
model = res.model.eval()
t = time.time()
pa, _ = sparseseg.predict(model, ia, device="cpu", backend="torch")
tpa = time.time() - t          # what densify's reserve is for: crop a alone
pb, _ = sparseseg.predict(model, ib, device="cpu", backend="torch")
tp = time.time() - t
semi_t = la.copy(); semi_t[annotated_mask(la, sl)] = 255
r_semi = iou_per_class(pa, semi_t, 3, 255); r_auto = iou_per_class(pb, lb, 3, 255)
row = {"options": over, "slices": counts, **({"dense": True} if dense else {}), "threads": threads, "iterations": res.iterations, "train_s": round(tt, 1),
       "predict_s": round(tp, 1), "predict_a_s": round(tpa, 1), "semi": [round(v, 4) for v in r_semi["iou"]], "semi_mf": round(r_semi["mean_foreground_iou"], 4),
       "auto": [round(v, 4) for v in r_auto["iou"]], "auto_mf": round(r_auto["mean_foreground_iou"], 4), "plan": res.plan,
       "network": {"ndim": mcfg.ndim, "planes": mcfg.planes},
       "semi_confusion": confusion(pa, semi_t, 3, 255)[:3, :3].tolist(), "auto_confusion": confusion(pb, lb, 3, 255)[:3, :3].tolist(),
       "dataset": "nuclei (plantseg_nuclei crops a/b, 75^3, classes background/interior/boundary)",
       "protocol": ("train on every voxel of crop a; semi" if dense else
                    f"train on crop a's {counts},{counts},{counts} orthogonal slices; semi")
                   + ": IoU on a's unannotated voxels; "
                   "auto: IoU on all of crop b",
       **record(commit_at_start=started, load_before=load0)}
print(json.dumps(row))
with open(ROOT / "benchmarks" / "results" / "nuclei_levers.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
