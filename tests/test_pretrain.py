import numpy as np
import torch

from sparseseg.model.checkpoint import load_checkpoint
from sparseseg.trainer.data import TrainingVolume
from sparseseg.trainer.pretrain import hide_blocks, pretrain
from sparseseg.trainer.sparse import orthogonal_slices, sparsify
from sparseseg.trainer.train import _prepare, train
from tests.helpers import blobs, fast_train_config, run_cli, tiny_config


def _vols():
    image, labels = blobs()
    return [TrainingVolume(image, sparsify(labels, orthogonal_slices(labels.shape, (4, 0, 0))), "blobs")]


def test_hidden_blocks_are_squares_drawn_per_section():
    rng = np.random.default_rng(0)
    m = hide_blocks((6, 400, 400), rng, block=8, share=0.3)
    assert m.shape == (6, 400, 400) and m.dtype == bool
    assert abs(m.mean() - 0.3) < 0.03
    # Sections are drawn independently: a hidden voxel is hidden on the next section about 30% of
    # the time, not always.
    both = (m[:-1] & m[1:]).sum() / m[:-1].sum()
    assert 0.2 < both < 0.4
    # Runs along x are whole blocks (8) except where clipped at the borders.
    row = m[0, 200].astype(np.int8)
    edges = np.flatnonzero(np.diff(row))
    runs = np.diff(edges)
    assert len(runs) and (runs % 8 == 0).all()


def test_mirror_copies_past_the_border_share_the_hidden_state():
    from sparseseg.engine.tiling import reflect_index

    rng = np.random.default_rng(1)
    start, shape, size = (-2, -30, 5), (5, 60, 40), (4, 50, 30)
    index = [reflect_index(np.arange(s, s + n), m) for s, n, m in zip(start, shape, size)]
    m = hide_blocks(shape, rng, index=index)
    assert 0.2 < m.mean() < 0.4
    # Every window position showing volume voxel (z, y, x) is hidden or visible together.
    seen = {}
    for p in zip(*np.nonzero(np.ones(shape, bool))):
        key = (index[0][p[0]], index[1][p[1]], index[2][p[2]])
        assert seen.setdefault(key, m[p]) == m[p]


def test_pretraining_learns_to_inpaint_and_leaves_the_class_head():
    vols = _vols()
    mcfg = tiny_config()
    cfg = fast_train_config(lr=3e-3)
    torch.manual_seed(0)
    run = _prepare(vols, mcfg, cfg, ["bg", "ball"])
    head = {k: v.clone() for k, v in run.model.net.head.state_dict().items()}
    body = [p.detach().clone() for n, p in run.model.net.named_parameters() if not n.startswith("head")]
    info = pretrain(run, 150)
    assert info["loss"] < 0.8 * info["first_loss"], info   # 150 steps: 1.09 -> 0.70
    for k, v in run.model.net.head.state_dict().items():
        assert torch.equal(v, head[k])
    after = [p for n, p in run.model.net.named_parameters() if not n.startswith("head")]
    assert any(not torch.equal(a, b) for a, b in zip(after, body))
    assert run.model.net.head.out_channels == 2


def test_pretrained_training_is_recorded_and_resume_does_not_repeat_it(tmp_path):
    vols = _vols()
    cfg = fast_train_config(iterations=20, pretrain=10, checkpoint_every=10)
    full = train(vols, tiny_config(), cfg, ["bg", "ball"], out_path=tmp_path / "a.pt", progress=False)
    ck = load_checkpoint(full.checkpoint)
    assert ck.extra["pretrain"]["iterations"] == 10 and ck.train_config["pretrain"] == 10
    assert full.pretrain == ck.extra["pretrain"]
    # The clock counts the self-supervised phase.
    assert full.history[0]["seconds"] >= ck.extra["pretrain"]["seconds"]
    half = train(vols, tiny_config(), fast_train_config(iterations=10, pretrain=10, checkpoint_every=0),
                 ["bg", "ball"], out_path=tmp_path / "b.pt", progress=False)
    resumed = train(vols, tiny_config(), cfg, ["bg", "ball"], out_path=tmp_path / "c.pt",
                    resume=half.checkpoint, progress=False)
    phase = load_checkpoint(half.checkpoint).extra["pretrain"]
    assert load_checkpoint(resumed.checkpoint).extra["pretrain"] == phase
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_pretraining_works_with_the_cheng_network():
    from sparseseg.model.config import plan_model

    vols = _vols()
    mcfg = plan_model("small", 1, 2, ndim=3, arch="cheng", shape=(24, 40, 40))
    torch.manual_seed(0)
    run = _prepare(vols, mcfg, fast_train_config(), ["bg", "ball"])
    info = pretrain(run, 5)
    assert np.isfinite(info["loss"])
    assert run.model.net.head[-1].out_channels == 2


def test_negative_pretrain_is_one_line_error(tmp_path):
    code, out = run_cli("train", tmp_path / "x.tif", tmp_path / "y.tif", "--pretrain", "-3")
    assert code != 0 and "Traceback" not in out and "--pretrain" in out
