"""The fixed filter bank in front of the network (sparseseg.model.filters)."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from sparseseg.model.checkpoint import load_checkpoint, save_checkpoint
from sparseseg.model.config import plan_model
from sparseseg.model.filters import FilterBank
from sparseseg.model.network import SegmentationModel
from sparseseg.model.shapes import bank_context
from tests.helpers import blobs, fast_train_config, run_cli


def _eig_desc(a, b, c):
    ev = np.linalg.eigvalsh(np.stack([np.stack([a, b], -1), np.stack([b, c], -1)], -2))
    return ev[..., 1], ev[..., 0]


def scipy_features(img, sigmas):
    """ilastik's eight responses per scale with scipy.ndimage, truncated at 3 sigma."""
    t = {"truncate": 3.0}
    out = []
    for s in sigmas:
        g = ndi.gaussian_filter(img, s, **t)
        gy = ndi.gaussian_filter(img, s, order=(1, 0), **t)
        gx = ndi.gaussian_filter(img, s, order=(0, 1), **t)
        iy = ndi.gaussian_filter(img, 0.5 * s, order=(1, 0), **t)
        ix = ndi.gaussian_filter(img, 0.5 * s, order=(0, 1), **t)
        st = [ndi.gaussian_filter(p, s, **t) for p in (iy * iy, iy * ix, ix * ix)]
        hess = [ndi.gaussian_filter(img, s, order=o, **t) for o in ((2, 0), (1, 1), (0, 2))]
        dog = g - ndi.gaussian_filter(img, 0.66 * s, **t)
        out += [g, ndi.gaussian_laplace(img, s, **t), np.hypot(gy, gx), dog, *_eig_desc(*st), *_eig_desc(*hess)]
    return np.stack(out)


def test_bank_equals_scipy_per_section_channel_major():
    sigmas = (0.7, 1.6, 3.5)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 3, 60, 70))                      # (C, Z, Y, X)
    bank = FilterBank(2, sigmas)
    got = bank.responses(torch.from_numpy(img)[None].float())[0].numpy()
    r = bank_context(sigmas)
    assert got.shape == (2 * 8 * 3, 3, 60 - 2 * r, 70 - 2 * r)
    for c in range(2):
        for z in range(3):
            want = scipy_features(img[c, z], sigmas)[:, r:-r, r:-r]
            np.testing.assert_allclose(got[c * 24:(c + 1) * 24, z], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_geometry_counts_the_bank(ndim):
    plain = plan_model("small", 1, 2, ndim=ndim, base_width=4, depth=2)
    cfg = plan_model("small", 1, 2, ndim=ndim, base_width=4, depth=2, filters=(1.0, 2.0))
    r = bank_context((1.0, 2.0))
    assert cfg.geometry.context == (plain.geometry.context[0], plain.geometry.context[1] + r,
                                    plain.geometry.context[2] + r)
    model = SegmentationModel(cfg).eval()
    for out in [(4, 8, 12), (8, 12, 8)]:
        ins = cfg.geometry.input_for_output(out)
        with torch.no_grad():
            assert tuple(model(torch.randn(1, 1, *ins)).shape[2:]) == out
    same = SegmentationModel(plan_model("small", 1, 2, ndim=ndim, padding="same", base_width=4, depth=2,
                                        filters=(1.0,))).eval()
    assert same.cfg.geometry.context == (0, 0, 0)
    with torch.no_grad():
        assert tuple(same(torch.randn(1, 1, 8, 16, 16)).shape[2:]) == (8, 16, 16)


def test_tiles_equal_one_pass_through_onnx(tmp_path):
    """Exact tiling holds with the bank: any block and tile give the whole volume's labels."""
    from sparseseg.engine.run import run_inference
    from sparseseg.volume import open_volume
    from tests.test_engine import assert_matches_whole_pass, whole_pass

    torch.manual_seed(0)
    cfg = plan_model("small", 1, 3, base_width=4, depth=2, filters=(0.7, 1.6))
    model = SegmentationModel(cfg, mean=[100.0], std=[30.0])
    model.calibrate_filters(torch.rand(2, 1, 1, 40, 40) * 200)
    ck = save_checkpoint(tmp_path / "m.pt", model, None, ["a", "b", "c"], 255)
    code, out = run_cli("export", ck)
    assert code == 0, out
    data = (np.random.default_rng(0).random((21, 45, 50)) * 200).astype(np.float32)
    np.save(tmp_path / "v.npy", data)
    logits = whole_pass(ck, data)
    for i, (engine, block, tile) in enumerate([(tmp_path / "m.onnx", (8, 24, 20), (4, 8, 12)),
                                               (ck, (24, 48, 52), None)]):
        run_inference(engine, tmp_path / "v.npy", tmp_path / f"o{i}.zarr", workers=0, block=block, tile=tile,
                      progress=False)
        assert_matches_whole_pass(open_volume(tmp_path / f"o{i}.zarr").read_labels(), logits)


def test_training_calibrates_the_bank_and_checkpoints_keep_it(tmp_path):
    from sparseseg.trainer.data import TrainingVolume
    from sparseseg.trainer.train import train

    image, labels = blobs()
    cfg = plan_model("small", 1, 2, base_width=4, depth=2, filters=(1.0, 2.0))
    res = train([TrainingVolume(image, labels, "toy")], cfg, fast_train_config(iterations=3), ["bg", "ball"],
                out_path=tmp_path / "m.pt", progress=False)
    bank = res.model.filters
    # Fitted on the training data: the responses of its sections come out z-scored.
    shape = (1, -1, 1, 1, 1)
    x = (torch.from_numpy(image[None, :, ::6]) - res.model.mean.view(shape)) / res.model.std.view(shape)
    f = bank(x).transpose(0, 1).reshape(bank.out_channels, -1)
    assert f.mean(1).abs().max() < 0.3 and (f.std(1) - 1).abs().max() < 0.3
    assert bank.std.max() > 1.5 * bank.std.min()           # raw scales differ: the fit did something
    ck = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(ck.model.filters.mean, bank.mean.cpu()) and ck.model_config.filters == (1.0, 2.0)
    z, y, x = cfg.geometry.input_for_output((4, 8, 8))
    probe = torch.from_numpy(image[None, :, :z, :y, :x])
    with torch.no_grad():
        assert torch.equal(ck.model(probe), res.model.eval()(probe))


@pytest.mark.parametrize("args, message", [
    (["--filters", "wide"], "--filters must be auto, ilastik, none or comma-separated scales"),
    (["--filters", "1,-2"], "--filters must be distinct scales"),
    (["--filters", "ilastik", "--arch", "cheng"], "--filters applies to --arch unet only"),
])
def test_bad_filters_are_one_line_errors(tmp_path, args, message):
    image, labels = blobs()
    np.save(tmp_path / "i.npy", image[0])
    np.save(tmp_path / "l.npy", labels)
    code, out = run_cli("train", "--image", tmp_path / "i.npy", "--labels", tmp_path / "l.npy",
                        "--out", tmp_path / "m.pt",
                        "--iterations", "1", "--device", "cpu", *args)
    assert code != 0 and message in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()
