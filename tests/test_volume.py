import json

import numpy as np
import pytest
import tifffile
import zarr

from sparseseg.errors import SparsesegError
from sparseseg.volume import open_volume, write_ome_zarr


def test_formats_round_trip(tmp_path):
    data = np.arange(2 * 3 * 4 * 5, dtype=np.uint16).reshape(2, 3, 4, 5)
    np.save(tmp_path / "a.npy", data)
    tifffile.imwrite(tmp_path / "a.tif", data[0])
    zarr.save_array(str(tmp_path / "a.zarr"), data)
    write_ome_zarr(tmp_path / "ome.zarr", data[0], voxel_size=(50.0, 4.0, 4.0))
    assert np.array_equal(open_volume(tmp_path / "a.npy").read(), data)
    assert np.array_equal(open_volume(tmp_path / "a.tif").read(), data[:1])
    v = open_volume(tmp_path / "a.zarr")
    assert v.channels == 2 and v.shape == (3, 4, 5)
    assert np.array_equal(v.read((slice(1, 3), slice(0, 2), slice(None))), data[:, 1:3, 0:2])
    ome = open_volume(tmp_path / "ome.zarr")
    assert ome.voxel_size == (50.0, 4.0, 4.0) and np.array_equal(ome.read_labels(), data[0])
    inner = open_volume(f"{tmp_path / 'ome.zarr'}:0")
    assert inner.voxel_size == (50.0, 4.0, 4.0)
    attrs = json.loads((tmp_path / "ome.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["ome"]["version"] == "0.5"


def test_ome_tczyx(tmp_path):
    g = zarr.open_group(str(tmp_path / "t.zarr"), mode="w")
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n} for n in "tczyx"],
                               "datasets": [{"path": "s0", "coordinateTransformations": [
                                   {"type": "scale", "scale": [1, 1, 3.0, 2.0, 2.0]}]}]}]
    g.create_array("s0", shape=(1, 2, 4, 5, 6), dtype="float32")
    v = open_volume(tmp_path / "t.zarr")
    assert v.channels == 2 and v.shape == (4, 5, 6) and v.voxel_size == (3.0, 2.0, 2.0)


def test_errors(tmp_path):
    with pytest.raises(SparsesegError, match="no such file"):
        open_volume(tmp_path / "missing.zarr")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SparsesegError, match="unknown volume format"):
        open_volume(tmp_path / "x.txt")
    np.save(tmp_path / "c.npy", np.zeros((2, 2), complex))
    with pytest.raises(SparsesegError, match="unsupported dtype"):
        open_volume(tmp_path / "c.npy")
    np.save(tmp_path / "2d.npy", np.zeros((4, 4)))
    with pytest.raises(SparsesegError, match="expected axes"):
        open_volume(tmp_path / "2d.npy")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(SparsesegError, match="bad.tif"):
        open_volume(tmp_path / "bad.tif")
    write_ome_zarr(tmp_path / "o.zarr", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(SparsesegError, match="exists"):
        write_ome_zarr(tmp_path / "o.zarr", np.zeros((2, 2, 2), np.uint8))


def test_store_paths_and_urls():
    from sparseseg.volume import join_store_path, split_store_path, storage_options_from

    assert split_store_path("v.zarr:labels/0") == ("v.zarr", "labels/0")
    assert split_store_path("s3://bucket/v.zarr#labels/0") == ("s3://bucket/v.zarr", "labels/0")
    assert split_store_path("s3://bucket/v.zarr/") == ("s3://bucket/v.zarr", None)   # the colon is the URL's
    assert split_store_path("http://host:8000/v.zarr") == ("http://host:8000/v.zarr", None)
    for p in ("v.zarr:0", "s3://b/v.zarr#0", "gs://b/v.zarr"):
        assert join_store_path(*split_store_path(p)) == p
    assert storage_options_from('{"anon": true}') == {"anon": True} and storage_options_from(None) == {}
    for bad in ("{anon", "[1]"):
        with pytest.raises(SparsesegError, match="--storage-options"):
            storage_options_from(bad)


def test_file_urls_and_input_path(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    write_ome_zarr(tmp_path / "v.zarr", data)
    for vol in (open_volume(f"file://{tmp_path / 'v.zarr'}"), open_volume(tmp_path / "v.zarr", inner="0"),
                open_volume(f"file://{tmp_path / 'v.zarr'}#0")):
        assert np.array_equal(vol.read_labels(), data)
    with pytest.raises(SparsesegError, match="already names a path"):
        open_volume(f"{tmp_path / 'v.zarr'}:0", inner="0")


def test_chunk_cache_serves_a_neighbouring_read(tmp_path):
    data = np.arange(16 * 16 * 16, dtype=np.uint16).reshape(16, 16, 16)
    write_ome_zarr(tmp_path / "v.zarr", data, chunks=(8, 8, 8))
    vol = open_volume(tmp_path / "v.zarr", cache_bytes=1 << 20)
    cache = vol.chunk_cache
    opened = cache.misses                                      # metadata documents
    a = (slice(0, 16), slice(0, 16), slice(0, 10))             # all 8 chunks
    b = (slice(0, 16), slice(0, 16), slice(6, 16))             # the same 8 again: no new read
    assert np.array_equal(vol.read(a)[0], data[a]) and cache.misses - opened == 8
    hits = cache.hits
    assert np.array_equal(vol.read(b)[0], data[b]) and cache.misses - opened == 8 and cache.hits - hits == 8
    small = open_volume(tmp_path / "v.zarr", cache_bytes=1)    # too small to keep anything
    opened = small.chunk_cache.misses
    small.read(a), small.read(b)
    assert small.chunk_cache.misses - opened == 16
