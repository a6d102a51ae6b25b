"""A labels volume to paint: the image's shape, every voxel the ignore value.

Written as OME-Zarr (zarr v3, NGFF 0.5, uint8) whose fill value is the ignore value, so no
chunk is written at all (a 2048^3 template costs a few kilobytes and no memory); existing
annotations, when given, are copied block by block (all-ignore chunks stay unwritten). The
suggested slices are listed in the group's `sparseseg` attributes. Written to a temporary
sibling and renamed: an interrupted write leaves nothing under the final name.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.fsutil import atomic_path
from sparseseg.suggest.planes import block_shape
from sparseseg.volume import check_output, ngff_attrs


def template_chunks(shape) -> tuple[int, int, int]:
    # Thin in z so painting one xy slice in napari rewrites few voxels; 64^3-sized otherwise.
    return tuple(min(s, c) for s, c in zip(shape, (16, 256, 256)))


def write_template(path, shape, voxel_size, suggestions: list[dict], ignore: int = 255, source: str = "",
                   annotated=None, overwrite: bool = False, max_block_voxels: int = 1 << 24) -> Path:
    import zarr

    path = check_output(path, overwrite)

    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        attrs = ngff_attrs(path.stem, voxel_size)
        attrs["ome"]["image-label"] = {"version": "0.5", "source": {"image": str(source)}}
        attrs["sparseseg"] = {"kind": "annotation-template", "ignore_label": int(ignore), "image": str(source),
                              "suggested_slices": suggestions,
                              "planes": {"xy": "z fixed", "xz": "y fixed", "yz": "x fixed"}}
        group.attrs.update(attrs)
        chunks = template_chunks(shape)
        arr = group.create_array("0", shape=tuple(shape), dtype="uint8", chunks=chunks, fill_value=int(ignore),
                                 dimension_names=["z", "y", "x"])     # NGFF 0.5 requires them
        if annotated is not None:
            block = block_shape(shape, (1, 1, 1), chunks, max_block_voxels)
            for z0, y0, x0 in itertools.product(*(range(0, s, b) for s, b in zip(shape, block))):
                reg = (slice(z0, z0 + block[0]), slice(y0, y0 + block[1]), slice(x0, x0 + block[2]))
                data = annotated.read(reg)[0]
                if (data != ignore).any():
                    if data.min() < 0 or data.max() > 255:
                        raise SparsesegError(f"{annotated.source}: label values must fit uint8 (0..255)")
                    arr[reg] = data.astype(np.uint8)
    return path
