"""The block worker: read -> tiles -> batched forward -> stitch -> crop -> write -> mark done.

A task gets a group of blocks. Inside it, one thread reads the next block (with its halo,
straight from the input store) and another writes the previous one while this one computes,
so I/O overlaps with compute. A block is marked done only after its chunks are on disk (fsync),
so a killed worker never leaves a block that looks finished but is not.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparseseg.engine.backends import BackendSpec, cached_backend
from sparseseg.engine.blocks import Block, assemble, read_plan
from sparseseg.engine.tiling import predict_padded
from sparseseg.errors import SparsesegError

log = logging.getLogger("sparseseg.engine")

DONE_DIR = ".sparseseg-done"       # inside the output store; zarr ignores it


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs, small enough to send with every task."""

    input: str
    output: str
    backend: BackendSpec
    geometry: dict
    volume_shape: tuple
    tile: tuple
    overlap: float
    batch: int
    probabilities: str | None      # None | "uint8" | "float16"


_OPEN: dict = {}


def _open(job: BlockJob):
    """Input volume, label array and probability array, opened once per process."""
    key = (job.input, job.output)
    if key not in _OPEN:
        import zarr

        from sparseseg.volume import open_volume

        vol = open_volume(job.input)
        labels = zarr.open_array(str(Path(job.output) / "0"), mode="r+")
        probs = zarr.open_array(str(Path(job.output) / "probabilities"), mode="r+") if job.probabilities else None
        _OPEN[key] = (vol, labels, probs)
    return _OPEN[key]


def done_marker(output, block: Block) -> Path:
    return Path(output) / DONE_DIR / block.key


def is_done(output, block: Block) -> bool:
    return done_marker(output, block).exists()


def _fsync_tree(paths):
    for p in paths:
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _chunk_files(array_dir: Path, block: Block, chunks, lead=()) -> list[Path]:
    """Files of the chunks a block covers (zarr v3 default key encoding c/i/j/k)."""
    ranges = [range(s // c, (s + n - 1) // c + 1) for s, n, c in zip(block.start, block.shape, chunks[-3:])]
    files = []
    for i in ranges[0]:
        for j in ranges[1]:
            for k in ranges[2]:
                files.append(array_dir.joinpath("c", *map(str, lead), str(i), str(j), str(k)))
    return files


def _read(job: BlockJob, block: Block, geometry):
    vol, _, _ = _open(job)
    plan = read_plan(block, job.volume_shape, geometry, job.tile, job.overlap)
    data = vol.read(plan.region, dtype=np.float32)
    if not np.isfinite(data).all():
        where = ", ".join(f"{a} {s.start}:{s.stop}" for a, s in zip("zyx", block.slices))
        raise SparsesegError(f"NaN or Inf in the input of block {block.key} ({where})")
    return assemble(data, plan), plan


def _compute(job: BlockJob, block: Block, geometry, padded, plan):
    backend = cached_backend(job.backend)
    labels, probs = predict_padded(backend.forward, padded, geometry, plan.out_shape, job.tile, job.batch,
                                   job.overlap, probabilities=job.probabilities is not None,
                                   num_classes=backend.contract["num_classes"])
    crop = tuple(slice(o, o + n) for o, n in zip(plan.offset, block.shape))
    labels = labels[crop]
    if probs is not None:
        probs = probs[(slice(None),) + crop]
        probs = np.round(probs * 255).astype(np.uint8) if job.probabilities == "uint8" else probs.astype(np.float16)
    return labels, probs


def _write(job: BlockJob, block: Block, labels, probs):
    _, label_arr, prob_arr = _open(job)
    label_arr[block.slices] = labels
    files = _chunk_files(Path(job.output) / "0", block, label_arr.chunks)
    if prob_arr is not None:
        prob_arr[(slice(None),) + block.slices] = probs
        for c in range(0, prob_arr.shape[0], prob_arr.chunks[0]):
            files += _chunk_files(Path(job.output) / "probabilities", block, prob_arr.chunks, lead=(c // prob_arr.chunks[0],))
    _fsync_tree(files)
    marker = done_marker(job.output, block)
    marker.parent.mkdir(exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"{block.start} {block.shape}\n")
        f.flush()
        os.fsync(f.fileno())


def process_blocks(job: BlockJob, blocks: list[Block], on_block=None) -> list[tuple[str, int, float]]:
    """Run a group of blocks with read-ahead and write-behind; returns (key, voxels, seconds) per
    block, and passes each to `on_block` once its write has finished (for in-process progress)."""
    from sparseseg.model.shapes import NetGeometry

    geometry = NetGeometry.from_dict(job.geometry)
    delay = float(os.environ.get("SPARSESEG_BLOCK_DELAY", "0"))   # fault-injection tests only
    results = []
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        pending_read = reader.submit(_read, job, blocks[0], geometry) if blocks else None
        pending_write = None
        for i, block in enumerate(blocks):
            t0 = time.perf_counter()
            padded, plan = pending_read.result()
            if i + 1 < len(blocks):
                pending_read = reader.submit(_read, job, blocks[i + 1], geometry)
            labels, probs = _compute(job, block, geometry, padded, plan)
            if delay:
                time.sleep(delay)
            if pending_write is not None:
                pending_write.result()          # surface write errors in order
                if on_block:
                    on_block(results[-1])
            pending_write = writer.submit(_write, job, block, labels, probs)
            results.append((block.key, block.voxels, time.perf_counter() - t0))
        if pending_write is not None:
            pending_write.result()
            if on_block:
                on_block(results[-1])
    return results
