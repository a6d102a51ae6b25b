"""The Cheng & Varshney 2017 networks: sizes, factorized convolutions, feature augmentation,
geometry, export and bad input."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sparseseg.errors import SparsesegError
from sparseseg.model.cheng import FactorizedConv, ResidualBlock, split_evenly, stochastic_subsample
from sparseseg.model.config import ModelConfig, plan_model
from sparseseg.model.network import SegmentationModel, build_net, count_parameters


def cheng(ndim=3, factorized=False, feature_augment=False, classes=2, **kw):
    return plan_model("small", 1, classes, ndim=ndim, arch="cheng", factorized=factorized,
                      feature_augment=feature_augment, **kw)


def test_parameter_counts():
    counts = {(nd, f): count_parameters(build_net(cheng(nd, f))) for nd in (2, 3) for f in (False, True)}
    # The paper's 3D factorized model has 0.63 M parameters; ours 0.62 M (see cheng.BLOCKS).
    assert counts[(3, True)] == 620358 and abs(counts[(3, True)] - 630_000) / 630_000 < 0.02
    assert counts == {(2, False): 1687032, (2, True): 592926, (3, False): 4996782, (3, True): 620358}
    # Feature augmentation adds no parameter.
    assert count_parameters(build_net(cheng(3, True, True))) == counts[(3, True)]


def test_factorized_conv_is_concatenated_rank1_kernels():
    conv = FactorizedConv(3, 4, 10, (3, 3, 3), (1, 1, 1))
    assert [tuple(b.weight.shape) for b in conv.branches] == [(4, 4, 3, 1, 1), (3, 4, 1, 3, 1), (3, 4, 1, 1, 3)]
    # An anisotropic level (kernel 1 along z) splits between the two wide axes only.
    conv2 = FactorizedConv(3, 4, 8, (1, 3, 3), (1, 2, 2))
    assert [tuple(b.weight.shape[2:]) for b in conv2.branches] == [(3, 1), (1, 3)] or \
        [tuple(b.weight.shape[2:]) for b in conv2.branches] == [(1, 3, 1), (1, 1, 3)]
    x = torch.randn(2, 4, 4, 8, 6)
    assert conv(x).shape == (2, 10, 4, 8, 6) and conv2(x).shape == (2, 8, 4, 4, 3)
    # Map j of a branch only sees its own axis: an impulse spreads along that axis alone.
    imp = torch.zeros(1, 4, 5, 5, 5)
    imp[0, :, 2, 2, 2] = 1
    with torch.no_grad():
        for b in conv.branches:
            b.bias.zero_()
        y = conv(imp)[0].abs().sum(0)
    assert (y > 0).sum() == 7          # the centre and two neighbours along each of the three axes
    assert split_evenly(32, 3) == [11, 11, 10]


def test_stochastic_subsample_picks_positions_per_region():
    torch.manual_seed(0)
    n, t = 12, 4
    x = torch.arange(n, dtype=torch.float32).view(1, 1, 1, n).expand(1, 1, n, n).contiguous()
    seen = set()
    for _ in range(20):
        y = stochastic_subsample(x, (2, 2), t)
        assert y.shape == (1, 1, 6, 6)
        cols = y[0, 0, 0].tolist()
        # Two sorted positions in each region of 4 (t/s = 2), the same along every row.
        for r in range(n // t):
            part = cols[2 * r: 2 * r + 2]
            assert part == sorted(part) and all(t * r <= v < t * (r + 1) for v in part)
        assert (y[0, 0] == y[0, 0, :1]).all()
        seen.add(tuple(cols))
    assert len(seen) > 1                # random from call to call
    # A last region shorter than t keeps its length / s positions.
    assert stochastic_subsample(torch.zeros(1, 1, 6, 10), (1, 2), 4).shape == (1, 1, 6, 5)


def test_feature_augment_train_random_eval_deterministic_average():
    torch.manual_seed(1)
    block = ResidualBlock(2, 8, (3, 3), (2, 2), False, feature_augment=True, t=4)
    x = torch.randn(1, 8, 8, 8)
    block.train()
    assert not torch.equal(block.shortcut(x), block.shortcut(x))
    block.eval()
    ref = torch.nn.functional.avg_pool2d(x, 2)
    assert torch.equal(block.shortcut(x), ref) and torch.equal(block(x), block(x))
    assert block(x).shape == (1, 16, 4, 4)


@pytest.mark.parametrize("ndim,factorized", [(2, False), (3, True)])
def test_same_size_output_and_geometry(ndim, factorized):
    cfg = cheng(ndim, factorized, True, classes=3)
    geom = cfg.geometry
    assert cfg.padding == "same" and geom.context == (0, 0, 0)
    assert geom.step == ((8, 8, 8) if ndim == 3 else (1, 8, 8))
    model = SegmentationModel(cfg).eval()
    shape = (16, 24, 40) if ndim == 3 else (3, 24, 40)
    with torch.no_grad():
        y = model(torch.randn(1, 1, *shape))
    assert y.shape == (1, 3) + shape
    assert geom.output_for_input(shape) == shape and geom.output_for_input((16, 24, 36)) is None


def test_anisotropic_plan_keeps_z_unpooled():
    cfg = cheng(3, True, voxel_size=(10.0, 1.0, 1.0))
    assert cfg.pool_sizes == ((1, 2, 2),) * 3 and cfg.kernel_sizes[0] == (1, 3, 3)
    assert cfg.geometry.step == (1, 8, 8)
    with torch.no_grad():
        assert SegmentationModel(cfg).eval()(torch.randn(1, 1, 3, 16, 16)).shape == (1, 2, 3, 16, 16)


def test_engine_predicts_whole_volume_tiled():
    from sparseseg import predict

    torch.manual_seed(0)
    model = SegmentationModel(cheng(2, True, base_width=8)).eval()
    image = np.random.default_rng(0).normal(size=(1, 2, 50, 70)).astype(np.float32)
    tiled, _ = predict(model, image, tile=(1, 32, 32), probabilities=True)
    one, _ = predict(model, image, tile=(1, 56, 72), probabilities=True)
    assert tiled.shape == one.shape == (2, 50, 70)
    # Blended same-padding tiles agree with one pass over the (padded) volume on most voxels.
    assert (tiled == one).mean() > 0.8


def test_bad_input_is_one_line():
    with pytest.raises(SparsesegError, match="unknown --arch"):
        plan_model("small", 1, 2, arch="resnet")
    with pytest.raises(SparsesegError, match="--factorized applies to --arch cheng only"):
        plan_model("small", 1, 2, factorized=True)
    with pytest.raises(SparsesegError, match="--feature-augment applies"):
        plan_model("small", 1, 2, feature_augment=True)
    with pytest.raises(SparsesegError, match="padding"):
        ModelConfig(1, 2, depth=4, padding="valid", arch="cheng")
    with pytest.raises(SparsesegError, match="feature-augment-t"):
        cheng(3, feature_augment=True, feature_augment_t=3)
    with pytest.raises(SparsesegError, match="4 resolution levels"):
        cheng(3, depth=3)


def test_config_round_trip():
    cfg = cheng(3, True, True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # A checkpoint written before `arch` existed reads as the U-Net.
    d = plan_model("small", 1, 2).to_dict()
    for k in ("arch", "factorized", "feature_augment", "feature_augment_t"):
        d.pop(k)
    assert ModelConfig.from_dict(d).arch == "unet"


def test_export_onnx_round_trip(tmp_path):
    from sparseseg.cli import main
    from sparseseg.export.onnx_export import ort_session
    from sparseseg.model.checkpoint import load_checkpoint
    from sparseseg.trainer.data import TrainingVolume
    from sparseseg.trainer.train import train
    from tests.helpers import blobs, fast_train_config

    image, labels = blobs((8, 32, 32), seed=4)
    cfg = cheng(3, True, True, base_width=8)
    # A few iterations (feature augmentation on) so that BatchNorm statistics are not the identity.
    train([TrainingVolume(image, labels, "toy")], cfg, fast_train_config(iterations=2, patch_output=(8, 16, 16)),
          ["bg", "fg"], out_path=tmp_path / "m.pt", progress=False)
    r = CliRunner().invoke(main, ["export", str(tmp_path / "m.pt")])
    assert r.exit_code == 0, r.output
    assert "argmax agreement 100.000%" in r.output
    model = load_checkpoint(tmp_path / "m.pt").model.eval()
    sess = ort_session(tmp_path / "m.onnx")
    for shape in ((8, 16, 24), (16, 8, 8)):
        x = (np.random.default_rng(1).normal(size=(1, 1) + shape) * 30 + 100).astype(np.float32)
        got = sess.run(None, {"image": x})[0]
        again = sess.run(None, {"image": x})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert np.array_equal(got, again) and np.abs(got - ref).max() <= 1e-4


def test_cli_trains_cheng_and_rejects_bad_arch_options(tmp_path):
    from sparseseg.cli import main
    from sparseseg.model.checkpoint import load_checkpoint
    from tests.helpers import blobs

    image, labels = blobs((8, 32, 32), seed=2)
    np.save(tmp_path / "img.npy", image)
    np.save(tmp_path / "lab.npy", labels)
    base = ["train", "--image", str(tmp_path / "img.npy"), "--labels", str(tmp_path / "lab.npy"),
            "--out", str(tmp_path / "m.pt"), "--iterations", "2", "--device", "cpu", "--no-augment",
            "--patch", "8,16,16"]

    def err(extra, text):
        r = CliRunner().invoke(main, base + extra)
        assert r.exit_code == 1 and r.output.startswith("error: ") and text in r.output, r.output
        assert r.output.count("\n") == 1

    err(["--arch", "resnet"], "unknown --arch 'resnet'")
    err(["--factorized"], "--factorized applies to --arch cheng only")
    err(["--arch", "cheng", "--feature-augment", "--feature-augment-t", "3"], "--feature-augment-t")
    r = CliRunner().invoke(main, base + ["--arch", "cheng", "--factorized", "--feature-augment"])
    assert r.exit_code == 0, r.output
    cfg = load_checkpoint(tmp_path / "m.pt").model_config
    assert (cfg.arch, cfg.factorized, cfg.feature_augment, cfg.padding) == ("cheng", True, True, "same")
