"""Self-training (sparseseg.selftrain): plane views, averaged pseudo-labels, the distilled
checkpoint through the engine, and the CLI's errors. Tiny networks, a few iterations."""

import logging

import numpy as np
import pytest
import torch

from sparseseg.model.network import SegmentationModel
from sparseseg.selftrain import planes as pl
from sparseseg.selftrain.pseudo import average, dense_targets, predictions
from sparseseg.trainer.data import TrainingVolume
from tests.helpers import run_cli as run, blobs, tiny_config

FAST = ["--depth", "2", "--base-width", "4", "--iterations", "2", "--device", "cpu", "--no-augment"]


@pytest.fixture
def cube(tmp_path):
    """A 24^3 volume (every plane large enough for the tiny 2D network), 3 annotated z-slices."""
    image, labels = blobs(shape=(24, 24, 24))
    sparse = np.full_like(labels, 255)
    sparse[[4, 12, 20]] = labels[[4, 12, 20]]
    np.save(tmp_path / "img.npy", image)
    np.save(tmp_path / "lab.npy", sparse)
    return tmp_path, image, sparse


def _models(seed=0):
    torch.manual_seed(seed)
    m3 = SegmentationModel(tiny_config(ndim=3), [100.0], [50.0]).eval()
    m2 = SegmentationModel(tiny_config(ndim=2), [100.0], [50.0]).eval()
    return m3, m2


def test_views_round_trip():
    a = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    for plane in pl.PLANES:
        v = pl.to_view(a, plane)
        assert np.array_equal(pl.from_view(v, plane), a)
    assert pl.to_view(a, "xz").shape == (2, 4, 3, 5) and pl.to_view(a, "yz").shape == (2, 5, 3, 4)
    # an xz slice of the view is the volume's plane at fixed y
    assert np.array_equal(pl.to_view(a, "xz")[:, 1], a[:, :, 1, :])
    assert np.array_equal(pl.to_view(a, "yz")[:, 2], a[:, :, :, 2])


def test_pseudo_labels_average_each_view_and_respect_annotations(cube):
    _, image, sparse = cube
    m3, m2 = _models()
    each = dict(predictions(image, m3, m2, ["xy", "xz", "yz"], "cpu", "torch"))
    assert list(each) == ["3d", "2d-xy", "2d-xz", "2d-yz"]
    from sparseseg.engine.predict import predict

    # the yz prediction is the 2D network on x-slices, put back in (Z, Y, X): checked with a
    # transpose written out by hand
    _, p = predict(m2, np.ascontiguousarray(image.transpose(0, 3, 1, 2)), probabilities="float32",
                   device="cpu", backend="torch")
    assert np.allclose(each["2d-yz"], p.transpose(0, 2, 3, 1), atol=1e-6)
    assert not np.allclose(each["2d-yz"], each["2d-xy"], atol=1e-3)     # the planes do differ
    mean, names = average(image, m3, m2, ["xy", "xz", "yz"], "cpu", "torch")
    assert names == list(each)
    assert np.allclose(mean, sum(each.values()) / 4, atol=1e-6)
    assert np.allclose(mean.sum(0), 1, atol=1e-4)

    target = dense_targets(mean, sparse, 255)
    annotated = sparse != 255
    assert np.array_equal(target[annotated], sparse[annotated])
    assert np.array_equal(target[~annotated], mean.argmax(0)[~annotated])
    unsure = dense_targets(mean, sparse, 255, threshold=0.99)
    low = (mean.max(0) < 0.99) & ~annotated
    assert low.any() and (unsure[low] == 255).all()
    assert np.array_equal(unsure[annotated], sparse[annotated])


def test_thin_planes_skipped(caplog):
    image, labels = blobs(shape=(8, 40, 40))
    vol = TrainingVolume(image, labels, "thin")
    cfg = tiny_config(ndim=2)
    with caplog.at_level(logging.INFO, logger="sparseseg.selftrain"):
        assert pl.usable_planes([vol], cfg, "small") == ["xy"]
    assert "plane xz skipped" in caplog.text and "plane yz skipped" in caplog.text
    image, labels = blobs(shape=(24, 24, 24))
    assert pl.usable_planes([TrainingVolume(image, labels, "cube")], cfg, "small") == ["xy", "xz", "yz"]


def test_self_train_gives_an_ordinary_checkpoint(cube):
    tmp, image, _ = cube
    out = tmp / "m.pt"
    code, text = run("train", "--image", tmp / "img.npy", "--labels", tmp / "lab.npy", "--out", out, *FAST,
                     "--self-train", "--self-train-iterations", "3")
    assert code == 0, text
    assert "planes xy,xz,yz" in text
    from sparseseg.model.checkpoint import load_checkpoint

    ck = load_checkpoint(out)
    info = ck.extra["self_train"]
    assert info["planes"] == ["xy", "xz", "yz"] and info["predictions"] == ["3d", "2d-xy", "2d-xz", "2d-yz"]
    assert ck.iteration == 3 and ck.model_config.ndim == 3
    assert (tmp / "m.base3d.pt").exists() and (tmp / "m.base2d.pt").exists()
    assert load_checkpoint(tmp / "m.base2d.pt").model_config.ndim == 2
    from sparseseg import predict

    labels, _ = predict(str(out), image, device="cpu")          # the engine file, unchanged
    assert labels.shape == (24, 24, 24)
    code, text = run("densify", tmp / "img.npy", tmp / "lab.npy", "--out", tmp / "d.zarr", *FAST, "--self-train")
    assert code == 0, text
    from sparseseg.volume import open_volume

    assert open_volume(tmp / "d.zarr").read_labels().shape == (24, 24, 24)


@pytest.mark.parametrize("args, message", [
    (["--self-train-iterations", "5"], "--self-train-iterations applies with --self-train only"),
    (["--self-train", "--ndim", "2"], "leave --ndim and --planes at auto"),
    (["--self-train", "--planes", "all"], "leave --ndim and --planes at auto"),
    (["--self-train", "--val-slices", "1"], "does not support --val-slices"),
    (["--self-train", "--self-train-mode", "mean"], "unknown --self-train-mode"),
    (["--self-train", "--resume", "x.pt"], "--resume does not apply"),
    (["--self-train", "--self-train-mode", "meta", "--normalization", "volume"], "global only"),
])
def test_cli_errors(cube, args, message):
    tmp, _, _ = cube
    code, text = run("train", "--image", tmp / "img.npy", "--labels", tmp / "lab.npy", "--out", tmp / "e.pt",
                     *FAST, *args)
    assert code == 1 and message in text and text.count("\n") == 1, text
    assert not (tmp / "e.pt").exists()
    if "--resume" not in args:
        code, text = run("densify", tmp / "img.npy", tmp / "lab.npy", "--out", tmp / "e.zarr", *FAST, *args)
        assert code == 1 and message in text and text.count("\n") == 1, text
        assert not (tmp / "e.zarr").exists()


def test_existing_base_checkpoint_not_overwritten(cube):
    tmp, _, _ = cube
    (tmp / "m.base2d.pt").write_bytes(b"keep")
    code, text = run("train", "--image", tmp / "img.npy", "--labels", tmp / "lab.npy", "--out", tmp / "m.pt",
                     *FAST, "--self-train")
    assert code == 1 and "exists" in text
    assert (tmp / "m.base2d.pt").read_bytes() == b"keep" and not (tmp / "m.pt").exists()


# ------------------------------------------------------------------ meta-model

def _with_running_stats(*models):
    """Non-trivial BatchNorm statistics, so BatchNorm folding in the export is exercised."""
    for m in models:
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return models


def test_composed_meta_equals_separate_pipeline_and_exports(tmp_path):
    from sparseseg.engine.predict import predict
    from sparseseg.selftrain.compose import ComposedMeta

    torch.manual_seed(0)
    m3 = SegmentationModel(tiny_config(ndim=3), [100.0], [50.0]).eval()
    m2 = SegmentationModel(tiny_config(ndim=2, depth=3), [100.0], [50.0]).eval()   # another step and context
    mm = SegmentationModel(tiny_config(ndim=3, in_channels=3), [100.0, 0, 0], [50.0, 1, 1]).eval()
    _with_running_stats(m3, m2, mm)
    composed = ComposedMeta(m3, m2, ["xy", "xz", "yz"], mm).eval()
    geom = composed.cfg.geometry
    assert geom.step == (4, 4, 4)                      # lcm of the parts' pooling steps
    image, _ = blobs(shape=(40, 44, 48))
    # the separate pipeline: base networks through the engine, then the meta-network on image + mean
    mean, _ = average(image, m3, m2, ["xy", "xz", "yz"], "cpu", "torch")
    _, separate = predict(mm, np.concatenate([image, mean]), probabilities="float32", device="cpu", backend="torch")
    _, together = predict(composed, image, probabilities="float32", device="cpu", backend="torch")
    m = mm.cfg.geometry.context
    inner = (slice(None),) + tuple(slice(c, n - c) for c, n in zip(m, image.shape[1:]))
    assert np.abs(together[inner] - separate[inner]).max() < 1e-5
    # another tile: the same result (the composed step keeps every part's pooling phase)
    _, tiled = predict(composed, image, probabilities="float32", device="cpu", backend="torch",
                       tile=tuple(r.output_at_least(n // 2 + 1) for r, n in zip(geom.axes, image.shape[1:])))
    assert np.abs(tiled - together).max() < 1e-5
    # the engine's torch backend on CUDA moves 3D models to channels_last_3d
    x = torch.randn((1, 1) + geom.min_input) * 50 + 100
    with torch.inference_mode():
        plain = composed(x)
        assert torch.allclose(composed.to(memory_format=torch.channels_last_3d)(x), plain, atol=1e-5)

    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.contract import read_contract
    from sparseseg.selftrain.export import export_composed

    save_checkpoint(tmp_path / "meta.pt", mm, None, ["a", "b"], 255)
    out = export_composed(composed, ["a", "b"], 255, None, tmp_path / "meta.pt", tmp_path / "m.onnx", {"mode": "meta"})
    contract = read_contract(out)
    assert contract["geometry"] == geom.to_dict() and contract["self_train"]["mode"] == "meta"
    _, onnx_probs = predict(out, image, probabilities="float32", device="cpu")
    assert np.abs(onnx_probs - together).max() < 1e-4


def test_meta_stage2_picks_the_nearest_pseudo_label():
    from sparseseg.selftrain.meta import _ce, _targets

    real = torch.tensor([[255, 1, 255, 255]])
    cands = torch.tensor([[0, 0, 1, 1], [1, 1, 0, -1]])
    t = _targets(torch.stack([real[0], *cands])[:, None], 255)[:, 0]
    assert t.tolist() == [[0, 1, 1, 1], [1, 1, 0, 255]]          # real label wins, outside ignored
    logits = torch.tensor([[[5.0, 5.0, -5.0, 0.0], [-5.0, -5.0, 5.0, 0.0]]])   # predicts 0, 0, 1, ?
    logp = torch.log_softmax(logits, 1)
    d = torch.stack([_ce(logp, t[j:j + 1], 255) for j in range(2)], 1)
    assert int(d.argmin(1)) == 0


def test_meta_cli_train_and_densify(cube):
    tmp, _, _ = cube
    code, text = run("train", "--image", tmp / "img.npy", "--labels", tmp / "lab.npy", "--out", tmp / "m.pt", *FAST,
                     "--self-train", "--self-train-mode", "meta")
    assert code == 1 and "name it .onnx" in text and text.count("\n") == 1
    code, text = run("train", "--image", tmp / "img.npy", "--labels", tmp / "lab.npy", "--out", tmp / "m.onnx",
                     *FAST, "--self-train", "--self-train-mode", "meta", "--self-train-iterations", "4")
    assert code == 0, text
    assert all((tmp / f"m.{s}.pt").exists() for s in ("base3d", "base2d", "meta"))
    from sparseseg.model.checkpoint import load_checkpoint

    meta = load_checkpoint(tmp / "m.meta.pt")
    assert meta.model_config.in_channels == 3 and meta.iteration == 4
    assert [e["stage"] for e in meta.extra["history"]] == [1, 1, 2, 2]
    code, text = run("infer", "--engine", tmp / "m.onnx", tmp / "img.npy", "--output", tmp / "p.zarr")
    assert code == 0, text
    code, text = run("densify", tmp / "img.npy", tmp / "lab.npy", "--out", tmp / "d.zarr", *FAST, "--self-train",
                     "--self-train-mode", "meta")
    assert code == 0, text
    from sparseseg.volume import open_volume

    a, b = open_volume(tmp / "p.zarr").read_labels(), open_volume(tmp / "d.zarr").read_labels()
    assert a.shape == b.shape == (24, 24, 24)


def test_blockwise_pseudo_labels_match_in_memory(cube, tmp_path):
    """Volumes read lazily: base networks through the engine's block-wise run (float16
    probabilities in a store), the targets written to a zarr array the trainer reads lazily."""
    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.selftrain.blockwise import lazy_targets
    from sparseseg.trainer.data import load_pairs

    tmp, image, sparse = cube
    m3, m2 = _with_running_stats(*_models(1))
    paths = {"3d": tmp_path / "b3.pt", "2d": tmp_path / "b2.pt"}
    save_checkpoint(paths["3d"], m3, None, ["a", "b"], 255)
    save_checkpoint(paths["2d"], m2, None, ["a", "b"], 255)
    (vol,) = load_pairs([tmp / "img.npy"], [tmp / "lab.npy"], 255, in_memory_bytes=0)
    assert not isinstance(vol.image, np.ndarray)                  # read lazily
    target, names = lazy_targets(vol, paths, tmp_path, 255, 0.0, "cpu")
    assert names == ["3d", "2d-xy"] and target.dtype == np.uint8
    mean, _ = average(image, m3, m2, ["xy"], "cpu", "torch")
    expected = dense_targets(mean, sparse, 255)
    got = target.read()[0]
    annotated = sparse != 255
    assert np.array_equal(got[annotated], sparse[annotated])
    unsure = np.abs(mean[1] - mean[0]) < 2e-3                     # float16 probabilities may flip a tie
    assert np.array_equal(got[~unsure], expected[~unsure]) and unsure.mean() < 0.01
