"""The 3D filter bank for 2D networks on all three planes (sparseseg.model.volume_filters) and its
responses computed once per training volume (sparseseg.trainer.responses)."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from helpers import blobs, fast_train_config, train_cli
from sparseseg.errors import SparsesegError
from sparseseg.model.config import plan_model
from sparseseg.model.network import SegmentationModel
from sparseseg.model.volume_filters import VolumeFilterBank, eig3
from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.options import build_configs
from sparseseg.trainer.sparse import orthogonal_slices, sparsify


def _scipy_features(img, sigmas):
    """The forest's 3D features (benchmarks.baselines.forest._features) with the bank's truncation."""
    img = img.astype(np.float64)
    kw = dict(truncate=3.0)
    out = []
    for s in sigmas:
        g = ndi.gaussian_filter(img, s, **kw)
        d = lambda *o, sd=s: ndi.gaussian_filter(img, sd, order=o, **kw)       # noqa: E731
        hess = np.array([[d(2, 0, 0), d(1, 1, 0), d(1, 0, 1)], [d(1, 1, 0), d(0, 2, 0), d(0, 1, 1)],
                         [d(1, 0, 1), d(0, 1, 1), d(0, 0, 2)]])
        grad = [d(1, 0, 0), d(0, 1, 0), d(0, 0, 1)]
        inner = [d(1, 0, 0, sd=0.5 * s), d(0, 1, 0, sd=0.5 * s), d(0, 0, 1, sd=0.5 * s)]
        st = np.array([[ndi.gaussian_filter(inner[a] * inner[b], s, **kw) for b in range(3)] for a in range(3)])
        out += [g, np.trace(hess), np.sqrt(sum(v * v for v in grad)), g - ndi.gaussian_filter(img, 0.66 * s, **kw)]
        for m in (st, hess):
            ev = np.linalg.eigvalsh(np.moveaxis(m, (0, 1), (-2, -1)))[..., ::-1]
            out += [ev[..., i] for i in range(3)]
    return np.stack(out)


def test_responses_equal_scipy_in_their_valid_region():
    rng = np.random.default_rng(0)
    img = ndi.gaussian_filter(rng.normal(size=(30, 33, 31)), 1.0).astype(np.float32) * 5
    sigmas = (0.7, 1.6)
    bank = VolumeFilterBank(1, sigmas)
    with torch.no_grad():
        got = bank.responses(torch.from_numpy(img)[None, None])[0].numpy()
    r = bank.context
    want = _scipy_features(img, sigmas)[:, r:-r, r:-r, r:-r]
    assert got.shape == want.shape == (20, 30 - 2 * r, 33 - 2 * r, 31 - 2 * r)
    scale = np.abs(want).reshape(20, -1).max(1)
    assert (np.abs(got - want).reshape(20, -1).max(1) <= 1e-4 * scale).all()


def test_closed_form_eigenvalues_match_numpy_also_when_degenerate():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 3, 3))
    mats = np.concatenate([a + a.transpose(0, 2, 1),
                           np.eye(3)[None] * rng.normal(size=(50, 1, 1)),          # three equal
                           np.diag([1.0, 1.0, -2.0])[None].repeat(5, 0),            # two equal
                           np.zeros((5, 3, 3))])
    t = torch.from_numpy(mats).float()
    got = torch.stack(eig3(t[:, 0, 0], t[:, 0, 1], t[:, 0, 2], t[:, 1, 1], t[:, 1, 2], t[:, 2, 2]), 1).numpy()
    want = np.linalg.eigvalsh(mats)[:, ::-1]
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_responses_commute_with_turning_the_volume_so_planes_may_share_them():
    """all_planes computes the bank once and permutes its responses for the xz and yz passes."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(ndi.gaussian_filter(rng.normal(size=(20, 22, 24)), 1.0).astype(np.float32))[None, None]
    bank = VolumeFilterBank(1, (1.0,))
    with torch.no_grad():
        base = bank.responses(x)
        for order in ((1, 0, 2), (2, 0, 1)):
            turned = bank.responses(x.permute(0, 1, *(2 + a for a in order)))
            assert torch.allclose(turned, base.permute(0, 1, *(2 + a for a in order)), atol=1e-4)
            flipped = bank.responses(x.flip(2 + order[0]))
            assert torch.allclose(flipped, base.flip(2 + order[0]), atol=1e-4)


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = plan_model("small", 1, 3, ndim=2, planes=3, base_width=4, depth=2, filters=(0.7, 1.0), filter_dims=3)
    model = SegmentationModel(cfg, mean=[0.1], std=[1.1]).eval()
    model.filters.std.uniform_(0.5, 2.0)
    return model


def test_geometry_adds_the_bank_on_every_axis_and_a_pass_has_the_output_shape():
    model = _model()
    g = model.cfg.geometry
    plain = plan_model("small", 1, 3, ndim=2, planes=3, base_width=4, depth=2).geometry
    assert g.context == tuple(c + model.filters.context for c in plain.context)
    with torch.no_grad():
        y = model(torch.randn(1, 1, *g.input_for_output((8, 12, 8))))
    assert y.shape == (1, 3, 8, 12, 8) and torch.allclose(y.exp().sum(1), torch.ones(1, 8, 12, 8), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_engine_tiles_reproduce_one_whole_volume_pass(backend):
    import sparseseg
    from sparseseg.engine.tiling import pad_region

    model = _model()
    g = model.cfg.geometry
    image, _ = blobs(tuple(g.y.output_at_most(n) for n in (26, 30, 28)))
    labels, _ = sparseseg.predict(model, image, device="cpu", backend=backend, tile=(20, 20, 20))
    padded = pad_region(image.astype(np.float32), g.context, g.context)
    with torch.no_grad():
        want = model(torch.from_numpy(np.ascontiguousarray(padded))[None])[0].argmax(0).numpy()
    assert (labels == want).mean() > 0.999       # float ties between runtimes only


def test_training_responses_are_what_the_graph_computes_on_the_engines_padding():
    from sparseseg.engine.tiling import pad_region
    from sparseseg.trainer import responses

    model = _model()
    image, dense = blobs((18, 21, 20))
    vol = TrainingVolume(image, dense, "v")
    with torch.no_grad():
        (got,) = responses.volume_responses(model, [vol], [None], torch.device("cpu"))
        r = model.filters.context
        padded = pad_region(image.astype(np.float32), (r,) * 3, (r,) * 3)
        want = model.prepare(torch.from_numpy(np.ascontiguousarray(padded))[None])[0].numpy()
    assert got.image.shape == want.shape == (model.filters.out_channels, 18, 21, 20)
    assert np.allclose(got.image, want, atol=1e-4) and got.labels is vol.labels
    flat = got.image.reshape(got.image.shape[0], -1)
    assert np.allclose(flat.mean(1), 0, atol=1e-3) and np.allclose(flat.std(1), 1, atol=1e-2)


def test_slabs_give_the_responses_of_one_pass(monkeypatch):
    from sparseseg.trainer import responses

    image, dense = blobs((17, 16, 15))
    vol = TrainingVolume(image, dense, "v")
    whole = responses.volume_responses(_model(), [vol], [None], torch.device("cpu"))[0].image
    monkeypatch.setattr(responses, "SLAB_VOXELS", 1)
    slabs = responses.volume_responses(_model(), [vol], [None], torch.device("cpu"))[0].image
    assert np.allclose(whole, slabs, atol=1e-5)


def _orthogonal(shape=(30, 40, 40), counts=(3, 3, 3)):
    image, dense = blobs(shape)
    return TrainingVolume(image, sparsify(dense, orthogonal_slices(shape, counts)), "o"), dense


def test_options_pick_the_3d_bank_on_all_planes_and_only_where_it_fits(monkeypatch):
    from sparseseg.trainer import options

    vol, _ = _orthogonal()
    mcfg, _, _ = build_configs([vol], {"iterations": 1})
    assert (mcfg.planes, mcfg.filter_dims, mcfg.filters) == (3, 3, (0.7, 1.0, 1.6, 3.5, 5.0))
    mcfg, _, _ = build_configs([vol], {"iterations": 1, "filter_dims": "2"})
    assert mcfg.filter_dims == 2 and mcfg.filters == (0.7, 1.0)          # the in-plane rule: room for patches
    mcfg, _, _ = build_configs([vol], {"iterations": 1, "planes": "xy", "ndim": "2"})
    assert mcfg.filter_dims == 2
    with pytest.raises(SparsesegError, match="--filter-dims 3 applies to 2D networks on all three planes"):
        build_configs([vol], {"iterations": 1, "ndim": "3", "filter_dims": "3"})
    # Memory for two scales' responses: auto keeps the two smallest, an explicit 3 with more is refused.
    monkeypatch.setattr(options, "RESPONSE_BYTES", 2 * 10 * 4 * int(np.prod(vol.shape)))
    mcfg, _, _ = build_configs([vol], {"iterations": 1})
    assert (mcfg.filter_dims, mcfg.filters) == (3, (0.7, 1.0))
    monkeypatch.setattr(options, "RESPONSE_BYTES", 10)
    mcfg, _, _ = build_configs([vol], {"iterations": 1})
    assert mcfg.filter_dims == 2
    monkeypatch.setattr("sparseseg.trainer.responses.RESPONSE_BYTES", 10)
    with pytest.raises(SparsesegError, match="3D filter responses of the training volumes need"):
        build_configs([vol], {"iterations": 1, "filter_dims": "3", "filters": "1.0"})


def test_training_on_responses_learns_and_its_checkpoint_keeps_the_bank(tmp_path):
    from sparseseg.model.checkpoint import load_checkpoint
    from sparseseg.trainer.train import train
    import sparseseg

    vol, dense = _orthogonal()
    mcfg, _, names = build_configs([vol], {"iterations": 1, "filters": "0.7,1.6", "base_width": 4, "depth": 2})
    assert mcfg.filter_dims == 3
    res = train([vol], mcfg, fast_train_config(iterations=60), names, out_path=tmp_path / "m.pt", progress=False)
    ck = load_checkpoint(res.checkpoint)
    assert ck.model_config.filter_dims == 3 and torch.equal(ck.model.filters.std, res.model.filters.std.cpu())
    assert not torch.equal(ck.model.filters.std, torch.ones_like(ck.model.filters.std))     # fitted
    pred, _ = sparseseg.predict(ck.model, vol.image, device="cpu", backend="torch")
    unpainted = vol.labels == 255
    assert (pred[unpainted] == dense[unpainted]).mean() > 0.9


def test_pretraining_on_responses_is_refused(tmp_path):
    vol, _ = _orthogonal()
    code, out = train_cli(tmp_path, vol, "--filters", "1.0", "--depth", "2", "--pretrain", "5", "--iterations", "2")
    assert code != 0 and out.strip().splitlines()[-1].startswith("error: --pretrain inpaints the raw image")
    assert not (tmp_path / "m.pt").exists()


def test_all_planes_training_is_not_turned_and_responses_get_no_gray_values():
    from sparseseg.trainer.config import AugmentConfig
    from sparseseg.trainer.train import _prepare

    vol, _ = _orthogonal()
    lossless = fast_train_config(augment=AugmentConfig.mode("lossless"))
    for filters, gray in (("0.7", False), ("none", True)):
        mcfg, _, names = build_configs([vol], {"iterations": 1, "filters": filters, "base_width": 4, "depth": 2})
        run = _prepare([vol], mcfg, lossless, names)
        assert run.on_responses == (filters != "none") and mcfg.planes == 3
        assert (run.augmenter.cfg.rotate, run.augmenter.cfg.flip, run.augmenter.cfg.gray) == (False, True, gray)
    mcfg, _, names = build_configs([vol], {"iterations": 1, "ndim": "3", "depth": 2, "base_width": 4})
    assert _prepare([vol], mcfg, lossless, names).augmenter.cfg.rotate          # 3D networks still turn


def test_prediction_work_counts_the_sections_behind_the_shared_bank(monkeypatch):
    """forward_work with the bank's context: the in-plane input of every section the planes'
    passes compute from the shared responses, which is what all_planes feeds its 2D network."""
    from sparseseg.model.shapes import forward_work

    model = _model()
    g, out, seen = model.cfg.geometry, (8, 12, 16), []
    apply_net = model.apply_net
    monkeypatch.setattr(model, "apply_net", lambda v: seen.append(v.shape[2:]) or apply_net(v))
    with torch.no_grad():
        model(torch.zeros(1, 1, *g.input_for_output(out)))
    assert forward_work(g, 3, out, model.filters.context) == sum(float(np.prod(s)) for s in seen)


def test_input_dropout_zeroes_whole_channels_of_training_patches_only():
    from sparseseg.trainer.config import TrainConfig
    from sparseseg.trainer.train import _prepare, _step

    vol, _ = _orthogonal()
    mcfg, _, names = build_configs([vol], {"iterations": 1, "filters": "0.7,1.0", "base_width": 4, "depth": 2})
    run = _prepare([vol], mcfg, fast_train_config(input_dropout=0.5, batch_size=2), names)
    seen = []
    forward = run.forward
    run.forward = lambda x: seen.append(x) or forward(x)
    torch.manual_seed(0)
    _step(run, 0, 10)
    zero = (seen[0].flatten(2) == 0).all(-1)                   # (patch, channel)
    assert seen[0].shape[1] == 20 and 0.2 < zero.float().mean() < 0.8
    with pytest.raises(SparsesegError, match="--input-dropout must be in"):
        TrainConfig(input_dropout=1.0)
    with pytest.raises(SparsesegError, match="--input-dropout must be auto or a number"):
        build_configs([vol], {"iterations": 1, "input_dropout": "some"})
    # auto: on responses only
    _, tcfg, _ = build_configs([vol], {"iterations": 1})
    assert tcfg.input_dropout is None
    for filters, want in (("0.7", 0.2), ("none", 0.0)):
        mcfg, _, names = build_configs([vol], {"iterations": 1, "filters": filters, "base_width": 4, "depth": 2})
        assert _prepare([vol], mcfg, fast_train_config(input_dropout=None), names).input_dropout == want


@pytest.mark.parametrize("filters", ["0.7,1.6", "none"])
def test_reduced_precision_exports_keep_the_three_planes(tmp_path, filters):
    """fp16 and bf16 graphs of an all-planes network run its three passes (they once ran the xy
    pass alone), within the export's parity bounds of the fp32 model."""
    from sparseseg.export.onnx_export import verify_onnx
    from sparseseg.model.checkpoint import load_checkpoint
    from sparseseg.model.onnx_graph import export_onnx
    from sparseseg.trainer.train import train

    vol, _ = _orthogonal()
    mcfg, _, names = build_configs([vol], {"iterations": 1, "filters": filters, "base_width": 8, "depth": 2})
    res = train([vol], mcfg, fast_train_config(iterations=40), names, out_path=tmp_path / "m.pt", progress=False)
    ck = load_checkpoint(res.checkpoint)
    for precision in ("fp16", "bf16"):
        path, _, _ = export_onnx(ck, "sha", tmp_path / f"{precision}.onnx", precision, simplify=False)
        _, agree, _ = verify_onnx(path, ck, precision)          # raises beyond the bounds
        assert agree >= 0.99
