"""One training option on and off, per dataset, network (3D / 2D) and seed, from the JSON lines
that benchmarks/real_data.py appends; the forest beside them.

    python benchmarks/compare_option.py --option pretrain --tags s9-cs,s10-pt,s10-base --name pretrain_s10

Writes benchmarks/results/<name>.json (every run with its commit, date, machine and load; the
difference per seed and its mean) and <name>.png. A run is "off" when it leaves the option at
its default (not in its overrides, or given the default value). Runs whose other overrides
differ from today's defaults (besides iterations, seed and ndim) are left out, named in the JSON;
a run records only the options it overrode, so name tags from the period whose defaults are
today's (see summarize_self_training.defaults_at for runs across a change of default).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/compare_option.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import record  # noqa: E402


RESULTS = Path(__file__).resolve().parent / "results"
FREE = ("iterations", "seed", "ndim")       # the overrides that name a cell, not a setting


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def foreground(r) -> dict:
    """IoU of the classes a table reports (not the background-like ones)."""
    skip = ("other", "background", "interior")
    return {c: round(v, 4) for c, v in zip(r["classes"], r["iou"]) if c not in skip}


def compare(rows, option: str, tags, defaults: dict) -> dict:
    """Cells (dataset, network, seed) -> off / on runs; the forest per dataset (its latest run)."""
    cells, left_out, forest = defaultdict(dict), [], {}
    for r in rows:
        if r.get("labels", "sparse") != "sparse" or r.get("task", "all") not in ("all", "membrane"):
            continue
        if str(r["method"]).startswith(("forest", "random forest")):
            forest[r["dataset"]] = {"iou": foreground(r), "commit": r["commit"], "date": r["date"]}
            continue
        if r.get("tag") not in tags:
            continue
        o = r.get("options", {})
        other = {k: v for k, v in o.items() if k not in FREE + (option,) and v != defaults.get(k)}
        if other:
            left_out.append({"tag": r["tag"], "options": o, "why": "other settings"})
            continue
        state = "off" if o.get(option, defaults[option]) == defaults[option] else "on"
        key = (r["dataset"], "2D" if str(o.get("ndim", "3")) == "2" else "3D", int(o.get("seed", 0)),
               o.get("iterations"))
        run = {"iou": foreground(r), "value": o.get(option, defaults[option]), "tag": r["tag"],
               "train_seconds": r.get("train_seconds"), "commit": r["commit"], "date": r["date"],
               "machine": r["machine"], "load_before": r["load_before"]}
        if r.get("pretrain"):
            run["phase"] = r["pretrain"]
        if state in cells[key]:         # a repeat of a cell: the first run counts, the repeat is named
            left_out.append({"tag": r["tag"], "options": o, "why": "same cell as an earlier run"})
            continue
        cells[key][state] = run
    table = []
    for (dataset, net, seed, iterations), runs in sorted(cells.items(), key=lambda kv: str(kv[0])):
        entry = {"dataset": dataset, "network": net, "seed": seed, "iterations": iterations, **runs}
        if "on" in runs and "off" in runs:
            on, off = runs["on"]["iou"], runs["off"]["iou"]
            entry["difference"] = {c: round(on[c] - off[c], 4) for c in on}
        table.append(entry)
    means = defaultdict(list)
    for e in table:
        if "difference" in e:
            means[(e["dataset"], e["network"], e["iterations"])].append(e["difference"])
    mean = [{"dataset": d, "network": n, "iterations": i, "seeds": len(v),
             "mean_difference": {c: round(sum(x[c] for x in v) / len(v), 4) for c in v[0]}}
            for (d, n, i), v in sorted(means.items(), key=lambda kv: str(kv[0]))]
    return {"option": option, "tags": sorted(tags), "cells": table, "mean": mean, "forest": forest,
            "left_out": left_out}


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(e["dataset"], c) for e in result["cells"] for s in ("on", "off") if s in e
                     for c in e[s]["iou"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (dataset, cls) in zip(axes[0], panels):
        nets = sorted({e["network"] for e in result["cells"] if e["dataset"] == dataset})
        for i, net in enumerate(nets):
            for j, state in enumerate(("off", "on")):
                vals = [e[state]["iou"][cls] for e in result["cells"]
                        if e["dataset"] == dataset and e["network"] == net and state in e]
                x = i * 3 + j
                ax.scatter([x] * len(vals), vals, color="C0" if state == "off" else "C1", zorder=3)
                if vals:
                    ax.hlines(sum(vals) / len(vals), x - 0.3, x + 0.3, color="k")
        ax.set_xticks([i * 3 + j for i in range(len(nets)) for j in (0, 1)],
                      [f"{n}\n{s}" for n in nets for s in ("off", "on")], fontsize=8)
        f = result["forest"].get(dataset, {}).get("iou", {}).get(cls)
        if f is not None:
            ax.axhline(f, color="gray", ls="--", label="forest")
            ax.legend(fontsize=7)
        ax.set_title(f"{dataset} {cls}", fontsize=9)
        ax.set_ylabel("IoU on unannotated voxels", fontsize=8)
    fig.suptitle(f"--{result['option'].replace('_', '-')} off / on (dots: seeds; bar: mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    from sparseseg.trainer.options import DEFAULTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--option", required=True, help="a training option key, e.g. pretrain")
    ap.add_argument("--tags", required=True, help="comma-separated run tags")
    ap.add_argument("--name", required=True, help="results/<name>.json and .png")
    ap.add_argument("--runs", default=str(RESULTS / "real_data_runs.jsonl"))
    a = ap.parse_args()
    if a.option not in DEFAULTS:
        raise SystemExit(f"unknown training option {a.option!r}")
    result = compare(read_rows(Path(a.runs)), a.option, set(a.tags.split(",")), DEFAULTS)
    if not result["cells"]:
        raise SystemExit(f"no network run in tags {a.tags}")
    (RESULTS / f"{a.name}.json").write_text(json.dumps({"record": record(), **result}, indent=1))
    figure(result, RESULTS / f"{a.name}.png")
    for e in result["cells"]:
        print(e["dataset"], e["network"], e["seed"], *(f"{s} {e[s]['iou']}" for s in ("off", "on") if s in e),
              e.get("difference", ""))
    for m in result["mean"]:
        print("mean", m)


if __name__ == "__main__":
    main()
