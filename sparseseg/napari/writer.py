"""napari writer: a labels layer to an OME-Zarr (NGFF 0.5) label image.

`IMAGE.zarr/labels/NAME[.zarr]` (the path inside an existing OME-Zarr image) adds a label image beside
that image; any other `.zarr` path becomes a standalone OME-Zarr label image. Sparse labels keep
their ignore value (255) verbatim, so the file trains exactly what was painted; the
`image-label` metadata names it and gives it a transparent colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparseseg import labels_zarr as lz
from sparseseg.errors import SparsesegError

IGNORE_LABEL = 255


def _image_group_of(path: Path):
    """`X.zarr/labels/NAME` -> X.zarr when X.zarr is an OME-Zarr image, else None."""
    if path.parent.name == "labels" and lz.is_ome_image(path.parent.parent):
        return path.parent.parent
    return None


def write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer hook; returns the paths written."""
    p = Path(path)
    if p.suffix.lower() not in (".zarr", ".zr3") and _image_group_of(p) is None:
        p = p.with_suffix(".zarr")
    arr = np.asarray(data[0] if meta.get("multiscale") else data)
    if arr.ndim != 3:
        raise SparsesegError(f"sparseseg writes 3D label volumes (Z, Y, X); this layer has shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise SparsesegError("label values must lie in 0..255 to be written as uint8")
    arr = arr.astype(np.uint8, copy=False)
    metadata = meta.get("metadata") or {}
    present = [int(v) for v in np.unique(arr) if v != IGNORE_LABEL]
    k = max(len(metadata.get("class_names") or []), (max(present) + 1) if present else 0, 2)
    names = list(metadata.get("class_names") or [])
    names += [f"class {i}" for i in range(len(names), k)]
    scale = meta.get("scale")
    voxel = tuple(float(s) for s in scale[-3:]) if scale is not None and len(scale) >= 3 else None
    image = _image_group_of(p)
    # napari appends the extension: IMAGE.zarr/labels/NAME.zarr names the label image NAME.
    name = p.stem if p.suffix.lower() in (".zarr", ".zr3") else p.name
    target = lz.write_labels(p, arr, names, voxel_size=voxel, name=name, overwrite=True, beside_image=image)
    if (arr == IGNORE_LABEL).any():
        _mark_ignore(target, names)
    return [str(target)]


def _mark_ignore(target, names):
    """Add the ignore value to `image-label` (transparent, class 'unannotated')."""
    import zarr

    group = zarr.open_group(str(target), mode="r+")
    attrs = dict(group.attrs)
    ome = dict(attrs.get("ome", {}))
    source = (ome.get("image-label") or {}).get("source", {}).get("image")
    il = lz.image_label_attrs(names, source_image=source)
    il["colors"].append({"label-value": IGNORE_LABEL, "rgba": [0, 0, 0, 0]})
    il["properties"].append({"label-value": IGNORE_LABEL, "class": "unannotated (ignored in training)"})
    if "image-label" in ome:                 # standalone images carry no image-label (NGFF)
        ome["image-label"] = il
        attrs["ome"] = ome
    attrs.setdefault("sparseseg", {})["ignore_label"] = IGNORE_LABEL
    group.attrs.update(attrs)
