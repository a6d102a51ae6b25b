"""`sparseseg-eval --figure/--report`: per-class colours, TP/FN/FP, and the HTML report."""

import base64
import re

import numpy as np
from click.testing import CliRunner

from sparseseg.cli import main
from sparseseg.eval.figure import _classes, class_colours
from sparseseg.eval.report import class_names_of, write_report
from sparseseg.volume import write_ome_zarr


def test_class_colours_follow_the_label_images():
    from sparseseg.labels_zarr import label_colours

    gray = np.zeros((2, 3))
    values = np.array([[0, 1, 2], [2, 1, 0]])
    rgb = _classes(gray, values, 3, skip=0)
    assert np.allclose(rgb[0, 0], 0)                                  # background left uncoloured
    c1 = np.asarray(label_colours(3)[1][:3]) / 255
    assert np.allclose(rgb[0, 1], 0.55 * c1)
    assert not np.allclose(rgb[0, 1], rgb[0, 2])                      # classes differ
    assert class_colours(3).shape == (3, 4)


def test_eval_figure_and_report(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (12, 20, 24)).astype(np.uint8)
    pred = truth.copy()
    pred[:, :5] = 0                                                    # some false negatives
    sparse = np.full_like(truth, 255)
    sparse[3] = truth[3]
    sparse[:, :, 7] = truth[:, :, 7]
    write_ome_zarr(tmp_path / "pred.zarr", pred)
    np.save(tmp_path / "lab.npy", sparse)
    np.save(tmp_path / "img.npy", truth.astype(np.float32))
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "pred.zarr"), str(tmp_path / "lab.npy"), "--image",
                                  str(tmp_path / "img.npy"), "--figure", str(tmp_path / "f.png"), "--report",
                                  str(tmp_path / "r.html"), "--json"])
    assert r.exit_code == 0, r.output
    png = (tmp_path / "f.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "r.html").read_text()
    assert "mean foreground" in page and "Orthogonal views" in page and "Annotated slices" in page
    imgs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(imgs) == 2 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
    # Every IoU of the JSON result is in the table.
    import json

    res = json.loads(r.output.strip().splitlines()[-1])
    for v in res["iou"]:
        assert f"{v:.4f}" in page
    # ... and each is TP / (TP + FP + FN) over the annotated voxels only, counted here by hand
    seen = sparse != 255
    expected = [float(((pred == c) & (sparse == c) & seen).sum() / (((pred == c) | (sparse == c)) & seen).sum())
                for c in range(3)]
    assert np.allclose(res["iou"], expected) and expected[1] < 1.0       # the false negatives count
    assert np.isclose(res["mean_foreground_iou"], np.mean(expected[1:]))


def test_report_with_names_and_history(tmp_path):
    lab = np.zeros((6, 8, 8), np.uint8)
    lab[2:4] = 1
    res = {"iou": [1.0, 1.0], "mean_foreground_iou": 1.0, "voxels": lab.size}
    history = [{"iteration": i, "loss": 1.0 / i} for i in range(1, 6)] + [
        {"iteration": 6, "loss": 0.1, "val_mean_foreground_iou": 0.8}]
    write_report(tmp_path / "r.html", lab, lab, res, class_names=["bg", "mito<chondria>"], history=history)
    page = (tmp_path / "r.html").read_text()
    # the names escaped in the table beside their IoU; the curve drawn from the history
    assert "mito&lt;chondria&gt;</td><td>1.0000</td>" in page and "bg</td><td>1.0000</td>" in page
    curve = re.search(r"<h2>Training</h2><img src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", page)
    assert curve and base64.b64decode(curve.group(1))[:4] == b"\x89PNG"
    assert len(re.findall(r"data:image/png;base64,", page)) == 3      # views, annotated slices, curve


def test_report_without_history_has_no_curve(tmp_path):
    lab = np.zeros((6, 8, 8), np.uint8)
    lab[2:4] = 1
    res = {"iou": [0.5, None], "mean_foreground_iou": None, "voxels": 7}
    write_report(tmp_path / "r.html", lab, lab, res, sources={"labels": "a<b>.npy"})
    page = (tmp_path / "r.html").read_text()
    assert "Training" not in page and "class 1</td><td>n/a</td>" in page and "<th>n/a</th>" in page
    assert "7 voxels" in page and "labels: <code>a&lt;b&gt;.npy</code>" in page


def test_class_names_come_from_the_output_attributes(tmp_path):
    import zarr

    write_ome_zarr(tmp_path / "seg.zarr", np.zeros((2, 4, 4), np.uint8))
    zarr.open_group(str(tmp_path / "seg.zarr"), mode="r+").attrs["sparseseg"] = {"class_names": ["bg", "cell"]}
    assert class_names_of(tmp_path / "seg.zarr") == (["bg", "cell"], None)
    np.save(tmp_path / "seg.npy", np.zeros((2, 4, 4), np.uint8))
    assert class_names_of(tmp_path / "seg.npy") == (None, None)          # a bare array records none
