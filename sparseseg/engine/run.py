"""`sparseseg-infer`: validate everything cheap first, create (or resume) the output store, then
hand one small task per group of blocks to Dask (or run them in this process)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from sparseseg.engine.backends import BackendSpec
from sparseseg.engine.blocks import make_blocks
from sparseseg.engine.store import DONE_DIR, done_keys
from sparseseg.engine.worker import BlockJob, process_blocks
from sparseseg.errors import SparsesegError

log = logging.getLogger("sparseseg.infer")

RUN_KEY = "sparseseg_run"


def default_output(input_path: str) -> Path:
    from sparseseg.volume import split_store_path

    store = Path(split_store_path(input_path)[0])
    return store.with_name(store.name.split(".")[0] + "_segmentation.zarr")


def _run_record(contract, engine_sha, geometry, block, tile, overlap, shape, probabilities) -> dict:
    return {"engine_sha256": engine_sha, "checkpoint_sha256": contract.get("checkpoint_sha256"),
            "geometry": geometry.to_dict(), "block": list(block), "tile": list(tile), "overlap": overlap,
            "input_shape": list(shape), "probabilities": probabilities,
            "class_names": contract["class_names"]}


def _prepare_output(out: Path, record: dict, voxel_size, num_classes, resume: bool, overwrite: bool) -> None:
    import zarr

    from sparseseg.volume import check_output, ngff_attrs

    if out.exists():
        if resume:
            try:
                attrs = dict(zarr.open_group(str(out), mode="r").attrs)
            except Exception:
                raise SparsesegError(f"{out} exists but is not a sparseseg output; cannot resume into it") from None
            old = attrs.get(RUN_KEY)
            if old is None:
                raise SparsesegError(f"{out} was not written by sparseseg-infer; cannot resume into it")
            for key, what in (("engine_sha256", "engine"), ("geometry", "network geometry"), ("block", "--block"),
                              ("tile", "--tile"), ("overlap", "overlap"), ("input_shape", "input shape"),
                              ("probabilities", "--probabilities")):
                if old.get(key) != record[key]:
                    raise SparsesegError(f"cannot resume {out}: it was written with a different {what} "
                                         f"({old.get(key)} vs {record[key]}); use --overwrite to start again")
            return
        if not overwrite:
            raise SparsesegError(f"{out} exists; pass --resume to continue it or --overwrite to replace it")
    check_output(out, replace=True)
    if out.exists():
        shutil.rmtree(out)
    shape = tuple(record["input_shape"])
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    attrs = ngff_attrs("segmentation", voxel_size)
    attrs[RUN_KEY] = record
    group.attrs.update(attrs)
    group.create_array("0", shape=shape, dtype="uint8", chunks=tuple(record["block"]), fill_value=0)
    if record["probabilities"]:
        group.create_array("probabilities", shape=(num_classes,) + shape, dtype=record["probabilities"],
                           chunks=(1,) + tuple(record["block"]), fill_value=0,
                           attributes={"sparseseg": {"axes": "czyx", "class_names": record["class_names"],
                                                     "scale": "p*255" if record["probabilities"] == "uint8" else
                                                     "probability"}})
    (out / DONE_DIR).mkdir(parents=True)


def _local_cluster(workers: int | None, device: str):
    """A local Dask cluster: one worker per GPU (dask-cuda pins each to its GPU), else CPU
    workers sharing the cores."""
    from dask.distributed import Client, LocalCluster

    gpus = 0
    if device != "cpu":
        try:
            import torch

            gpus = torch.cuda.device_count()
        except ImportError:
            gpus = 0
    if gpus > 1 and device != "cpu":
        try:
            from dask_cuda import LocalCUDACluster

            return Client(LocalCUDACluster(n_workers=workers or gpus, threads_per_worker=1)), 1
        except ImportError:
            log.warning("%d GPUs but dask-cuda is not installed: using one GPU worker", gpus)
            workers = 1
    cores = os.cpu_count() or 1
    n = workers or (1 if gpus else max(1, cores // 4))
    threads = max(1, cores // n) if not gpus else 1
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    return Client(cluster), threads


def run_inference(engine, input_path, output=None, *, workers=None, scheduler=None, block=None, tile=None, batch=None,
                  overlap=0.5, probabilities=None, resume=False, overwrite=False, device="auto", precision="fp32",
                  group_size=None, progress=None, backend="auto", dry_run=False,
                  assume_voxels_per_second=None) -> dict:
    from sparseseg.model.checkpoint import file_sha256
    from sparseseg.model.contract import geometry_of_contract, read_contract
    from sparseseg.volume import open_volume, split_store_path

    if resume and overwrite:
        raise SparsesegError("--resume and --overwrite exclude each other")
    t_start = time.time()
    contract = read_contract(engine)
    engine_sha = file_sha256(engine)
    vol = open_volume(input_path)
    if vol.channels != contract["in_channels"]:
        raise SparsesegError(f"{input_path} has {vol.channels} channel(s), the engine expects {contract['in_channels']}")
    geometry = geometry_of_contract(contract)
    shape = vol.shape
    from sparseseg.engine.backends import resolve_backend
    from sparseseg.engine.plan import choose, gather_normalization, plan_figures, resolve_device

    spec = BackendSpec(str(Path(engine).resolve()), device, precision, backend=backend)
    backend_name = resolve_backend(spec)
    run_device = resolve_device(engine, device)
    blk, tile, batch = choose(contract, shape, device=run_device, block=block, tile=tile, batch=batch,
                              overlap=overlap)
    if dry_run:
        fig = plan_figures(contract, shape, blk, tile, batch, overlap, assume_voxels_per_second)
        return {"dry_run": True, "engine": str(engine), "input": str(input_path), "backend": backend_name,
                "device": run_device, **fig}
    out = Path(output) if output else default_output(input_path)
    record = _run_record(contract, engine_sha, geometry, blk, tile, overlap, shape, probabilities)
    _prepare_output(out, record, vol.voxel_size, contract["num_classes"], resume, overwrite)

    blocks = make_blocks(shape, blk)
    done = done_keys(out) if resume else set()
    todo = [b for b in blocks if b.key not in done]
    skipped = len(blocks) - len(todo)
    store, inner = split_store_path(input_path)
    source = str(Path(store).resolve()) + (f":{inner}" if inner else "")   # workers may run elsewhere
    job = BlockJob(source, str(out.resolve()), spec, geometry.to_dict(), shape, tile, overlap, batch, probabilities,
                   normalization=gather_normalization(contract, vol))
    voxels_total = sum(b.voxels for b in todo)
    log.info("%s: %d blocks of %s (%d to compute, %d already done), tile %s, batch %d, %s on %s", input_path,
             len(blocks), blk, len(todo), skipped, tile, batch, backend_name, run_device)

    show = sys.stderr.isatty() if progress is None else progress
    from tqdm import tqdm

    bar = tqdm(total=voxels_total, disable=not show, unit="vox", unit_scale=True, desc="infer")
    done_blocks, done_vox, t0 = 0, 0, time.time()

    def advance(results):
        nonlocal done_blocks, done_vox
        for _, vox, _ in results:
            done_blocks += 1
            done_vox += vox
            bar.update(vox)
        if not show:
            rate = done_vox / max(time.time() - t0, 1e-9)
            eta = (voxels_total - done_vox) / max(rate, 1e-9)
            log.info("blocks %d/%d, %.3g voxels/s, ETA %.0f s", done_blocks, len(todo), rate, eta)

    backend_device = run_device
    if todo:
        if workers == 0 and scheduler is None:
            backend_name, backend_device = _in_process(job, todo, advance)
        else:
            backend_name, backend_device = _with_dask(job, todo, advance, workers, scheduler, device, group_size)
    bar.close()
    seconds = time.time() - t_start
    return {"output": str(out), "voxels": int(np.prod(shape)), "voxels_computed": voxels_total,
            "seconds": round(seconds, 3), "voxels_per_second": round(voxels_total / max(time.time() - t0, 1e-9), 1),
            "blocks": len(blocks), "blocks_computed": len(todo), "blocks_skipped": skipped,
            "backend": backend_name, "device": backend_device, "block": list(blk), "tile": list(tile),
            "batch": batch}


def _in_process(job, todo, advance):
    from sparseseg.engine.backends import cached_backend

    backend = cached_backend(job.backend)
    # One group: reading the next block and writing the previous one overlap with compute.
    process_blocks(job, todo, on_block=lambda result: advance([result]))
    return backend.name, str(backend.device)


def _backend_info(job):
    from sparseseg.engine.backends import cached_backend

    b = cached_backend(job.backend)
    return b.name, str(b.device)


def _with_dask(job, todo, advance, workers, scheduler, device, group_size):
    from dask.distributed import as_completed

    if scheduler:
        from dask.distributed import Client

        try:
            client = Client(scheduler, timeout=10)
        except (OSError, TimeoutError) as e:
            raise SparsesegError(f"cannot reach the Dask scheduler at {scheduler}: {e}".splitlines()[0]) from None
        threads = 0
    else:
        client, threads = _local_cluster(workers, device)
    try:
        if threads:
            from dataclasses import replace

            job = replace(job, backend=replace(job.backend, threads=threads))
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        # Small tasks, several per worker: good balance, and a lost worker loses little work.
        size = group_size or max(1, min(8, len(todo) // (4 * n_workers)))
        groups = [todo[i:i + size] for i in range(0, len(todo), size)]
        futures = [client.submit(process_blocks, job, g, pure=False) for g in groups]
        info = client.submit(_backend_info, job, pure=False)
        try:
            for fut in as_completed(futures):
                advance(fut.result())
        except BaseException:
            client.cancel(futures)
            raise
        return info.result()
    finally:
        cluster = None if scheduler else client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
