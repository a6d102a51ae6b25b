"""Networks against the incumbent forest on real EM, one run per call, results appended as JSON lines.

Datasets and protocols (IoU scored on voxels nobody annotated):
  isbi : ISBI 2012 (30 x 512 x 512, membrane vs interior); annotate every 6th section
         (0, 6, ..., 24), score the other 25 sections.
  vnc  : Drosophila VNC stack 1 (20 x 1024 x 1024, other / membrane / mitochondria); train on
         the half x < 512 (every 4th section annotated, or all of it with --labels full), score
         the other half x >= 512 (all 20 sections). --task mito trains mitochondria vs the rest
         (Cheng & Varshney's task), --task all the three classes.

Network runs take the CLI's defaults (`sparseseg.trainer.options.DEFAULTS`, so they follow the
trainer as it changes) plus overrides (--set key=value, option names as in the CLI with
underscores), and are bounded by --iterations (pick iterations that fit the time budget: the
training seconds per iteration are recorded; --eval-every N adds a learning curve).

    python benchmarks/real_data.py --dataset isbi --method forest
    python benchmarks/real_data.py --dataset isbi --method net --set ndim=2 --iterations 400 --tag 2d
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPARSESEG_DATA", "/work/shared/data"))
if str(ROOT) not in sys.path:          # `python benchmarks/real_data.py` imports benchmarks.baselines
    sys.path.insert(0, str(ROOT))


def load(dataset: str, task: str, labels: str):
    """(train image (Z,Y,X) float32, train sparse labels, test image, test dense labels,
    class names, protocol text); the test labels mark trained-on voxels 255."""
    from sparseseg.trainer.sparse import annotated_mask, sparsify
    from sparseseg.volume import open_volume

    if dataset == "isbi":
        d = DATA / "isbi2012_em"
        img = open_volume(d / "isbi2012_train_image_zyx.tif").read(dtype=np.float32)[0]
        lab = open_volume(d / "isbi2012_train_label_zyx.tif").read_labels().astype(np.uint8)
        slices = [(0, z) for z in range(0, lab.shape[0], 6)]
        test = lab.copy()
        test[annotated_mask(lab, slices)] = 255
        return (img, sparsify(lab, slices, 255), img, test, ["interior", "membrane"],
                f"annotate sections {[s[1] for s in slices]} of {lab.shape[0]}; IoU on the others")
    d = DATA / "drosophila_vnc"
    img = open_volume(d / "vnc_stack1_image_zyx.tif").read(dtype=np.float32)[0]
    lab = open_volume(d / "vnc_stack1_labels_zyx.tif").read_labels().astype(np.uint8)
    names = ["other", "membrane", "mitochondria"]
    if task == "mito":
        lab = (lab == 2).astype(np.uint8)
        names = ["rest", "mitochondria"]
    elif task == "membrane":
        lab = (lab == 1).astype(np.uint8)
        names = ["rest", "membrane"]
    half = lab.shape[2] // 2
    tr_img, tr_lab = np.ascontiguousarray(img[:, :, :half]), np.ascontiguousarray(lab[:, :, :half])
    te_img, te_lab = np.ascontiguousarray(img[:, :, half:]), np.ascontiguousarray(lab[:, :, half:])
    if labels == "sparse":
        slices = [(0, z) for z in range(0, lab.shape[0], 4)]
        tr_lab = sparsify(tr_lab, slices, 255)
        proto = f"train x<{half}, sections {[s[1] for s in slices]} annotated; test x>={half}, all sections"
    else:
        proto = f"train x<{half}, all sections annotated; test x>={half}, all sections"
    return tr_img, tr_lab, te_img, te_lab, names, proto


def cli_defaults() -> dict:
    """The training options' defaults, as the CLI and the napari widget take them."""
    from sparseseg.trainer.options import DEFAULTS

    return dict(DEFAULTS)


def parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def filter_bank(img):
    """(40, Z, Y, X) float32: the forest's 2D filter bank per section (an experiment: does a
    network fed these features fit faster than one learning its first layers?)."""
    from benchmarks.baselines.forest import _features

    return np.stack([_features(img[z]) for z in range(img.shape[0])], axis=1)


def parse_overrides(items) -> dict:
    """--set key=value items -> {option_name: value} (JSON values where they parse)."""
    out = {}
    for kv in items:
        k, _, v = kv.partition("=")
        out[k.replace("-", "_")] = parse_value(v)
    return out


def code_version() -> str:
    """The commit the run's code comes from (flagged when sparseseg/ has uncommitted changes); taken
    when the run starts, since a commit made while it runs is not the code it ran. A run from an
    exported snapshot (git archive, no .git) names its commit in BENCH_COMMIT."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "sparseseg"], cwd=ROOT, capture_output=True,
                           text=True, check=False).stdout.strip()
    return commit + ("+uncommitted sparseseg/ changes" if dirty else "")


def provenance(load_before, commit: str | None = None) -> dict:
    """Command, commit (`code_version()`, best taken at the start: `commit`), machine, library
    versions, date (the end) and load of a run: benchmarks/record.py's record."""
    from benchmarks.record import record

    return record(commit_at_start=commit or code_version(), load_before=load_before)


def run_net(tr_img, tr_lab, te_img, te_lab, names, iterations, overrides, eval_every=0, save=None):
    import torch

    from sparseseg import predict
    from sparseseg.model.network import count_parameters
    from sparseseg.trainer.data import TrainingVolume
    from sparseseg.trainer.metrics import iou_per_class
    from sparseseg.trainer.options import build_configs
    from sparseseg.trainer.train import train

    o = cli_defaults()
    features = overrides.pop("input", "image") == "features"
    arch = {k: overrides.pop(k) for k in ("arch", "factorized", "feature_augment", "feature_augment_t")
            if k in overrides}
    o.update(overrides)
    o["iterations"] = iterations
    o["device"] = "cpu"
    o["checkpoint_every"] = 0
    o["num_classes"] = len(names)
    same = tr_img is te_img
    if features:
        tr_img = filter_bank(tr_img)
        te_img = tr_img if same else filter_bank(te_img)
    else:
        tr_img, te_img = tr_img[None], (tr_img[None] if same else te_img[None])
    vols = [TrainingVolume(tr_img, tr_lab, "train")]
    mcfg, tcfg, _ = build_configs(vols, o)
    if arch and arch.get("arch", "unet") != "unet":
        # Re-plan for another architecture (works whether or not the CLI has --arch yet).
        from sparseseg.model.config import plan_model

        mcfg = plan_model(o["preset"], tr_img.shape[0], len(names), ndim=int(o["ndim"]), voxel_size=None, shape=tr_lab.shape,
                          **arch)
    overrides = {**overrides, **arch}
    curve = []
    if eval_every:
        # Learning curve: train in stages (an exact resume from the stage's checkpoint) and score
        # each stage on the test volume's central 256 x 256 columns (all sections), the last on all.
        import tempfile
        from dataclasses import replace

        c = [s // 2 for s in te_lab.shape]
        crop = (slice(None), slice(max(c[1] - 128, 0), c[1] + 128), slice(max(c[2] - 128, 0), c[2] + 128))
        tmp = tempfile.mkdtemp()
        ckpt, seconds = str(Path(tmp) / "m.pt"), 0.0
        if tcfg.schedule != "constant":
            raise SystemExit("--eval-every trains in stages: only with the constant schedule")
        for stop in range(eval_every, iterations, eval_every):
            res = train(vols, mcfg, replace(tcfg, iterations=stop), names, out_path=ckpt,
                        resume=ckpt if stop > eval_every else None, progress=False)
            seconds = res.history[-1]["seconds"]          # cumulative over resumes
            with torch.inference_mode():
                p, _ = predict(res.model, te_img[(slice(None),) + crop], device="cpu")
            curve.append({"iteration": stop, "train_seconds": round(seconds, 1),
                          **iou_per_class(p, te_lab[crop], len(names), 255)})
            print(json.dumps(curve[-1]), flush=True)
        res = train(vols, mcfg, tcfg, names, out_path=ckpt, resume=ckpt, progress=False)
        res = replace(res, seconds=res.history[-1]["seconds"])
    else:
        res = train(vols, mcfg, tcfg, names, out_path=save, progress=False)
    t0 = time.time()
    with torch.inference_mode():
        pred, _ = predict(res.model, te_img, device="cpu")
    scores = iou_per_class(pred, te_lab, len(names), 255)
    # Same volume (ISBI): the annotated sections' own IoU, free, tells over- from under-fitting.
    fit = {"annotated_iou": iou_per_class(pred, tr_lab, len(names), 255)["iou"]} if same else {}
    return {**fit, **({"input": "forest filter bank, 40 channels per section"} if features else {}),
            "options": {k: v for k, v in o.items() if k in overrides or k == "iterations"},
            "model_config": mcfg.to_dict(), "parameters": count_parameters(res.model.net),
            "train_seconds": round(res.seconds, 1), **({"pretrain": res.pretrain} if res.pretrain else {}),
            "seconds_per_iteration": round((res.seconds - (res.pretrain or {}).get("seconds", 0)) / iterations, 3),
            "predict_seconds": round(time.time() - t0, 1), "final_loss": res.final_loss,
            "predicted_fraction": np.bincount(pred.ravel(), minlength=len(names)).astype(float).tolist(),
            **({"curve_crop": "central 256x256 columns of the test volume, all sections", "curve": curve}
               if curve else {}),
            **scores}


def run_forest(tr_img, tr_lab, te_img, te_lab, names):
    from benchmarks.baselines.forest import fit_predict
    from sparseseg.trainer.metrics import iou_per_class

    if tr_img is te_img:
        pred, info = fit_predict(tr_img, tr_lab, 255)
    else:
        # Train on one half, predict the other: fit on the train image, then apply to the test one.
        pred, info = fit_predict(tr_img, tr_lab, 255, predict_image=te_img)
    scores = iou_per_class(pred, te_lab, len(names), 255)
    info["predicted_fraction"] = np.bincount(pred.ravel(), minlength=len(names)).astype(float).tolist()
    return {**info, **scores}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["isbi", "vnc"], required=True)
    ap.add_argument("--task", choices=["all", "membrane", "mito"], default="all", help="vnc only")
    ap.add_argument("--labels", choices=["sparse", "full"], default="sparse", help="vnc only")
    ap.add_argument("--method", choices=["forest", "net"], required=True)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--set", action="append", default=[], help="training option override key=value")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also score every N iterations on a central crop (a learning curve)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--save", default=None, help="keep the trained checkpoint here (to rescore it later)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_data_runs.jsonl"))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    overrides = parse_overrides(a.set)
    load_before, commit = os.getloadavg(), code_version()
    data = load(a.dataset, a.task, a.labels)
    t0 = time.time()
    if a.method == "forest":
        r = run_forest(*data[:5])
    else:
        r = run_net(*data[:5], a.iterations, overrides, a.eval_every, a.save)
    rec = {"dataset": a.dataset, "task": a.task if a.dataset == "vnc" else "membrane",
           "labels": a.labels if a.dataset == "vnc" else "sparse", "method": a.method, "tag": a.tag,
           "classes": data[4], "protocol": data[5], **r, "wall_seconds": round(time.time() - t0, 1),
           **provenance(load_before, commit)}
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec[k] for k in ("dataset", "task", "labels", "method", "tag", "iou", "wall_seconds")}))


if __name__ == "__main__":
    main()
