"""BioImage Model Zoo packages: validated and test-run with the official tools (bioimageio.spec,
bioimageio.core), and run in a consumer's tiling with the halo respected."""

import os
import zipfile

import numpy as np
import pytest

from sparseseg.model.checkpoint import load_checkpoint
from tests.helpers import run_cli as run, blobs

pytest.importorskip("bioimageio.spec")
core = pytest.importorskip("bioimageio.core")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from tests.test_export import trained_checkpoint

    d = tmp_path_factory.mktemp("zoo")
    trained_checkpoint(d / "model.pt")
    code, out = run("export", d / "model.pt", "--bioimageio", d / "model.zip", "--author", "A. Tester")
    assert code == 0, out
    assert "test-run with bioimageio.core" in out
    return d


def test_package_describes_the_network(package):
    from bioimageio.spec import load_model_description

    ckpt = load_checkpoint(package / "model.pt")
    g = ckpt.model_config.geometry
    descr = load_model_description(str(package / "model.zip"))
    assert descr.validation_summary.status in ("passed", "valid-format")
    (inp,), (out,) = descr.inputs, descr.outputs
    space_in = [a for a in inp.axes if a.type == "space"]
    space_out = [a for a in out.axes if a.type == "space"]
    assert [(a.size.min, a.size.step) for a in space_in] == [(r.min_input, r.step) for r in g.axes]
    assert [a.halo for a in space_out] == list(g.context)
    channel = next(a for a in out.axes if a.type == "channel")
    assert [str(n) for n in channel.channel_names] == ["bg", "fg"]
    assert [p.id for p in inp.preprocessing][:2] == ["ensure_dtype", "fixed_zero_mean_unit_variance"]
    assert descr.weights.onnx is not None and descr.weights.torchscript is not None
    assert descr.config.model_extra["sparseseg"]["class_names"] == ["bg", "fg"]
    assert descr.authors[0].name == "A. Tester"
    names = zipfile.ZipFile(package / "model.zip").namelist()
    assert {"rdf.yaml", "weights.onnx", "weights_torchscript.pt", "test_input.npy", "test_output.npy",
            "cover.png", "README.md"} <= set(names)


def test_consumer_tiling_respects_the_halo(package):
    """bioimageio.core's own tiling equals its whole-image pass, and both equal sparseseg's
    prediction wherever the network saw real data (inside the halo)."""
    from bioimageio.core import load_description, predict
    from bioimageio.core.tensor import Tensor

    import sparseseg

    image, _ = blobs(shape=(30, 34, 36), seed=5)
    descr = load_description(str(package / "model.zip"))
    x = {"raw": Tensor(image[None], dims=("batch", "channel", "z", "y", "x"))}
    whole = np.asarray(predict(model=descr, inputs=x).members["probabilities"].data)[0]
    tiled = np.asarray(predict(model=descr, inputs=x, blocksize_parameter=5).members["probabilities"].data)[0]
    ckpt = load_checkpoint(package / "model.pt")
    _, ours = sparseseg.predict(ckpt.model, image, probabilities=True)
    c = ckpt.model_config.geometry.context
    inner = (slice(None),) + tuple(slice(ci, n - ci) for ci, n in zip(c, image.shape[1:]))
    np.testing.assert_allclose(tiled[inner], whole[inner], atol=1e-5)
    np.testing.assert_allclose(tiled[inner], ours[inner], atol=1e-5)
    assert tiled.shape == ours.shape


def test_export_errors_leave_nothing_behind(package, tmp_path, monkeypatch):
    before = (package / "model.zip").read_bytes()
    code, out = run("export", package / "model.pt", "--bioimageio", package / "model.zip")
    assert code == 1 and "exists; pass --force" in out
    assert (package / "model.zip").read_bytes() == before
    code, out = run("export", package / "model.pt", "--bioimageio", tmp_path / "model.tar")
    assert code == 1 and ".zip" in out

    import bioimageio.core

    class Failed:
        status = "failed"
        details = []

    monkeypatch.setattr(bioimageio.core, "test_model", lambda descr: Failed())
    code, out = run("export", package / "model.pt", "--bioimageio", tmp_path / "bad.zip")
    assert code == 1 and out.startswith("error: the bioimage.io package failed its inference test"), out
    assert len(out.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []          # no zip, no temporary folder or file


def test_validator_error_reaches_the_one_line_message(package, tmp_path, monkeypatch):
    """bioimageio.spec raises "Invalid model description:" with its errors on the lines below; the
    user's one line must carry the first of them, not end at the colon."""
    import bioimageio.spec

    def invalid(*args, **kwargs):
        raise ValueError("Invalid model description:\n: Value error, 'index_key' is expected to be an integer\n"
                         "- inputs.0: second error")

    monkeypatch.setattr(bioimageio.spec, "load_model_description", invalid)
    code, out = run("export", package / "model.pt", "--bioimageio", tmp_path / "bad.zip")
    assert code == 1, out
    assert out.strip() == ("error: could not build the bioimage.io package: Invalid model description: "
                           "Value error, 'index_key' is expected to be an integer"), out
    assert os.listdir(tmp_path) == []
