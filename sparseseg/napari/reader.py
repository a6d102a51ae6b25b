"""napari reader: zarr arrays, OME-Zarr images with their label images, standalone OME-Zarr
labels (sparseseg outputs), TIFF and .npy, as image or labels layers.

Everything stays lazy (dask over zarr, memory-mapped .npy, TIFF through its zarr view), so a
volume larger than memory opens at once and napari reads only the slices it shows. The voxel
size becomes the layer's scale.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sparseseg.labels_zarr import label_colours
from sparseseg.volume import _tiff_voxel_size

log = logging.getLogger("sparseseg.napari")

IGNORE_LABEL = 255
_LABEL_WORDS = ("label", "seg", "mask", "annot")


def labels_colormap(num_classes: int, ignore_label: int | None = IGNORE_LABEL, colours=None):
    """A napari colormap that shows class 0 (background) as a visible grey and the ignore value as
    transparent: in sparse labels 0 is an annotation, 'unpainted' is the ignore value."""
    from napari.utils.colormaps import DirectLabelColormap

    rgba = colours or label_colours(max(num_classes, 2))
    table = {i: np.asarray(c, np.float32) / 255 for i, c in enumerate(rgba)}
    table[0] = np.array([0.55, 0.55, 0.55, 0.6], np.float32) if ignore_label is not None else table[0]
    if ignore_label is not None:
        table[int(ignore_label)] = np.zeros(4, np.float32)
    table[None] = np.array([1.0, 1.0, 0.0, 1.0], np.float32)      # any other value: yellow, hard to miss
    return DirectLabelColormap(color_dict=table, background_value=int(ignore_label) if ignore_label is not None
                               else 0)


def get_reader(path):
    """npe2 reader hook: a function for paths this plugin reads, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(str(path))
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff", ".npy") and p.is_file():
        return read
    if p.is_dir() and (suffix in (".zarr", ".zr3") or (p / "zarr.json").is_file() or (p / ".zgroup").is_file()
                       or (p / ".zarray").is_file()):
        return read
    return None


def read(path) -> list:
    """Layer data tuples for `path` (napari's reader contract)."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    p = Path(str(path))
    if p.suffix.lower() in (".tif", ".tiff"):
        return [_read_tiff(p)]
    if p.suffix.lower() == ".npy":
        import dask.array as da

        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        return [_layer(da.from_array(arr, chunks=_chunks(arr.shape)), p.stem, None, _is_labels_name(p.stem, arr.dtype))]
    return _read_zarr(p)


def _chunks(shape):
    return tuple(min(s, 64) for s in shape[:-2]) + tuple(min(s, 512) for s in shape[-2:])


def _is_labels_name(name: str, dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.integer) and any(w in name.lower() for w in _LABEL_WORDS)


def _layer(data, name, scale, is_labels, class_names=None, colours=None, multiscale=False):
    """One layer tuple; images with a channel axis (C, Z, Y, X) become one layer per channel."""
    first = data[0] if multiscale else data
    kwargs = {"name": name}
    if scale:
        kwargs["scale"] = tuple(float(s) for s in scale)
    if multiscale:
        kwargs["multiscale"] = True
    if is_labels:
        # Ignore value present or not, a sparseseg label layer always shows 255 as transparent.
        k = len(class_names) if class_names else 2
        kwargs["colormap"] = labels_colormap(k, IGNORE_LABEL, colours)
        kwargs["metadata"] = {"class_names": list(class_names or [])}
        return (data, kwargs, "labels")
    if first.ndim == 4 and first.shape[0] > 1:
        kwargs["channel_axis"] = 0
        kwargs["name"] = [f"{name} [{c}]" for c in range(first.shape[0])]
    elif first.ndim == 4:
        data = [d[0] for d in data] if multiscale else data[0]
    return (data, kwargs, "image")


def _read_tiff(p: Path):
    import dask.array as da
    import tifffile
    import zarr

    with tifffile.TiffFile(str(p)) as tif:        # metadata only; pixels are read lazily below
        voxel = _tiff_voxel_size(tif)
        dtype = tif.series[0].dtype
    store = tifffile.imread(str(p), aszarr=True)
    arr = da.from_zarr(zarr.open(store, mode="r"))
    if isinstance(arr, list):
        arr = arr[0]
    return _layer(arr, p.stem, voxel, _is_labels_name(p.stem, dtype))


def _ome(attrs) -> dict:
    attrs = dict(attrs)
    return attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs


def _multiscale_layer(group, name, is_labels=None):
    """A layer from an NGFF multiscales group: every level as a lazy dask array."""
    import dask.array as da

    ome = _ome(group.attrs)
    ms = ome["multiscales"][0]
    levels, scales = [], []
    for d in ms["datasets"]:
        levels.append(da.from_zarr(group[d["path"]]))
        scales.append(next((t["scale"] for t in d.get("coordinateTransformations", []) if t["type"] == "scale"),
                           None))
    axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])]
    # Keep (c,) z, y, x; a singleton time axis is dropped.
    if axes and axes[0] == "t":
        levels = [lv[0] for lv in levels]
        scales = [s[1:] if s else s for s in scales]
    scale = scales[0][-3:] if scales[0] else None
    label_meta = ome.get("image-label")
    attrs = dict(group.attrs)
    class_names = None
    colours = None
    if label_meta:
        props = {p.get("label-value"): p.get("class") for p in label_meta.get("properties", [])}
        class_names = [props.get(i, f"class {i}") for i in range(max([v for v in props if v is not None],
                                                                    default=1) + 1)] if props else None
        cols = {c["label-value"]: c["rgba"] for c in label_meta.get("colors", [])}
        if cols:
            colours = [cols.get(i, [128, 128, 128, 255]) for i in range(max(cols) + 1) if i != IGNORE_LABEL]
    elif "sparseseg" in attrs:
        class_names = attrs["sparseseg"].get("class_names")
    elif "sparseseg_run" in attrs:
        class_names = attrs["sparseseg_run"].get("class_names")
    if is_labels is None:
        is_labels = bool(label_meta) or ((class_names is not None)
                                         and np.issubdtype(np.dtype(levels[0].dtype), np.integer))
    data = levels if len(levels) > 1 else levels[0]
    return _layer(data, name, scale, is_labels, class_names, colours, multiscale=len(levels) > 1)


def _probabilities_layer(group, scale):
    """sparseseg-infer's probabilities beside its labels (K, Z, Y, X, uint8 = p*255 or float16):
    one array, or (with --pyramid) an image group of its own whose levels follow the labels'.
    Hidden image layers, one per class; None when the group has none."""
    import dask.array as da
    import zarr

    if "probabilities" not in group:
        return None
    prob = group["probabilities"]
    kwargs = {"channel_axis": 0, "scale": scale, "blending": "additive", "visible": False}
    if isinstance(prob, zarr.Array):
        data = da.from_zarr(prob)
        k = prob.shape[0]
    elif _ome(prob.attrs).get("multiscales"):
        levels = [da.from_zarr(prob[d["path"]]) for d in _ome(prob.attrs)["multiscales"][0]["datasets"]]
        k = levels[0].shape[0]
        data = levels if len(levels) > 1 else levels[0]
        if len(levels) > 1:
            kwargs["multiscale"] = True
    else:
        return None
    names = dict(prob.attrs).get("sparseseg", {}).get("class_names") or [str(i) for i in range(k)]
    return (data, {"name": [f"p({n})" for n in names], **kwargs}, "image")


def _read_zarr(p: Path) -> list:
    import dask.array as da
    import zarr

    node = zarr.open(str(p), mode="r")
    name = p.name.split(".")[0]
    if isinstance(node, zarr.Array):
        return [_layer(da.from_zarr(node), name, None, _is_labels_name(name, node.dtype))]
    ome = _ome(node.attrs)
    layers = []
    if ome.get("multiscales"):
        layers.append(_multiscale_layer(node, name))
        # Label images beside the image, as listed in `labels`.
        label_names = []
        if "labels" in node:
            names = _ome(node["labels"].attrs).get("labels", [])
            label_names = [n for n in names if n in node["labels"]]
            for label_name in label_names:
                layers.append(_multiscale_layer(node["labels"][label_name], label_name, is_labels=True))
        for group, layer in list(zip([node] + [node["labels"][n] for n in label_names], list(layers))):
            prob = _probabilities_layer(group, layer[1].get("scale"))
            if prob is not None:
                layers.append(prob)
        return layers
    arrays = sorted(k for k, _ in node.arrays())
    for key in arrays:
        arr = node[key]
        layers.append(_layer(da.from_zarr(arr), f"{name}/{key}", None, _is_labels_name(key, arr.dtype)))
    if not layers:
        raise ValueError(f"{p}: a zarr group without arrays or OME-Zarr metadata")
    return layers
