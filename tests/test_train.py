import numpy as np
import torch

from sparseseg.model.checkpoint import load_checkpoint
from sparseseg import predict
from sparseseg.eval.metrics import iou_per_class
from sparseseg.trainer.config import AugmentConfig
from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.sparse import orthogonal_slices, sparsify
from sparseseg.trainer.train import train
from tests.helpers import blobs, fast_train_config, tiny_config


def test_tiny_overfit_reaches_high_iou():
    image, labels = blobs()
    cfg = tiny_config(width=8)
    # Windows anywhere in the volume (the border reflected), so the patch must be big enough to
    # hold balls often: 8x24x24 reaches 0.89 in 80 iterations (0.76 with 8x16x16).
    res = train([TrainingVolume(image, labels, "toy")], cfg, fast_train_config(iterations=80, patch_output=(8, 24, 24)),
                ["bg", "ball"], progress=False)
    pred, _ = predict(res.model, image)
    assert iou_per_class(pred, labels, 2)["iou"][1] > 0.85


def test_held_out_slices_are_masked_from_training():
    """Held-out slices: no sampled window, augmentation read or class count sees their labels."""
    from sparseseg.trainer.train import _prepare

    image, labels = blobs(seed=3)
    slices = orthogonal_slices(labels.shape, (3, 3, 3))
    sparse = sparsify(labels, slices)
    vols = [TrainingVolume(image, sparse, "toy")]
    run = _prepare(vols, tiny_config(width=4), fast_train_config(val_slices=1, augment=AugmentConfig(),
                                                                 patch_output=(4, 8, 8)), ["bg", "ball"])
    held = run.held_out[0]
    assert sorted(held) == [0, 1, 2] and all(len(ix) == 1 for ix in held.values())
    seen = run.train_labels[0][(slice(None),) * 3]
    val = run.val_labels[0][(slice(None),) * 3]
    for axis, (i,) in held.items():
        assert (np.take(seen, i, axis=axis) == 255).all()                 # masked for training
        assert (np.take(val, i, axis=axis) == np.take(sparse, i, axis=axis)).all()   # kept for validation
    # class weights count only the training voxels
    assert run.sampler.counts.sum() == (seen != 255).sum() < (sparse != 255).sum()
    # augmented patches never carry a held-out label: give the held-out voxels a value of their
    # own (2) and look at what the augmenter hands to the loss
    from sparseseg.trainer.train import _batch

    marked = sparse.copy()
    for axis, (i,) in held.items():
        index = [slice(None)] * 3
        index[axis] = i
        marked[tuple(index)] = np.where(marked[tuple(index)] != 255, 2, 255)
    run.train_labels[0].labels = marked
    labelled = 0
    for _ in range(20):
        _, y = _batch(run)
        assert 2 not in set(np.unique(y.numpy()).tolist())
        labelled += int((y != 255).sum())
    assert labelled > 0


def test_validation_on_held_out_slices_best_checkpoint_and_run_log(tmp_path):
    import json

    image, labels = blobs(seed=3)
    sparse = sparsify(labels, orthogonal_slices(labels.shape, (3, 3, 3)))
    tc = fast_train_config(iterations=40, val_slices=1, val_every=10, patch_output=(8, 16, 16), schedule="poly",
                           warmup=5)
    res = train([TrainingVolume(image, sparse, "toy")], tiny_config(width=8), tc, ["bg", "ball"],
                out_path=tmp_path / "m.pt", progress=False)
    vals = [h for h in res.history if "val_iou" in h]
    assert [h["iteration"] for h in vals] == [10, 20, 30, 40]
    assert all(len(h["val_iou"]) == 2 for h in vals)
    # it learns: the held-out IoU of the balls rises well above chance and the best is kept
    assert vals[-1]["val_mean_foreground_iou"] > vals[0]["val_mean_foreground_iou"]
    assert res.best_iou == max(h["val_mean_foreground_iou"] for h in vals) > 0.2
    best = load_checkpoint(tmp_path / "m.best.pt")
    assert best.iteration == max(vals, key=lambda h: h["val_mean_foreground_iou"])["iteration"]
    lines = [json.loads(x) for x in (tmp_path / "m.metrics.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in lines] == list(range(1, 41))
    lrs = [e["lr"] for e in lines]
    assert lrs[0] < lrs[5] and lrs[5] > lrs[-1] > 0                       # warm-up, then poly decay
    assert all(lines[i]["seconds"] <= lines[i + 1]["seconds"] for i in range(39))
    assert (tmp_path / "m.curve.png").stat().st_size > 1000


def test_bad_training_input_is_one_line():
    import pytest

    from sparseseg.errors import SparsesegError

    image, labels = blobs(seed=3)
    one = sparsify(labels, [(0, 12)])                    # a single annotated slice ...
    with pytest.raises(SparsesegError, match="no annotated voxel is left"):
        train([TrainingVolume(image, one, "toy")], tiny_config(), fast_train_config(val_slices=1), ["a", "b"],
              progress=False)                            # ... held out: nothing left to train on
    for field, value in (("loss", "dice"), ("schedule", "cosine"), ("normalization", "minmax")):
        with pytest.raises(SparsesegError, match=f"unknown {field}"):
            fast_train_config(**{field: value})


def test_on_step_sees_every_entry_and_stops_cleanly(tmp_path):
    image, labels = blobs(seed=1)
    seen = []

    def on_step(entry):
        seen.append(dict(entry))
        return entry["iteration"] == 3

    res = train([TrainingVolume(image, labels, "toy")], tiny_config(), fast_train_config(iterations=50,
                patch_output=(4, 8, 8)), ["bg", "fg"], out_path=tmp_path / "m.pt", progress=False, on_step=on_step)
    assert [e["iteration"] for e in seen] == [1, 2, 3] and res.iterations == 3
    assert all({"iteration", "loss", "lr", "seconds"} <= set(e) for e in seen)
    assert load_checkpoint(tmp_path / "m.pt").iteration == 3


def test_seed_reproducible_and_resume_identical(tmp_path):
    image, labels = blobs(seed=1)
    cfg = tiny_config(width=4)
    vols = [TrainingVolume(image, labels, "toy")]
    tc = fast_train_config(iterations=6, augment=AugmentConfig(), patch_output=(4, 8, 8), checkpoint_every=3)
    a = train(vols, cfg, tc, ["bg", "fg"], out_path=tmp_path / "a.pt", progress=False)
    b = train(vols, cfg, tc, ["bg", "fg"], out_path=tmp_path / "b.pt", progress=False)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    # stop after 3 iterations, then resume to 6: same weights as the uninterrupted run
    from dataclasses import replace

    train(vols, cfg, replace(tc, iterations=3), ["bg", "fg"], out_path=tmp_path / "c.pt", progress=False)
    c = train(vols, cfg, tc, ["bg", "fg"], out_path=tmp_path / "c.pt", resume=tmp_path / "c.pt", progress=False)
    for (k, va), vc in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.allclose(va, vc, atol=1e-6), k


def test_2d_baseline_learns():
    image, labels = blobs(seed=2)
    cfg = tiny_config(ndim=2, width=8)
    res = train([TrainingVolume(image, labels, "toy")], cfg, fast_train_config(iterations=60, patch_output=(1, 24, 24)),
                ["bg", "fg"], progress=False)
    pred, _ = predict(res.model, image)
    assert pred.shape == labels.shape
    assert iou_per_class(pred, labels, 2)["iou"][1] > 0.5      # measured 0.60 (balls are 5% of voxels)


def test_amp_loss_scale_is_checkpointed_and_resumed(tmp_path):
    """The GradScaler's state travels with the checkpoint (a CPU scaler stands in for CUDA's)."""
    from sparseseg.trainer.train import _prepare, _resume, _save, _step

    image, labels = blobs(seed=1)
    vols = [TrainingVolume(image, labels, "toy")]
    tc = fast_train_config(iterations=4, patch_output=(4, 8, 8))
    run = _prepare(vols, tiny_config(), tc, ["bg", "fg"])
    run.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for it in range(2):
        _step(run, it, 2)
    assert run.scaler.get_scale() == 4096.0          # grew once per finite step
    _save(run, tmp_path / "m.pt", 2)
    again = _prepare(vols, tiny_config(), tc, ["bg", "fg"])
    again.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)
    assert _resume(again, tmp_path / "m.pt") == 2 and again.scaler.get_scale() == 4096.0


def test_per_volume_normalization_is_stored_and_invariant_to_intensity_scale(tmp_path):
    image, labels = blobs(seed=2)
    tc = fast_train_config(iterations=3, patch_output=(4, 8, 8), normalization="percentile")
    res = train([TrainingVolume(image, labels, "toy")], tiny_config(), tc, ["bg", "fg"], out_path=tmp_path / "m.pt",
                progress=False)
    spec = load_checkpoint(tmp_path / "m.pt").normalization
    assert spec["mode"] == "percentile" and spec["in_graph"] is False and spec["percentiles"] == [0.5, 99.5]
    # statistics come from each input: an affine change of intensities changes nothing
    _, p1 = predict(res.model, image, probabilities=True)
    _, p2 = predict(res.model, image * 7.0 + 1000.0, probabilities=True)
    assert np.abs(p1 - p2).max() < 1e-3


def test_lazy_store_training_equals_in_memory(tmp_path):
    """A volume too big for memory trains from the store (zarr image, .npy labels) with the
    same patches, hence the same weights, as the in-memory path."""
    from sparseseg.trainer.data import load_pairs
    from sparseseg.volume import Volume, write_ome_zarr

    image, labels = blobs(seed=4)
    sparse = sparsify(labels, orthogonal_slices(labels.shape, (2, 2, 2)))
    write_ome_zarr(tmp_path / "img.zarr", image, name="img", chunks=(1, 8, 16, 16))
    np.save(tmp_path / "lab.npy", sparse)
    lazy = load_pairs([str(tmp_path / "img.zarr")], [str(tmp_path / "lab.npy")], 255, in_memory_bytes=0)
    eager = load_pairs([str(tmp_path / "img.zarr")], [str(tmp_path / "lab.npy")], 255)
    assert isinstance(lazy[0].image, Volume) and isinstance(eager[0].image, np.ndarray)
    tc = fast_train_config(iterations=3, patch_output=(4, 8, 8), augment=AugmentConfig(), val_slices=1, val_every=3)
    a = train(lazy, tiny_config(), tc, ["bg", "fg"], progress=False)
    b = train(eager, tiny_config(), tc, ["bg", "fg"], progress=False)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    assert a.history[-1]["val_iou"] == b.history[-1]["val_iou"]


def test_separate_sections_are_told_from_slabs_and_orthogonal_slices():
    from sparseseg.trainer.data import on_separate_sections

    def vol(lab):
        return [TrainingVolume(np.zeros((1,) + lab.shape, np.float32), lab, "v")]

    dense = (np.arange(24 * 16 * 16) % 2).astype(np.uint8).reshape(24, 16, 16)
    assert on_separate_sections(vol(sparsify(dense, [(0, z) for z in range(0, 24, 4)], 255)), 255)
    assert on_separate_sections(vol(sparsify(dense, [(0, 11)], 255)), 255)
    assert on_separate_sections(vol(sparsify(dense, [(0, z) for z in range(1, 24, 2)], 255)), 255)
    assert not on_separate_sections(vol(sparsify(dense, [(0, 5), (0, 6)], 255)), 255)
    assert not on_separate_sections(vol(sparsify(dense, orthogonal_slices(dense.shape, (1, 1, 1)), 255)), 255)
    assert not on_separate_sections(vol(dense), 255)


def test_weight_decay_is_decoupled_and_shrinks_weights():
    """--weight-decay with adam is AdamW's decoupled decay; the same seed with it ends with smaller
    weights than without."""
    from sparseseg.trainer.options import build_configs
    from sparseseg.trainer.train import _optimizer

    image, labels = blobs()
    vol = TrainingVolume(image, labels, "v")
    _, plain, _ = build_configs([vol], {"iterations": 1})
    _, decayed, _ = build_configs([vol], {"iterations": 1, "weight_decay": 0.5})
    net = torch.nn.Linear(3, 3)
    assert type(_optimizer(net, plain)) is torch.optim.Adam
    opt = _optimizer(net, decayed)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.5
    norms = []
    for cfg in (plain, decayed):
        res = train([vol], tiny_config(width=4), fast_train_config(iterations=20, patch_output=(8, 16, 16),
                                                                    weight_decay=cfg.weight_decay),
                    ["bg", "ball"], progress=False)
        norms.append(sum(float(p.detach().norm()) for p in res.model.net.parameters()))
    assert norms[1] < norms[0]
