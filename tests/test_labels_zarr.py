"""OME-Zarr label images and pyramids, checked with maintained NGFF 0.5 readers (ome-zarr-models,
ome-zarr-py) besides our own reader."""

import numpy as np
import pytest
import zarr

from sparseseg import labels_zarr as lz
from sparseseg.errors import SparsesegError
from sparseseg.volume import open_volume

v05 = pytest.importorskip("ome_zarr_models.v05")


def _image(path, shape=(10, 40, 50), voxel=(4.0, 1.0, 1.0), levels=3, seed=0):
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    arr = lz.create_image(path, shape, (5, 16, 16), voxel, levels, "float32", name="raw")
    arr[...] = data
    lz.write_pyramid(path, "mean")
    return data


def test_pyramid_factors_keep_thin_axes():
    # z is 4x coarser: only y, x halve until z is at most twice the finest, then all three.
    assert lz.pyramid_factors((4, 1, 1), (10, 40, 50), 4) == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert lz.pyramid_factors((8, 1, 1), (10, 40, 50), 3) == [(1, 2, 2), (1, 2, 2)]
    assert lz.pyramid_factors(None, (1, 8, 8), 3) == [(1, 2, 2), (1, 2, 2)]
    assert lz.pyramid_factors(None, (1, 1, 1), 3) == []


def test_label_image_beside_image_is_valid_ngff(tmp_path):
    img = tmp_path / "img.zarr"
    raw = _image(img)
    lab = (raw > 0.5).astype(np.uint8) + (raw > 0.9)
    target = lz.write_labels(None, lab, ["background", "cell", "nucleus"], name="seg", beside_image=img)
    assert target == img / "labels" / "seg"
    image = v05.Image.from_zarr(zarr.open_group(str(img), mode="r"))     # validates image + labels
    assert image.labels is not None
    label = v05.ImageLabel.from_zarr(zarr.open_group(str(target), mode="r"))
    assert [c.label_value for c in label.ome_attributes.image_label.colors] == [0, 1, 2]
    attrs = zarr.open_group(str(target), mode="r").attrs["ome"]
    assert [p["class"] for p in attrs["image-label"]["properties"]] == ["background", "cell", "nucleus"]
    assert attrs["image-label"]["colors"][0]["rgba"][3] == 0          # background transparent
    assert attrs["image-label"]["source"]["image"] == "../../"
    # Levels mirror the image: same shapes and scales; nearest keeps only existing values.
    g, gi = zarr.open_group(str(target), mode="r"), zarr.open_group(str(img), mode="r")
    for lvl in range(3):
        assert g[str(lvl)].shape == gi[str(lvl)].shape
        assert set(np.unique(g[str(lvl)][...])) <= {0, 1, 2}
    np.testing.assert_array_equal(g["1"][...], lab[:, ::2, ::2])
    np.testing.assert_array_equal(g["2"][...], lab[::2, ::4, ::4])
    # Our reader sees the labels with the image's voxel size.
    vol = open_volume(str(target))
    np.testing.assert_array_equal(vol.read_labels(), lab)
    assert vol.voxel_size == (4.0, 1.0, 1.0)


def test_second_label_image_is_added_and_existing_refused(tmp_path):
    img = tmp_path / "img.zarr"
    raw = _image(img, levels=1)
    lab = (raw > 0.5).astype(np.uint8)
    lz.write_labels(None, lab, ["bg", "fg"], name="a", beside_image=img)
    lz.write_labels(None, 1 - lab, ["bg", "fg"], name="b", beside_image=img)
    assert zarr.open_group(str(img / "labels"), mode="r").attrs["ome"]["labels"] == ["a", "b"]
    with pytest.raises(SparsesegError, match="exists"):
        lz.write_labels(None, lab, ["bg", "fg"], name="a", beside_image=img)
    np.testing.assert_array_equal(open_volume(str(img / "labels" / "a")).read_labels(), lab)   # untouched
    lz.write_labels(None, 1 - lab, ["bg", "fg"], name="a", beside_image=img, overwrite=True)
    np.testing.assert_array_equal(open_volume(str(img / "labels" / "a")).read_labels(), 1 - lab)
    with pytest.raises(SparsesegError, match="shape"):
        lz.write_labels(None, lab[:5], ["bg", "fg"], name="c", beside_image=img)
    with pytest.raises(SparsesegError, match="integer"):
        lz.create_label_image(img, "d", lab.shape, (5, 16, 16), ["bg", "fg"], dtype="float32")
    v05.Image.from_zarr(zarr.open_group(str(img), mode="r"))


def test_labels_need_an_ome_image(tmp_path):
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4, 4), dtype="uint8")
    with pytest.raises(SparsesegError, match="not an OME-Zarr image"):
        lz.create_label_image(tmp_path / "plain.zarr", "seg", (4, 4, 4), (4, 4, 4), ["a", "b"])


def test_standalone_labels_and_mean_pyramid_of_probabilities(tmp_path):
    lab = np.random.default_rng(1).integers(0, 3, (9, 33, 31)).astype(np.uint8)
    out = lz.write_labels(tmp_path / "seg.zarr", lab, ["a", "b", "c"], voxel_size=(1, 1, 1), levels=3,
                          chunks=(4, 8, 8))
    v05.Image.from_zarr(zarr.open_group(str(out), mode="r"))
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["sparseseg"]["class_names"] == ["a", "b", "c"]
    assert [g[str(i)].shape for i in range(3)] == [(9, 33, 31), (5, 17, 16), (3, 9, 8)]
    np.testing.assert_array_equal(g["2"][...], lab[::4, ::4, ::4])
    with pytest.raises(SparsesegError, match="exists"):
        lz.write_labels(tmp_path / "seg.zarr", lab, ["a", "b", "c"])

    prob = np.random.default_rng(2).integers(0, 256, (2, 8, 12, 10)).astype(np.uint8)
    arr = lz.create_image(tmp_path / "p.zarr", prob.shape[1:], (4, 4, 4), None, 2, "uint8", "probabilities",
                          channels=2)
    arr[...] = prob
    lz.write_pyramid(tmp_path / "p.zarr", "mean")
    v05.Image.from_zarr(zarr.open_group(str(tmp_path / "p.zarr"), mode="r"))
    want = np.rint(prob.reshape(2, 4, 2, 6, 2, 5, 2).astype(np.float64).mean(axis=(2, 4, 6))).astype(np.uint8)
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "p.zarr"), mode="r")["1"][...], want)


def test_ome_zarr_py_reads_the_label_image(tmp_path):
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    img = tmp_path / "img.zarr"
    raw = _image(img, levels=2)
    lab = (raw > 0.5).astype(np.uint8)
    lz.write_labels(None, lab, ["bg", "fg"], name="seg", beside_image=img)
    nodes = list(Reader(parse_url(str(img)))())
    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert label_nodes, "ome-zarr-py found no label image"
    node = label_nodes[0]
    np.testing.assert_array_equal(np.asarray(node.data[0]), lab)
    assert len(node.data) == 2
    colours = node.metadata.get("color", {})
    assert colours[0][3] == 0 and colours[1][3] > 0        # background transparent, class 1 opaque
