from benchmarks.compare_option import compare

DEFAULTS = {"pretrain": 0, "class_sampling": 0.33, "iterations": 3000, "seed": 0, "ndim": "3"}


def _row(tag, iou, method="net", **options):
    return {"dataset": "vnc", "task": "all", "labels": "sparse", "method": method, "tag": tag,
            "classes": ["other", "membrane", "mitochondria"], "iou": iou, "options": options, "commit": "c",
            "date": "d", "machine": "m", "load_before": [0, 0, 0]}


def test_runs_pair_by_network_and_seed_and_other_settings_are_left_out():
    rows = [_row("a", [0.9, 0.70, 0.50], iterations=3000),
            _row("b", [0.9, 0.72, 0.46], iterations=3000, pretrain=1000),
            _row("b", [0.9, 0.71, 0.40], iterations=3000, pretrain=1000, seed=1),
            _row("b", [0.9, 0.60, 0.30], iterations=3000, ndim=2, pretrain=1000),
            _row("a", [0.9, 0.69, 0.52], iterations=3000, class_sampling=0.33, ndim="2"),
            _row("a", [0.9, 0.50, 0.10], iterations=3000, class_sampling=0.5),     # another setting
            _row("z", [0.9, 0.10, 0.10], iterations=3000),                           # tag not asked for
            _row("b", [0.9, 0.30, 0.30], iterations=1000, pretrain=1000),           # its own cell
            _row("a", [0.9, 0.20, 0.20], iterations=3000),                           # a repeat
            _row("forest", [0.9, 0.659, 0.257], method="random forest (ilastik filter bank)")]
    out = compare(rows, "pretrain", {"a", "b"}, DEFAULTS)
    cells = {(c["network"], c["seed"]): c for c in out["cells"] if c["iterations"] == 3000}
    assert set(cells) == {("3D", 0), ("3D", 1), ("2D", 0)}
    assert [c["on"]["iou"]["membrane"] for c in out["cells"] if c["iterations"] == 1000] == [0.3]
    assert cells[("3D", 0)]["difference"] == {"membrane": 0.02, "mitochondria": -0.04}
    assert "difference" not in cells[("3D", 1)] and "off" not in cells[("3D", 1)]
    assert cells[("2D", 0)]["difference"] == {"membrane": -0.09, "mitochondria": -0.22}
    assert out["left_out"] == [
        {"tag": "a", "options": {"iterations": 3000, "class_sampling": 0.5}, "why": "other settings"},
        {"tag": "a", "options": {"iterations": 3000}, "why": "same cell as an earlier run"}]
    assert out["forest"]["vnc"]["iou"] == {"membrane": 0.659, "mitochondria": 0.257}
    means = {m["network"]: m for m in out["mean"]}
    assert means["3D"]["seeds"] == 1 and means["3D"]["mean_difference"]["membrane"] == 0.02
