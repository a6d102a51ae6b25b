"""What a network costs per tile, measured from the network itself on torch's meta device
(shapes only: no weights, no compute, milliseconds even for the paper network's big tiles):

* peak live activation bytes of one forward pass: every tensor an op creates is counted while
  it is alive (views and in-place results share storage and are not counted twice);
* the largest single activation in elements (cuDNN refuses or slowly splits convolutions on
  tensors of 2^31 elements or more);
* FLOPs, with torch.utils.flop_counter (a multiply-add = 2 FLOPs).

Cached per (network, tile, batch, dtype), so a run measures each candidate once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref


def _meta_model(model_config: str):
    import torch

    from sparseseg.model.config import ModelConfig
    from sparseseg.model.network import SegmentationModel

    with torch.device("meta"):
        return SegmentationModel(ModelConfig.from_dict(json.loads(model_config))).eval()


@functools.lru_cache(maxsize=256)
def _measure(model_config: str, input_shape: tuple, dtype: str, count_flops: bool) -> tuple[int, int, int]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model(model_config).to(getattr(torch, dtype))      # autocast runs the convolutions in it
    state = {"live": 0, "peak": 0, "largest": 0}

    def release(n):
        state["live"] -= n

    class LiveBytes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for r, t in zip(returns, outs):
                if isinstance(t, torch.Tensor) and r.alias_info is None:      # a new storage
                    n = t.numel() * t.element_size()
                    state["largest"] = max(state["largest"], t.numel())
                    state["live"] += n
                    weakref.finalize(t, release, n)
            state["peak"] = max(state["peak"], state["live"])
            return out

    x = torch.empty(input_shape, dtype=getattr(torch, dtype), device="meta")
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    base = x.numel() * x.element_size()
    with torch.inference_mode(), counter, LiveBytes():
        y = model(x)
        del y
    flops = int(counter.get_total_flops()) if count_flops else -1
    return state["peak"] + base, flops, max(state["largest"], x.numel())


def tile_cost(model_config: dict, input_shape, dtype: str = "float32") -> tuple[int, int]:
    """(peak activation bytes, FLOPs) of one forward pass on an (N, C, z, y, x) input."""
    return _measure(json.dumps(model_config, sort_keys=True), tuple(int(v) for v in input_shape), dtype, True)[:2]


def tile_peak_bytes(model_config: dict, input_shape, dtype: str = "float32") -> int:
    """Peak activation bytes only (the default-tile search: no flop counting)."""
    return _measure(json.dumps(model_config, sort_keys=True), tuple(int(v) for v in input_shape), dtype, False)[0]


def largest_activation(model_config: dict, input_shape, dtype: str = "float32") -> int:
    """Elements of the largest tensor one forward pass creates (the input included)."""
    return _measure(json.dumps(model_config, sort_keys=True), tuple(int(v) for v in input_shape), dtype, False)[2]
