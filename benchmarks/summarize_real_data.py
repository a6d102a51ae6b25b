"""Tables, a figure and the levers' conclusions from the JSON lines that benchmarks/real_data.py appends.

    python benchmarks/summarize_real_data.py            # reads benchmarks/results/*_runs.jsonl

Writes benchmarks/results/real_data.json + real_data.png (forest vs networks), levers_isbi.json
(each lever against its base run, one line each) and cheng_vnc.json (the Cheng table), from
whatever runs exist; every row keeps its commit, date, machine and load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/summarize_real_data.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import record  # noqa: E402


RESULTS = Path(__file__).resolve().parent / "results"
NOISE = 0.01        # IoU differences below this, from one short run each, are called inconclusive


def read(name):
    p = RESULTS / name
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def true_shares(dataset: str, task: str) -> list[float]:
    """Share of each class among the voxels a run predicts (ISBI: the whole stack; VNC: the test half)."""
    import numpy as np

    from sparseseg.volume import open_volume

    from benchmarks.record import data_dir

    data = data_dir()
    if dataset == "isbi":
        lab = open_volume(data / "isbi2012_em" / "isbi2012_train_label_zyx.tif").read_labels()
    else:
        lab = open_volume(data / "drosophila_vnc" / "vnc_stack1_labels_zyx.tif").read_labels()
        lab = lab[:, :, lab.shape[2] // 2:]
        if task != "all":
            lab = (lab == (2 if task == "mito" else 1)).astype(np.uint8)
    counts = np.bincount(lab.ravel()).astype(float)
    return (counts / counts.sum()).tolist()


def method_of(r):
    return "forest" if r["method"] in ("forest",) or str(r["method"]).startswith("random forest") else r["tag"]


def row(r):
    names = r["classes"]
    out = {"dataset": r["dataset"], "task": r["task"], "labels": r["labels"], "method": method_of(r),
           "iou": {n: (round(v, 4) if v is not None else None) for n, v in zip(names, r["iou"])},
           "iterations": r.get("options", {}).get("iterations"), "parameters": r.get("parameters"),
           "train_seconds": r.get("train_seconds", r.get("fit_seconds")),
           "seconds_per_iteration": r.get("seconds_per_iteration"), "predict_seconds": r.get("predict_seconds"),
           "wall_seconds": r["wall_seconds"], "options": r.get("options"), "commit": r["commit"], "date": r["date"],
           "machine": r["machine"], "load_before": r["load_before"], "load_after": r["load_after"],
           "protocol": r["protocol"]}
    if r.get("predicted_fraction"):
        pred = r["predicted_fraction"]
        truth = true_shares(r["dataset"], r["task"])
        # Class weighting makes thin structures too thick: predicted share vs true share shows it.
        out["predicted_share"] = {n: round(p / sum(pred), 4) for n, p in zip(names, pred)}
        out["true_share"] = {n: round(t, 4) for n, t in zip(names, truth)}
    if out["method"] == "forest":
        out["training_samples"] = r.get("training_samples")
        out["annotated_voxels"] = r.get("annotated_voxels")
    return out


def figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for r in rows:
        for cls, v in r["iou"].items():
            if cls in ("interior", "other", "rest"):
                continue
            groups.append((f"{r['dataset']} {cls}\n({r['labels']})", r["method"], v or 0.0))
    keys = sorted({g[0] for g in groups})
    methods = sorted({g[1] for g in groups}, key=lambda m: (m != "forest", m))
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(keys) * max(1, len(methods)) / 3, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [k for k in range(len(keys))]
        vals = [next((g[2] for g in groups if g[0] == keys[k] and g[1] == m), 0.0) for k in xs]
        ax.bar([x + i * width for x in xs], vals, width, label=m)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], keys, fontsize=8)
    ax.set_ylabel("IoU on unannotated voxels")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("sparse labels: ilastik-style forest vs networks (CPU, budget in JSON)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def levers(rows, base_tag="s300-defaults", prefix="s3"):
    """Each short ISBI screening run (same iterations, one or two options changed) against the
    defaults' run at the same budget."""
    base = next((r for r in rows if r["dataset"] == "isbi" and r["method"] == base_tag), None)
    if base is None:
        return None
    b = base["iou"]["membrane"]
    out = {"protocol": base["protocol"], "network": "3D U-Net --preset small unless the options say ndim 2",
           "iterations": base["iterations"], "base": {"membrane_iou": b, "commit": base["commit"]},
           "noise": f"differences under {NOISE} IoU (one run each) are called inconclusive", "levers": []}
    for r in rows:
        if r["dataset"] != "isbi" or not r["method"].startswith(prefix) or r is base:
            continue
        v = r["iou"]["membrane"]
        d = v - b
        verdict = "inconclusive" if abs(d) < NOISE else ("helps" if d > 0 else "hurts")
        out["levers"].append({"lever": r["method"], "options": r["options"], "membrane_iou": v,
                              "delta": round(d, 4), "predicted_share": r.get("predicted_share"),
                              "conclusion": f"{r['method']}: membrane IoU {v:.3f} vs {b:.3f} ({d:+.3f}), {verdict}",
                              "commit": r["commit"], "date": r["date"], "load_before": r["load_before"]})
    return out


def main():
    main_rows = [row(r) for r in read("real_data_runs.jsonl")]
    lever_rows = [row(r) for r in read("levers_runs.jsonl")]
    cheng_rows = [row(r) for r in read("cheng_vnc_runs.jsonl")]
    (RESULTS / "real_data.json").write_text(json.dumps({"record": record(), "runs": main_rows}, indent=1))
    # The figure: the forest and the 10-minute runs (tags "l*"), not the short screening runs.
    shown = [r for r in main_rows if r["method"] == "forest" or r["method"].startswith("l")]
    figure(shown + [r for r in cheng_rows if r["labels"] == "sparse"], RESULTS / "real_data.png")
    lv = levers(main_rows)
    if lv:
        (RESULTS / "levers_isbi.json").write_text(json.dumps({"record": record(), **lv}, indent=1))
    ref = [r for r in main_rows if r["dataset"] == "vnc"]
    (RESULTS / "cheng_vnc.json").write_text(json.dumps({"record": record(), "runs": ref + cheng_rows}, indent=1))
    for r in main_rows + lever_rows + cheng_rows:
        print(f"{r['dataset']:5} {r['labels']:6} {r['method']:22} "
              + " ".join(f"{k} {v:.3f}" for k, v in r["iou"].items() if v is not None)
              + (" | predicted/true share " + " ".join(f"{k} {v:.3f}/{r['true_share'][k]:.3f}"
                                                       for k, v in r["predicted_share"].items())
                 if "predicted_share" in r else "")
              + f"  train {r['train_seconds']} s  it {r['iterations']}  params {r['parameters']}  commit {r['commit']}"
              + f"  load {r['load_before'][0]}")


if __name__ == "__main__":
    main()
