"""A 2D network applied along all three planes (labels on orthogonal xy, xz and yz slices)."""

import numpy as np
import pytest
import torch

from helpers import blobs, fast_train_config, train_cli
from sparseseg.errors import SparsesegError
from sparseseg.model.config import plan_model
from sparseseg.model.network import PLANES, SegmentationModel
from sparseseg.trainer.data import TrainingVolume, annotated_planes, on_orthogonal_planes, plane_views
from sparseseg.trainer.options import build_configs, network_kind
from sparseseg.trainer.sparse import orthogonal_slices, sparsify


def _model(filters=(0.7,), seed=0):
    torch.manual_seed(seed)
    cfg = plan_model("small", 1, 3, ndim=2, planes=3, base_width=4, depth=2, filters=filters)
    model = SegmentationModel(cfg, mean=[0.1], std=[1.1]).eval()
    for m in model.modules():                 # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.8, 1.2)
    return model


def test_geometry_is_the_in_plane_rule_on_every_axis():
    cfg = _model().cfg
    g = cfg.geometry
    assert g.z == g.y == g.x and g.context[0] > 0
    one = plan_model("small", 1, 3, ndim=2, base_width=4, depth=2, filters=(0.7,))
    assert one.geometry.z.context == 0 and one.geometry.y == g.y


def test_all_planes_is_the_mean_probability_of_three_whole_passes():
    """Each plane's pass over the whole input (every section), cropped to the shared window, then
    the mean of their probabilities: what all_planes computes with the needless sections dropped."""
    model = _model()
    g = model.cfg.geometry
    x = torch.randn(1, 1, *g.input_for_output((8, 12, 8))) * 2 + 0.3
    with torch.no_grad():
        got = model(x)
        c = g.context
        mean = 0
        for order in PLANES.values():
            y = model.sections(x.permute(0, 1, *(2 + a for a in order)))
            back = [order.index(a) for a in range(3)]
            y = torch.softmax(y, 1).permute(0, 1, *(2 + a for a in back))
            crop = [slice(None), slice(None)] + [slice(0, None) for _ in range(3)]
            for a in range(3):
                if a == order[0]:
                    crop[2 + a] = slice(c[a], y.shape[2 + a] - c[a])
            mean = mean + y[tuple(crop)]
    assert got.shape == (1, 3, 8, 12, 8)
    assert torch.allclose(got.exp(), mean / 3, atol=1e-5)
    assert torch.allclose(got.exp().sum(1), torch.ones(1, 8, 12, 8), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_engine_tiles_reproduce_one_whole_volume_pass(backend):
    """The engine's tiles (reflect-padded volume) give the labels of one pass
    of the module over the whole padded volume, through torch and through the exported graph."""
    import sparseseg
    from sparseseg.engine.tiling import pad_region

    model = _model()
    g = model.cfg.geometry
    image, _ = blobs(tuple(g.y.output_at_most(n) for n in (28, 33, 30)))   # one valid whole-volume pass
    labels, _ = sparseseg.predict(model, image, device="cpu", backend=backend, tile=(24, 24, 24))
    padded = pad_region(image.astype(np.float32), g.context, g.context)
    with torch.no_grad():
        want = model(torch.from_numpy(np.ascontiguousarray(padded))[None])[0].argmax(0).numpy()
    assert labels.shape == image.shape[1:]
    assert (labels == want).mean() > 0.999       # float ties between runtimes only


def _orthogonal(shape=(30, 36, 36), counts=(2, 2, 2)):
    image, dense = blobs(shape)
    return TrainingVolume(image, sparsify(dense, orthogonal_slices(shape, counts)), "o"), dense


def test_painted_planes_are_found_and_only_they():
    vol, _ = _orthogonal()
    assert annotated_planes(vol, 255) == {a: [i for ax, i in orthogonal_slices(vol.shape, (2, 2, 2)) if ax == a]
                                          for a in range(3)}
    assert on_orthogonal_planes([vol], 255)
    image, dense = blobs((30, 36, 36))
    sections = TrainingVolume(image, sparsify(dense, [(0, 5), (0, 15), (0, 25)]), "em")
    block = dense.copy()
    block[:, 20:] = 255                                      # a dense sub-volume
    assert not on_orthogonal_planes([sections], 255)
    assert not on_orthogonal_planes([TrainingVolume(image, block, "block")], 255)


def test_auto_picks_all_planes_for_orthogonal_slices_only():
    vol, _ = _orthogonal()
    assert network_kind([vol], {"ndim": "auto", "planes": "auto"}, 255) == (2, 3)
    assert network_kind([vol], {"ndim": "3", "planes": "auto"}, 255) == (3, 1)
    assert network_kind([vol], {"ndim": "2", "planes": "xy"}, 255) == (2, 1)
    image, dense = blobs((30, 36, 36))
    sections = TrainingVolume(image, sparsify(dense, [(0, 5), (0, 15), (0, 25)]), "em")
    assert network_kind([sections], {"ndim": "auto", "planes": "auto"}, 255) == (3, 1)
    with pytest.raises(SparsesegError, match="--planes all applies to 2D"):
        network_kind([vol], {"ndim": "3", "planes": "all"}, 255)
    mcfg, _, _ = build_configs([vol], {"iterations": 1})
    assert (mcfg.ndim, mcfg.planes) == (2, 3)


def test_plane_views_hold_each_orientations_planes_as_sections():
    vol, dense = _orthogonal()
    views = plane_views([vol], 255)
    assert len(views) == 3
    for view, (plane, order) in zip(views, PLANES.items()):
        assert view.image.shape[1:] == tuple(vol.shape[a] for a in order)
        assert np.shares_memory(view.image, vol.image)          # a transpose, not a copy
        planes = [i for ax, i in orthogonal_slices(vol.shape, (2, 2, 2)) if ax == order[0]]
        lab = view.labels
        assert np.flatnonzero((lab != 255).any((1, 2))).tolist() == planes
        assert np.array_equal(lab[planes], dense.transpose(order)[planes])


def test_plane_views_of_dense_labels_take_every_labelled_plane():
    """`--planes all` on labels without painted planes (a dense block): every plane that holds a
    label, in each orientation, rather than no training data at all."""
    image, dense = blobs((12, 16, 16))
    labels = np.full_like(dense, 255)
    labels[3:9, 4:12, 2:14] = dense[3:9, 4:12, 2:14]
    views = plane_views([TrainingVolume(image, labels, "block")], 255)
    assert len(views) == 3
    for view, (_, order), (lo, hi) in zip(views, PLANES.items(), [(3, 9), (4, 12), (2, 14)]):
        assert np.flatnonzero((view.labels != 255).any((1, 2))).tolist() == list(range(lo, hi))


def test_training_on_all_planes_learns_and_keeps_its_config(tmp_path):
    """A short run: patches from each orientation's planes, a checkpoint that predicts with all
    three planes, better than chance on the voxels nobody painted."""
    from sparseseg.model.checkpoint import load_checkpoint
    from sparseseg.trainer.train import train
    import sparseseg

    vol, dense = _orthogonal((30, 40, 40), (3, 3, 3))
    mcfg, _, names = build_configs([vol], {"iterations": 1, "filters": "none", "base_width": 4, "depth": 2})
    res = train([vol], mcfg, fast_train_config(iterations=80), names, out_path=tmp_path / "m.pt", progress=False)
    ck = load_checkpoint(res.checkpoint)
    assert ck.model_config.planes == 3 and ck.model.cfg.geometry.z.context > 0
    pred, _ = sparseseg.predict(ck.model, vol.image, device="cpu", backend="torch")
    unpainted = vol.labels == 255
    assert (pred[unpainted] == dense[unpainted]).mean() > 0.9


def test_cli_refuses_all_planes_for_a_3d_network(tmp_path):
    vol, _ = _orthogonal()
    code, out = train_cli(tmp_path, vol, "--ndim", "3", "--planes", "all", "--iterations", "1")
    assert code != 0 and out.strip().splitlines()[-1].startswith("error: --planes all applies to 2D")
    assert not (tmp_path / "m.pt").exists()


def test_prediction_reserve_counts_the_sections_each_plane_computes(monkeypatch):
    """The reserve scales a timed pass by forward_work: for all three planes, the input area of
    every section the passes compute, which is what all_planes feeds its 2D network."""
    from sparseseg.model.shapes import forward_work

    model = _model()
    g = model.cfg.geometry
    out = (8, 12, 16)
    seen = []
    sections = model.sections
    monkeypatch.setattr(model, "sections", lambda v: seen.append(v.shape[2:]) or sections(v))
    with torch.no_grad():
        model(torch.zeros(1, 1, *g.input_for_output(out)))
    assert forward_work(g, 3, out) == sum(float(np.prod(s)) for s in seen)
    assert forward_work(g, 1, out) == float(np.prod(g.input_for_output(out)))
