"""OME-Zarr outputs that viewers open as labels (NGFF 0.5, zarr v3).

Two layouts:
  * beside the input: when the input is an OME-Zarr image group, the segmentation becomes the
    label image `IMAGE.zarr/labels/<name>` with `image-label` metadata (a colour and a class
    name per label value, `source.image` pointing back at the image), listed in
    `IMAGE.zarr/labels`; napari, Fiji/MoBIE, webKnossos and Neuroglancer then show it as labels
    over the image;
  * standalone: an OME-Zarr image group of its own (multiscales only), which stays a valid
    image for every reader; its class names are kept under the `sparseseg` attribute.

Both may carry a multiscale pyramid: level i+1 is computed from level i one output chunk at a
time (nearest neighbour for labels, so no value is invented; mean for probabilities), so memory
is bounded by a chunk, not the volume. Axes whose voxel size is more than twice the finest are
not downsampled until the others catch up (thin EM stacks keep their sections).

How the engine uses it (sparseseg/engine/run.py): `label_levels` checks a label image against
its image before anything is written; `init_label_image` (or `init_levels` for a standalone
output) writes the metadata and every level's array into the output group around the engine's
lease; blocks go into level 0; after the last block `write_pyramid(group, method)` fills the
coarser levels. `create_label_image` / `create_image` / `write_labels` do the same for a whole
array in memory (the napari writer).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.volume import check_output, open_volume

log = logging.getLogger("sparseseg.labels_zarr")

NGFF_VERSION = "0.5"
# Colours per label value (RGBA, 0..255): background transparent, then a qualitative palette
# (matplotlib's tab10 order) that stays distinguishable for the few classes this tool trains.
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def label_colours(num_classes: int) -> list[list[int]]:
    """RGBA per label value 0..num_classes-1: 0 (background) fully transparent."""
    out = [[0, 0, 0, 0]]
    for i in range(1, num_classes):
        r, g, b = _PALETTE[(i - 1) % len(_PALETTE)]
        out.append([r, g, b, 255])
    return out


def _axes(channels: bool) -> list[dict]:
    return ([{"name": "c", "type": "channel"}] if channels else []) + [
        {"name": a, "type": "space"} for a in ("z", "y", "x")]


def pyramid_factors(voxel_size, shape, levels: int) -> list[tuple[int, int, int]]:
    """Per level (after the first) the (z, y, x) downsampling factor from the previous level: 2 on
    axes whose current voxel size is at most twice the finest and that are longer than 1."""
    spacing = [float(s) for s in (voxel_size or (1.0, 1.0, 1.0))]
    size = [int(s) for s in shape]
    factors = []
    for _ in range(max(0, levels - 1)):
        finest = min(spacing)
        f = tuple(2 if (sp <= 2 * finest and n > 1) else 1 for sp, n in zip(spacing, size))
        if f == (1, 1, 1):
            break
        factors.append(f)
        spacing = [sp * fi for sp, fi in zip(spacing, f)]
        size = [math.ceil(n / fi) for n, fi in zip(size, f)]
    return factors


def level_scales(voxel_size, factors) -> list[list[float]]:
    """(z, y, x) scale of level 0 and of one level per factor."""
    scales = [[float(s) for s in (voxel_size or (1.0, 1.0, 1.0))]]
    for f in factors:
        scales.append([s * fi for s, fi in zip(scales[-1], f)])
    return scales


def multiscales_attrs(name: str, scales, channels: bool = False) -> dict:
    """The NGFF 0.5 `multiscales` entry: one dataset per level with its (z, y, x) scale."""
    datasets = [{"path": str(level), "coordinateTransformations": [
        {"type": "scale", "scale": ([1.0] if channels else []) + [float(v) for v in scale]}]}
        for level, scale in enumerate(scales)]
    ms = {"name": name, "axes": _axes(channels), "datasets": datasets}
    if len(scales) > 1:
        ms["type"] = "mean" if channels else "nearest"
    return ms


def image_label_attrs(class_names, colours=None, source_image: str | None = "../../") -> dict:
    """NGFF 0.5 `image-label`: colours and class names per label value."""
    colours = colours or label_colours(len(class_names))
    d = {"colors": [{"label-value": i, "rgba": list(map(int, c))} for i, c in enumerate(colours)],
         "properties": [{"label-value": i, "class": str(n)} for i, n in enumerate(class_names)]}
    if source_image:
        d["source"] = {"image": source_image}
    return d


def _level_shapes(shape, factors):
    shapes = [tuple(int(s) for s in shape)]
    for f in factors:
        shapes.append(tuple(math.ceil(n / fi) for n, fi in zip(shapes[-1], f)))
    return shapes


def _create_levels(group, shapes, dtype, chunks, channels: int | None, fill_value=0):
    dims = (["c"] if channels else []) + ["z", "y", "x"]
    arrays = []
    for level, s in enumerate(shapes):
        full = ((channels,) if channels else ()) + tuple(s)
        ch = ((1,) if channels else ()) + tuple(min(c, n) for c, n in zip(chunks, s))
        arrays.append(group.create_array(str(level), shape=full, dtype=dtype, chunks=ch, fill_value=fill_value,
                                         dimension_names=dims, overwrite=True))
    return arrays[0]


def _image_levels(root) -> tuple[list, list]:
    """(z, y, x) shapes and scales of every level of an OME-Zarr image group."""
    ms = root.attrs["ome"]["multiscales"][0]
    shapes, scales = [], []
    for d in ms["datasets"]:
        shapes.append(tuple(root[d["path"]].shape[-3:]))
        scales.append(next(t["scale"] for t in d["coordinateTransformations"] if t["type"] == "scale")[-3:])
    return shapes, scales


def is_ome_image(path) -> bool:
    """True for an OME-Zarr image group (NGFF 0.4 or 0.5 multiscales) at `path`."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:
        return False
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)
    return isinstance(ome, dict) and bool(ome.get("multiscales"))


def image_voxel_size(path):
    """Level-0 (z, y, x) scale of an OME-Zarr image group, or None."""
    return open_volume(str(path)).voxel_size


def label_levels(image_path, shape) -> tuple[list, list]:
    """(z, y, x) shapes and scales a label image of `shape` beside `image_path` must have: the
    image's own levels (NGFF: a label image has as many levels as its image). Checks only."""
    import zarr

    image_path = Path(image_path)
    if not is_ome_image(image_path):
        raise SparsesegError(f"{image_path} is not an OME-Zarr image group; labels can only go beside one")
    root = zarr.open_group(str(image_path), mode="r")
    if root.metadata.zarr_format != 3 or root.attrs.get("ome", {}).get("version") != NGFF_VERSION:
        # NGFF 0.4 images live in zarr v2 stores; a v3 label group inside one would be unreadable.
        raise SparsesegError(f"{image_path} is not an NGFF {NGFF_VERSION} (zarr v3) image; "
                             f"write the labels as a standalone output instead")
    shapes, scales = _image_levels(root)
    if shapes[0] != tuple(int(s) for s in shape):
        raise SparsesegError(f"labels of shape {tuple(shape)} cannot go beside image {image_path} "
                             f"of shape {shapes[0]}")
    return shapes, scales


def label_names(image_path) -> list[str]:
    """The label images listed in `image_path/labels` (NGFF `labels`)."""
    import zarr

    try:
        labels = zarr.open_group(str(Path(image_path) / "labels"), mode="r")
    except Exception:  # no labels group yet
        return []
    return list(dict(labels.attrs.get("ome", {})).get("labels", []))


def label_exists(image_path, name: str) -> bool:
    return name in label_names(image_path) or (Path(image_path) / "labels" / name).exists()


def init_label_image(image_path, name: str, chunks, class_names, dtype="uint8", colours=None,
                     extra_attrs: dict | None = None):
    """Write the label image `image_path/labels/<name>` into place without clearing what is
    already there (the engine keeps its lease under it), list it in `labels` beside the label
    images already listed, and return its level-0 array. Checks: see create_label_image."""
    import zarr

    image_path = Path(image_path)
    if not np.issubdtype(np.dtype(dtype), np.integer):
        raise SparsesegError(f"label images must have an integer dtype, got {dtype}")
    root = zarr.open_group(str(image_path), mode="r")
    shapes, scales = _image_levels(root)
    group = zarr.open_group(str(image_path / "labels" / name), mode="a", zarr_format=3)
    attrs = {"ome": {"version": NGFF_VERSION, "multiscales": [multiscales_attrs(name, scales)],
                     "image-label": image_label_attrs(class_names, colours)}}
    attrs.update(extra_attrs or {})
    group.attrs.update(attrs)
    arr = _create_levels(group, shapes, dtype, chunks, None)
    # The listing last: a viewer never finds a listed label image without its metadata.
    labels = zarr.open_group(str(image_path / "labels"), mode="a", zarr_format=3)
    names = list(dict(labels.attrs.get("ome", {})).get("labels", []))
    if name not in names:
        names.append(name)
    labels.attrs.update({"ome": {"version": NGFF_VERSION, "labels": names}})
    return arr


def create_label_image(image_path, name: str, shape, chunks, class_names, dtype="uint8", colours=None,
                       overwrite: bool = False):
    """Create `image_path/labels/<name>` (an NGFF 0.5 label image) and return its level-0 array.

    The label image mirrors the image's levels (the spec asks for the same number of levels;
    same shapes and scales, so a viewer overlays every level). Other label images are kept; an
    existing one of that name is refused unless `overwrite`.
    """
    import zarr

    image_path = Path(image_path)
    label_levels(image_path, shape)
    if not np.issubdtype(np.dtype(dtype), np.integer):
        raise SparsesegError(f"label images must have an integer dtype, got {dtype}")
    if label_exists(image_path, name) and not overwrite:
        raise SparsesegError(f"{image_path}/labels/{name} exists; pass --overwrite to replace it")
    zarr.open_group(str(image_path), mode="r+").require_group("labels").create_group(name, overwrite=True)
    return init_label_image(image_path, name, chunks, class_names, dtype, colours)


def create_image(path, shape, chunks, voxel_size=None, levels: int = 1, dtype="uint8", name="segmentation",
                 class_names=None, channels: int | None = None, extra_attrs: dict | None = None):
    """A standalone NGFF 0.5 image group at `path` (created anew) and its level-0 array.

    `channels` adds a leading channel axis (probabilities: (K, Z, Y, X)); its pyramid is meant
    for the mean. Class names go under `sparseseg.class_names`, outside the NGFF keys.
    """
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    return init_image(group, shape, chunks, voxel_size, levels, dtype, name, class_names, channels, extra_attrs)


def init_image(group, shape, chunks, voxel_size=None, levels: int = 1, dtype="uint8", name="segmentation",
               class_names=None, channels: int | None = None, extra_attrs: dict | None = None):
    """Write an NGFF 0.5 image (metadata and `levels` level arrays, the coarser ones empty until
    write_pyramid) into an open zarr v3 group, keeping whatever else the group holds; returns
    the level-0 array. See create_image."""
    shapes, scales = plan_levels(voxel_size, shape, levels)
    attrs = {"sparseseg": {"class_names": list(class_names)}} if class_names else {}
    attrs.update(extra_attrs or {})
    return init_levels(group, shapes, scales, chunks, dtype, name, channels, attrs)


def plan_levels(voxel_size, shape, levels: int) -> tuple[list, list]:
    """(z, y, x) shapes and scales of up to `levels` levels (fewer when every axis is down to 1)."""
    factors = pyramid_factors(voxel_size, shape, levels)
    return _level_shapes(shape, factors), level_scales(voxel_size, factors)


def init_levels(group, shapes, scales, chunks, dtype="uint8", name="image", channels: int | None = None,
                extra_attrs: dict | None = None):
    """An NGFF 0.5 image of the given level shapes and scales in an open zarr v3 group (kept
    otherwise as it is); returns the level-0 array."""
    attrs = {"ome": {"version": NGFF_VERSION, "multiscales": [multiscales_attrs(name, scales, bool(channels))]}}
    attrs.update(extra_attrs or {})
    group.attrs.update(attrs)
    return _create_levels(group, shapes, dtype, chunks, channels)


def _downsample_block(src, lead_sel, region, factor, method):
    """One output chunk of the next level from its (factor x larger) source region; `lead_sel`
    picks the channels (one channel chunk at a time: memory stays at a few blocks)."""
    lead = src.ndim - 3
    sl = tuple(lead_sel) + tuple(
        slice(r.start * f, min(r.stop * f, n)) for r, f, n in zip(region, factor, src.shape[lead:]))
    data = np.asarray(src[sl])
    if method == "nearest":
        return data[(Ellipsis,) + tuple(slice(None, None, f) for f in factor)]
    # Mean over each factor-box; a partial box at the far edge averages what it has. float32 is
    # exact here: sums of at most 8 values of 8 or 16 bits, divided by a power of two.
    out_shape = tuple(r.stop - r.start for r in region)
    pad = [(0, 0)] * lead + [(0, o * f - d) for o, f, d in zip(out_shape, factor, data.shape[lead:])]
    padded = np.pad(data.astype(np.float32), pad, mode="edge")
    shp = padded.shape[:lead] + sum(((o, f) for o, f in zip(out_shape, factor)), ())
    mean = padded.reshape(shp).mean(axis=tuple(lead + 2 * i + 1 for i in range(3)))
    if np.issubdtype(src.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(src.dtype)


def _chunk_starts(shape, chunks):
    grid = [range(0, n, c) for n, c in zip(shape, chunks)]
    return np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, len(shape))


def write_pyramid(group, method: str = "nearest", threads: int | None = None) -> int:
    """Fill levels 1.. of an NGFF multiscales group (a path or an open zarr group) from level 0,
    one output chunk (and one channel chunk) at a time: memory is bounded by a few chunks per
    thread, not the volume. `threads` (default: up to 4, by the cores) work on distinct output
    chunks, which hides an object store's latency. Idempotent: a pyramid interrupted half-way is
    simply written again. Returns the number of levels written."""
    import os
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import zarr

    if method not in ("nearest", "mean"):
        raise SparsesegError(f"pyramid method must be nearest or mean, got {method!r}")
    if not isinstance(group, zarr.Group):
        group = zarr.open_group(str(group), mode="r+")
    ms = group.attrs["ome"]["multiscales"][0]
    paths = [d["path"] for d in ms["datasets"]]
    scales = [next(t["scale"] for t in d["coordinateTransformations"] if t["type"] == "scale")
              for d in ms["datasets"]]
    threads = max(1, threads or min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads, thread_name_prefix="sparseseg-pyramid") as pool:
        for level in range(1, len(paths)):          # each level reads the finished one before it
            src, dst = group[paths[level - 1]], group[paths[level]]
            factor = _level_factor(scales[level - 1], scales[level], dst.ndim - 3, paths[level - 1], paths[level])

            def one(lead_sel, region, src=src, dst=dst, factor=factor):
                dst[lead_sel + region] = _downsample_block(src, lead_sel, region, factor, method)

            pending = set()
            for lead_sel, region in _output_chunks(dst):
                if len(pending) >= 2 * threads:     # bounded: a few chunks in flight, never the level
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(one, lead_sel, region))
            for f in pending:
                f.result()
    return len(paths) - 1


def _level_factor(finer, coarser, lead: int, finer_path, coarser_path) -> tuple[int, ...]:
    ratio = [b / a for a, b in zip(finer[lead:], coarser[lead:])]
    factor = tuple(round(r) for r in ratio)
    if any(abs(r - f) > 1e-6 or f < 1 for r, f in zip(ratio, factor)):
        raise SparsesegError(f"level {coarser_path} is not an integer downsampling of level {finer_path} "
                             f"(scale ratio {ratio})")
    return factor


def _output_chunks(dst):
    """(channel selection, spatial region) of every chunk of `dst`."""
    lead = dst.ndim - 3
    lead_starts = _chunk_starts(dst.shape[:lead], dst.chunks[:lead]) if lead else [()]
    for lead_start in lead_starts:
        lead_sel = tuple(slice(int(s), min(int(s) + c, n)) for s, c, n in
                         zip(lead_start, dst.chunks[:lead], dst.shape[:lead]))
        for start in _chunk_starts(dst.shape[lead:], dst.chunks[lead:]):
            yield lead_sel, tuple(slice(int(s), min(int(s) + c, n)) for s, c, n in
                                  zip(start, dst.chunks[lead:], dst.shape[lead:]))


def write_labels(path, data: np.ndarray, class_names, voxel_size=None, name: str = "segmentation",
                 levels: int = 1, chunks=None, overwrite: bool = False, beside_image=None) -> Path:
    """Write a whole label volume: as `beside_image/labels/<name>` when `beside_image` is given
    (its levels are mirrored), else as a standalone image at `path` with `levels` levels.
    Returns the group written."""
    import shutil

    data = np.asarray(data)
    chunks = chunks or tuple(min(s, 128) for s in data.shape)
    if beside_image is not None:
        arr = create_label_image(beside_image, name, data.shape, chunks, class_names, data.dtype,
                                 overwrite=overwrite)
        target = Path(beside_image) / "labels" / name
    else:
        target = check_output(path, overwrite)
        if target.exists():
            shutil.rmtree(target)
        arr = create_image(target, data.shape, chunks, voxel_size, levels, data.dtype, name, class_names)
    arr[...] = data
    write_pyramid(target, "nearest")
    return target
