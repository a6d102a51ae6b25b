"""Table and figure from the JSON lines benchmarks/self_training.py appends.

    python benchmarks/summarize_self_training.py [--tag s4]

Writes benchmarks/results/self_training.json (one row per run: dataset, budget, method, IoU per
class, seconds, machine, date, load) and self_training.png (foreground IoU per budget: forest,
sparse 3D network, self-training per mode, full labels), from whatever runs exist. Where a
(dataset, budget, method) ran more than once the latest run is shown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def label(r) -> str:
    if r["method"] == "selftrain":
        return f"self-train ({(r.get('self_train') or {}).get('mode', 'distill')})"
    return {"sparse": "sparse 3D", "full": "full labels", "forest": "forest"}.get(r["method"], r["method"])


def rows(runs):
    latest = {}
    for r in runs:
        latest[(r["dataset"], r["task"], r["budget_percent"], label(r))] = r
    out = []
    for (dataset, task, budget, method), r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3])):
        out.append({"dataset": dataset, "task": task, "budget_percent": budget, "method": method,
                    "annotated_sections": r.get("annotated_sections"),
                    "iou": {n: (round(v, 4) if v is not None else None) for n, v in zip(r["classes"], r["iou"])},
                    "iterations": r.get("iterations"), "stage_seconds": r.get("stage_seconds"),
                    "wall_seconds": r["wall_seconds"], "cpu_seconds": r.get("cpu_seconds"),
                    "overrides": r.get("overrides"), "commit": r.get("commit"), "date": r.get("date"),
                    "machine": r.get("machine"), "load_before": r.get("load_before"),
                    "load_after": r.get("load_after"), "protocol": r.get("protocol")})
    return out


def figure(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dataset"], c) for r in table for c in list(r["iou"])[1:]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (dataset, cls) in zip(axes[0], panels):
        sub = [r for r in table if r["dataset"] == dataset and cls in r["iou"]]
        methods = sorted({r["method"] for r in sub})
        budgets = sorted({r["budget_percent"] for r in sub if r["method"] != "full labels"})
        width = 0.8 / max(1, len(methods) - ("full labels" in methods))
        bars = [m for m in methods if m != "full labels"]
        for i, m in enumerate(bars):
            ys = [next((r["iou"][cls] for r in sub if r["method"] == m and r["budget_percent"] == b), None)
                  for b in budgets]
            xs = [j + i * width for j, y in enumerate(ys) if y is not None]
            ax.bar(xs, [y for y in ys if y is not None], width, label=m)
        full = next((r["iou"][cls] for r in sub if r["method"] == "full labels"), None)
        if full is not None:
            ax.axhline(full, color="k", ls="--", lw=1, label="full labels")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(budgets))], [f"{b:g}%" for b in budgets])
        ax.set_xlabel("annotated sections")
        ax.set_ylabel(f"{cls} IoU (held-out half)")
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    machine = next((r["machine"] for r in table if r.get("machine")), "")
    fig.suptitle(f"sparse vs self-training vs full labels ({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", help="only runs with this tag")
    a = ap.parse_args()
    src = RESULTS / "self_training.jsonl"
    runs = [json.loads(line) for line in src.read_text().splitlines() if line.strip()] if src.exists() else []
    runs = [r for r in runs if a.tag is None or r.get("tag") == a.tag]
    if not runs:
        raise SystemExit(f"no runs in {src}" + (f" with tag {a.tag}" if a.tag else ""))
    table = rows(runs)
    (RESULTS / "self_training.json").write_text(json.dumps(table, indent=1) + "\n")
    figure(table, RESULTS / "self_training.png")
    for r in table:
        iou = ", ".join(f"{k} {v:.3f}" for k, v in r["iou"].items() if v is not None)
        print(f"{r['dataset']:5} {r['budget_percent']:5g}%  {r['method']:22} {iou}  ({r['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
