import pytest
import torch

import sparseseg
from sparseseg.errors import CheckpointError
from sparseseg.model.checkpoint import load_checkpoint, save_checkpoint
from sparseseg.model.network import SegmentationModel
from sparseseg.trainer.config import TrainConfig
from tests.helpers import tiny_config


def test_round_trip(tmp_path):
    cfg = tiny_config(in_channels=2, classes=3)
    torch.manual_seed(0)
    model = SegmentationModel(cfg, mean=[1.0, 2.0], std=[3.0, 4.0])
    path = save_checkpoint(tmp_path / "m.pt", model, TrainConfig(iterations=7), ["a", "b", "c"], 255, 7,
                           voxel_size=(2.0, 1.0, 1.0))
    ck = load_checkpoint(path)
    assert ck.model_config == cfg and ck.class_names == ["a", "b", "c"] and ck.iteration == 7
    assert ck.train_config["iterations"] == 7 and ck.voxel_size == [2.0, 1.0, 1.0]
    assert ck.normalization == {"mode": "global", "in_graph": True, "mean": [1.0, 2.0], "std": [3.0, 4.0],
                                "percentiles": None}
    x = torch.randn(1, 2, *cfg.geometry.min_input)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), sparseseg.load_model(path)(x))
    assert not sparseseg.load_model(path).training


def test_opening_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "sparseseg-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04garbage"])
def test_corrupt_files(tmp_path, content):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(p)


def test_foreign_and_future_checkpoints(tmp_path):
    p = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, p)
    with pytest.raises(CheckpointError, match="not a sparseseg checkpoint"):
        load_checkpoint(p)
    cfg = tiny_config()
    good = save_checkpoint(tmp_path / "m.pt", SegmentationModel(cfg), None, ["a", "b"], 255)
    payload = torch.load(good, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="upgrade"):
        load_checkpoint(tmp_path / "future.pt")
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.pt")


def test_normalization_modes_round_trip_and_legacy(tmp_path):
    import json

    import numpy as np

    from sparseseg.model.contract import contract_from_checkpoint
    from sparseseg.model.normalization import apply, volume_statistics

    cfg = tiny_config()
    model = SegmentationModel(cfg, mean=[5.0], std=[2.0], normalization="percentile", percentiles=(1.0, 99.0))
    path = save_checkpoint(tmp_path / "p.pt", model, None, ["a", "b"], 255)
    ck = load_checkpoint(path)
    # per-volume modes: identity in the graph, the mode and percentiles in the contract
    assert ck.normalization == {"mode": "percentile", "in_graph": False, "mean": [0.0], "std": [1.0],
                                "percentiles": [1.0, 99.0]}
    c = contract_from_checkpoint(ck, "0" * 64)
    assert c["normalization"]["mode"] == "percentile" and "per input volume" in c["input"]
    # what the engine does with it: statistics once per volume, then every block alike
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 10, (1, 20, 30, 30)).astype(np.float32)
    vol[0, 0, 0, :5] = 1e6                                   # saturated pixels are clipped away
    stats = volume_statistics(vol, c["normalization"])
    assert stats["hi"][0] < 200 and stats["lo"][0] > 0
    out = apply(vol, stats)
    assert abs(out.mean()) < 0.05 and abs(out.std() - 1) < 0.05 and out.max() < 4
    # a legacy checkpoint stored only mean/std: global, inside the graph
    payload = torch.load(save_checkpoint(tmp_path / "g.pt", SegmentationModel(cfg, [3.0], [4.0]), None, ["a", "b"],
                                         255), weights_only=True)
    payload["normalization"] = json.dumps({"mean": [3.0], "std": [4.0]})
    torch.save(payload, tmp_path / "legacy.pt")
    assert load_checkpoint(tmp_path / "legacy.pt").normalization == {
        "mode": "global", "in_graph": True, "mean": [3.0], "std": [4.0], "percentiles": None}
