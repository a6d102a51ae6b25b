import numpy as np
import pytest

from sparseseg.errors import SparsesegError
from sparseseg.trainer.config import TrainConfig
from sparseseg.trainer.sampler import PatchSampler, index_labels


def rare_spot_volume():
    # One annotated section of class 0 with a 3x3 spot of class 1 (0.1% of the labels).
    lab = np.full((3, 100, 100), 255, np.uint8)
    lab[1] = 0
    lab[1, 80:83, 10:13] = 1
    return lab


def windows_on_spot(fraction, draws=400, seed=0):
    lab = rare_spot_volume()
    tiles, counts = index_labels(lab, 255, 2)
    assert tiles.shape == (2, 3, 2, 2) and counts.tolist() == [9991, 9]
    assert tiles.sum((1, 2, 3)).tolist() == counts.tolist()
    sampler = PatchSampler([lab], [tiles], (1, 8, 8), 255, np.random.default_rng(seed), fraction)
    hits = 0
    for _ in range(draws):
        _, (z, y, x) = sampler.sample()
        window = lab[z, y:y + 8, x:x + 8]
        assert (window != 255).any()                      # every window holds labels
        hits += bool((window == 1).any())
    return hits / draws


def test_class_sampling_anchors_a_share_of_windows_on_a_uniformly_drawn_class():
    assert windows_on_spot(0.0) < 0.05                    # by frequency: the spot is almost never seen
    # fraction 1: half the draws pick class 1, whose windows all hold the spot
    assert 0.4 < windows_on_spot(1.0) < 0.6
    assert 0.2 < windows_on_spot(0.5) < 0.35


def test_class_sampling_outside_0_1_is_an_error():
    with pytest.raises(SparsesegError, match="class-sampling"):
        TrainConfig(class_sampling=1.5)
