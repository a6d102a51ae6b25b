"""`suggest`: open the image, read it block-wise into per-plane slice stacks, embed, order the
slices of each plane by greedy max-cover, optionally write a template to paint."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.suggest.annotated import find_annotated
from sparseseg.suggest.cover import cosine_similarity, coverage, lazy_greedy_max_cover
from sparseseg.suggest.features import FEATURES, AutoencoderConfig, autoencoder_features, filterbank_features
from sparseseg.suggest.planes import PLANES, check_planes, parse_planes, reduce_volume
from sparseseg.suggest.template import write_template
from sparseseg.volume import Volume, check_output, open_volume, split_store_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuggestConfig:
    budget: str | int = 5             # slices per plane: N, or "P%" of the plane's slices
    planes: tuple[str, ...] | None = None  # None: every plane the image has (a 2D image: xy only)
    features: str = "filterbank"
    size: int = 256                   # slices are shrunk to at most this many pixels per side
    ignore_label: int = 255
    max_block_voxels: int = 1 << 24   # the most voxels read (and held) at once
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)


def parse_budget(budget, n_slices: int, n_annotated: int, plane: str) -> int:
    """`budget` is a count or a percentage of the plane's slices; it must fit the free slices."""
    text = str(budget).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            k = max(1, round(n_slices * pct / 100))
        else:
            k = int(text)
            if k < 1:
                raise ValueError
    except ValueError:
        raise SparsesegError(f"--budget must be a positive integer or a percentage like 10%, got {text!r}") from None
    free = n_slices - n_annotated
    if k > free:
        extra = f" ({n_annotated} already annotated)" if n_annotated else ""
        raise SparsesegError(f"--budget {k} is larger than the {free} slices of plane {plane} left to choose{extra}")
    return k


class _AddZ:
    """A 2D (Y, X) array seen lazily as (1, Y, X)."""

    def __init__(self, arr):
        self._arr, self.shape, self.dtype = arr, (1,) + tuple(arr.shape), arr.dtype
        self.chunks = (1,) + tuple(getattr(arr, "chunks", arr.shape))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        return np.asarray(self._arr[key[1:]])[None][key[0]]


def _plain_2d(path):
    """The array behind `path` if it is a plain 2D image, else None (zarr, .npy, .tif)."""
    store, inner = split_store_path(str(path))
    try:
        if store.lower().endswith(".npy"):
            arr = np.load(store, mmap_mode="r", allow_pickle=False)
        elif store.lower().endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(store)
        else:
            import zarr

            arr = zarr.open_array(store, mode="r", path=inner or "")
    except Exception:  # noqa: BLE001 - only a probe: open_volume's own error is the one reported
        return None
    return arr if len(arr.shape) == 2 else None


def open_image(path) -> Volume:
    """open_volume, plus plain 2D images as one-slice volumes (only their xy plane exists)."""
    try:
        return open_volume(path)
    except SparsesegError:
        arr = _plain_2d(path)
        if arr is None:
            raise
        return Volume(_AddZ(arr), False, None, str(path))


def suggest(image, cfg: SuggestConfig = SuggestConfig(), annotated=None, template=None,
            overwrite: bool = False) -> dict:
    """Order the slices of each plane of `image` by what they add; returns a JSON-able dict with,
    per plane, the first `budget` slices and their marginal gains."""
    t0 = time.perf_counter()
    planes = parse_planes(cfg.planes) if cfg.planes is not None else None
    if cfg.features not in FEATURES:
        raise SparsesegError(f"unknown --features {cfg.features!r} (use {', '.join(FEATURES)})")
    if template is not None:
        check_output(template, overwrite)  # fail before the long part, not after
    vol = open_image(image)
    shape = vol.shape
    if planes is None:
        planes = tuple(p for p in PLANES if min(s for a, s in enumerate(shape) if a != PLANES[p]) > 1) or ("xy",)
    check_planes(shape, planes)
    ann_vol, done = None, {p: [] for p in planes}
    if annotated is not None:
        ann_vol = open_image(annotated)
        found = find_annotated(ann_vol, shape, cfg.ignore_label, cfg.max_block_voxels)
        done = {p: found[p] for p in planes}
    budgets = {p: parse_budget(cfg.budget, shape[PLANES[p]], len(done[p]), p) for p in planes}

    stacks = reduce_volume(vol, planes, cfg.size, cfg.max_block_voxels)
    for p, st in stacks.items():
        if not np.isfinite(st).all():
            raise SparsesegError(f"{image} contains NaN or Inf values")
    t_read = time.perf_counter()
    extra = {}
    if cfg.features == "autoencoder":
        feats, extra = autoencoder_features(stacks, cfg.autoencoder)
    else:
        feats = {p: filterbank_features(s) for p, s in stacks.items()}
    t_feat = time.perf_counter()
    del stacks
    result = {"image": str(image), "shape": list(shape), "features": cfg.features, "planes": {}}
    if extra:
        result["autoencoder"] = extra
    suggestions = []
    for p in planes:
        sim = cosine_similarity(feats[p])
        n = sim.shape[0]
        picks = lazy_greedy_max_cover(sim, budgets[p], done[p])
        before = f = coverage(sim, done[p])
        rows = []
        for pk in picks:
            f += pk.gain  # F(S + i) = F(S) + gain(i)
            rows.append({"index": pk.index, "gain": round(pk.gain, 4), "coverage": round(f / n, 4)})
            suggestions.append({"plane": p, "index": pk.index, "gain": round(pk.gain, 4)})
        result["planes"][p] = {"axis": "zyx"[PLANES[p]], "slices": n, "annotated": done[p],
                               "coverage_before": round(before / n, 4), "suggested": rows}
    result["seconds"] = {"read": round(t_read - t0, 2), "features": round(t_feat - t_read, 2),
                         "total": round(time.perf_counter() - t0, 2)}
    if template is not None:
        write_template(template, shape, vol.voxel_size, suggestions, cfg.ignore_label, str(image),
                       annotated=ann_vol, overwrite=overwrite, max_block_voxels=cfg.max_block_voxels)
        result["template"] = str(template)
    return result
