"""sparseseg-suggest: greedy max-cover, block-wise reading, annotated slices, template, CLI."""

import itertools
import json
import math

import numpy as np
import pytest

from tests.helpers import run_cli as run
import zarr

from sparseseg.errors import SparsesegError
from sparseseg.suggest.annotated import annotated_slices, find_annotated, label_projections
from sparseseg.suggest.cover import cosine_similarity, coverage, greedy_max_cover, lazy_greedy_max_cover
from sparseseg.suggest.features import AutoencoderConfig, autoencoder_features, filterbank_features
from sparseseg.suggest.planes import block_shape, reduce_volume, shrink_factors
from sparseseg.suggest.run import SuggestConfig, suggest
from sparseseg.volume import Volume, open_volume


def _err(code, out, text):
    assert code == 1, out
    assert out.startswith("error: ") and text in out and "Traceback" not in out and out.count("\n") == 1, out


# ---------------------------------------------------------------- max-cover

@pytest.mark.parametrize("seed", range(4))
def test_lazy_greedy_equals_plain_greedy(seed):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(120, 6)) + rng.normal(size=(1, 6))
    sim = cosine_similarity(feats)
    pre = [] if seed % 2 else list(rng.choice(120, 5, replace=False))
    lazy, plain = lazy_greedy_max_cover(sim, 40, pre), greedy_max_cover(sim, 40, pre)
    assert [p.index for p in lazy] == [p.index for p in plain]
    assert np.allclose([p.gain for p in lazy], [p.gain for p in plain])
    assert not set(pre) & {p.index for p in lazy}


def test_lazy_greedy_ties_pick_lowest_index_like_plain():
    feats = np.repeat(np.eye(4), 3, axis=0)  # 4 groups of 3 identical slices
    sim = cosine_similarity(feats)
    lazy, plain = lazy_greedy_max_cover(sim, 12), greedy_max_cover(sim, 12)
    assert [p.index for p in lazy] == [p.index for p in plain] == [0, 3, 6, 9, 1, 2, 4, 5, 7, 8, 10, 11]
    assert [p.gain for p in lazy[4:]] == [0.0] * 8


def test_cover_monotone_with_marginal_gains():
    rng = np.random.default_rng(5)
    sim = cosine_similarity(rng.random((60, 10)))
    assert sim.min() >= 0 and sim.max() <= 1 and np.allclose(np.diag(sim), 1)
    picks = lazy_greedy_max_cover(sim, 60)
    assert sorted(p.index for p in picks) == list(range(60))
    chosen, f_prev = [], 0.0
    for p in picks:
        chosen.append(p.index)
        f = coverage(sim, chosen)
        assert f >= f_prev - 1e-9 and f == pytest.approx(f_prev + p.gain, abs=1e-6)
        f_prev = f
    assert f_prev == pytest.approx(60.0)  # every slice covers itself fully
    gains = [p.gain for p in picks]
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(gains))  # submodular: greedy gains never grow
    # the first pick is the slice most similar to all
    assert picks[0].index == int(np.argmax(sim.sum(axis=1)))


def test_lazy_greedy_is_fast_on_thousands_of_slices():
    import time

    rng = np.random.default_rng(1)
    sim = cosine_similarity(rng.normal(size=(3000, 16)))
    t = time.perf_counter()
    picks = lazy_greedy_max_cover(sim, 300)
    assert len(picks) == 300 and time.perf_counter() - t < 20


# ---------------------------------------------------------------- block-wise reading

class CountingArray:
    """A (Z, Y, X) array that records every read and refuses reads larger than `limit` voxels."""

    def __init__(self, data, limit, chunks=None):
        self.data, self.limit, self.reads = data, limit, []
        self.shape, self.dtype = data.shape, data.dtype
        if chunks:
            self.chunks = chunks

    def __getitem__(self, key):
        out = self.data[key]
        assert out.size <= self.limit, f"read {out.shape} exceeds {self.limit} voxels"
        self.reads.append(out.size)
        return out


def _reference(data, f, plane):
    """Shrink every slice of one plane directly from the whole array (the expected answer)."""
    def mean(a, axis, k):
        n = a.shape[axis]
        idx = np.arange(0, n, k)
        return np.add.reduceat(a, idx, axis=axis) / (np.minimum(idx + k, n) - idx).reshape(
            [-1 if i == axis else 1 for i in range(a.ndim)])
    d = data.astype(np.float64)
    if plane == "xy":
        return mean(mean(d, 1, f[1]), 2, f[2])
    if plane == "xz":
        return mean(mean(d, 0, f[0]), 2, f[2]).transpose(1, 0, 2)
    return mean(mean(d, 0, f[0]), 1, f[1]).transpose(2, 0, 1)


def test_reduce_reads_blockwise_each_voxel_once_and_matches_whole_volume():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (37, 50, 45)).astype(np.uint8)
    arr = CountingArray(data, limit=4096, chunks=(8, 16, 16))
    stacks = reduce_volume(Volume(arr, False, None, "mem"), ("xy", "xz", "yz"), size=16, max_block_voxels=4096)
    assert sum(arr.reads) == data.size and len(arr.reads) > 10
    f = shrink_factors(data.shape, 16)
    assert f == (3, 4, 3)
    for p in ("xy", "xz", "yz"):
        ref = _reference(data, f, p)
        assert stacks[p].shape == (ref.shape[0], 1) + ref.shape[1:]
        assert np.allclose(stacks[p][:, 0], ref, atol=1e-4), p


def test_block_plan_for_a_2048_cube_stays_bounded():
    shape = (2048, 2048, 2048)
    f = shrink_factors(shape, 256)
    block = block_shape(shape, f, (64, 64, 64), 1 << 24)
    assert math.prod(block) <= 1 << 24 and all(b % k == 0 for b, k in zip(block, f))
    assert all(b % 64 == 0 for b in block)
    # per-plane stacks: 2048 slices of 256x256 floats each, 1/64 of the voxels per plane
    assert 3 * 2048 * 256 * 256 * 4 < 2 ** 31


def test_reduce_reads_a_zarr_lazily(tmp_path):
    rng = np.random.default_rng(2)
    z = zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=(24, 40, 40), chunks=(8, 20, 20), dtype="uint16")
    z[...] = rng.integers(0, 1000, z.shape)
    vol = open_volume(tmp_path / "v.zarr")
    counting = CountingArray(vol.array, limit=3200)
    vol.array = counting
    stacks = reduce_volume(vol, ("xy",), size=256, max_block_voxels=3200)
    assert sum(counting.reads) == 24 * 40 * 40
    assert np.allclose(stacks["xy"][:, 0], z[...])


# ---------------------------------------------------------------- features

def _two_regimes(shape=(16, 48, 48), seed=0):
    """Slices 0..7: fine noise; 8..15: smooth blobs. A good selection takes one of each."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape)
    b = ndi.gaussian_filter(rng.normal(size=shape), (0, 4, 4)) * 8
    vol = np.where(np.arange(shape[0])[:, None, None] < shape[0] // 2, a, b)
    return (vol * 30 + 100).astype(np.float32)


def test_filterbank_separates_textures():
    vol = _two_regimes()
    feats = filterbank_features(vol[:, None])
    sim = cosine_similarity(feats)
    within = sim[:8, :8].mean(), sim[8:, 8:].mean()
    assert min(within) > sim[:8, 8:].mean() + 0.05
    picks = lazy_greedy_max_cover(sim, 2)
    assert {p.index < 8 for p in picks} == {True, False}


def test_autoencoder_features_seeded_and_bounded():
    stacks = {"xy": _two_regimes()[:, None]}
    cfg = AutoencoderConfig(steps=3, seconds=30, size=32, batch=8, seed=3)
    f1, info = autoencoder_features(stacks, cfg)
    f2, _ = autoencoder_features(stacks, cfg)
    assert info["steps"] == 3 and f1["xy"].shape[0] == 16 and (f1["xy"] >= 0).all()
    assert np.array_equal(f1["xy"], f2["xy"])


# ---------------------------------------------------------------- annotated slices

def test_annotated_slices_per_plane(tmp_path):
    lab = np.full((12, 20, 18), 255, np.uint8)
    lab[3] = 1                      # a whole xy slice
    lab[:, :, 5] = 0                # a whole yz slice
    lab[2:6, 7, 9:12] = 2           # a scribble on xz slice y=7
    lab[9, 4:6, 2:4] = 1            # a small patch on xy slice z=9
    # (a 1-voxel-wide line would be as much a yz scribble as an xy one: the denser reading wins)
    np.save(tmp_path / "l.npy", lab)
    vol = open_volume(tmp_path / "l.npy")
    found = find_annotated(vol, lab.shape)
    assert found == {"xy": [3, 9], "xz": [7], "yz": [5]}
    small = label_projections(vol, 255, max_block_voxels=200)  # many blocks, same counts
    assert annotated_slices(*small) == found
    with pytest.raises(SparsesegError, match="shape"):
        find_annotated(vol, (12, 20, 19))


def test_suggestions_add_to_annotated_slices(tmp_path):
    vol = _two_regimes()
    np.save(tmp_path / "img.npy", vol)
    lab = np.full(vol.shape, 255, np.uint8)
    lab[2, 10:20, 10:20] = 1  # one painted slice of the noisy half
    np.save(tmp_path / "lab.npy", lab)
    res = suggest(tmp_path / "img.npy", SuggestConfig(budget=1, planes=("xy",)), annotated=tmp_path / "lab.npy")
    xy = res["planes"]["xy"]
    assert xy["annotated"] == [2] and xy["coverage_before"] > 0
    assert xy["suggested"][0]["index"] >= 8  # the other texture, not another noisy slice


# ---------------------------------------------------------------- command line

def test_cli_json_and_template(tmp_path):
    np.save(tmp_path / "img.npy", _two_regimes())
    code, out = run("suggest", tmp_path / "img.npy", "--budget", "3", "--json", "--template", tmp_path / "t.zarr")
    assert code == 0, out
    res = json.loads(out)  # exactly one JSON object, nothing else on stdout
    assert set(res["planes"]) == {"xy", "xz", "yz"}
    assert [len(r["suggested"]) for r in res["planes"].values()] == [3, 3, 3]
    assert len({s["index"] for s in res["planes"]["xy"]["suggested"]}) == 3
    t = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    arr = t["0"]
    assert arr.shape == (16, 48, 48) and arr.dtype == np.uint8 and (arr[...] == 255).all()
    meta = dict(t.attrs)["sparseseg"]
    assert len(meta["suggested_slices"]) == 9 and meta["ignore_label"] == 255
    assert {"plane", "index", "gain"} <= set(meta["suggested_slices"][0])
    assert open_volume(tmp_path / "t.zarr").shape == (16, 48, 48)  # readable as OME-Zarr
    code, out = run("suggest", tmp_path / "img.npy", "--budget", "25%", "--planes", "xy")
    assert code == 0 and out.count("z=") == 4, out


def test_cli_template_copies_annotations(tmp_path):
    np.save(tmp_path / "img.npy", _two_regimes())
    lab = np.full((16, 48, 48), 255, np.uint8)
    lab[4, :10, :10] = 2
    np.save(tmp_path / "lab.npy", lab)
    code, out = run("suggest", tmp_path / "img.npy", "--budget", "2", "--planes", "xy", "--annotated",
                    tmp_path / "lab.npy", "--template", tmp_path / "t.zarr")
    assert code == 0, out
    assert np.array_equal(open_volume(tmp_path / "t.zarr").read_labels(), lab)
    assert "z=4 " not in out


def test_cli_bad_inputs(tmp_path):
    np.save(tmp_path / "img.npy", _two_regimes())
    img = tmp_path / "img.npy"
    _err(*run("suggest", img, "--budget", "17", "--planes", "xy"), "larger than the 16 slices")
    _err(*run("suggest", img, "--budget", "0"), "positive integer")
    _err(*run("suggest", img, "--budget", "2", "--planes", "xy,ab"), "unknown plane")
    np.save(tmp_path / "two_d.npy", np.zeros((30, 40), np.float32))
    _err(*run("suggest", tmp_path / "two_d.npy", "--budget", "1", "--planes", "xy,xz"), "plane xz does not exist")
    code, out = run("suggest", tmp_path / "two_d.npy", "--budget", "1")  # default planes: those it has
    assert code == 0 and "z=0" in out and "plane xz" not in out, out
    bad = _two_regimes()
    bad[3, 4, 5] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    _err(*run("suggest", tmp_path / "nan.npy", "--budget", "1"), "NaN")
    np.save(tmp_path / "empty.npy", np.zeros((0, 40, 40), np.float32))
    _err(*run("suggest", tmp_path / "empty.npy", "--budget", "1"), "empty")
    np.save(tmp_path / "lab.npy", np.full((16, 48, 47), 255, np.uint8))
    _err(*run("suggest", img, "--budget", "1", "--annotated", tmp_path / "lab.npy"), "shape")
    full = np.full((16, 48, 48), 255, np.uint8)
    full[:15] = 0
    np.save(tmp_path / "most.npy", full)
    _err(*run("suggest", img, "--budget", "2", "--planes", "xy", "--annotated", tmp_path / "most.npy"),
         "15 already annotated")
    # an existing template is refused and left exactly as it was
    (tmp_path / "t.zarr").mkdir()
    (tmp_path / "t.zarr" / "keep.txt").write_text("mine")
    _err(*run("suggest", img, "--budget", "1", "--template", tmp_path / "t.zarr"), "--overwrite")
    assert (tmp_path / "t.zarr" / "keep.txt").read_text() == "mine"
    code, out = run("suggest", img, "--budget", "1", "--template", tmp_path / "t.zarr", "--overwrite")
    assert code == 0 and not (tmp_path / "t.zarr" / "keep.txt").exists()


def test_suggest_end_to_end_never_reads_more_than_a_block(tmp_path, monkeypatch):
    """Image, annotated labels and the template copy all go through bounded reads."""
    import sparseseg.suggest.run as run_mod

    rng = np.random.default_rng(4)
    image = CountingArray(rng.random((2, 24, 40, 36)).astype(np.float32), limit=2 * 2000)
    image.chunks = (2, 4, 8, 8)
    lab = np.full((24, 40, 36), 255, np.uint8)
    lab[5, 3:9, 4:20] = 1
    labels = CountingArray(lab, limit=2000)
    vols = {"img": Volume(image, True, None, "img"), "lab": Volume(labels, False, None, "lab")}
    monkeypatch.setattr(run_mod, "open_image", lambda p: vols[str(p)])
    cfg = SuggestConfig(budget=3, max_block_voxels=2000, size=16)
    res = suggest("img", cfg, annotated="lab", template=tmp_path / "t.zarr")
    assert sum(image.reads) == image.data.size and sum(labels.reads) >= 2 * lab.size
    assert res["planes"]["xy"]["annotated"] == [5]
    assert [len(r["suggested"]) for r in res["planes"].values()] == [3, 3, 3]
    assert np.array_equal(open_volume(tmp_path / "t.zarr").read_labels(), lab)
