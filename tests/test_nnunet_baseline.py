"""benchmarks/baselines/nnunet.py: the pure parts (raw format with the ignore label, dataset.json, the
epoch plan) without nnunetv2; nnunetv2's own reader on the written files where it is installed."""
import json

import numpy as np
import pytest

from benchmarks.baselines import nnunet


def sparse_case(shape=(6, 8, 10)):
    rng = np.random.default_rng(0)
    img = rng.normal(size=shape).astype(np.float32)
    lab = np.full(shape, 255, np.uint8)
    lab[2] = rng.integers(0, 3, shape[1:])
    lab[:, :, 4] = rng.integers(0, 3, (shape[0], shape[1]))
    return img, lab


def test_raw_labels_make_the_unannotated_voxels_the_highest_label():
    _, lab = sparse_case()
    raw = nnunet.raw_labels(lab, 255, 3)
    assert (raw[lab == 255] == 3).all() and (raw[lab != 255] == lab[lab != 255]).all()
    assert raw.max() == 3 and raw.dtype == np.uint8


def test_raw_labels_reject_classes_beyond_the_names_and_empty_annotation():
    _, lab = sparse_case()
    with pytest.raises(ValueError, match="outside"):
        nnunet.raw_labels(lab, 255, 2)
    with pytest.raises(ValueError, match="no annotated"):
        nnunet.raw_labels(np.full((2, 2, 2), 255, np.uint8), 255, 2)


def test_dataset_json_names_ignore_as_the_label_after_the_classes():
    d = nnunet.dataset_json(["bg", "interior", "boundary"])
    assert d["labels"] == {"background": 0, "interior": 1, "boundary": 2, "ignore": 3}
    assert max(d["labels"].values()) == d["labels"]["ignore"]
    assert d["file_ending"] == ".tif" and d["numTraining"] == 1
    assert d["channel_names"] == {"0": "microscopy"}          # not "CT": z-score per image
    assert d["overwrite_image_reader_writer"] == "Tiff3DIO"
    with pytest.raises(ValueError):
        nnunet.dataset_json(["bg", "ignore"])


def test_write_raw_lays_out_images_labels_spacing_and_dataset_json(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    img, lab = sparse_case()
    d = nnunet.write_raw(tmp_path, img, lab, ["a", "b", "c"], (50.0, 4.0, 4.0))
    assert d.name == "Dataset901_sparseseg"
    assert np.array_equal(tifffile.imread(d / "imagesTr" / "case_0000.tif"), img)
    raw = tifffile.imread(d / "labelsTr" / "case.tif")
    assert np.array_equal(raw, nnunet.raw_labels(lab, 255, 3))
    for sub in ("imagesTr", "labelsTr"):
        assert json.loads((d / sub / "case.json").read_text()) == {"spacing": [50.0, 4.0, 4.0]}
    assert json.loads((d / "dataset.json").read_text())["labels"]["ignore"] == 3
    with pytest.raises(ValueError):
        nnunet.write_raw(tmp_path, img, lab[:-1], ["a", "b", "c"], (1, 1, 1))
    with pytest.raises(ValueError):
        nnunet.write_raw(tmp_path, img, lab, ["a", "b", "c"], (1, 0, 1))


def test_nnunet_reads_the_written_case_with_its_spacing(tmp_path):
    pytest.importorskip("nnunetv2", reason="nnunetv2 is a benchmark-only dependency (not installed in CI)")
    from nnunetv2.imageio.tif_reader_writer import Tiff3DIO

    img, lab = sparse_case()
    d = nnunet.write_raw(tmp_path, img, lab, ["a", "b", "c"], (50.0, 4.0, 4.0))
    data, props = Tiff3DIO().read_images([str(d / "imagesTr" / "case_0000.tif")])
    seg, sprops = Tiff3DIO().read_seg(str(d / "labelsTr" / "case.tif"))
    assert data.shape == (1, *img.shape) and props["spacing"] == [50.0, 4.0, 4.0]
    assert sprops["spacing"] == [50.0, 4.0, 4.0] and seg.max() == 3


def test_epoch_plan_fits_the_budget_and_never_goes_back():
    assert nnunet.plan_epochs(0, 0.0, 600) == 1000                   # nnU-Net's default until timed
    assert nnunet.plan_epochs(1, 60.0, 600) == 10                     # 60 s per epoch: 10 in 600 s
    assert nnunet.plan_epochs(3, 200.0, 600) == 9                     # 66.7 s per epoch: 6 more
    assert nnunet.plan_epochs(5, 700.0, 600) == 5                     # over budget: stop where it is
    assert nnunet.plan_epochs(2, 590.0, 600) == 2                     # not time for another epoch


def test_plan_summary_names_patch_batch_and_network():
    plans = {"configurations": {"3d_fullres": {
        "patch_size": [80, 80, 80], "batch_size": 2, "spacing": [1, 1, 1],
        "architecture": {"network_class_name": "PlainConvUNet",
                         "arch_kwargs": {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320]}}},
        "2d": {}}}
    s = nnunet.plan_summary(plans)
    assert s["patch_size"] == [80, 80, 80] and s["batch_size"] == 2 and s["network"] == "PlainConvUNet"
    assert s["features_per_stage"][-1] == 320 and s["configurations_planned"] == ["2d", "3d_fullres"]
