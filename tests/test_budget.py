"""The time budget: plans from measured step time, re-plans, stops in time, refuses budgets that
cannot buy one step; and the one set of defaults every entry point uses."""

import time
from dataclasses import fields

import numpy as np
import pytest

from helpers import blobs, fast_train_config, run_cli, tiny_config
from sparseseg.errors import SparsesegError
from sparseseg.model.checkpoint import load_checkpoint
from sparseseg.model.defaults import DEFAULTS
from sparseseg.trainer.budget import Budget
from sparseseg.trainer.config import TrainConfig
from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.sparse import orthogonal_slices, sparsify
from sparseseg.trainer.train import train


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def drive(budget, clock, step_seconds, prepare=1.0, limit=100_000):
    """Run a budget with a fake clock: `step_seconds(i)` per step; the steps done."""
    clock.t += prepare
    done = 0
    while done < budget.total and done < limit:
        clock.t += step_seconds(done)
        done += 1
        if budget.after_step(done):
            break
    return done


def test_plan_fits_the_budget_from_the_measured_step_time():
    clock = Clock()
    b = Budget(1.0, 0.0, clock=clock, began=0.0)          # 60 s
    done = drive(b, clock, lambda i: 3.0 if i == 0 else 2.0)   # the first step pays for kernel selection
    plan = b.finish(done)
    assert 55.0 <= clock.t <= 60.0                           # ends within the budget, close to it
    assert done == plan.planned and plan.step_seconds == pytest.approx(2.0)
    assert plan.ran == done and 27 <= done <= 29


def test_replans_when_steps_slow_down_and_keeps_the_reserve():
    clock = Clock()
    b = Budget(10.0, 60.0, clock=clock, began=0.0)          # 600 s, 60 s kept for prediction
    done = drive(b, clock, lambda i: 1.0 if i < 20 else 1.5)
    first_guess = 1 + int((540 - 1 - 6) / 1.0)              # what the plan after the probe steps said
    assert done < first_guess                                # the slower steps moved the plan down
    plan = b.finish(done)
    # Steps 1.5x slower (load): the prediction after them is kept 1.5x as long, 90 s.
    assert plan.reserve_timed_seconds == 60.0 and plan.reserve_seconds == pytest.approx(90.0)
    assert 600.0 - 90.0 - 1.5 <= clock.t <= 600.0 - 90.0


def test_reserve_never_shrinks_below_its_timing():
    clock = Clock()
    b = Budget(2.0, 30.0, clock=clock, began=0.0)
    done = drive(b, clock, lambda i: 2.0 if i < 20 else 1.0)  # slow first steps (warm-up), then faster
    plan = b.finish(done)
    assert plan.reserve_seconds == 30.0 and 88.0 <= clock.t <= 90.0


def test_budget_too_small_for_one_step_is_an_error():
    clock = Clock()
    b = Budget(0.05, 0.0, clock=clock, began=0.0)           # 3 s
    with pytest.raises(SparsesegError, match="too small"):
        drive(b, clock, lambda i: 5.0)
    with pytest.raises(SparsesegError, match="prediction alone"):
        Budget(0.5, 40.0, clock=clock)


def _volume():
    image, labels = blobs(seed=2)
    return TrainingVolume(image, sparsify(labels, orthogonal_slices(labels.shape, (3, 3, 3))), "toy")


def test_train_within_budget_records_the_plan_and_follows_it(tmp_path):
    vol, model = _volume(), tiny_config(width=4)
    # The budget is sized from this machine's speed (a pinned 3-step run), so a loaded machine
    # still has room for a plan: at least 12 s, or four such runs.
    t = time.monotonic()
    train([vol], model, fast_train_config(iterations=3, patch_output=(8, 16, 16)), ["bg", "ball"], progress=False)
    three = time.monotonic() - t
    seconds = max(12.0, 4 * three)
    cfg = fast_train_config(iterations=0, time_budget=seconds / 60, schedule="poly", patch_output=(8, 16, 16))
    t = time.monotonic()
    res = train([vol], model, cfg, ["bg", "ball"], out_path=tmp_path / "m.pt", progress=False)
    wall = time.monotonic() - t
    assert wall < seconds + max(5.0, three)                  # the budget, plus the final save and curve
    assert res.plan["planned"] == res.iterations == res.plan["ran"] > 5
    planned = [e["planned"] for e in res.history if "planned" in e]
    assert planned and planned[-1] == res.iterations
    # the poly schedule follows the planned count: the rate decays towards 0 at the last step
    assert res.history[-1]["lr"] < 0.2 * cfg.lr
    extra = load_checkpoint(tmp_path / "m.pt").extra
    assert extra["budget"]["minutes"] == pytest.approx(seconds / 60, rel=1e-3) and extra["budget"]["ran"] == res.iterations


def test_pinned_iterations_ignore_the_budget():
    res = train([_volume()], tiny_config(width=4), fast_train_config(iterations=7, time_budget=0.001,
                                                                     patch_output=(8, 16, 16)),
                ["bg", "ball"], progress=False)
    assert res.iterations == 7 and res.plan is None


def test_prediction_time_is_kept_for_densify():
    res = train([_volume()], tiny_config(width=4), fast_train_config(iterations=0, time_budget=0.5,
                                                                     patch_output=(8, 16, 16)),
                ["bg", "ball"], progress=False, predict_shapes=[(60, 60, 60)])
    assert res.plan["reserve_seconds"] > 10.0                # the engine's start, and the voxels


def test_cli_budget_errors_are_one_line(tmp_path):
    image, labels = blobs(seed=2)
    np.save(tmp_path / "im.npy", image)
    np.save(tmp_path / "lab.npy", sparsify(labels, orthogonal_slices(labels.shape, (3, 3, 3))))
    base = ["train", "--image", tmp_path / "im.npy", "--labels", tmp_path / "lab.npy", "--out", tmp_path / "m.pt",
            "--depth", "2", "--base-width", "4", "--device", "cpu"]
    code, out = run_cli(*base, "--iterations", "5", "--time-budget", "1")
    assert code == 1 and out.strip().splitlines() == [
        "error: give --iterations or --time-budget, not both (--iterations pins the count)"]
    code, out = run_cli(*base, "--time-budget", "0")
    assert code == 1 and out.strip().startswith("error: --time-budget must be more than 0")
    code, out = run_cli(*base, "--time-budget", "0.0001")
    assert code == 1 and "too small" in out and "Traceback" not in out
    assert not (tmp_path / "m.pt").exists()                 # nothing written by a refused run


def test_one_set_of_defaults_for_cli_python_and_napari():
    from sparseseg.cli import TRAINING_HELP
    from sparseseg.trainer.options import build_configs

    assert set(TRAINING_HELP) == set(DEFAULTS)               # every default is a CLI option, and back
    _, from_cli, _ = build_configs([_volume()], {})          # what the CLI builds with no option given
    python = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in ("class_weights", "voxel_size"):
            continue
        assert getattr(from_cli, f.name) == getattr(python, f.name), f.name
    assert from_cli.class_weights == (1.0, 1.0) and python.class_weights == "uniform"
    assert python.iterations == 0 and python.time_budget == DEFAULTS["time_budget"]
    paper = TrainConfig.paper()
    assert (paper.schedule, paper.loss, paper.class_sampling, paper.augment.elastic) == ("constant", "ce", 0.0, True)


def test_widget_defaults_are_the_same_set():
    pytest.importorskip("qtpy")
    try:
        from sparseseg.napari.widget import default_options
    except Exception as e:            # no Qt binding importable here
        pytest.skip(f"napari widget not importable: {e}")
    o = default_options()
    assert {k: o[k] for k in DEFAULTS if k not in ("ignore_label", "val_every", "checkpoint_every")} == \
        {k: v for k, v in DEFAULTS.items() if k not in ("ignore_label", "val_every", "checkpoint_every")}
    assert np.isclose(o["time_budget"], DEFAULTS["time_budget"])


def test_live_preview_is_the_whole_volume_prediction_on_that_slice():
    """The widget's live prediction of one slice equals the engine's prediction of the whole
    volume there (valid network, window on the engine's tile grid, reflected borders)."""
    import sparseseg
    from sparseseg.trainer.preview import predict_plane

    image, labels = blobs(shape=(20, 33, 41), seed=1)
    vol = TrainingVolume(image, sparsify(labels, orthogonal_slices(labels.shape, (3, 3, 3))), "toy")
    res = train([vol], tiny_config(width=4), fast_train_config(iterations=30, patch_output=(8, 16, 16)),
                ["bg", "ball"], progress=False)
    model = res.model.eval()
    full, _ = sparseseg.predict(model, image, backend="torch", device="cpu")
    assert 0 < full.mean() < 1                                # both classes predicted
    for axis, index in [(0, 0), (0, 19), (1, 5), (1, 17), (2, 40)]:
        np.testing.assert_array_equal(predict_plane(model, image, axis, index), np.take(full, index, axis=axis))
    assert predict_plane(model, image, 0, 20) is None         # outside the volume
