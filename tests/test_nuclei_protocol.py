"""benchmarks/nuclei.py: the nuclei classes, the orthogonal-plane annotation and the two scoring targets."""
import numpy as np
import pytest

from benchmarks import nuclei
from sparseseg.eval.metrics import iou_per_class


def two_touching_boxes():
    ins = np.zeros((8, 10, 12), np.uint16)
    ins[2:6, 2:8, 1:5] = 7            # two nuclei sharing the face x = 4 | 5
    ins[2:6, 2:8, 5:10] = 9
    return ins


def test_boundary_is_a_six_neighbour_with_another_id():
    ins = two_touching_boxes()
    c = nuclei.boundary_classes(ins)
    assert c.dtype == np.uint8 and set(np.unique(c)) == {0, 1, 2}
    assert (c[ins == 0] == 0).all()
    assert c[3, 4, 4] == 2 and c[3, 4, 5] == 2          # the shared face, on both sides
    assert c[2, 4, 7] == 2                              # next to background (z = 1)
    assert c[3, 4, 2] == 1 and c[4, 5, 7] == 1          # inside, all six neighbours the same id
    # Only a diagonal neighbour differs: not a boundary (6-, not 26-neighbourhood).
    diag = np.zeros((5, 5, 5), np.uint16)
    diag[1:4, 1:4, 1:4] = 1
    diag[0, 0, 0] = 2
    assert nuclei.boundary_classes(diag)[2, 2, 2] == 1
    assert nuclei.boundary_classes(diag)[1, 1, 1] == 2   # its z-, y- and x-neighbours are background


def test_volume_border_alone_makes_no_boundary():
    ins = np.full((4, 4, 4), 3, np.uint16)
    assert (nuclei.boundary_classes(ins) == 1).all()


def test_annotation_keeps_n_planes_per_axis_evenly_spaced():
    lab = np.random.default_rng(0).integers(0, 3, (30, 30, 30)).astype(np.uint8)
    slices, sparse = nuclei.annotation(lab, 3)
    assert len(slices) == 9 and [sum(a == ax for a, _ in slices) for ax in range(3)] == [3, 3, 3]
    for ax in range(3):
        idx = sorted(i for a, i in slices if a == ax)
        assert len(set(np.diff(idx))) <= 2 and idx[0] >= 0 and idx[-1] < 30   # evenly spaced (+-1)
    mask = sparse != 255
    expect = np.zeros_like(mask)
    for a, i in slices:
        expect[(slice(None),) * a + (i,)] = True
    assert (mask == expect).all() and (sparse[mask] == lab[mask]).all()


def test_semi_target_ignores_exactly_the_annotated_voxels():
    lab = np.random.default_rng(1).integers(0, 3, (20, 20, 20)).astype(np.uint8)
    slices, sparse = nuclei.annotation(lab, 2)
    target = nuclei.semi_target(lab, slices)
    assert ((target == 255) == (sparse != 255)).all()
    # A prediction wrong on every annotated voxel and right elsewhere scores 1 in the semi protocol.
    pred = lab.copy()
    pred[sparse != 255] = (lab[sparse != 255] + 1) % 3
    assert iou_per_class(pred, target, 3, 255)["iou"] == pytest.approx([1.0, 1.0, 1.0])
    assert iou_per_class(pred, lab, 3, 255)["mean_foreground_iou"] < 1.0   # the auto target keeps them


def test_protocol_reads_both_crops(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    d = tmp_path / "plantseg_nuclei"
    d.mkdir()
    rng = np.random.default_rng(2)
    for name in "ab":
        tifffile.imwrite(d / f"nuclei_{name}_image_zyx.tif", rng.integers(0, 999, (16, 16, 16)).astype(np.uint16))
        tifffile.imwrite(d / f"nuclei_{name}_instances_zyx.tif", np.pad(two_touching_boxes(), 4)[:16, :16, :16])
    img, sparse, tests, slices = nuclei.protocol(2, tmp_path)
    assert set(tests) == {"semi", "auto"} and tests["semi"][0] is img and len(slices) == 6
    assert (tests["semi"][1][sparse != 255] == 255).all()          # semi: annotated voxels not scored
    assert (tests["auto"][1] != 255).all()                          # auto: all of crop b scored
    assert img.dtype == np.float32 and sparse.shape == img.shape
