import pytest

from sparseseg.errors import SparsesegError
from sparseseg.model.config import PRESETS, ModelConfig, plan_model
from sparseseg.model.shapes import NetGeometry, axis_rule
from sparseseg.trainer.config import patch_output_size


def test_paper_geometry():
    g = ModelConfig(3, 3).geometry
    assert g.output_for_input((116, 132, 132)) == (28, 44, 44)
    assert g.input_for_output((28, 44, 44)) == (116, 132, 132)
    assert g.context == (44, 44, 44)
    assert g.step == (8, 8, 8)
    # valid output sizes are 4 mod 8 (PERF.md); neighbours are invalid
    assert g.x.output_for_input(148) == 60 and g.x.output_for_input(144) is None
    assert g.x.min_output == 4 and g.x.min_input == 92
    assert g.x.nearest_inputs(130) == [124, 132]


def test_rule_matches_brute_force():
    # Forward simulation of sizes through the network vs the closed form.
    kernels, pools = [3, 1, 3], [2, 3]

    def simulate(n):
        sizes = []
        for lvl, k in enumerate(kernels):
            n -= 2 * (k - 1)
            if n < 1:
                return None
            sizes.append(n)
            if lvl < len(pools):
                if n % pools[lvl]:
                    return None
                n //= pools[lvl]
        for lvl in range(len(pools) - 1, -1, -1):
            n = n * pools[lvl] - 2 * (kernels[lvl] - 1)
            if n < 1:
                return None
        return n

    rule = axis_rule(kernels, pools, valid=True)
    for n in range(1, 200):
        assert rule.output_for_input(n) == simulate(n), n


def test_same_padding_and_2d():
    g = plan_model("small", 1, 2, padding="same").geometry
    assert g.context == (0, 0, 0) and g.output_for_input((8, 12, 16)) == (8, 12, 16)
    assert g.output_for_input((8, 12, 18)) is None
    g2 = plan_model("small", 1, 2, ndim=2).geometry
    assert g2.z.step == 1 and g2.z.context == 0 and g2.output_for_input((3, 92, 92)) == (3, 52, 52)


def test_geometry_roundtrip():
    g = plan_model("paper", 1, 2, voxel_size=(50, 4, 4)).geometry
    assert NetGeometry.from_dict(g.to_dict()) == g


def test_anisotropic_planning_from_voxel_size():
    cfg = plan_model("paper", 1, 2, voxel_size=(50, 4, 4))
    assert [k[0] for k in cfg.kernel_sizes] == [1, 1, 1, 3]
    assert all(p[0] == 1 for p in cfg.pool_sizes) and all(p[1:] == (2, 2) for p in cfg.pool_sizes)


def test_thin_stack_planning_from_shape():
    # 20 sections of 1024x1024 with no voxel size: the small preset must fit without flags.
    shape = (20, 1024, 1024)
    cfg = plan_model("small", 1, 2, shape=shape)
    assert cfg.geometry.z.min_input <= 10
    assert cfg.pool_sizes[0][0] == 1
    out = patch_output_size(cfg, "small", shape)
    inp = cfg.geometry.input_for_output(out)
    # The output fits the stack (all 20 sections), the input the preset's budget; its z margin
    # reaches past the stack, reflected as at inference.
    assert out[0] == 20 and inp is not None and inp[0] > 20
    assert all(i <= b for i, b in zip(inp, PRESETS["small"]["patch_input"]))


def test_too_small_volume_message():
    cfg = ModelConfig(1, 2)
    with pytest.raises(SparsesegError, match="too small for one valid patch"):
        patch_output_size(cfg, "paper", (30, 40, 40))


def test_bad_config():
    with pytest.raises(SparsesegError):
        ModelConfig(1, 2, kernel_sizes=((2, 2, 2),) * 4)
    with pytest.raises(SparsesegError):
        ModelConfig(1, 2, padding="full")


def test_labels_on_separate_sections_train_one_section_deep():
    # ISBI's shape, every 6th section painted: the 3D network keeps z kernels only where its input
    # stays within 5 sections and trains on one-section patches (the deeper outputs would hold
    # no label); without that hint the plan and the patch are as before.
    shape = (30, 512, 512)
    thick = plan_model("small", 1, 2, shape=shape)
    thin = plan_model("small", 1, 2, shape=shape, sections=True)
    assert thick.geometry.z.min_input == 13 and thin.geometry.z.min_input == 5
    assert [k[0] for k in thin.kernel_sizes] == [1, 1, 3]
    assert patch_output_size(thick, "small", shape)[0] > 1
    out = patch_output_size(thin, "small", shape, sections=True)
    # one section deep, wider in plane (the preset's section_input: 132 -> 92 against 92 -> 52)
    assert out == (1, 92, 92) and patch_output_size(thin, "small", shape)[1:] == (52, 52)
    assert thin.geometry.input_for_output(out)[0] == 5
    # a 2D network's patch is one section by nature: it gets the same in-plane size, so 2D and 3D
    # see as many labelled voxels per step (with or without the hint)
    flat = plan_model("small", 1, 2, ndim=2, shape=shape)
    flat_out = patch_output_size(flat, "small", shape)
    assert flat_out[1:] == patch_output_size(flat, "small", shape, sections=True)[1:] == out[1:]
    # a cube keeps its network (z is not thin) and trains in the smallest valid depth
    cube = plan_model("small", 1, 2, shape=(64, 64, 64), sections=True)
    assert cube.kernel_sizes == plan_model("small", 1, 2, shape=(64, 64, 64)).kernel_sizes
    assert patch_output_size(cube, "small", (64, 64, 64), sections=True)[0] == cube.geometry.z.min_output
