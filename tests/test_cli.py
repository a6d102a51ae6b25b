import json
import re
import subprocess
import sys

import numpy as np
import pytest

from sparseseg.volume import open_volume, write_ome_zarr
from tests.helpers import run_cli as run, blobs


@pytest.fixture
def data(tmp_path):
    image, labels = blobs(shape=(20, 36, 36))
    np.save(tmp_path / "img.npy", image)
    sparse = np.full_like(labels, 255)
    sparse[6:14] = labels[6:14]
    np.save(tmp_path / "lab.npy", sparse)
    return tmp_path


FAST = ["--depth", "2", "--base-width", "4", "--iterations", "2", "--device", "cpu", "--no-augment"]


def test_train_eval_densify(data):
    code, out = run("train", "--image", data / "img.npy", "--labels", data / "lab.npy", "--out", data / "m.pt", *FAST)
    assert code == 0, out
    # --iterations pins the count: no budget plan in the summary line, which names the checkpoint
    assert re.search(r"^trained 2 iterations in [0-9.]+ s, final loss [0-9]+\.[0-9]{4}; checkpoint: .*m\.pt$", out,
                     re.M), out
    code, out = run("train", "--image", data / "img.npy", "--labels", data / "lab.npy", "--out", data / "m.pt", *FAST)
    assert code == 1 and "exists" in out and out.count("\n") == 1
    code, out = run("densify", data / "img.npy", data / "lab.npy", "--out", data / "d.zarr", "--pyramid", "1", *FAST)
    assert code == 0, out
    assert re.search(r"^dense segmentation written to .*d\.zarr \([0-9.]+ s training, [0-9.]+ s prediction\)$", out,
                     re.M), out
    pred = open_volume(data / "d.zarr").read_labels()
    assert pred.shape == (20, 36, 36) and pred.dtype == np.uint8
    import zarr

    levels = zarr.open_group(str(data / "d.zarr"), mode="r").attrs["ome"]["multiscales"][0]["datasets"]
    assert len(levels) == 2 and zarr.open_array(str(data / "d.zarr" / levels[1]["path"]), mode="r").shape[1] < 36
    code, out = run("eval", data / "d.zarr", data / "lab.npy", "--json", "--figure", data / "f.png")
    assert code == 0, out
    res = json.loads(out)
    assert len(res["iou"]) == 2 and res["figure"] == str(data / "f.png")
    assert (data / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # eval scores the densified labels against the annotated voxels only: TP / (TP + FP + FN)
    sparse = np.load(data / "lab.npy")
    seen = sparse != 255
    expected = [((pred == c) & (sparse == c) & seen).sum() / max(1, (((pred == c) | (sparse == c)) & seen).sum())
                for c in range(2)]
    assert np.allclose(res["iou"], expected), (res["iou"], expected)
    assert res["voxels"] == seen.sum() and np.isclose(res["accuracy"], ((pred == sparse) & seen).sum() / seen.sum())
    # the plain output says the same, one line per class and the foreground mean
    code, out = run("eval", data / "d.zarr", data / "lab.npy")
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith(("class ", "mean "))]
    assert lines == [f"class {c}: IoU {v:.4f}" for c, v in enumerate(expected)] + [
        f"mean foreground IoU: {expected[1]:.4f} over {seen.sum()} voxels"], out
    # the checkpoint records what it was trained with
    from sparseseg.model.checkpoint import load_checkpoint

    ck = load_checkpoint(data / "m.pt")
    assert ck.iteration == 2 and ck.ignore_label == 255 and len(ck.class_names) == 2
    assert ck.model_config.depth == 2 and ck.model_config.base_width == 4


def _err(code, out, text):
    assert code == 1, out
    assert out.startswith("error: ") and text in out and "Traceback" not in out and out.count("\n") == 1, out


def test_bad_inputs(data):
    t = ["train", "--out", data / "new.pt", *FAST]
    _err(*run(*t, "--image", data / "nope.npy", "--labels", data / "lab.npy"), "no such file")
    np.save(data / "small_lab.npy", np.zeros((20, 36, 35), np.uint8))
    _err(*run(*t, "--image", data / "img.npy", "--labels", data / "small_lab.npy"), "differ")
    np.save(data / "empty.npy", np.full((20, 36, 36), 255, np.uint8))
    _err(*run(*t, "--image", data / "img.npy", "--labels", data / "empty.npy"), "no annotated voxel")
    lab = np.load(data / "lab.npy")
    lab[10, 0, 0] = 7
    np.save(data / "lab7.npy", lab)
    _err(*run(*t, "--image", data / "img.npy", "--labels", data / "lab7.npy", "--num-classes", "2"), ">= number of classes")
    img = np.load(data / "img.npy")
    img[0, 3, 3, 3] = np.nan
    np.save(data / "nan.npy", img)
    _err(*run(*t, "--image", data / "nan.npy", "--labels", data / "lab.npy"), "NaN")
    np.save(data / "tiny.npy", np.load(data / "img.npy")[:, :12, :12, :12])
    np.save(data / "tiny_lab.npy", lab[:12, :12, :12] % 2)
    _err(*run(*t, "--image", data / "tiny.npy", "--labels", data / "tiny_lab.npy", "--depth", "3"), "too small")
    (data / "corrupt.pt").write_bytes(b"garbage")
    _err(*run(*t, "--image", data / "img.npy", "--labels", data / "lab.npy", "--resume", data / "corrupt.pt"),
         "not a readable sparseseg checkpoint")
    _err(*run(*t, "--image", data / "img.npy", "--labels", data / "lab.npy", "--patch", "1,2"),
         "--patch must be three positive numbers Z,Y,X, got '1,2'")
    _err(*run(*t, "--image", data / "img.npy", "--labels", data / "lab.npy", "--voxel-size", "4,1,x"),
         "--voxel-size must be three comma-separated numbers Z,Y,X, got '4,1,x'")
    _err(*run(*t, "--image", data / "img.npy", "--labels", data / "lab.npy", "--iterations", "2", "--time-budget", "1"),
         "give --iterations or --time-budget, not both")
    write_ome_zarr(data / "exists.zarr", np.zeros((2, 2, 2), np.uint8))
    _err(*run("densify", data / "img.npy", data / "lab.npy", "--out", data / "exists.zarr", *FAST), "exists")
    assert open_volume(data / "exists.zarr").shape == (2, 2, 2)      # untouched


def test_console_script_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparseseg.cli", "eval", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: no such file") and "Traceback" not in r.stderr
