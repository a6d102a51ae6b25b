"""The current network's labels on one slice of an in-memory volume: the napari widget's live
prediction while training runs (ilastik's live update). One forward pass over a window one
valid output thick across the slice and covering its whole plane; reflected at the border as
the engine does."""

from __future__ import annotations

import numpy as np
import torch

from sparseseg.trainer.data import read_reflected

MAX_PLANE_VOXELS = 4 * 1024 * 1024     # above this a preview would cost the run too much time


def plane_window(geometry, shape, axis: int, index: int):
    """(input start, input shape, output start, output shape) of the window whose output holds
    slice `index` normal to `axis` and every voxel of its plane."""
    out_start, out_shape = [], []
    for a, (rule, n) in enumerate(zip(geometry.axes, shape)):
        if a == axis:
            # On the engine's tile grid (spacing: the pooling step), so the slice is what a
            # prediction of the whole volume gives there.
            m = rule.min_output
            out_start.append(index - index % rule.step)
        else:
            m = rule.output_at_least(n)
            out_start.append(0)
        out_shape.append(m)
    in_shape = geometry.input_for_output(tuple(out_shape))
    in_start = [s - c for s, c in zip(out_start, geometry.context)]
    return in_start, in_shape, out_start, out_shape


def predict_plane(model, image: np.ndarray, axis: int, index: int) -> np.ndarray | None:
    """Labels (uint8) of slice `index` normal to `axis` of `image` (C, Z, Y, X); None when the
    plane is too large for a preview."""
    shape = image.shape[1:]
    plane = [n for a, n in enumerate(shape) if a != axis]
    if plane[0] * plane[1] > MAX_PLANE_VOXELS or not 0 <= index < shape[axis]:
        return None
    geometry = model.cfg.geometry
    in_start, in_shape, out_start, _ = plane_window(geometry, shape, axis, index)
    x = read_reflected(image, in_start, in_shape)
    device = next(model.parameters()).device
    with torch.inference_mode():
        labels = model(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None].to(device))[0].argmax(0)
    labels = labels.to(torch.uint8).cpu().numpy()
    cut = [slice(0, n) for n in shape]
    cut[axis] = index - out_start[axis]
    return labels[tuple(cut)]
