import torch

from sparseseg.model.config import ModelConfig, plan_model
from sparseseg.model.network import SegmentationModel, count_parameters
from sparseseg.model.unet import UNet


def test_paper_parameter_count():
    assert count_parameters(UNet(ModelConfig(3, 3, batchnorm=False))) == 19_069_955


def test_paper_output_shape_without_running_the_full_tile():
    # The shape arithmetic is pinned in test_shapes; here the real modules agree with it on a
    # narrow network (same layers, width 2) so the test stays fast.
    cfg = ModelConfig(3, 3, base_width=2)
    with torch.no_grad():
        y = UNet(cfg)(torch.zeros(1, 3, 116, 132, 132))
    assert tuple(y.shape) == (1, 3, 28, 44, 44)
    assert cfg.geometry.output_for_input((116, 132, 132)) == tuple(y.shape[2:])


def test_anisotropic_and_2d_models_match_geometry():
    for cfg in (plan_model("small", 2, 3, base_width=4, voxel_size=(10, 1, 1)),
                plan_model("small", 2, 3, base_width=4, ndim=2),
                plan_model("small", 2, 3, base_width=4, padding="same")):
        g = cfg.geometry
        out = tuple(r.output_at_least(r.step + 3) for r in g.axes)
        inp = g.input_for_output(out)
        with torch.no_grad():
            y = SegmentationModel(cfg)(torch.randn(2, 2, *inp))
        assert tuple(y.shape) == (2, 3) + out


def test_normalization_inside_model():
    cfg = plan_model("small", 1, 2, base_width=2, padding="same")
    torch.manual_seed(0)
    a = SegmentationModel(cfg, mean=[100.0], std=[10.0]).eval()
    b = SegmentationModel(cfg).eval()
    b.load_state_dict({**a.state_dict(), "mean": torch.zeros(1), "std": torch.ones(1)})
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.allclose(a(x * 10 + 100), b(x), atol=1e-5)
