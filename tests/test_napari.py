"""The napari plugin in a real viewer (pytest-qt + napari's make_napari_viewer; CI runs it under
Xvfb): reader/writer round trip, sparse label layers, training, densify, retrain, errors."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

# CI installs napari, pytest-qt and Xvfb (.ci/run): there a missing piece is a failure, not a skip.
if os.environ.get("CI"):
    import napari
    import pytestqt  # noqa: F401

    assert os.environ.get("DISPLAY"), "CI: no X display (is xvfb installed and pytest-xvfb loaded?)"
else:
    napari = pytest.importorskip("napari")
    pytest.importorskip("pytestqt")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        # pytest-xvfb sets DISPLAY when Xvfb is installed; without any display Qt would abort.
        pytest.skip("no X display: install xvfb (pytest-xvfb then starts it)", allow_module_level=True)

import zarr  # noqa: E402

from sparseseg import labels_zarr as lz  # noqa: E402
from sparseseg.model.checkpoint import load_checkpoint  # noqa: E402
from tests.helpers import blobs  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "sparseseg" / "napari" / "napari.yaml"
TINY = dict(base_width=4, depth=2, no_augment=True, patch=(4, 8, 8))


@pytest.fixture(autouse=True)
def plugin():
    """Register this checkout's manifest (an editable install elsewhere may not carry it)."""
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    try:
        pm.get_manifest("sparseseg")
    except KeyError:
        pm.register(PluginManifest.from_file(MANIFEST))
    yield


@pytest.fixture
def errors(monkeypatch):
    """Collect error notifications instead of showing them."""
    import napari.utils.notifications as nt

    seen = []
    monkeypatch.setattr(nt, "show_error", lambda msg: seen.append(msg))
    return seen


def _ome_image(path, image, voxel=(2.0, 1.0, 1.0)):
    arr = lz.create_image(path, image.shape, (8, 16, 16), voxel, 2, image.dtype, name="raw")
    arr[...] = image
    lz.write_pyramid(path, "mean")


def test_manifest_validates():
    from npe2 import PluginManifest

    m = PluginManifest.from_file(MANIFEST)
    assert m.name == "sparseseg"
    assert [w.display_name for w in m.contributions.widgets] == ["Sparse training"]


def test_reader_opens_image_labels_npy_and_tiff(make_napari_viewer, tmp_path):
    import dask.array as da
    import tifffile

    image, labels = blobs(shape=(16, 32, 40), seed=1)
    img = tmp_path / "img.zarr"
    _ome_image(img, image[0])
    lz.write_labels(None, labels, ["bg", "ball"], name="truth", beside_image=img)
    viewer = make_napari_viewer()
    layers = viewer.open(str(img), plugin="sparseseg")
    assert [type(la).__name__ for la in layers] == ["Image", "Labels"]
    im, lab = layers
    assert im.multiscale and isinstance(im.data[0], da.Array)          # lazy, every level
    assert tuple(im.scale) == (2.0, 1.0, 1.0) and tuple(lab.scale) == (2.0, 1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(lab.data[0]), labels)
    assert lab.metadata["class_names"] == ["bg", "ball"]

    np.save(tmp_path / "vol.npy", image[0])
    (layer,) = viewer.open(str(tmp_path / "vol.npy"), plugin="sparseseg")
    assert type(layer).__name__ == "Image" and isinstance(layer.data, da.Array)
    tifffile.imwrite(tmp_path / "seg_labels.tif", labels, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"spacing": 3.0, "axes": "ZYX"})
    (layer,) = viewer.open(str(tmp_path / "seg_labels.tif"), plugin="sparseseg")
    assert type(layer).__name__ == "Labels"
    assert tuple(layer.scale) == (3.0, 0.5, 0.5)
    np.testing.assert_array_equal(np.asarray(layer.data), labels)


def test_writer_keeps_ignore_value_and_round_trips(make_napari_viewer, tmp_path):
    v05 = pytest.importorskip("ome_zarr_models.v05")
    image, labels = blobs(shape=(16, 32, 40), seed=2)
    img = tmp_path / "img.zarr"
    _ome_image(img, image[0])
    sparse = np.full(labels.shape, 255, np.uint8)
    sparse[4] = labels[4]
    sparse[:, 10] = labels[:, 10]
    viewer = make_napari_viewer()
    layer = viewer.add_labels(sparse, name="sparse", scale=(2.0, 1.0, 1.0), metadata={"class_names": ["bg", "ball"]})
    written = layer.save(str(img / "labels" / "sparse"), plugin="sparseseg")
    assert written == [str(img / "labels" / "sparse")]
    v05.Image.from_zarr(zarr.open_group(str(img), mode="r"))             # still a valid image + labels
    attrs = zarr.open_group(str(img / "labels" / "sparse"), mode="r").attrs["ome"]["image-label"]
    assert {"label-value": 255, "rgba": [0, 0, 0, 0]} in attrs["colors"]
    back = viewer.open(str(img), plugin="sparseseg")[1]
    np.testing.assert_array_equal(np.asarray(back.data[0]), sparse)   # 255 kept verbatim, every level mirrored
    # Standalone: any other .zarr path.
    out = layer.save(str(tmp_path / "alone.zarr"), plugin="sparseseg")
    v05.Image.from_zarr(zarr.open_group(out[0], mode="r"))
    (again,) = viewer.open(out[0], plugin="sparseseg")
    assert type(again).__name__ == "Labels"
    np.testing.assert_array_equal(np.asarray(again.data), sparse)


def _paint(layer, labels):
    data = layer.data
    for z in (4, 12):
        data[z] = labels[z]
    data[:, 20] = labels[:, 20]
    layer.data = data


def _wait(qtbot, widget, timeout=240_000):
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)


def test_widget_paint_train_densify_retrain(make_napari_viewer, qtbot, tmp_path, errors):
    from sparseseg.napari.widget import SparseTrainingWidget
    from sparseseg import predict

    image, labels = blobs(shape=(24, 40, 40), seed=3)
    viewer = make_napari_viewer()
    viewer.add_image(image[0], name="blobs", scale=(1.0, 1.0, 1.0))
    widget = SparseTrainingWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Sparse training")
    widget.image_combo.setCurrentText("blobs")
    widget.new_labels_btn.click()
    sparse = viewer.layers["blobs sparse labels"]
    assert sparse.data.shape == labels.shape and (sparse.data == 255).all()
    assert sparse.colormap.map(np.array([255]))[0][3] == 0          # unannotated: transparent
    assert sparse.colormap.map(np.array([0]))[0][3] > 0             # background paint: visible
    _paint(sparse, labels)

    widget.model_path.setText(str(tmp_path / "model.pt"))
    widget.budget.setValue(0.3)                  # minutes: the trainer plans the iterations
    widget.val_fraction.setValue(0.0)
    widget.device.setCurrentText("cpu")
    widget.extra_options = dict(TINY)
    widget.preview_seconds = 2.0                 # a live prediction every 2 s
    viewer.dims.set_point(0, 12.0)               # the slice in view: z = 12
    widget.train_btn.click()
    assert widget._worker is not None and not widget.train_btn.isEnabled()
    _wait(qtbot, widget)
    assert not errors, errors
    assert widget.last_model == tmp_path / "model.pt" and widget.last_model.is_file()
    ran = load_checkpoint(widget.last_model).extra["budget"]
    assert ran["minutes"] == pytest.approx(0.3) and ran["ran"] == len(widget._history) >= 2
    if "planned" in widget._history[-1]:         # planned after six steps (a loaded machine may not get there)
        assert widget._history[-1]["planned"] == len(widget._history)
        assert widget.progress.maximum() == widget.progress.value() == len(widget._history)
    # the live prediction showed the network's labels on the slice in view, and only there
    assert widget.preview_layer is not None
    live = viewer.layers["blobs live prediction"].data
    assert live.shape == labels.shape and not live[:12].any() and not live[13:].any() and live.max() <= 1
    first = len(widget._history)

    widget.probabilities.setChecked(True)
    widget.densify_btn.click()
    _wait(qtbot, widget)
    assert not errors, errors
    dense = widget.dense_layer
    assert dense is not None and dense.data.shape == labels.shape
    ckpt = load_checkpoint(widget.last_model)
    want, _ = predict(ckpt.model, image)
    np.testing.assert_array_equal(np.asarray(dense.data[...]), want)     # the engine's exact result
    assert "p(class 1)" in viewer.layers

    # Correct a slice and continue from the last model.
    sparse.data[16] = labels[16]
    widget.extra_options = {**TINY, "iterations": first + 2}    # pinned: two more iterations
    widget.retrain_btn.click()
    _wait(qtbot, widget)
    assert not errors, errors
    assert load_checkpoint(widget.last_model).iteration == first + 2


def test_widget_cancel_stops_and_saves(make_napari_viewer, qtbot, tmp_path, errors):
    from sparseseg.napari.widget import SparseTrainingWidget

    image, labels = blobs(shape=(24, 40, 40), seed=3)
    viewer = make_napari_viewer()
    viewer.add_image(image[0], name="blobs")
    widget = SparseTrainingWidget(viewer)
    widget.image_combo.setCurrentText("blobs")
    _paint(widget.new_sparse_labels(), labels)
    widget.model_path.setText(str(tmp_path / "model.pt"))
    widget.budget.setValue(60.0)
    widget.device.setCurrentText("cpu")
    widget.extra_options = dict(TINY)
    widget.start_training()
    qtbot.waitUntil(lambda: len(widget._history) >= 2, timeout=120_000)
    widget.cancel_btn.click()
    _wait(qtbot, widget)
    assert not errors, errors
    it = load_checkpoint(tmp_path / "model.pt").iteration
    assert 2 <= it < 10_000 and "stopped early" in widget.status.text()


def test_widget_errors_become_notifications(make_napari_viewer, qtbot, tmp_path, errors):
    from sparseseg.napari.widget import SparseTrainingWidget

    image, labels = blobs(shape=(24, 40, 40), seed=3)
    viewer = make_napari_viewer()
    viewer.add_image(image[0], name="blobs")
    viewer.add_labels(np.full((10, 40, 40), 255, np.uint8), name="wrong")
    widget = SparseTrainingWidget(viewer)
    widget.image_combo.setCurrentText("blobs")
    widget.labels_combo.setCurrentText("wrong")
    widget.model_path.setText(str(tmp_path / "model.pt"))
    widget.train_btn.click()
    assert len(errors) == 1 and "shape" in errors[0]
    widget.labels_combo.setCurrentText("wrong")
    widget.densify_btn.click()
    assert "train first" in errors[-1]
    # An unpainted layer: the trainer's own one-line error arrives as a notification.
    widget.new_labels_btn.click()
    widget.train_btn.click()
    assert "no annotated voxel" in errors[-1]
    # A model for one channel, an image with two: the engine's error, from the worker thread.
    from tests.test_export import trained_checkpoint

    trained_checkpoint(tmp_path / "one_channel.pt")
    viewer.add_image(np.stack([image[0], image[0]]), name="two channels")
    widget.image_combo.setCurrentText("two channels")
    widget.model_path.setText(str(tmp_path / "one_channel.pt"))
    widget.densify_btn.click()
    _wait(qtbot, widget)
    assert "channel" in errors[-1]
    assert widget.train_btn.isEnabled()                              # the widget is usable again
    assert os.path.isfile(tmp_path / "one_channel.pt")


def test_widget_opens_suggestion_template_and_goes_to_its_slices(make_napari_viewer, tmp_path, errors):
    from click.testing import CliRunner

    from sparseseg.cli import main
    from sparseseg.napari.widget import SparseTrainingWidget
    from sparseseg.suggest.planes import PLANES

    image, _ = blobs(shape=(16, 32, 32), seed=4)
    np.save(tmp_path / "img.npy", image[0])
    template = tmp_path / "t.zarr"
    res = CliRunner().invoke(main, ["suggest", str(tmp_path / "img.npy"), "--budget", "2", "--template", str(template)])
    assert res.exit_code == 0, res.output
    suggested = zarr.open_group(str(template), mode="r").attrs["sparseseg"]["suggested_slices"]
    assert {s["plane"] for s in suggested} == {"xy", "xz", "yz"}

    viewer = make_napari_viewer()
    viewer.add_image(image[0], name="img", scale=(2.0, 1.0, 1.0))
    widget = SparseTrainingWidget(viewer)
    widget.image_combo.setCurrentText("img")
    layer = widget.open_template(template)
    assert not errors, errors
    assert widget.labels_combo.currentText() == layer.name == "t sparse labels"
    assert tuple(layer.scale) == (2.0, 1.0, 1.0) and layer.data.shape == (16, 32, 32)
    assert layer.colormap.map(np.array([255]))[0][3] == 0                # unannotated: transparent
    assert widget.suggestions.count() == len(suggested) == 6
    for i, s in enumerate(suggested):
        widget.suggestions.setCurrentIndex(i)
        fixed = PLANES[s["plane"]]
        assert viewer.dims.ndisplay == 2
        assert viewer.dims.order[0] == fixed and fixed not in viewer.dims.displayed
        assert viewer.dims.current_step[fixed] == s["index"], (s, viewer.dims.current_step)
    assert str(s["index"]) in widget.suggestions.currentText()

    # Painting writes into the template itself.
    xy = next(s for s in suggested if s["plane"] == "xy")
    layer.paint((xy["index"], 16, 16), 1)
    on_disk = zarr.open_array(str(template / "0"), mode="r")
    assert on_disk[xy["index"], 16, 16] == 1 and on_disk[xy["index"], 0, 0] == 255

    # Without an image layer the template brings its image along.
    alone = make_napari_viewer()
    w2 = SparseTrainingWidget(alone)
    w2.open_template(template)
    assert [type(la).__name__ for la in alone.layers] == ["Image", "Labels"]
    assert w2.image_combo.currentText() == "img" and w2.suggestions.count() == 6

    # Wrong inputs: one-line notifications, the viewer and the template untouched.
    viewer.add_image(image[0][:8], name="other")
    widget.image_combo.setCurrentText("other")
    widget._guard(lambda: widget.open_template(template))()
    assert "shape" in errors[-1]
    widget._guard(lambda: widget.open_template(tmp_path / "img.npy"))()
    assert "zarr" in errors[-1] or "template" in errors[-1]
    assert len(errors) == 2 and widget.template_btn.isEnabled()


def test_widget_densifies_into_a_label_image_beside_the_ome_zarr_image(make_napari_viewer, qtbot, tmp_path, errors):
    from sparseseg.napari.widget import SparseTrainingWidget
    from tests.test_export import trained_checkpoint

    v05 = pytest.importorskip("ome_zarr_models.v05")
    image, _ = blobs(shape=(16, 32, 40), seed=5)
    img = tmp_path / "img.zarr"
    _ome_image(img, image[0])
    lz.write_labels(None, np.zeros((16, 32, 40), np.uint8), ["bg", "ball"], name="truth", beside_image=img)
    trained_checkpoint(tmp_path / "m.pt")
    viewer = make_napari_viewer()
    viewer.open(str(img), plugin="sparseseg")
    widget = SparseTrainingWidget(viewer)
    widget.image_combo.setCurrentText("img")
    widget.model_path.setText(str(tmp_path / "m.pt"))
    widget.device.setCurrentText("cpu")
    widget.beside_image.setChecked(True)
    widget.probabilities.setChecked(True)
    widget.densify_btn.click()
    _wait(qtbot, widget)
    assert not errors, errors
    root = zarr.open_group(str(img), mode="r")
    assert root["labels"].attrs["ome"]["labels"] == ["truth", "img_dense_1"]
    v05.Image.from_zarr(root)
    seg = root["labels"]["img_dense_1"]
    assert seg["1"].shape == root["1"].shape
    np.testing.assert_array_equal(np.asarray(widget.dense_layer.data), seg["0"][...])
    np.testing.assert_array_equal(seg["1"][...], seg["0"][::2, ::2, ::2])
    assert "p(fg)" in viewer.layers

    # An image that is no OME-Zarr image: a notification, nothing written.
    viewer.add_image(image[0], name="in memory")
    widget.image_combo.setCurrentText("in memory")
    widget.densify_btn.click()
    assert "OME-Zarr" in errors[-1] and widget._worker is None
