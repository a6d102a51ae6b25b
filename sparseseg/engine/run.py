"""`sparseseg-infer` as four steps, each joined to the next by a small dataclass:

plan     validate everything cheap, read the contract, choose backend and device, tile, block
         and batch (RunPlan; `sparseseg.predict` makes the same JobPlan, engine/job.py)
output   reach the output store, take its lease, check the resume contract, create the layout
         and its levels (output.Output; engine/output.py)
execute  the blocks still to do, in this process or as Dask tasks (Execution; engine/schedule.py)
summary  the figures of the run, as a dict
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparseseg.engine.backends.base import BackendSpec
from sparseseg.engine.backends.select import resolve_backend, resolve_device
from sparseseg.engine.blocks import make_blocks
from sparseseg.engine.job import JobPlan, plan_job
from sparseseg.engine.output import (Output, finish, output_levels, prepare_output, resolve_output, worker_location,
                                     write_levels)
from sparseseg.engine.plan import plan_figures
from sparseseg.engine.resume import resume_choice
from sparseseg.engine.schedule import in_process, with_dask
from sparseseg.engine.store import done_keys, read_cost
from sparseseg.errors import SparsesegError
from sparseseg.model.contract import read_contract
from sparseseg.progress import progress_bar
from sparseseg.volume import open_volume

log = logging.getLogger("sparseseg.infer")


@dataclass
class RunPlan:
    """What the run computes and how, decided before anything is written."""

    engine: str
    input_path: str
    volume: object          # volume.Volume
    engine_sha: str
    backend: str            # the backend's name as chosen (the workers report the one that ran)
    job: JobPlan


@dataclass
class Execution:
    """What the execute step did: the blocks, the ones computed, the backend that ran, failures."""

    blocks: list
    todo: list
    backend: str
    device: str
    failed: list
    seconds: float          # computing the blocks (not planning nor creating the output)


def plan_run(engine, input_path, *, output=None, as_label=None, input_inner=None, resume=False, dry_run=False,
             device="auto", precision="fp32", backend="auto", kernels=None, block=None, tile=None, batch=None,
             overlap=0.5, storage_options=None) -> RunPlan:
    """Every check that needs no output: the engine's contract against the input, the backend and
    device, then block, tile and batch (on resume the recorded ones, not today's defaults)."""
    from sparseseg.model.checkpoint import file_sha256

    contract = read_contract(engine)
    engine_sha = file_sha256(engine)
    vol = open_volume(input_path, storage_options=storage_options, inner=input_inner)
    if vol.channels != contract["in_channels"]:
        raise SparsesegError(f"{input_path} has {vol.channels} channel(s), the engine expects {contract['in_channels']}")
    spec = BackendSpec(str(Path(engine).resolve()), device, precision, backend=backend)
    backend_name = resolve_backend(spec)
    run_device = resolve_device(device, engine)
    if resume and not dry_run:
        block, tile, batch = resume_choice(resolve_output(output, input_path, as_label, input_inner)[0], engine_sha,
                                           block, tile, batch, storage_options)
    job = plan_job(contract, vol.shape, spec, run_device, kernels=kernels, block=block, tile=tile, batch=batch,
                   overlap=overlap)
    return RunPlan(str(engine), str(input_path), vol, engine_sha, backend_name, job)


def dry_run_report(plan: RunPlan, voxels_per_second=None) -> dict:
    j = plan.job
    fig = plan_figures(j.contract, plan.volume.shape, j.block, j.tile, j.batch, j.overlap, voxels_per_second)
    return {"dry_run": True, "engine": plan.engine, "input": plan.input_path, "backend": plan.backend,
            "device": j.device, **fig}


def run_record(plan: RunPlan, probabilities, levels: int) -> dict:
    """The run record kept in the output: what a resume must share (engine/output.py), and the
    batch it reuses (engine/resume.py)."""
    j = plan.job
    return {"engine_sha256": plan.engine_sha, "checkpoint_sha256": j.contract.get("checkpoint_sha256"),
            "geometry": j.geometry.to_dict(), "block": list(j.block), "tile": list(j.tile), "overlap": j.overlap,
            "input_shape": list(plan.volume.shape), "probabilities": probabilities,
            "class_names": j.contract["class_names"], "levels": levels, "batch": j.batch}


def open_output(plan: RunPlan, output=None, *, as_label=None, input_inner=None, pyramid=0, probabilities=None,
                resume=False, overwrite=False, storage_options=None) -> Output:
    out, label_image = resolve_output(output, plan.input_path, as_label, input_inner)
    levels = output_levels(plan.volume.shape, plan.volume.voxel_size, pyramid, label_image)
    record = run_record(plan, probabilities, len(levels[0]))
    lease = prepare_output(out, record, levels, plan.job.contract["num_classes"], resume, overwrite,
                           storage_options, label_image)
    return Output(out, label_image, record, lease, storage_options)


class Progress:
    """A tqdm bar on a terminal, else a log line per finished group with the rate and ETA."""

    def __init__(self, total_voxels: int, total_blocks: int, show):
        self.total, self.blocks_total = total_voxels, total_blocks
        self.bar = progress_bar(total_voxels, show, unit="vox", unit_scale=True, desc="infer")
        self.show = not self.bar.disable
        self.blocks, self.voxels, self.t0 = 0, 0, time.time()

    def advance(self, results):
        for _, vox, _ in results:
            self.blocks += 1
            self.voxels += vox
            self.bar.update(vox)
        if not self.show:
            rate = self.voxels / max(time.time() - self.t0, 1e-9)
            eta = (self.total - self.voxels) / max(rate, 1e-9)
            log.info("blocks %d/%d, %.3g voxels/s, ETA %.0f s", self.blocks, self.blocks_total, rate, eta)

    def close(self):
        self.bar.close()


def execute(plan: RunPlan, out: Output, *, resume=False, probabilities=None, workers=None, scheduler=None,
            group_size=None, retries=2, progress=None, cluster=None) -> Execution:
    """The blocks not yet done, in this process (workers 0, no scheduler) or on Dask; then the
    coarser levels (once no block has failed) and the note of failed blocks."""
    j = plan.job
    blocks = make_blocks(plan.volume.shape, j.block)
    done = done_keys(out.location, out.storage_options) if resume else set()
    todo = [b for b in blocks if b.key not in done]
    job = j.block_job(plan.volume, worker_location(plan.volume.source), worker_location(out.location), probabilities,
                storage_options=out.storage_options or None, run_id=out.lease.owner["id"])
    log.info("%s: %d blocks of %s (%d to compute, %d already done), tile %s, batch %d, %s %s on %s", plan.input_path,
             len(blocks), j.block, len(todo), len(blocks) - len(todo), j.tile, j.batch, plan.backend,
             j.spec.precision, j.device)
    bar = Progress(sum(b.voxels for b in todo), len(todo), progress)
    backend_name, backend_device, failed = plan.backend, j.device, []
    try:
        if todo:
            if workers == 0 and scheduler is None and cluster is None:
                backend_name, backend_device, failed = in_process(job, todo, bar.advance, retries)
            else:
                backend_name, backend_device, failed = with_dask(job, todo, bar.advance, workers, scheduler,
                                                                 j.spec.device, group_size, retries, cluster)
        if not failed:
            write_levels(out.location, out.record, out.storage_options, recompute=bool(todo))
        elif out.record["levels"] > 1:
            log.warning("the coarser levels are not written while blocks have failed: rerun with --resume")
    finally:
        bar.close()
        finish(out.location, out.lease, failed, out.storage_options)
    return Execution(blocks, todo, backend_name, backend_device, failed, time.time() - bar.t0)


def _read_figures(vol, geometry, shape, block, tile, overlap) -> dict:
    """Input bytes the store serves per output voxel (whole chunks: the halo's chunk-aligned
    superset) and the chunk requests, for chunked inputs; {} for files read whole."""
    chunks = getattr(vol.array, "chunks", None)
    if not chunks or not isinstance(chunks, tuple):
        return {}
    cost = read_cost(geometry, shape, block, tile, overlap, chunks, vol.dtype.itemsize, vol.channels)
    return {"input_bytes_per_output_voxel": cost["input_bytes_per_output_voxel"],
            "input_chunk_requests": cost["input_chunk_requests"]}


def summary(plan: RunPlan, out: Output, ran: Execution, t_start: float) -> dict:
    j, shape = plan.job, plan.volume.shape
    computed = sum(b.voxels for b in ran.todo)
    computed -= sum(int(np.prod([hi - lo for lo, hi in f["region"]])) for f in ran.failed)
    return {"output": str(out.location), "voxels": int(np.prod(shape)), "voxels_computed": computed,
            "seconds": round(time.time() - t_start, 3), "voxels_per_second": round(computed / max(ran.seconds, 1e-9), 1),
            "blocks": len(ran.blocks), "blocks_computed": len(ran.todo) - len(ran.failed),
            "blocks_skipped": len(ran.blocks) - len(ran.todo), "blocks_failed": len(ran.failed), "failed": ran.failed,
            **_read_figures(plan.volume, j.geometry, shape, j.block, j.tile, j.overlap),
            "backend": ran.backend, "precision": j.spec.precision, "device": ran.device, "block": list(j.block),
            "tile": list(j.tile), "batch": j.batch, "levels": out.record["levels"],
            "label_image": str(out.label_image) if out.label_image else None}


def run_inference(engine, input_path, output=None, *, workers=None, scheduler=None, block=None, tile=None, batch=None,
                  overlap=0.5, probabilities=None, resume=False, overwrite=False, device="auto", precision="fp32",
                  group_size=None, progress=None, backend="auto", dry_run=False,
                  assume_voxels_per_second=None, storage_options=None, input_inner=None, retries=2, pyramid=0,
                  as_label=None, kernels=None, cluster=None) -> dict:
    """Segment `input_path` with `engine` into an OME-Zarr output: plan -> output -> execute ->
    summary (or, with `dry_run`, the plan's figures and nothing written). `cluster`: SLURM jobs or
    dask-cuda workers (engine/cluster.py), started for this run and shut down after it."""
    if resume and overwrite:
        raise SparsesegError("--resume and --overwrite exclude each other")
    t_start = time.time()
    plan = plan_run(engine, input_path, output=output, as_label=as_label, input_inner=input_inner, resume=resume,
                    dry_run=dry_run, device=device, precision=precision, backend=backend, kernels=kernels,
                    block=block, tile=tile, batch=batch, overlap=overlap, storage_options=storage_options)
    if dry_run:
        return dry_run_report(plan, assume_voxels_per_second)
    out = open_output(plan, output, as_label=as_label, input_inner=input_inner, pyramid=pyramid,
                      probabilities=probabilities, resume=resume, overwrite=overwrite, storage_options=storage_options)
    ran = execute(plan, out, resume=resume, probabilities=probabilities, workers=workers, scheduler=scheduler,
                  group_size=group_size, retries=retries, progress=progress, cluster=cluster)
    return summary(plan, out, ran, t_start)
