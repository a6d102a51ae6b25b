"""Table and figure from the JSON lines benchmarks/self_training.py appends.

    python benchmarks/summarize_self_training.py [--tag s4 [--tag s6-1000 ...]] [--name NAME]

Writes benchmarks/results/NAME.json (default self_training; one row per dataset, budget and method:
IoU per class as the mean over network seeds with each seed's figure, the latest run's seconds,
machine, date, load) and NAME.png (foreground IoU per budget: forest, sparse 3D network,
self-training per mode, full labels; dots: each seed where there are several), from whatever runs
exist. Where a (dataset, budget, method, network seed) ran more than once the latest run counts.
Those use equal-interval sections; runs with another `--selection` go to selection.json /
selection.png instead (NAME_selection with another NAME): the sparse 3D network per budget and
selection (equal, representative, random: mean and range over seeds).

Runs whose settings differ from today's defaults are shown apart, the difference in the method's
name. A run records its overrides and its commit; the defaults it ran with are read from that
commit's sparseseg/trainer/options.py (git), so a run from before a default changed is told apart.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def overrides(r) -> dict:
    return r.get("overrides") or {}


@functools.lru_cache(maxsize=None)
def defaults_at(commit: str) -> dict:
    """The training defaults (sparseseg/trainer/options.py's DEFAULTS literal) at a commit, read
    with git; today's where the commit or git is not at hand."""
    from sparseseg.trainer.options import DEFAULTS

    text = subprocess.run(["git", "show", f"{commit.split('+')[0]}:sparseseg/trainer/options.py"], cwd=ROOT,
                          capture_output=True, text=True, check=False).stdout if commit else ""
    for node in ast.parse(text).body if text else ():
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "DEFAULTS" for t in node.targets):
            return {**DEFAULTS, **ast.literal_eval(node.value)}
    return dict(DEFAULTS)


def changed(r) -> str:
    """The run's settings (the defaults of its commit with its overrides) that differ from today's
    defaults, but the network seed, ndim and iterations (recorded apart): "k=v, ..." or ""."""
    from sparseseg.trainer.options import DEFAULTS

    settings = {**defaults_at(r.get("commit") or ""), **overrides(r)}
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items())
                     if k not in ("seed", "ndim", "iterations") and str(DEFAULTS.get(k)) != str(v))


def label(r) -> str:
    if r["method"] == "selftrain":
        name = f"self-train ({(r.get('self_train') or {}).get('mode', 'distill')})"
    elif overrides(r).get("ndim") == 2:
        name = {"sparse": "sparse 2D", "full": "full labels 2D"}.get(r["method"], r["method"])
    else:
        names = {"sparse": "sparse 3D", "full": "full labels", "forest": "forest"}
        name = names.get(r["method"], r["method"])
    diff = "" if r["method"] == "forest" else changed(r)     # no network setting changes the forest
    return f"{name} [{diff}]" if diff else name


def selection(r) -> str:
    return r.get("selection", "all" if r["method"] == "full" else "equal")   # older runs: equal-interval


def rows(runs):
    """Equal-interval (or full-label) runs per (dataset, budget, method): the latest run per network
    seed (`--set seed=N`), then the mean over seeds, each seed's figure beside it."""
    latest = {}
    for r in runs:
        if selection(r) not in ("equal", "all"):
            continue            # other selections: selection_rows
        latest[(r["dataset"], r["task"], r["budget_percent"], label(r), overrides(r).get("seed", 0))] = r
    groups = {}
    for (dataset, task, budget, method, _), r in latest.items():
        groups.setdefault((dataset, task, budget, method), []).append(r)
    out = []
    for (dataset, task, budget, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], *kv[0][2:])):
        r = rs[-1]
        per = {n: [x["iou"][i] for x in rs] for i, n in enumerate(r["classes"])}
        out.append({"dataset": dataset, "task": task, "budget_percent": budget, "method": method,
                    "annotated_sections": r.get("annotated_sections"), "runs": len(rs),
                    "iou": {n: None if None in v else round(sum(v) / len(v), 4) for n, v in per.items()},
                    "iou_runs": {n: [None if x is None else round(x, 4) for x in v] for n, v in per.items()},
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
    everywhere = sorted({r["method"] for r in table})      # one colour per method in every panel
    colour = {m: plt.cm.tab10(i % 10) for i, m in enumerate(everywhere)}
    for ax, (dataset, cls) in zip(axes[0], panels):
        sub = [r for r in table if r["dataset"] == dataset and cls in r["iou"]]
        methods = sorted({r["method"] for r in sub})
        fulls = [m for m in methods if m.startswith("full labels")]
        budgets = sorted({r["budget_percent"] for r in sub if r["method"] not in fulls})
        bars = [m for m in methods if m not in fulls]
        width = 0.8 / max(1, len(bars))
        for i, m in enumerate(bars):
            ys = [next((r["iou"][cls] for r in sub if r["method"] == m and r["budget_percent"] == b), None)
                  for b in budgets]
            xs = [j + i * width for j, y in enumerate(ys) if y is not None]
            ax.bar(xs, [y for y in ys if y is not None], width, label=m, color=colour[m])
            for x, b in zip(xs, [b for b, y in zip(budgets, ys) if y is not None]):   # each seed's run
                r = next(r for r in sub if r["method"] == m and r["budget_percent"] == b)
                if r["runs"] > 1:
                    ax.plot([x] * r["runs"], r["iou_runs"][cls], "k.", ms=4)
        for m, style in zip(fulls, ("--", ":")):
            full = next(r["iou"][cls] for r in sub if r["method"] == m)
            ax.axhline(full, color="k", ls=style, lw=1, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(budgets))], [f"{b:g}%" for b in budgets])
        ax.set_xlabel("annotated sections")
        ax.set_ylabel(f"{cls} IoU (held-out half)")
        ax.set_title(dataset)
        values = [v for r in sub for v in r["iou_runs"][cls] if v is not None]
        ax.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.03))   # differences: hundredths
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)), fontsize=7)
    machine = next((r["machine"] for r in table if r.get("machine")), "")
    fig.suptitle(f"sparse vs self-training vs full labels ({machine})", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(handles) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=110)


def selection_rows(runs):
    """Sparse 3D runs per (dataset, budget, selection): the latest run per selection seed and
    network seed (`--set seed=N`), then mean and range over them."""
    latest = {}
    for r in runs:
        if r["method"] == "sparse" and overrides(r).get("ndim", 3) == 3:
            net_seed = overrides(r).get("seed")
            latest[(r["dataset"], r["budget_percent"], selection(r), r.get("selection_seed"), net_seed)] = r
    groups = {}
    for (dataset, budget, sel, *_), r in latest.items():
        groups.setdefault((dataset, budget, sel), []).append(r)
    out = []
    for (dataset, budget, sel), rs in sorted(groups.items()):
        names = rs[0]["classes"][1:]
        per = {n: [r["iou"][i + 1] for r in rs] for i, n in enumerate(names)}
        out.append({"dataset": dataset, "budget_percent": budget, "selection": sel, "runs": len(rs),
                    "annotated_sections": [r["annotated_sections"] for r in rs],
                    "iou_mean": {n: round(sum(v) / len(v), 4) for n, v in per.items()},
                    "iou_min": {n: round(min(v), 4) for n, v in per.items()},
                    "iou_max": {n: round(max(v), 4) for n, v in per.items()},
                    "iou_runs": {n: [round(x, 4) for x in v] for n, v in per.items()},
                    "iterations": rs[0].get("iterations"), "tags": sorted({r.get("tag") for r in rs}),
                    "machine": rs[0].get("machine"), "dates": [r.get("date") for r in rs]})
    return out


def selection_figure(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dataset"], c) for r in table for c in r["iou_mean"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    order = ["equal", "representative", "random"]
    for ax, (dataset, cls) in zip(axes[0], panels):
        sub = [r for r in table if r["dataset"] == dataset and cls in r["iou_mean"]]
        budgets = sorted({r["budget_percent"] for r in sub})
        for i, sel in enumerate(order):
            pts = [(j, r) for j, b in enumerate(budgets) for r in sub
                   if r["budget_percent"] == b and r["selection"] == sel]
            if not pts:
                continue
            xs = [j + i * 0.27 for j, _ in pts]
            mean = [r["iou_mean"][cls] for _, r in pts]
            err = [[m - r["iou_min"][cls] for m, (_, r) in zip(mean, pts)],
                   [r["iou_max"][cls] - m for m, (_, r) in zip(mean, pts)]]
            ax.bar(xs, mean, 0.27, yerr=err, capsize=3, label=sel)
            for x, (_, r) in zip(xs, pts):        # every run, so one-run bars read as one run
                ax.plot([x] * len(r["iou_runs"][cls]), r["iou_runs"][cls], "k.", ms=4)
        values = [v for r in sub for v in r["iou_runs"][cls]]
        ax.set_xticks([j + 0.27 for j in range(len(budgets))], [f"{b:g}%" for b in budgets])
        ax.set_xlabel("annotated sections")
        ax.set_ylabel(f"{cls} IoU (held-out half)")
        ax.set_title(dataset)
        ax.set_ylim(min(values) - 0.05, max(values) + 0.03)   # the differences are a few hundredths
        ax.legend(fontsize=7, loc="lower right")
    machine = next((r["machine"] for r in table if r.get("machine")), "")
    fig.suptitle(f"which sections to annotate: sparse 3D network ({machine}); bars: mean, min-max; dots: runs",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", action="append",
                    help="only runs with this tag (repeat for several); forest runs count whatever their tag "
                         "(no network setting changes them, and every table shows the incumbent)")
    ap.add_argument("--name", default="self_training",
                    help="output name in benchmarks/results (default self_training; another name also "
                         "renames the selection table NAME_selection, so a subset never overwrites it)")
    a = ap.parse_args()
    src = RESULTS / "self_training.jsonl"
    runs = [json.loads(line) for line in src.read_text().splitlines() if line.strip()] if src.exists() else []
    runs = [r for r in runs if a.tag is None or r.get("tag") in a.tag or r["method"] == "forest"]
    if not runs:
        raise SystemExit(f"no runs in {src}" + (f" with tags {', '.join(a.tag)}" if a.tag else ""))
    table = rows(runs)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(table, indent=1) + "\n")
    figure(table, RESULTS / f"{a.name}.png")
    for r in table:
        iou = ", ".join(f"{k} {v:.3f}" for k, v in r["iou"].items() if v is not None)
        print(f"{r['dataset']:5} {r['budget_percent']:5g}%  {r['method']:22} {iou}  n={r['runs']}  "
              f"({r['wall_seconds']:.0f} s)")
    sel = selection_rows(runs)
    if any(r["selection"] not in ("equal", "all") for r in sel):
        name = "selection" if a.name == "self_training" else f"{a.name}_selection"
        (RESULTS / f"{name}.json").write_text(json.dumps(sel, indent=1) + "\n")
        selection_figure(sel, RESULTS / f"{name}.png")
        for r in sel:
            iou = ", ".join(f"{k} {v:.3f} [{r['iou_min'][k]:.3f}, {r['iou_max'][k]:.3f}]"
                            for k, v in r["iou_mean"].items())
            print(f"{r['dataset']:5} {r['budget_percent']:5g}%  {r['selection']:15} n={r['runs']}  {iou}")


if __name__ == "__main__":
    main()
