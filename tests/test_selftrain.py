"""Self-training (sparseseg.selftrain): plane views, averaged pseudo-labels, the distilled
checkpoint through the engine, and the CLI's errors. Tiny networks, a few iterations."""

import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sparseseg.cli import main
from sparseseg.model.network import SegmentationModel
from sparseseg.selftrain import planes as pl
from sparseseg.selftrain.pseudo import average, dense_targets, predictions
from sparseseg.trainer.data import TrainingVolume
from tests.helpers import blobs, tiny_config

FAST = ["--depth", "2", "--base-width", "4", "--iterations", "2", "--device", "cpu", "--no-augment"]


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


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
    tmp, image, sparse = cube
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
    (["--self-train", "--ndim", "2"], "leave --ndim at 3"),
    (["--self-train", "--val-slices", "1"], "does not support --val-slices"),
    (["--self-train", "--self-train-mode", "mean"], "unknown --self-train-mode"),
    (["--self-train", "--resume", "x.pt"], "--resume does not apply"),
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
