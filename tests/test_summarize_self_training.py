"""The self-training summary groups runs as its table claims: network seeds averaged (each kept),
changed options apart, other selections left to the selection table."""

from benchmarks.summarize_self_training import rows
from sparseseg.trainer.options import DEFAULTS


def run(seed=None, iou=(0.9, 0.6), **over):
    o = dict(over)
    if seed is not None:
        o["seed"] = seed
    return {"dataset": "isbi", "task": "membrane", "budget_percent": 10.0, "method": "sparse",
            "classes": ["interior", "membrane"], "iou": list(iou), "overrides": o, "wall_seconds": 1.0}


def test_seeds_are_averaged_and_the_latest_run_per_seed_counts():
    table = rows([run(iou=(0.9, 0.5)), run(iou=(0.9, 0.6)), run(seed=1, iou=(0.8, 0.7))])
    assert len(table) == 1
    r = table[0]
    assert r["runs"] == 2 and r["iou_runs"]["membrane"] == [0.6, 0.7]
    assert abs(r["iou"]["membrane"] - 0.65) < 1e-9 and abs(r["iou"]["interior"] - 0.85) < 1e-9


def test_a_changed_option_is_its_own_row_and_a_default_one_is_not():
    default = DEFAULTS["class_sampling"]
    table = rows([run(), run(class_sampling=0.25, iou=(0.9, 0.1)), run(class_sampling=default, seed=1)])
    by = {r["method"]: r for r in table}
    assert set(by) == {"sparse 3D", "sparse 3D [class_sampling=0.25]"}
    assert by["sparse 3D"]["runs"] == 2 and by["sparse 3D [class_sampling=0.25]"]["iou"]["membrane"] == 0.1


def test_other_selections_stay_out():
    assert rows([{**run(), "selection": "random"}]) == []


def test_a_run_from_before_a_default_changed_is_told_apart(tmp_path, monkeypatch):
    import subprocess

    import benchmarks.summarize_self_training as summary

    opts = tmp_path / "sparseseg" / "trainer" / "options.py"
    opts.parent.mkdir(parents=True)
    opts.write_text('DEFAULTS = {"class_sampling": 0.77, "iterations": 1800, "seed": 3}\n')   # not ours
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "then"]):
        subprocess.run(git + args, check=True)
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    commit = commit.strip()
    monkeypatch.setattr(summary, "ROOT", tmp_path)
    summary.defaults_at.cache_clear()
    then = {**run(), "commit": commit + "+uncommitted sparseseg/ changes"}
    now = run(class_sampling=0.77)
    assert summary.changed(then) == summary.changed(now) == "class_sampling=0.77"   # not iterations, seed
    assert summary.changed({**run(), "commit": "0000000"}) == ""           # unknown commit: today's defaults
    summary.defaults_at.cache_clear()
