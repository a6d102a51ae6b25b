"""The plan of a run, and its figures, from shapes alone (no block I/O, no network weights):
blocks, tile, batch, voxels read and FLOPs per output voxel, recomputed tiles. What
`sparseseg-infer --dry-run` prints, and what the run itself uses.

Blocks form a Cartesian grid, so every per-block count is a product of per-axis counts and a
sum over all blocks is a product of per-axis sums: planning is O(blocks per axis), which keeps
a 10000^3 volume's plan instant.
"""

from __future__ import annotations

import math
from sparseseg.engine.blocks import axis_span
from sparseseg.engine.tiling import tile_input, tile_stride

SAME_RECOMPUTE_TARGET = 0.10
SAME_BLOCK_VOXELS_CAP = 96 * 512 * 512      # accumulators of a block: (K + 1) * 4 bytes a voxel


def _axis_starts(n: int, b: int):
    return [(s, min(b, n - s)) for s in range(0, n, b)]


def figures(geometry, volume_shape, block, tile, overlap: float) -> dict:
    """Counts for the whole volume: blocks, voxels read, tiles computed, unique tiles."""
    stride = tile_stride(geometry, tile, overlap)
    blocks = read = tiles = unique = 1
    for a, (n, b, t, s) in enumerate(zip(volume_shape, block, tile, stride)):
        rule = geometry.axes[a]
        spans = [axis_span(st, sz, n, rule, geometry.padding, t, s, overlap) for st, sz in _axis_starts(n, b)]
        blocks *= len(spans)
        read *= sum(hi - lo for _, _, _, lo, hi, _ in spans)
        tiles *= sum(sp[5] for sp in spans)
        if geometry.padding == "same":
            unique *= math.ceil(max(n - t, 0) / s) + 1
        else:
            unique *= sum(sp[5] for sp in spans)
    return {"blocks": blocks, "read": read, "tiles": tiles, "unique_tiles": unique}


def recomputed_fraction(counts: dict) -> float:
    """Share of the tile computations that another block also does (same padding only)."""
    return 1 - counts["unique_tiles"] / counts["tiles"] if counts["tiles"] else 0.0


def same_padding_block(geometry, volume_shape, block, tile, overlap: float):
    """Grow a same-padding network's default block (doubling the axis that recomputes most,
    never past the volume) until under SAME_RECOMPUTE_TARGET of its tiles are computed twice,
    within SAME_BLOCK_VOXELS_CAP voxels."""
    block = list(block)
    while True:
        counts = figures(geometry, volume_shape, block, tile, overlap)
        if recomputed_fraction(counts) < SAME_RECOMPUTE_TARGET:
            return tuple(block)
        best, gain = None, 0.0
        for a in range(3):
            if block[a] >= volume_shape[a]:
                continue
            trial = list(block)
            trial[a] = min(volume_shape[a], block[a] * 2)
            trial[a] = -(-trial[a] // geometry.axes[a].step) * geometry.axes[a].step
            if math.prod(trial) > SAME_BLOCK_VOXELS_CAP:
                continue
            f = recomputed_fraction(figures(geometry, volume_shape, trial, tile, overlap))
            if best is None or recomputed_fraction(counts) - f > gain:
                best, gain = trial, recomputed_fraction(counts) - f
        if best is None:
            return tuple(block)
        block = best


def plan_figures(contract: dict, volume_shape, block, tile, batch: int, overlap: float,
                 voxels_per_second: float | None = None) -> dict:
    """The dry-run report: every figure counted, FLOPs from the network (torch's flop counter
    on one tile, on the meta device)."""
    from sparseseg.engine.measure import tile_cost
    from sparseseg.model.contract import geometry_of_contract

    geometry = geometry_of_contract(contract)
    counts = figures(geometry, volume_shape, block, tile, overlap)
    voxels = math.prod(volume_shape)
    tin = tile_input(geometry, tile)
    stride = tile_stride(geometry, tile, overlap)
    activation_bytes, flops = tile_cost(contract["model_config"], (1, contract["in_channels"]) + tin)
    out = {
        "volume": list(volume_shape), "voxels": voxels, "block": list(block), "blocks": counts["blocks"],
        "tile_input": list(tin), "tile_output": list(tile), "batch": batch, "overlap": overlap,
        "padding": geometry.padding, "tiles": counts["tiles"],
        "input_voxels_per_output_voxel": round(counts["read"] / voxels, 4),
        "tile_input_voxels_per_output_voxel": round(counts["tiles"] * math.prod(tin) / voxels, 4),
        "flops_per_tile": flops,
        "flops_per_output_voxel": round(counts["tiles"] * flops / voxels, 1),
        # A tile keeps only its stride's voxels on the grid (valid: 24x40x40 of the paper tile's
        # 28x44x44), so its cost per kept voxel, not per output voxel, bounds the throughput.
        "tile_kept": list(stride),
        "flops_per_kept_voxel": round(flops / math.prod(stride), 1),
        "activation_bytes_per_tile": activation_bytes,
        "recomputed_fraction": round(recomputed_fraction(counts), 4),
    }
    if voxels_per_second:
        out["assumed_voxels_per_second"] = voxels_per_second
        out["projected_seconds"] = round(voxels / voxels_per_second, 1)
    return out


def choose(contract: dict, volume_shape, *, device: str, block=None, tile=None, batch=None, overlap: float = 0.5,
           precision: str = "fp32"):
    """(block, tile, batch) for a run: what the user asked for, checked, else the defaults of
    engine/tiling.py (tile and batch from the memory budget or the plan's profile) and, for
    same-padding networks, a block that keeps recomputation under 10%."""
    from sparseseg.engine.blocks import Block, block_size, read_plan
    from sparseseg.engine.tiling import (check_activation_cap, check_profile_tile, check_tile, default_batch,
                                         default_tile, run_dtype)
    from sparseseg.errors import SparsesegError
    from sparseseg.model.contract import geometry_of_contract

    geometry = geometry_of_contract(contract)
    blk = block_size(geometry, block, volume_shape)
    dtype = run_dtype(precision)
    if tile:
        tile = check_tile(geometry, tile)
        check_profile_tile(contract, tile)
        if "profile" not in contract:       # a plan's profile already bounds its tiles
            check_activation_cap(contract, tile, dtype)
    else:
        tile = check_tile(geometry, default_tile(contract, device, extent=blk, dtype=dtype))
    if geometry.padding == "same" and not block:
        blk = same_padding_block(geometry, volume_shape, blk, tile, overlap)
    if batch is None:
        first = Block((0, 0, 0), (0, 0, 0), blk)
        batch = default_batch(contract, device, tile, len(read_plan(first, volume_shape, geometry, tile, overlap).offsets),
                              dtype=dtype)
    elif batch < 1:
        raise SparsesegError(f"--batch must be >= 1, got {batch}")
    return blk, tile, int(batch)


def gather_normalization(contract: dict, volume) -> dict | None:
    """None when the engine's graph normalizes (legacy contracts: global mean/std in the graph);
    else per-channel statistics of this input volume, computed once here (from a sample, by
    sparseseg.model.normalization) and applied in the gather: normalization happens once."""
    norm = contract.get("normalization") or {}
    if norm.get("in_graph", True):
        return None
    try:
        from sparseseg.model.normalization import volume_statistics
    except ImportError:
        from sparseseg.errors import SparsesegError

        raise SparsesegError("this engine normalizes outside its graph, which needs a newer sparseseg "
                             "(sparseseg.model.normalization)") from None
    stats = volume_statistics(volume, norm)
    return {"mean": list(map(float, stats["mean"])), "std": list(map(float, stats["std"])),
            "lo": None if stats.get("lo") is None else list(map(float, stats["lo"])),
            "hi": None if stats.get("hi") is None else list(map(float, stats["hi"]))}
