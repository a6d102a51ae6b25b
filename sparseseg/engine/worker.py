"""The block worker: read -> device -> gather tiles -> batched forward -> stitch -> argmax ->
host -> write -> mark done, with everything between the upload and the download on the
backend's device (torch functions of kernels/torch_ops.py, or with --kernels cuda the CUDA
kernels of sparseseg/kernels on a CUDA device; a GPU keeps the block resident).

Per block: the region is read in its stored dtype (uint8/uint16/float32: no host float32 copy),
copied into a pinned host buffer and uploaded on a copy stream (CUDA); tiles are cut from it on
the device with reflect padding at the true volume border, normalized only when the engine's
graph does not normalize itself, and cast to the backend's input dtype. The stitched labels
(and quantized probabilities) come back on a download stream.

Double buffering: a reader thread reads and uploads block k+1 and a writer thread downloads and
writes block k-1 while block k computes; they order with the compute through CUDA events, not a
device-wide synchronize. A block is marked done only after its chunks are stored
(engine/store.py), so a killed worker never leaves a block that looks finished but is not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sparseseg.engine.backends import BackendSpec, cached_backend
from sparseseg.engine.blocks import Block, read_plan
from sparseseg.engine.store import open_io, write_block
from sparseseg.errors import SparsesegError

log = logging.getLogger("sparseseg.engine")

NATIVE_DTYPES = (np.uint8, np.uint16, np.float32)     # uploaded as stored; others become float32


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
    storage_options: dict | None = None   # fsspec options for URL inputs/outputs (credentials, endpoint)
    run_id: str = ""                      # one run's arrays and chunk cache are never reused by another
    normalization: dict | None = None     # {mean, std, lo, hi} applied in the gather; None: the graph does it
    kernels: str = "torch"                # gather/stitch: torch functions, or "cuda" kernels on a CUDA device


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class BlockRunner:
    """The per-worker state of the pipeline: backend, device streams, blending weights,
    normalization tensors, and the batch size (halved once on CUDA out-of-memory)."""

    def __init__(self, job: BlockJob, backend):
        import torch

        from sparseseg.engine.tiling import gaussian_weights, tile_input
        from sparseseg.kernels.torch_ops import normalization_tensors
        from sparseseg.model.shapes import NetGeometry

        self.job, self.backend, self.torch = job, backend, torch
        self.geometry = NetGeometry.from_dict(job.geometry)
        self.device = backend.device
        self.cuda = self.device.type == "cuda"
        self.tile_in = tile_input(self.geometry, job.tile)
        self.batch = max(1, int(job.batch))
        self.halved = False
        self.num_classes = int(backend.contract["num_classes"])
        self.norm = normalization_tensors(job.normalization, self.device)
        self.weights = (torch.from_numpy(gaussian_weights(job.tile)).to(self.device)
                        if self.geometry.padding == "same" else None)
        self.prob_dtype = {None: None, "uint8": torch.uint8, "float16": torch.float16,
                           "float32": torch.float32}[job.probabilities]
        from sparseseg.kernels.select import block_ops

        self.ops = block_ops(job.kernels, self.device)      # kernels/torch_ops.py unless --kernels cuda
        if self.cuda:
            self.upload_stream = torch.cuda.Stream(self.device)
            # The compute has its own stream: on the legacy default stream TensorRT's execute_async_v3
            # synchronizes per call, and every other stream would implicitly wait on it.
            self.compute_stream = torch.cuda.Stream(self.device)
            self.download_stream = torch.cuda.Stream(self.device)

    # ---------------------------------------------------------------- reader thread
    def stage(self, volume, block: Block):
        """Read the block's region (stored dtype) and start its upload."""
        torch = self.torch
        plan = read_plan(block, self.job.volume_shape, self.geometry, self.job.tile, self.job.overlap)
        data = volume.read(plan.region)
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            where = ", ".join(f"{a} {s.start}:{s.stop}" for a, s in zip("zyx", block.slices))
            raise SparsesegError(f"NaN or Inf in the input of block {block.key} ({where})")
        if data.dtype not in NATIVE_DTYPES:
            data = data.astype(np.float32)
        elif not data.flags.writeable:           # a read-only memory map (.npy): torch wants writable
            data = data.copy()
        host = torch.from_numpy(np.ascontiguousarray(data))
        if not self.cuda:
            return plan, host, None
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        with torch.cuda.stream(self.upload_stream):
            region = pinned.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return plan, region, (ready, pinned)

    # ---------------------------------------------------------------- compute (this thread)
    def forward(self, x):
        """The batched forward; on CUDA out-of-memory retry once with half the batch (kept for
        the rest of the run), then stop with a line that names the options to change."""
        try:
            return self.backend.forward(x)
        except Exception as e:        # noqa: BLE001  (only OOM is handled; the rest re-raised)
            if not _is_oom(e):
                raise
        if self.cuda:
            self.torch.cuda.empty_cache()
        if self.halved or len(x) == 1:
            raise SparsesegError(f"out of device memory with tile {list(self.job.tile)} and batch {len(x)}: "
                                 "pass a smaller --tile or --batch") from None
        self.halved = True
        self.batch = max(1, len(x) // 2)
        log.warning("out of device memory: retrying with batch %d", self.batch)
        try:
            return self.torch.cat([self.backend.forward(part) for part in x.split(self.batch)])
        except Exception as e:        # noqa: BLE001
            if not _is_oom(e):
                raise
            raise SparsesegError(f"out of device memory with tile {list(self.job.tile)} even at batch "
                                 f"{self.batch}: pass a smaller --tile or --batch") from None

    def compute(self, block: Block, plan, region, staged):
        """Gather, forward and stitch one block; on CUDA everything is enqueued on the compute stream."""
        if not self.cuda:
            return self._compute(block, plan, region, staged)
        with self.torch.cuda.stream(self.compute_stream):
            return self._compute(block, plan, region, staged)

    def _compute(self, block: Block, plan, region, staged):
        torch, ops = self.torch, self.ops
        if staged is not None:
            torch.cuda.current_stream().wait_event(staged[0])
            region.record_stream(torch.cuda.current_stream())
        dev, k = self.device, self.num_classes
        labels = torch.empty(block.shape, dtype=torch.uint8, device=dev)
        probs = torch.empty((k,) + block.shape, dtype=self.prob_dtype, device=dev) if self.prob_dtype else None
        valid = self.geometry.padding == "valid"
        if not valid:
            acc = torch.zeros((k,) + plan.out_shape, dtype=torch.float32, device=dev)
            wsum = torch.zeros(plan.out_shape, dtype=torch.float32, device=dev)
        keep = plan.keep() if valid else None
        offsets = plan.offsets
        start, shape = plan.region_start, self.job.volume_shape
        with torch.inference_mode():
            i = 0
            while i < len(offsets):
                n = self.batch
                group = offsets[i:i + n]
                x = ops.gather(region, start, group, plan.origin, shape, self.tile_in, self.norm,
                               self.backend.input_dtype)
                logits = self.forward(x)
                if valid:
                    ops.stitch_valid(logits, group, keep[i:i + n], labels, probs)
                else:
                    ops.accumulate_same(logits, self.weights, group, acc, wsum)
                i += len(group)
            if not valid:
                ops.finalize_same(acc, wsum, plan.crop, labels, probs)
        return labels, probs

    # ---------------------------------------------------------------- download
    def start_download(self, labels, probs):
        """Device results -> host arrays: a copy on the download stream (CUDA), returned as a
        callable the writer thread waits on."""
        torch = self.torch
        if not self.cuda:
            return lambda: (labels.numpy(), probs.numpy() if probs is not None else None)
        outs = []
        # The stream that computed the labels, named before entering the download stream: inside
        # it, current_stream() *is* the download stream and a wait on it would wait on itself.
        compute = self.compute_stream
        with torch.cuda.stream(self.download_stream):
            self.download_stream.wait_stream(compute)
            for t in (labels, probs):
                if t is None:
                    outs.append(None)
                    continue
                t.record_stream(self.download_stream)
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                outs.append(host)
            done = torch.cuda.Event()
            done.record()

        def finish():
            done.synchronize()
            return tuple(o.numpy() if o is not None else None for o in outs)

        return finish


_RUNNERS: dict = {}
_RUNNERS_LOCK = threading.Lock()
MAX_RUNNERS = 4                 # a worker runs one job at a time; a few keep a retried job's runner too


def _job_key(job: BlockJob) -> str:
    return json.dumps(dataclasses.asdict(job), sort_keys=True, default=str)


def cached_runner(job: BlockJob, backend) -> BlockRunner:
    """One BlockRunner per job, backend and thread in a worker process, reused by every Dask task
    of the run: streams, blending weights and a halved batch survive task edges."""
    key = (_job_key(job), id(backend), threading.get_ident())
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(key)
        if runner is None or runner.backend is not backend:
            if len(_RUNNERS) >= MAX_RUNNERS:
                _RUNNERS.pop(next(iter(_RUNNERS)))
            runner = _RUNNERS[key] = BlockRunner(job, backend)
        return runner


def process_blocks(job: BlockJob, blocks: list[Block], on_block=None, io=None, backend=None
                   ) -> list[tuple[str, int, float]]:
    """Run a group of blocks with read-ahead and write-behind; returns (key, voxels, seconds) per
    block, and passes each to `on_block` once its write has finished (for in-process progress).
    `io` = (volume, write(block, labels, probs)) and `backend` replace the job's store and engine
    file (sparseseg.predict runs on an in-memory array and model this way)."""
    backend = backend or cached_backend(job.backend)
    if io is None:
        volume = open_io(job)[0]

        def write(block, labels, probs):
            write_block(job, block, labels, probs)
    else:
        volume, write = io
    runner = BlockRunner(job, backend) if io is not None else cached_runner(job, backend)
    delay = float(os.environ.get("SPARSESEG_BLOCK_DELAY", "0"))   # fault-injection tests only
    import torch

    threads = torch.get_num_threads()
    if not runner.cuda and backend.name != "torch":
        # Gather and stitch are copies; ONNX Runtime and OpenVINO run their own thread pools, and
        # torch's OpenMP pool spinning beside them costs far more than it gains (10-100x slower
        # small copies measured on 2 loaded cores). Restored afterwards: the caller's process.
        torch.set_num_threads(1)
    try:
        return _run_blocks(runner, volume, write, blocks, on_block, delay)
    finally:
        torch.set_num_threads(threads)


def _run_blocks(runner, volume, write, blocks, on_block, delay):
    def store(block, finish):
        labels, probs = finish()
        write(block, labels, probs)

    results = []
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        pending_read = reader.submit(runner.stage, volume, blocks[0]) if blocks else None
        pending_write = None
        for i, block in enumerate(blocks):
            t0 = time.perf_counter()
            plan, region, staged = pending_read.result()
            if i + 1 < len(blocks):
                pending_read = reader.submit(runner.stage, volume, blocks[i + 1])
            labels, probs = runner.compute(block, plan, region, staged)
            finish = runner.start_download(labels, probs)
            del region, staged
            if delay:
                time.sleep(delay)
            if pending_write is not None:
                pending_write.result()          # surface write errors in order
                if on_block:
                    on_block(results[-1])
            pending_write = writer.submit(store, block, finish)
            results.append((block.key, block.voxels, time.perf_counter() - t0))
        if pending_write is not None:
            pending_write.result()
            if on_block:
                on_block(results[-1])
    return results
