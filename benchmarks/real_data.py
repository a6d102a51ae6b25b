"""Networks, the forest and nnU-Net on real data, one run per call, results appended as JSON lines.

Datasets and protocols (IoU scored on voxels nobody annotated):
  isbi   : ISBI 2012 (30 x 512 x 512, membrane vs interior); annotate every 6th section
           (0, 6, ..., 24), score the other 25 sections (semi-automated).
  vnc    : Drosophila VNC stack 1 (20 x 1024 x 1024, other / membrane / mitochondria); train on
           the half x < 512 (every 4th section annotated, or all of it with --labels full), score
           the other half x >= 512 (all 20 sections; fully automated). --task mito trains
           mitochondria vs the rest (Cheng & Varshney's task), --task all the three classes.
  nuclei : two 75^3 light-microscopy crops (background / interior / boundary, benchmarks/nuclei.py);
           train on --slices N xy, N xz and N yz evenly spaced planes of crop a; one training gives
           both scores: semi (a's unannotated voxels) and auto (all of crop b); --protocol names the
           headline (the row's top-level "iou"), "scores" holds both.

Network runs take the trainer's defaults (`sparseseg.model.defaults.DEFAULTS`, so they follow the
trainer as it changes) plus overrides (--set key=value, option names as in the CLI with
underscores). They run on the trainer's time budget: --budget-minutes M sets `time_budget`
(default: DEFAULTS, 10 minutes) and the trainer plans the iterations; --iterations N pins a count.
nnU-Net (benchmarks/baselines/nnunet.py) trains for --budget-minutes of wall clock after its own
planning and preprocessing. --method interpolation is the image-blind reference (each voxel the
nearest annotated voxel's label, benchmarks/baselines/interpolation.py), semi-automated tests only:
it shows how much of a semi-automated score copying the annotation already gives. The machine may be shared: every row records the load average at its
start and end (`load_before`, `load_after`), with benchmarks/record.py's provenance.

    python benchmarks/real_data.py --dataset isbi --method forest
    python benchmarks/real_data.py --dataset nuclei --slices 5 --method nnunet --budget-minutes 10
    python benchmarks/real_data.py --dataset isbi --method net --set ndim=2 --tag 2d
    python benchmarks/real_data.py --dataset nuclei --slices 5 --method interpolation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # `python benchmarks/real_data.py` imports benchmarks.baselines
    sys.path.insert(0, str(ROOT))

from benchmarks.record import data_dir  # noqa: E402

DATA = data_dir()                      # $SPARSESEG_DATA, else ../shared/data beside the repository
# Voxel spacing (z, y, x) as the SOURCE.txt files give it (nm for EM; the nuclei crops are near-isotropic):
# only nnU-Net's planner reads it.
SPACING = {"isbi": (50.0, 4.0, 4.0), "vnc": (50.0, 4.6, 4.6), "nuclei": (1.0, 1.0, 1.0)}


def load(dataset: str, task: str, labels: str):
    """(train image (Z,Y,X) float32, train sparse labels, test image, test labels, class names,
    protocol text) for scripts with one test volume (nuclei: crop b, the fully automated test)."""
    tr_img, tr_lab, tests, names, proto = load_tests(dataset, task, labels)
    te_img, te_lab = tests["auto"] if "auto" in tests else next(iter(tests.values()))
    return tr_img, tr_lab, te_img, te_lab, names, proto


def load_tests(dataset: str, task: str, labels: str, slices: int = 5):
    """(train image (Z,Y,X) float32, train sparse labels, {protocol: (test image, test labels)},
    class names, protocol text); test labels mark trained-on voxels 255. The semi-automated test of
    one volume holds the training image itself (the same object)."""
    from sparseseg.trainer.sparse import annotated_mask, sparsify
    from sparseseg.volume import open_volume

    if dataset == "nuclei":
        from benchmarks.nuclei import CLASSES, protocol

        img, sparse, tests, sl = protocol(slices, DATA)
        return (img, sparse, tests, CLASSES,
                f"annotate {slices} xy, {slices} xz, {slices} yz evenly spaced planes of crop a "
                f"({len(sl)} planes); semi: IoU on a's other voxels; auto: IoU on all of crop b")
    if dataset == "isbi":
        d = DATA / "isbi2012_em"
        img = open_volume(d / "isbi2012_train_image_zyx.tif").read(dtype=np.float32)[0]
        lab = open_volume(d / "isbi2012_train_label_zyx.tif").read_labels().astype(np.uint8)
        slices = [(0, z) for z in range(0, lab.shape[0], 6)]
        test = lab.copy()
        test[annotated_mask(lab, slices)] = 255
        return (img, sparsify(lab, slices, 255), {"semi": (img, test)}, ["interior", "membrane"],
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
    return tr_img, tr_lab, {"auto": (te_img, te_lab)}, names, proto


def cli_defaults() -> dict:
    """The training options' defaults, as the CLI and the napari widget take them."""
    from sparseseg.model.defaults import DEFAULTS

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
    """The commit the run's code comes from (`record.commit()`: flagged when sparseseg/ or benchmarks/
    has uncommitted changes); taken when the run starts, since a commit made while it runs is not the
    code it ran. A run from an exported snapshot (git archive, no .git) names its commit in BENCH_COMMIT."""
    from benchmarks.record import commit

    return os.environ.get("BENCH_COMMIT") or commit()


def provenance(load_before, commit: str | None = None) -> dict:
    """Command, commit (`code_version()`, best taken at the start: `commit`), machine, library
    versions, date (the end) and load of a run: benchmarks/record.py's record."""
    from benchmarks.record import record

    return record(commit_at_start=commit or code_version(), load_before=load_before)


def score(preds: dict, tests: dict, names) -> dict:
    """{protocol: iou_per_class} for each protocol's prediction (sparseseg's IoU, 255 ignored)."""
    from sparseseg.eval.metrics import iou_per_class

    return {k: {**iou_per_class(preds[k], tests[k][1], len(names), 255),
                "predicted_fraction": np.bincount(preds[k].ravel(), minlength=len(names)).astype(float).tolist()}
            for k in tests}


def run_net(tr_img, tr_lab, tests, names, iterations, budget, overrides, eval_every=0, save=None):
    import torch

    from sparseseg import predict
    from sparseseg.model.network import count_parameters
    from sparseseg.trainer.data import TrainingVolume
    from sparseseg.eval.metrics import iou_per_class
    from sparseseg.trainer.options import build_configs
    from sparseseg.trainer.train import train

    o = cli_defaults()
    features = overrides.pop("input", "image") == "features"
    arch = {k: overrides.pop(k) for k in ("arch", "factorized", "feature_augment", "feature_augment_t")
            if k in overrides}
    o.update(overrides)
    if iterations is not None:
        o["iterations"] = iterations          # pinned; otherwise planned from the time budget
    if budget is not None:
        o["time_budget"] = budget
    o["device"] = "cpu"
    o["checkpoint_every"] = 0
    o["num_classes"] = len(names)
    inputs = {}                               # the network's input per test (the same array for the training volume)
    train_in = filter_bank(tr_img) if features else tr_img[None]
    for k, (img, _) in tests.items():
        inputs[k] = train_in if img is tr_img else (filter_bank(img) if features else img[None])
    vols = [TrainingVolume(train_in, tr_lab, "train")]
    mcfg, tcfg, _ = build_configs(vols, o)
    if arch and arch.get("arch", "unet") != "unet":
        # Re-plan for another architecture (works whether or not the CLI has --arch yet).
        from sparseseg.model.config import plan_model

        mcfg = plan_model(o["preset"], train_in.shape[0], len(names), ndim=int(o["ndim"]), voxel_size=None,
                          shape=tr_lab.shape, **arch)
    overrides = {**overrides, **arch}
    curve = []
    if eval_every:
        # Learning curve: train in stages (an exact resume from the stage's checkpoint) and score
        # each stage on the headline test's central 256 x 256 columns (all sections), the last on all.
        import tempfile
        from dataclasses import replace

        if iterations is None:
            raise SystemExit("--eval-every trains in stages: give --iterations")
        k0 = next(iter(tests))
        te_img, te_lab = inputs[k0], tests[k0][1]
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
    preds, predict_seconds = {}, {}
    for k in tests:
        t0 = time.time()
        with torch.inference_mode():
            preds[k], _ = predict(res.model, inputs[k], device="cpu")
        predict_seconds[k] = round(time.time() - t0, 1)
    out = {"scores": score(preds, tests, names)}
    # The training volume's own annotated voxels, free, tell over- from under-fitting.
    fit = {k: iou_per_class(preds[k], tr_lab, len(names), 255)["iou"] for k in tests if tests[k][0] is tr_img}
    if fit:
        out["annotated_iou"] = next(iter(fit.values()))
    trained = res.iterations
    return {**out, **({"input": "forest filter bank, 40 channels per section"} if features else {}),
            "options": {k: v for k, v in o.items() if k in overrides or k in ("iterations", "time_budget")},
            "model_config": mcfg.to_dict(), "parameters": count_parameters(res.model.net),
            "plan": res.plan, "iterations_run": trained,
            "train_seconds": round(res.seconds, 1), **({"pretrain": res.pretrain} if res.pretrain else {}),
            "seconds_per_iteration": round((res.seconds - (res.pretrain or {}).get("seconds", 0)) / max(trained, 1), 3),
            "predict_seconds": predict_seconds, "final_loss": res.final_loss,
            **({"curve_crop": "central 256x256 columns of the test volume, all sections", "curve": curve}
               if curve else {})}


def run_forest(tr_img, tr_lab, te_img, te_lab, names):
    """The forest on one test volume (the scripts that import it): info and that volume's scores."""
    key = "semi" if te_img is tr_img else "auto"
    r = forest_scores(tr_img, tr_lab, {key: (te_img, te_lab)}, names)
    return {**r, **r.pop("scores")[key]}


def forest_scores(tr_img, tr_lab, tests, names, two_d=None):
    """One forest fit on the training volume, applied to every test volume. `two_d`: filter per
    xy section (True) or in 3D (False); None: the forest's own rule (thin stacks in 2D)."""
    from benchmarks.baselines.forest import fit_predict

    others = [k for k in tests if tests[k][0] is not tr_img]
    preds, info = fit_predict(tr_img, tr_lab, 255, predict_images=[tests[k][0] for k in others], two_d=two_d)
    out = {k: p for k, p in zip(others, preds[1:])}
    out.update({k: preds[0] for k in tests if k not in others})
    return {**info, "scores": score(out, tests, names)}


def interpolation_scores(tr_img, tr_lab, tests, names):
    """The image-blind reference (benchmarks/baselines/interpolation.py) on the semi-automated tests."""
    from benchmarks.baselines.interpolation import nearest_label

    t = time.time()
    semi = {k: v for k, v in tests.items() if v[0] is tr_img}
    if not semi:
        raise SystemExit("error: --method interpolation needs a semi-automated test (isbi, or nuclei)")
    pred = nearest_label(tr_lab, 255)
    return {"method": "nearest annotated voxel, image ignored", "seconds": round(time.time() - t, 1),
            "scores": score({k: pred for k in semi}, semi, names)}


def run_nnunet(tr_img, tr_lab, tests, names, budget, spacing, mirroring=False, iterations_per_epoch=25):
    from benchmarks.baselines.nnunet import fit_predict

    keys = list(tests)
    preds, info = fit_predict(tr_img, tr_lab, names, spacing=spacing, predict_images=[tests[k][0] for k in keys],
                              budget_minutes=budget, mirroring=mirroring, iterations_per_epoch=iterations_per_epoch,
                              threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    info["seconds"]["predict"] = dict(zip(keys, info["seconds"]["predict"]))
    return {**info, "scores": score(dict(zip(keys, preds)), tests, names)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["isbi", "vnc", "nuclei"], required=True)
    ap.add_argument("--task", choices=["all", "membrane", "mito"], default="all", help="vnc only")
    ap.add_argument("--labels", choices=["sparse", "full"], default="sparse", help="vnc only")
    ap.add_argument("--slices", type=int, default=5, help="nuclei: N xy, N xz, N yz planes of crop a")
    ap.add_argument("--protocol", choices=["auto", "semi"], default=None,
                    help="nuclei: the headline score (both are recorded); default auto")
    ap.add_argument("--method", choices=["forest", "net", "nnunet", "interpolation"], required=True)
    ap.add_argument("--forest-features", choices=["auto", "2d", "3d"], default="auto",
                    help="forest: filter per xy section or in 3D (auto: 2D for thin stacks, as ilastik users do)")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="net: the trainer's time_budget (default DEFAULTS'); nnunet: training wall clock (default the same)")
    ap.add_argument("--iterations", type=int, default=None, help="net: pin the iteration count (else planned)")
    ap.add_argument("--nnunet-mirroring", action="store_true", help="nnunet: mirroring test-time augmentation")
    ap.add_argument("--nnunet-epoch", type=int, default=25, help="nnunet: training iterations per (shortened) epoch")
    ap.add_argument("--set", action="append", default=[], help="training option override key=value")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also score every N iterations on a central crop (a learning curve)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--save", default=None, help="keep the trained checkpoint here (to rescore it later)")
    ap.add_argument("--out", default=None,
                    help="default results/nuclei_runs.jsonl for nuclei, results/real_data_runs.jsonl otherwise")
    a = ap.parse_args()
    if a.dataset != "nuclei" and a.protocol:
        ap.error("--protocol is for --dataset nuclei (isbi is semi-automated, vnc fully automated)")
    out = a.out or str(ROOT / "benchmarks" / "results" /
                       ("nuclei_runs.jsonl" if a.dataset == "nuclei" else "real_data_runs.jsonl"))
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    overrides = parse_overrides(a.set)
    load_before, commit = os.getloadavg(), code_version()
    tr_img, tr_lab, tests, names, proto = load_tests(a.dataset, a.task, a.labels, a.slices)
    headline = a.protocol or ("auto" if a.dataset == "nuclei" and a.method != "interpolation" else next(iter(tests)))
    t0 = time.time()
    if a.method == "forest":
        r = forest_scores(tr_img, tr_lab, tests, names, {"auto": None, "2d": True, "3d": False}[a.forest_features])
    elif a.method == "interpolation":
        r = interpolation_scores(tr_img, tr_lab, tests, names)
    elif a.method == "nnunet":
        from sparseseg.model.defaults import DEFAULTS

        budget = DEFAULTS["time_budget"] if a.budget_minutes is None else a.budget_minutes
        r = run_nnunet(tr_img, tr_lab, tests, names, budget, SPACING[a.dataset], a.nnunet_mirroring, a.nnunet_epoch)
    else:
        r = run_net(tr_img, tr_lab, tests, names, a.iterations, a.budget_minutes, overrides, a.eval_every, a.save)
    wall = round(time.time() - t0, 1)
    scores = r.pop("scores")
    rec = {"dataset": a.dataset, "task": {"vnc": a.task, "isbi": "membrane", "nuclei": "boundary"}[a.dataset],
           "labels": a.labels if a.dataset == "vnc" else "sparse", "method": a.method, "tag": a.tag,
           **({"slices": [a.slices] * 3} if a.dataset == "nuclei" else {}),
           "protocol_scored": headline, "classes": names, "protocol": proto,
           **{k: v for k, v in r.items() if k != "method"}, **scores[headline],
           "scores": scores, "wall_seconds": wall,
           "shared_machine": "2 cores shared with other sessions' work; see load_before / load_after",
           **provenance(load_before, commit)}
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({"dataset": a.dataset, "method": a.method, "tag": a.tag, "wall_seconds": wall,
                      **{k: {"iou": v["iou"], "mean_foreground_iou": v.get("mean_foreground_iou")}
                         for k, v in scores.items()}}))


if __name__ == "__main__":
    main()
