"""The image-blind reference of the semi-automated tables (benchmarks/baselines/interpolation.py)."""
import numpy as np
import pytest

from benchmarks.baselines.interpolation import nearest_label


def test_each_voxel_takes_the_nearest_annotated_label():
    sparse = np.full((1, 1, 10), 255, np.uint8)
    sparse[0, 0, 1] = 1
    sparse[0, 0, 8] = 2
    # voxels 0..4 are nearer voxel 1, 5..9 nearer voxel 8 (4.5 is the midpoint)
    assert nearest_label(sparse).ravel().tolist() == [1] * 5 + [2] * 5


def test_plane_labels_are_copied_across_the_gap():
    dense = np.zeros((6, 4, 4), np.uint8)
    dense[:, 1:3, 1:3] = 1                     # a column through every section
    sparse = np.full_like(dense, 255)
    sparse[0], sparse[5] = dense[0], dense[5]  # two annotated sections
    assert np.array_equal(nearest_label(sparse), dense)


def test_no_annotation_is_an_error():
    with pytest.raises(ValueError, match="no annotated voxel"):
        nearest_label(np.full((2, 2, 2), 255, np.uint8))
