"""What sparseseg-infer writes, checked with a maintained NGFF 0.5 validator (ome-zarr-models) and
readers (ome-zarr-py, our napari reader): standalone images, label images beside an OME-Zarr
image (--as-label, or --output IMAGE.zarr/labels/NAME), and block-wise pyramids (--pyramid)."""

import json
import os

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from sparseseg import labels_zarr as lz
from sparseseg.cli import main
from sparseseg.engine.run import run_inference
from sparseseg.volume import open_volume
from tests.test_engine import make_engine

v05 = pytest.importorskip("ome_zarr_models.v05")

SHAPE = (16, 40, 48)
BLOCK = (8, 16, 16)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 3-class engine, the volume as .npy and as a 3-level OME-Zarr image (voxel 2x1x1), and the
    labels a standalone run writes (the reference every other layout must reproduce)."""
    d = tmp_path_factory.mktemp("ome_outputs")
    ck = make_engine(d)
    data = (np.random.default_rng(0).random(SHAPE) * 200).astype(np.float32)
    np.save(d / "vol.npy", data)
    run_inference(ck, d / "vol.npy", d / "ref.zarr", workers=0, block=BLOCK, progress=False)
    return {"dir": d, "engine": ck, "data": data, "ref": open_volume(d / "ref.zarr").read_labels()}


def _image(path, data, levels=3, labels=()):
    arr = lz.create_image(path, data.shape, (8, 16, 16), (2.0, 1.0, 1.0), levels, "float32", name="raw")
    arr[...] = data
    lz.write_pyramid(path, "mean")
    for name in labels:
        lz.write_labels(None, (data > 100).astype(np.uint8), ["bg", "fg"], name=name, beside_image=path)
    return path


def _infer(*args):
    res = CliRunner().invoke(main, ["infer", *map(str, args), "--block", ",".join(map(str, BLOCK)),
                                    "--workers", "0", "--json"])
    return res.exit_code, res.output


def test_standalone_output_validates_as_ngff_05(work, tmp_path):
    code, out = _infer("--engine", work["engine"], work["dir"] / "vol.npy", "--output", tmp_path / "o.zarr",
                       "--probabilities", "uint8")
    assert code == 0, out
    group = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    v05.Image.from_zarr(group)                       # bookkeeping under .sparseseg/ and probabilities tolerated
    assert group["0"].metadata.dimension_names == ("z", "y", "x")
    assert group["probabilities"].metadata.dimension_names == ("c", "z", "y", "x")
    np.testing.assert_array_equal(group["0"][...], work["ref"])


def test_pyramid_levels_blockwise_and_napari_reader(work, tmp_path):
    img = _image(tmp_path / "img.zarr", work["data"])
    code, out = _infer("--engine", work["engine"], img, "--output", tmp_path / "o.zarr", "--pyramid", "2",
                       "--probabilities", "uint8")
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["levels"] == 3
    g = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    v05.Image.from_zarr(g)
    v05.Image.from_zarr(g["probabilities"])          # its own image: (c, z, y, x), mean pyramid
    ms = g.attrs["ome"]["multiscales"][0]
    assert ms["type"] == "nearest"
    assert [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]] == [[2, 1, 1], [4, 2, 2], [8, 4, 4]]
    assert [g[str(i)].shape for i in range(3)] == [SHAPE, (8, 20, 24), (4, 10, 12)]
    lab = g["0"][...]
    np.testing.assert_array_equal(lab, work["ref"])
    np.testing.assert_array_equal(g["1"][...], lab[::2, ::2, ::2])           # nearest: no invented value
    np.testing.assert_array_equal(g["2"][...], lab[::4, ::4, ::4])
    p0 = g["probabilities"]["0"][...].astype(np.float64)
    want = np.rint(p0.reshape(3, 8, 2, 20, 2, 24, 2).mean(axis=(2, 4, 6)))
    np.testing.assert_array_equal(g["probabilities"]["1"][...], want)
    assert g["probabilities"]["2"].shape == (3, 4, 10, 12)

    # A complete run resumed computes nothing and leaves the levels as they are.
    code, out = _infer("--engine", work["engine"], img, "--output", tmp_path / "o.zarr", "--pyramid", "2",
                       "--probabilities", "uint8", "--resume")
    s = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and s["blocks_skipped"] == s["blocks"]
    # Another pyramid depth is another output: refused, not mixed.
    code, out = _infer("--engine", work["engine"], img, "--output", tmp_path / "o.zarr", "--pyramid", "1", "--resume")
    assert code == 1 and "levels" in out

    pytest.importorskip("napari")
    from sparseseg.napari.reader import read

    layers = read(str(tmp_path / "o.zarr"))
    (data, kwargs, kind), (_, pkw, pkind) = layers
    assert kind == "labels" and kwargs["multiscale"] and len(data) == 3
    assert tuple(kwargs["scale"]) == (2.0, 1.0, 1.0) and kwargs["metadata"]["class_names"] == ["a", "b", "c"]
    np.testing.assert_array_equal(np.asarray(data[1]), lab[::2, ::2, ::2])
    assert pkind == "image" and pkw["multiscale"] and pkw["name"] == ["p(a)", "p(b)", "p(c)"]


def test_resume_rewrites_levels_after_blocks_were_missing(work, tmp_path):
    out = tmp_path / "o.zarr"
    run_inference(work["engine"], work["dir"] / "vol.npy", out, workers=0, block=BLOCK, progress=False, pyramid=1)
    # As if the run had died: two blocks unwritten, the coarse level never filled.
    done = out / ".sparseseg" / "done"
    lost = sorted(os.listdir(done))[:2]
    for key in lost:
        (done / key).unlink()
    g = zarr.open_group(str(out), mode="r+")
    g["0"][:8, :16, :32] = 0
    g["1"][...] = 0
    s = run_inference(work["engine"], work["dir"] / "vol.npy", out, workers=0, block=BLOCK, progress=False,
                      pyramid=1, resume=True)
    assert s["blocks_computed"] == 2 and s["levels"] == 2
    np.testing.assert_array_equal(g["0"][...], work["ref"])
    np.testing.assert_array_equal(g["1"][...], work["ref"][::2, ::2, ::2])


def test_as_label_writes_a_label_image_beside_the_input(work, tmp_path):
    img = _image(tmp_path / "img.zarr", work["data"], labels=["truth"])
    truth = zarr.open_group(str(img / "labels" / "truth"), mode="r")["0"][...]
    code, out = _infer("--engine", work["engine"], img, "--as-label", "seg", "--probabilities", "uint8")
    assert code == 0, out
    s = json.loads(out.strip().splitlines()[-1])
    assert s["output"] == str((img / "labels" / "seg").resolve()) and s["levels"] == 3
    root = zarr.open_group(str(img), mode="r")
    image = v05.Image.from_zarr(root)                                   # the image and every label image
    assert image.labels is not None
    v05.ImageLabel.from_zarr(root["labels"]["seg"])
    assert root["labels"].attrs["ome"]["labels"] == ["truth", "seg"]    # the existing label image kept
    np.testing.assert_array_equal(root["labels"]["truth"]["0"][...], truth)
    il = root["labels"]["seg"].attrs["ome"]["image-label"]
    assert [p["class"] for p in il["properties"]] == ["a", "b", "c"]
    assert il["colors"][0]["rgba"][3] == 0 and il["source"]["image"] == "../../"
    seg = root["labels"]["seg"]
    for level in range(3):                                              # the image's levels, filled
        assert seg[str(level)].shape == root[str(level)].shape
    np.testing.assert_array_equal(seg["0"][...], work["ref"])
    np.testing.assert_array_equal(seg["2"][...], work["ref"][::4, ::4, ::4])
    v05.Image.from_zarr(seg["probabilities"])                          # beside the labels, same levels
    assert seg["probabilities"]["2"].shape == (3, 4, 10, 12) and seg["probabilities"]["2"][...].any()

    # ome-zarr-py finds it as a label image with its colours.
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = [n for n in Reader(parse_url(str(img)))() if any(isinstance(sp, Label) for sp in n.specs)]
    assert sorted(n.metadata["name"] for n in nodes) == ["seg", "truth"]

    # Again without flags: refused, nothing touched; --resume: nothing to do.
    code, out = _infer("--engine", work["engine"], img, "--as-label", "seg", "--probabilities", "uint8")
    assert code == 1 and "--resume" in out
    code, out = _infer("--engine", work["engine"], img, "--as-label", "seg", "--probabilities", "uint8", "--resume")
    s = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and s["blocks_skipped"] == s["blocks"] and s["blocks_computed"] == 0

    # INPUT may name the image's level 0 (img.zarr:0): the label image still goes beside the image.
    code, out = _infer("--engine", work["engine"], f"{img}:0", "--as-label", "seg", "--probabilities", "uint8",
                       "--resume")
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["output"] == str((img / "labels" / "seg").resolve())

    # --output IMAGE.zarr/labels/NAME is the same thing; --overwrite replaces only that label image.
    code, out = _infer("--engine", work["engine"], img, "--output", img / "labels" / "truth", "--overwrite")
    assert code == 0, out
    root = zarr.open_group(str(img), mode="r")
    assert root["labels"].attrs["ome"]["labels"] == ["truth", "seg"]
    np.testing.assert_array_equal(root["labels"]["truth"]["0"][...], work["ref"])
    assert [p["class"] for p in root["labels"]["truth"].attrs["ome"]["image-label"]["properties"]] == ["a", "b", "c"]
    v05.Image.from_zarr(root)

    pytest.importorskip("napari")
    from sparseseg.napari.reader import read

    kinds = [(kw["name"], kind) for _, kw, kind in read(str(img))]
    assert kinds == [("img", "image"), ("truth", "labels"), ("seg", "labels"), (["p(a)", "p(b)", "p(c)"], "image")]


def test_label_output_errors_are_one_line(work, tmp_path):
    img = _image(tmp_path / "img.zarr", work["data"], levels=2)
    cases = [
        (["--engine", work["engine"], work["dir"] / "vol.npy", "--as-label", "seg"], "OME-Zarr image"),
        (["--engine", work["engine"], img, "--as-label", "seg", "--output", tmp_path / "x.zarr"], "exclude"),
        (["--engine", work["engine"], img, "--as-label", "a/b"], "plain name"),
        (["--engine", work["engine"], img, "--as-label", "seg", "--pyramid", "3"], "levels of its image"),
    ]
    for args, words in cases:
        code, out = _infer(*args)
        assert code == 1 and words in out and "Traceback" not in out, out
    assert not (img / "labels").exists()                     # nothing written by a refused run


def test_densify_as_label(tmp_path):
    from tests.helpers import blobs

    image, labels = blobs(shape=(16, 32, 32))
    img = _image(tmp_path / "img.zarr", image[0], levels=2)
    sparse = np.full_like(labels, 255)
    sparse[4:12] = labels[4:12]
    np.save(tmp_path / "lab.npy", sparse)
    fast = ["--depth", "2", "--base-width", "4", "--iterations", "2", "--device", "cpu", "--no-augment",
            "--class-names", "bg,ball"]
    res = CliRunner().invoke(main, ["densify", str(img), str(tmp_path / "lab.npy"), "--as-label", "dense", *fast])
    assert res.exit_code == 0, res.output
    root = zarr.open_group(str(img), mode="r")
    v05.Image.from_zarr(root)
    assert root["labels"].attrs["ome"]["labels"] == ["dense"]
    seg = root["labels"]["dense"]
    assert [p["class"] for p in seg.attrs["ome"]["image-label"]["properties"]] == ["bg", "ball"]
    np.testing.assert_array_equal(seg["1"][...], seg["0"][::2, ::2, ::2])
    # An existing label image is refused before any training.
    res = CliRunner().invoke(main, ["densify", str(img), str(tmp_path / "lab.npy"), "--as-label", "dense", *fast])
    assert res.exit_code == 1 and "exists" in res.output and "--overwrite" in res.output
    res = CliRunner().invoke(main, ["densify", str(img), str(tmp_path / "lab.npy"), *fast])
    assert res.exit_code == 1 and "--as-label" in res.output
