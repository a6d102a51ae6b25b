"""One reader for every volume the trainer and the engine touch: zarr arrays, OME-Zarr
multiscale groups, TIFF and .npy, with axes (Z, Y, X) or (C, Z, Y, X); and one writer for
OME-Zarr (NGFF 0.5, zarr v3) outputs.

Reading is lazy where the format allows (zarr, .npy memory maps), so the engine can read
one block with its halo from a terabyte store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparseseg.errors import SparsesegError, first_line
from sparseseg.fsutil import atomic_path

SUPPORTED_DTYPES = {
    np.dtype(t) for t in ("bool", "uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32",
                          "float64")
}


@dataclass
class Volume:
    """A lazily read volume with explicit axes.

    `array` is indexable with (C, Z, Y, X) slices when `has_channels`, else (Z, Y, X).
    """

    array: object
    has_channels: bool
    voxel_size: tuple[float, float, float] | None
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (Z, Y, X)."""
        return tuple(int(s) for s in self.array.shape[-3:])

    @property
    def channels(self) -> int:
        return int(self.array.shape[0]) if self.has_channels else 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, region=None, dtype=None) -> np.ndarray:
        """Read a spatial region (tuple of 3 slices) as (C, z, y, x)."""
        region = tuple(region) if region is not None else (slice(None),) * 3
        cache = getattr(self, "chunk_cache", None)
        if cache is not None:
            cache.start_read()
        if self.has_channels:
            out = np.asarray(self.array[(slice(None),) + region])
        else:
            out = np.asarray(self.array[region])[None]
        if cache is not None:
            cache.end_read()
        return out.astype(dtype, copy=False) if dtype is not None else out

    def read_labels(self) -> np.ndarray:
        """Whole volume as a single-channel (Z, Y, X) array (labels have no channel axis)."""
        if self.has_channels:
            if self.channels != 1:
                raise SparsesegError(f"{self.source}: labels must have one channel, found {self.channels}")
            return np.asarray(self.array[0])
        return np.asarray(self.array[...])


def is_url(path) -> bool:
    """A store URL zarr opens through fsspec (s3://, gs://, http(s)://, file://, ...)."""
    return "://" in str(path)


def split_store_path(path: str) -> tuple[str, str | None]:
    """`store.zarr:sub/path` -> ("store.zarr", "sub/path"); plain paths have no inner part.

    URLs carry their inner path after `#` (`s3://bucket/v.zarr#sub/path`): a colon is part of
    every URL, so `store:path` would be ambiguous there."""
    s = str(path)
    if is_url(s):
        store, _, inner = s.partition("#")
        return store.rstrip("/"), inner.strip("/") or None
    # A Windows drive letter ("C:\\...") is not an inner path.
    if ":" in s and not (len(s) > 1 and s[1] == ":" and s.count(":") == 1):
        store, inner = s.rsplit(":", 1)
        return store, inner or None
    return s, None


def join_store_path(store: str, inner: str | None) -> str:
    """The inverse of split_store_path."""
    if not inner:
        return str(store)
    return f"{store}#{inner}" if is_url(store) else f"{store}:{inner}"


def storage_options_from(text: str | None) -> dict:
    """`--storage-options JSON` -> dict (fsspec keyword arguments, e.g. endpoint_url, anon)."""
    if not text:
        return {}
    import json

    try:
        opts = json.loads(text)
    except ValueError as e:
        raise SparsesegError(f"--storage-options is not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise SparsesegError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return opts


def store_error(e: BaseException) -> str:
    """One line for an exception raised by zarr/fsspec/botocore/aiohttp while opening a store."""
    name = type(e).__name__
    text = first_line(e)
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return "no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or pass --storage-options)"
    if name in ("GroupNotFoundError", "ArrayNotFoundError", "NodeNotFoundError", "FileNotFoundError"):
        return "no zarr array or group there"
    if isinstance(e, PermissionError):
        return f"permission denied ({text})" if text else "permission denied"
    if isinstance(e, ImportError):
        return text            # "Install s3fs to access S3" and the like
    return f"{name}: {text}" if text else name


def _multiscales(attrs) -> list | None:
    attrs = dict(attrs)
    if "ome" in attrs and isinstance(attrs["ome"], dict):  # NGFF 0.5
        return attrs["ome"].get("multiscales")
    return attrs.get("multiscales")  # NGFF <= 0.4


def _scale_of(ms: dict, dataset_path: str) -> list | None:
    for ds in ms.get("datasets", []):
        if str(ds.get("path")) == dataset_path:
            for t in ds.get("coordinateTransformations", []):
                if t.get("type") == "scale":
                    return list(t["scale"])
    return None


class _ChunkCache:
    """Made a zarr WrapperStore subclass on first use (zarr is imported lazily): an LRU of whole
    objects read from the input store. A block reads its halo's chunks whole, and the next block
    of the same task needs most of them again (with input chunks as large as the blocks, 18 of
    its 27): a worker keeps them instead of fetching them again."""

    cls = None

    @classmethod
    def wrap(cls, store, max_bytes: int):
        if cls.cls is None:
            from collections import OrderedDict

            from zarr.storage import WrapperStore

            class ChunkCache(WrapperStore):
                def __init__(self, store, max_bytes: int = 256 << 20):
                    super().__init__(store)
                    self.max_bytes, self.used, self.hits, self.misses = max_bytes, 0, 0, 0
                    self._lru = OrderedDict()
                    # Kept: twice the largest single read's chunks (the next block's halo overlaps
                    # this one's), never more than max_bytes: memory follows the block, not the volume.
                    self.limit, self._read_bytes, self._largest = max_bytes, 0, 0

                def start_read(self):
                    self._read_bytes = 0

                def end_read(self):
                    self._largest = max(self._largest, self._read_bytes)
                    self.limit = min(self.max_bytes, 2 * self._largest)
                    self._evict()

                def _evict(self):
                    while self.used > self.limit and self._lru:
                        _, old = self._lru.popitem(last=False)
                        self.used -= len(old)

                def _with_store(self, store):
                    return type(self)(store, self.max_bytes)

                async def get(self, key, prototype, byte_range=None):
                    if byte_range is not None:          # partial reads (shards) go straight through
                        return await self._store.get(key, prototype, byte_range)
                    buf = self._lru.get(key)
                    if buf is not None:
                        self._lru.move_to_end(key)
                        self.hits += 1
                        self._read_bytes += len(buf)
                        return buf
                    buf = await self._store.get(key, prototype, byte_range)
                    self.misses += 1
                    if buf is not None and len(buf) <= self.max_bytes:
                        self._read_bytes += len(buf)
                        self._lru[key] = buf
                        self.used += len(buf)
                        if self.used > self.max_bytes:
                            self.limit = min(self.limit, self.max_bytes)
                            self._evict()
                    return buf

            cls.cls = ChunkCache
        return cls.cls(store, max_bytes)


def _open_zarr(store: str, inner: str | None, source: str, storage_options=None, cache_bytes: int = 0) -> Volume:
    import zarr

    kwargs = {"storage_options": storage_options} if storage_options and is_url(store) else {}
    cache = None
    try:
        if cache_bytes:
            from zarr.storage import FsspecStore, LocalStore

            base = (FsspecStore.from_url(store, storage_options=storage_options or None, read_only=True)
                    if is_url(store) else LocalStore(store, read_only=True))
            cache = _ChunkCache.wrap(base, cache_bytes)
            store, kwargs = cache, {}
        node = zarr.open(store, mode="r", path=inner or "", **kwargs)
    except Exception as e:  # zarr, fsspec and the network raise many unrelated types
        raise SparsesegError(f"cannot open zarr store {source}: {store_error(e)}") from None
    axes_names = None
    scale = None
    if isinstance(node, zarr.Group):
        ms = _multiscales(node.attrs)
        if not ms:
            arrays = sorted(k for k, _ in node.arrays())
            raise SparsesegError(
                f"{source} is a zarr group without OME-Zarr multiscales metadata; name an array inside it "
                f"as {join_store_path(store, 'NAME')} (arrays: {', '.join(arrays) or 'none'})")
        ms = ms[0]
        level = str(ms["datasets"][0]["path"])
        axes_names = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])] or None
        scale = _scale_of(ms, level)
        node = node[level]
    else:
        # An array inside a multiscales group: take the scale from its parent's metadata.
        parent_path, _, name = (inner or "").rpartition("/")
        if inner:
            try:
                parent = zarr.open_group(store, mode="r", path=parent_path, **kwargs)
                ms = _multiscales(parent.attrs)
                if ms:
                    axes_names = [a["name"] if isinstance(a, dict) else a for a in ms[0].get("axes", [])] or None
                    scale = _scale_of(ms[0], name)
            except Exception:
                pass  # no parent group: a bare array has no scale
    vol = _wrap(node, axes_names, scale, source)
    vol.chunk_cache = cache
    return vol


def _wrap(arr, axes_names, scale, source) -> Volume:
    if np.dtype(arr.dtype) not in SUPPORTED_DTYPES:
        raise SparsesegError(f"{source}: unsupported dtype {arr.dtype} (use integer or float data)")
    nd = len(arr.shape)
    voxel = None
    if axes_names and len(axes_names) == nd:
        names = [str(a).lower() for a in axes_names]
        if names[-3:] != ["z", "y", "x"]:
            raise SparsesegError(f"{source}: spatial axes must end in z, y, x (found {names})")
        lead = names[:-3]
        # Drop a singleton time axis; keep a channel axis.
        if "t" in lead:
            ti = lead.index("t")
            if arr.shape[ti] != 1:
                raise SparsesegError(f"{source}: time series with {arr.shape[ti]} points are not supported")
            idx = tuple(0 if i == ti else slice(None) for i in range(nd))
            arr = _Sliced(arr, idx)
            lead = [n for n in lead if n != "t"]
            if scale:
                scale = [s for i, s in enumerate(scale) if i != ti]
        nd = len(arr.shape)
        if scale and len(scale) >= 3:
            voxel = tuple(float(s) for s in scale[-3:])
    if nd == 3:
        return Volume(arr, False, voxel, source)
    if nd == 4:
        return Volume(arr, True, voxel, source)
    if nd == 5 and arr.shape[0] == 1:
        return Volume(_Sliced(arr, (0,)), True, voxel, source)
    raise SparsesegError(f"{source}: expected axes (Z, Y, X) or (C, Z, Y, X), got shape {tuple(arr.shape)}")


class _Sliced:
    """A lazy fixed index into an array (drops singleton leading axes without reading)."""

    def __init__(self, arr, index):
        self._arr, self._index = arr, index
        probe = [s for i, s in enumerate(arr.shape) if i >= len(index) or isinstance(index[i], slice)]
        self.shape = tuple(probe)
        self.dtype = arr.dtype

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        full, k = [], iter(key)
        for i in range(len(self._arr.shape)):
            if i < len(self._index) and not isinstance(self._index[i], slice):
                full.append(self._index[i])
            else:
                full.append(next(k, slice(None)))
        return self._arr[tuple(full)]


def _tiff_voxel_size(tif) -> tuple[float, float, float] | None:
    try:
        ij = tif.imagej_metadata or {}
        page = tif.pages[0]
        xr = page.tags.get("XResolution")
        yr = page.tags.get("YResolution")
        if "spacing" not in ij or xr is None or yr is None:
            return None
        x = xr.value[1] / xr.value[0]
        y = yr.value[1] / yr.value[0]
        return (float(ij["spacing"]), float(y), float(x))
    except Exception:
        return None  # metadata is optional; a malformed tag just means "unknown"


def open_volume(path, storage_options=None, inner=None, cache_bytes: int = 0) -> Volume:
    """Open a volume lazily. `path` may be `store.zarr`, `store.zarr:inner/array`, `.tif`, `.npy`,
    or a zarr URL (`s3://bucket/v.zarr#inner/array`, gs://, http(s)://, file://) opened through
    fsspec with `storage_options` (else credentials and endpoint come from the environment).
    `inner` names the array or group inside the store (the CLI's --input-path). `cache_bytes`:
    keep up to that many bytes of recently read zarr chunks (the engine's workers)."""
    store, inner_in_path = split_store_path(str(path))
    if inner and inner_in_path:
        raise SparsesegError(f"{path} already names a path inside the store; drop --input-path {inner}")
    inner = (inner or inner_in_path or "").strip("/") or None
    source = join_store_path(store, inner)
    if is_url(store) and not store.startswith("file://"):
        return _open_zarr(store, inner, source, storage_options, cache_bytes)
    store = store.removeprefix("file://")
    p = Path(store)
    if not p.exists():
        raise SparsesegError(f"no such file or directory: {store}")
    suffix = p.suffix.lower()
    if p.is_dir() or suffix in (".zarr", ".zr3"):
        return _open_zarr(store, inner, source, cache_bytes=cache_bytes)
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(store) as tif:
                arr = tif.asarray()
                voxel = _tiff_voxel_size(tif)
        except Exception as e:
            raise SparsesegError(f"cannot read TIFF {store}: {e}".splitlines()[0]) from None
        vol = _wrap(arr, None, None, source)
        vol.voxel_size = voxel
        return vol
    if suffix == ".npy":
        try:
            arr = np.load(store, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise SparsesegError(f"cannot read {store}: {e}".splitlines()[0]) from None
        return _wrap(arr, None, None, source)
    raise SparsesegError(f"{store}: unknown volume format (use .zarr, OME-Zarr, .tif/.tiff or .npy)")


def check_finite(data: np.ndarray, what: str) -> None:
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise SparsesegError(f"{what} contains NaN or Inf values")


# ---------------------------------------------------------------- writing


def ngff_attrs(name: str, voxel_size, ndim_lead: int = 0) -> dict:
    """NGFF 0.5 `ome` attributes for a single-scale image with axes ([c,] z, y, x)."""
    axes = ([{"name": "c", "type": "channel"}] if ndim_lead else []) + [
        {"name": a, "type": "space"} for a in ("z", "y", "x")]
    scale = ([1.0] if ndim_lead else []) + [float(s) for s in (voxel_size or (1.0, 1.0, 1.0))]
    return {"ome": {"version": "0.5", "multiscales": [{
        "name": name, "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }]}}


def create_ome_zarr(path, shape, dtype, chunks, voxel_size=None, name="labels", extra_attrs=None):
    """Create an OME-Zarr (zarr v3, NGFF 0.5) image group with one level `0`; returns the array."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    attrs = ngff_attrs(name, voxel_size, ndim_lead=len(shape) - 3)
    if extra_attrs:
        attrs.update(extra_attrs)
    group.attrs.update(attrs)
    # NGFF 0.5 asks every array of a multiscales image to name its axes as `axes` does.
    dims = (["c"] if len(shape) == 4 else []) + ["z", "y", "x"]
    return group.create_array("0", shape=tuple(shape), dtype=dtype, chunks=tuple(chunks), fill_value=0,
                              dimension_names=dims)


def check_output(path, replace: bool, flag: str = "--overwrite") -> Path:
    """The one check before writing any output: refuse an existing path unless `replace`, and a
    missing or unwritable directory. Nothing already written is touched."""
    path = Path(path)
    if path.exists() and not replace:
        raise SparsesegError(f"{path} exists; pass {flag} to replace it")
    if not path.parent.is_dir():
        raise SparsesegError(f"output directory does not exist: {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise SparsesegError(f"output directory is not writable: {path.parent}")
    return path


def write_ome_zarr(path, data: np.ndarray, voxel_size=None, chunks=None, name="labels", overwrite=False):
    """Write a whole array as an OME-Zarr image, atomically: a temporary sibling is renamed into
    place, so an interrupted write never leaves a half-written store under the final name."""
    path = check_output(path, overwrite)
    with atomic_path(path) as tmp:
        chunks = chunks or tuple(min(s, 128) for s in data.shape)
        arr = create_ome_zarr(tmp, data.shape, data.dtype, chunks, voxel_size, name)
        arr[...] = data
    return path
