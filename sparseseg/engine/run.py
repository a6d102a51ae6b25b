"""`sparseseg-infer`: validate everything cheap first, create (or resume) the output store, then
hand one small task per group of blocks to Dask (or run them in this process)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from sparseseg.engine.backends import BackendSpec
from sparseseg.engine.blocks import make_blocks
from sparseseg.engine.resume import RUN_KEY
from sparseseg.engine.store import done_keys
from sparseseg.engine.worker import BlockJob, process_blocks
from sparseseg.errors import SparsesegError

log = logging.getLogger("sparseseg.infer")


def default_output(input_path: str) -> Path:
    from sparseseg.volume import split_store_path

    store = Path(split_store_path(input_path)[0])
    return store.with_name(store.name.split(".")[0] + "_segmentation.zarr")


def _run_record(contract, engine_sha, geometry, block, tile, overlap, shape, probabilities, levels=1) -> dict:
    return {"engine_sha256": engine_sha, "checkpoint_sha256": contract.get("checkpoint_sha256"),
            "geometry": geometry.to_dict(), "block": list(block), "tile": list(tile), "overlap": overlap,
            "input_shape": list(shape), "probabilities": probabilities,
            "class_names": contract["class_names"], "levels": levels}


def resolve_output(output, input_path, as_label: str | None = None, input_inner: str | None = None):
    """(output location, the OME-Zarr image it is a label image of, or None).

    `as_label NAME` puts the segmentation beside an OME-Zarr image INPUT as INPUT/labels/NAME; an
    --output of the form IMAGE.zarr/labels/NAME (IMAGE.zarr an OME-Zarr image) does the same.
    Anything else is a standalone OME-Zarr image."""
    from sparseseg.labels_zarr import is_ome_image
    from sparseseg.volume import is_url, split_store_path

    if as_label is not None:
        if output:
            raise SparsesegError("--output and --as-label exclude each other")
        if not as_label or any(c in as_label for c in "/\\:") or as_label.startswith("."):
            raise SparsesegError(f"--as-label {as_label!r}: give a plain name (no '/', ':' or leading '.')")
        store, inner = split_store_path(str(input_path))
        inner = (input_inner or inner or "").strip("/")
        if is_url(store):
            raise SparsesegError("--as-label needs a local OME-Zarr image as INPUT; for a URL input name --output")
        image = Path(store).joinpath(*inner.split("/")) if inner else Path(store)
        if inner and not is_ome_image(image) and is_ome_image(image.parent):
            image = image.parent            # INPUT named a level of the image (img.zarr:0): its image group
        if not is_ome_image(image):
            raise SparsesegError(f"--as-label needs INPUT to be an OME-Zarr image group; {image} is not one")
        image = image.resolve()
        return str(image / "labels" / as_label), image
    out = _output_location(output, input_path)
    if not is_url(out):
        p = Path(out)
        if p.parent.name == "labels" and is_ome_image(p.parent.parent):
            return out, p.parent.parent
    return out, None


def check_output_target(out, label_image, input_path, overwrite: bool) -> None:
    """The output checks a command makes before long work (densify trains first): an existing
    output needs `overwrite`; a label image must fit its image. Nothing is written."""
    from sparseseg.labels_zarr import label_exists, label_levels
    from sparseseg.volume import check_output, is_url, open_volume

    if label_image is None:
        if not is_url(out):
            check_output(out, overwrite)
        return
    label_levels(label_image, open_volume(str(input_path)).shape)
    if label_exists(label_image, Path(out).name) and not overwrite:
        raise SparsesegError(f"{out} exists; pass --overwrite to replace it")
    check_output(Path(label_image) / "labels", replace=True)


def _output_levels(shape, voxel_size, pyramid: int, label_image) -> tuple[list, list]:
    """(z, y, x) shapes and scales of the output's levels: a label image has its image's levels
    (NGFF); a standalone output has 1 + `pyramid` (fewer when the volume is down to one voxel)."""
    from sparseseg import labels_zarr as lz

    if label_image is not None:
        shapes, scales = lz.label_levels(label_image, shape)
        if pyramid and pyramid != len(shapes) - 1:
            raise SparsesegError(f"a label image has the levels of its image ({len(shapes) - 1} downsampled); "
                                 f"drop --pyramid {pyramid}")
        return shapes, scales
    shapes, scales = lz.plan_levels(voxel_size, shape, 1 + max(0, int(pyramid or 0)))
    if pyramid and len(shapes) < pyramid + 1:
        log.warning("--pyramid %d: only %d downsampled levels before the volume is one voxel", pyramid,
                    len(shapes) - 1)
    return shapes, scales


def _prepare_output(out: str, record: dict, levels, num_classes, resume: bool, overwrite: bool,
                    storage_options=None, label_image=None):
    """Check the output (nothing is touched before every check has passed), take its lease,
    then create it (or keep it, to resume). `levels`: (shapes, scales) of the output's levels.
    Returns the held Lease; the caller releases it."""
    import zarr

    from sparseseg import labels_zarr as lz
    from sparseseg.engine.store import Lease, clear_store, local_path, store_exists
    from sparseseg.volume import check_output, store_error

    options = storage_options or {}
    zkw = {"storage_options": options} if options and local_path(out) is None else {}
    try:
        exists = store_exists(out, options)
    except Exception as e:  # unreachable store, bad credentials, missing fsspec backend
        raise SparsesegError(f"cannot reach the output store {out}: {store_error(e)}") from None
    lease = Lease(out, options)
    if exists:
        cur = lease.holder()
        if cur is not None:                 # one line, whatever the flags
            raise SparsesegError(lease.refusal(cur))
        if resume:
            try:
                attrs = dict(zarr.open_group(str(out), mode="r", **zkw).attrs)
            except Exception:
                raise SparsesegError(f"{out} exists but is not a sparseseg output; cannot resume into it") from None
            old = attrs.get(RUN_KEY)
            if old is None:
                raise SparsesegError(f"{out} was not written by sparseseg-infer; cannot resume into it")
            for key, what in (("engine_sha256", "engine"), ("geometry", "network geometry"), ("block", "--block"),
                              ("tile", "--tile"), ("overlap", "overlap"), ("input_shape", "input shape"),
                              ("probabilities", "--probabilities"), ("levels", "number of levels (--pyramid)")):
                was = old.get(key, 1 if key == "levels" else None)      # outputs from before levels had 1
                if was != record[key]:
                    raise SparsesegError(f"cannot resume {out}: it was written with a different {what} "
                                         f"({was} vs {record[key]}); use --overwrite to start again")
        elif not overwrite:
            raise SparsesegError(f"{out} exists; pass --resume to continue it or --overwrite to replace it")
    if label_image is not None:             # IMAGE.zarr/labels may not exist yet: IMAGE.zarr must be writable
        check_output(Path(label_image) / "labels", replace=True)
    elif local_path(out) is not None:
        check_output(local_path(out), replace=True)
    try:
        lease.acquire()                     # also proves the store is writable, before anything is removed
    except SparsesegError:
        raise
    except Exception as e:
        why = "its bucket or parent directory does not exist" if isinstance(e, FileNotFoundError) else store_error(e)
        raise SparsesegError(f"cannot write to the output store {out}: {why}") from None
    if exists and resume:
        return lease
    try:
        if exists:
            clear_store(out, options)
        shape = tuple(record["input_shape"])
        shapes, scales = levels
        chunks = tuple(record["block"])
        names = record["class_names"]
        # The group holds only our lease now; the image's metadata and arrays are written around it.
        if label_image is not None:
            lz.init_label_image(label_image, Path(out).name, chunks, names, "uint8", extra_attrs={RUN_KEY: record})
            group = zarr.open_group(str(out), mode="r+")
        else:
            group = zarr.open_group(str(out), mode="a", zarr_format=3, **zkw)
            lz.init_levels(group, shapes, scales, chunks, "uint8", "segmentation", None,
                           {"sparseseg": {"class_names": list(names)}, RUN_KEY: record})
        if record["probabilities"]:
            meta = {"sparseseg": {"axes": "czyx", "class_names": names,
                                  "scale": "p*255" if record["probabilities"] == "uint8" else "probability"}}
            if len(shapes) == 1:
                group.create_array("probabilities", shape=(num_classes,) + shape, dtype=record["probabilities"],
                                   chunks=(1,) + chunks, fill_value=0, dimension_names=["c", "z", "y", "x"],
                                   attributes=meta)
            else:                           # its own NGFF image: levels like the labels', mean pyramid
                lz.init_levels(group.create_group("probabilities"), shapes, scales, chunks,
                               record["probabilities"], "probabilities", num_classes, meta)
    except Exception as e:
        lease.release()
        raise SparsesegError(f"cannot write to the output store {out}: {store_error(e)}") from None
    return lease


def _local_cluster(workers: int | None, device: str):
    """A local Dask cluster: one worker per GPU (dask-cuda pins each to its GPU), else CPU
    workers sharing the cores: workers x torch threads never exceeds the core count. Returns
    (client, torch threads per worker; 0 = library default)."""
    from dask.distributed import Client, LocalCluster

    # The cluster's own logs (scheduler, nanny, worker start/stop) only with --verbose.
    quiet = logging.INFO if logging.getLogger("distributed").isEnabledFor(logging.INFO) else logging.ERROR
    if quiet == logging.ERROR:
        import warnings

        # The scheduler's HTTP endpoint moves to a free port when 8787 is taken: nothing to act on.
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
    gpus = 0
    if device != "cpu":
        try:
            import torch

            gpus = torch.cuda.device_count()
        except ImportError:
            gpus = 0
    if gpus:
        try:
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(n_workers=workers or gpus, threads_per_worker=1, dashboard_address=None,
                                       silence_logs=quiet)
            return Client(cluster), 2
        except ImportError:
            if gpus > 1:
                log.warning("%d GPUs but dask-cuda is not installed: using one GPU worker", gpus)
            workers = 1
    cores = os.cpu_count() or 1
    n = workers or (1 if gpus else max(1, cores // 4))
    threads = max(1, cores // n) if not gpus else 2
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=quiet)
    return Client(cluster), threads


def run_inference(engine, input_path, output=None, *, workers=None, scheduler=None, block=None, tile=None, batch=None,
                  overlap=0.5, probabilities=None, resume=False, overwrite=False, device="auto", precision="fp32",
                  group_size=None, progress=None, backend="auto", dry_run=False,
                  assume_voxels_per_second=None, storage_options=None, input_inner=None, retries=2, pyramid=0,
                  as_label=None, kernels=None, cluster=None) -> dict:
    from sparseseg.model.checkpoint import file_sha256
    from sparseseg.model.contract import geometry_of_contract, read_contract
    from sparseseg.volume import open_volume

    if resume and overwrite:
        raise SparsesegError("--resume and --overwrite exclude each other")
    t_start = time.time()
    contract = read_contract(engine)
    engine_sha = file_sha256(engine)
    vol = open_volume(input_path, storage_options=storage_options, inner=input_inner)
    if vol.channels != contract["in_channels"]:
        raise SparsesegError(f"{input_path} has {vol.channels} channel(s), the engine expects {contract['in_channels']}")
    geometry = geometry_of_contract(contract)
    shape = vol.shape
    from sparseseg.engine.backends import resolve_backend
    from sparseseg.engine.plan import choose, gather_normalization, plan_figures, resolve_device

    spec = BackendSpec(str(Path(engine).resolve()), device, precision, backend=backend)
    backend_name = resolve_backend(spec)
    run_device = resolve_device(engine, device)
    from sparseseg.kernels.select import check_kernels, kernels_option

    kernels = kernels_option(kernels)
    check_kernels(kernels, run_device)
    if resume and not dry_run:          # the recorded block/tile/batch, not today's defaults
        from sparseseg.engine.resume import resume_choice

        block, tile, batch = resume_choice(resolve_output(output, input_path, as_label, input_inner)[0], engine_sha,
                                           block, tile, batch, storage_options)
    blk, tile, batch = choose(contract, shape, device=run_device, block=block, tile=tile, batch=batch,
                              overlap=overlap, precision=precision)
    if dry_run:
        fig = plan_figures(contract, shape, blk, tile, batch, overlap, assume_voxels_per_second)
        return {"dry_run": True, "engine": str(engine), "input": str(input_path), "backend": backend_name,
                "device": run_device, **fig}
    out, label_image = resolve_output(output, input_path, as_label, input_inner)
    levels = _output_levels(shape, vol.voxel_size, pyramid, label_image)
    record = _run_record(contract, engine_sha, geometry, blk, tile, overlap, shape, probabilities, len(levels[0]))
    record["batch"] = batch             # reused on resume (engine/resume.py)
    lease = _prepare_output(out, record, levels, contract["num_classes"], resume, overwrite, storage_options,
                            label_image)

    blocks = make_blocks(shape, blk)
    done = done_keys(out, storage_options) if resume else set()
    todo = [b for b in blocks if b.key not in done]
    skipped = len(blocks) - len(todo)
    job = BlockJob(_worker_location(vol.source), _worker_location(out), spec, geometry.to_dict(), shape, tile, overlap, batch, probabilities,
                   normalization=gather_normalization(contract, vol), storage_options=storage_options or None,
                   run_id=lease.owner["id"], kernels=kernels)
    voxels_total = sum(b.voxels for b in todo)
    log.info("%s: %d blocks of %s (%d to compute, %d already done), tile %s, batch %d, %s %s on %s", input_path,
             len(blocks), blk, len(todo), skipped, tile, batch, backend_name, precision, run_device)

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

    backend_device, failed = run_device, []
    try:
        if todo:
            if workers == 0 and scheduler is None:
                backend_name, backend_device, failed = _in_process(job, todo, advance, retries)
            else:
                backend_name, backend_device, failed = _with_dask(job, todo, advance, workers, scheduler, device,
                                                                  group_size, retries, cluster)
        if not failed:
            _write_levels(out, record, storage_options, recompute=bool(todo))
        elif record["levels"] > 1:
            log.warning("the coarser levels are not written while blocks have failed: rerun with --resume")
    finally:
        bar.close()
        _finish(out, lease, failed, storage_options)
    seconds = time.time() - t_start
    voxels_total -= sum(int(np.prod([hi - lo for lo, hi in f["region"]])) for f in failed)
    return {"output": str(out), "voxels": int(np.prod(shape)), "voxels_computed": voxels_total,
            "seconds": round(seconds, 3), "voxels_per_second": round(voxels_total / max(time.time() - t0, 1e-9), 1),
            "blocks": len(blocks), "blocks_computed": len(todo) - len(failed), "blocks_skipped": skipped,
            "blocks_failed": len(failed), "failed": failed, **_read_figures(vol, geometry, shape, blk, tile, overlap),
            "backend": backend_name, "precision": precision, "device": backend_device, "block": list(blk), "tile": list(tile),
            "batch": batch, "levels": record["levels"], "label_image": str(label_image) if label_image else None}


def _in_process(job, todo, advance, retries):
    # One group: reading the next block and writing the previous one overlap with compute.
    def submit(blocks):
        from concurrent.futures import Future

        f = Future()
        f.set_result(run_group(job, blocks, on_block=lambda result: advance([result])))
        return f

    failed, info = _schedule(submit, iter([todo]), None, retries, lambda: 1)
    if info is None:
        info = _backend_info(job)
    return info[0], info[1], failed


def _backend_info(job):
    from sparseseg.engine.backends import cached_backend

    b = cached_backend(job.backend)
    return b.name, str(b.device)


def run_group(job, blocks, on_block=None):
    """The task body: run a group of blocks. It never raises: an exception raised in a Dask
    task is logged with its traceback by the worker, and a failed block is an expected outcome
    here (recorded, retried, summarized). Returns (finished results, one-line error or None,
    (backend name, device) or None)."""
    finished = []

    def record(result):
        finished.append(result)
        if on_block is not None:
            on_block(result)

    try:
        process_blocks(job, blocks, on_block=record)
        return finished, None, _backend_info(job)
    except Exception as e:
        return finished, _one_line(e), None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, SparsesegError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _failure(block, error: str) -> dict:
    return {"key": block.key, "region": [[s.start, s.stop] for s in block.slices], "error": error}


def _schedule(submit, groups, advance, retries: int, window):
    """Run block groups through `submit(blocks) -> future of run_group's result`, at most
    `window()` tasks in flight (backpressure: the client holds a bounded number of futures, so
    memory stays flat and the first tasks start at once however many blocks there are).

    A group that fails is split: its unfinished blocks are rerun alone (wherever the scheduler
    puts them), each up to `retries` times; a block that still fails is recorded and the run
    goes on. A task lost with its worker (KilledWorker) is a failed attempt like any other.
    Returns (failed blocks as dicts, backend info or None)."""
    import queue
    from collections import deque

    done_q: queue.Queue = queue.Queue()
    solo: deque = deque()
    attempts: dict[str, int] = {}
    failed: list[dict] = []
    info = None
    in_flight = 0

    def launch(blocks, alone):
        nonlocal in_flight
        fut = submit(blocks)
        in_flight += 1
        fut.add_done_callback(lambda f, b=blocks, a=alone: done_q.put((f, b, a)))

    while True:
        limit = window()
        while in_flight < limit:
            if solo:
                launch([solo.popleft()], True)
                continue
            group = next(groups, None)
            if group is None:
                break
            launch(group, False)
        if in_flight == 0:
            break
        fut, blocks, alone = done_q.get()
        in_flight -= 1
        try:
            finished, error, got = fut.result()
        except Exception as e:  # the task itself was lost: KilledWorker, a scheduler gone, ...
            finished, error, got = [], _one_line(e), None
        info = info or got
        if finished and advance is not None:
            advance(finished)
        if error is None:
            continue
        finished_keys = {r[0] for r in finished}
        for b in blocks:
            if b.key in finished_keys:
                continue
            n = attempts[b.key] = attempts.get(b.key, 0) + 1
            if n <= retries:
                solo.append(b)
            else:
                log.debug("block %s failed for good: %s", b.key, error)
                failed.append(_failure(b, error))
    failed.sort(key=lambda f: f["key"])
    return failed, info


def _read_figures(vol, geometry, shape, block, tile, overlap) -> dict:
    """Input bytes the store serves per output voxel (whole chunks: the halo's chunk-aligned
    superset) and the chunk requests, for chunked inputs; {} for files read whole."""
    from sparseseg.engine.store import read_cost

    chunks = getattr(vol.array, "chunks", None)
    if not chunks or not isinstance(chunks, tuple):
        return {}
    cost = read_cost(geometry, shape, block, tile, overlap, chunks, vol.dtype.itemsize, vol.channels)
    return {"input_bytes_per_output_voxel": cost["input_bytes_per_output_voxel"],
            "input_chunk_requests": cost["input_chunk_requests"]}


def _output_location(output, input_path) -> str:
    """The output as a URL (kept as given) or a local path (absolute: workers may run elsewhere)."""
    from sparseseg.volume import is_url

    if output:
        return str(output).rstrip("/") if is_url(output) else str(Path(output).resolve())
    from sparseseg.volume import split_store_path

    store = split_store_path(str(input_path))[0]
    if is_url(store):
        raise SparsesegError("name the output with --output when the input is a URL")
    return str(default_output(input_path).resolve())


def _worker_location(source: str) -> str:
    """A local `store[:inner]` made absolute for workers in other directories; URLs as they are."""
    from sparseseg.volume import is_url, join_store_path, split_store_path

    if is_url(source):
        return source
    store, inner = split_store_path(source)
    return join_store_path(str(Path(store).resolve()), inner)


PYRAMID_META = "pyramid.json"


def _write_levels(out, record, storage_options, recompute: bool) -> None:
    """Once every block is written (this run's or an earlier one's), fill the coarser levels
    chunk by chunk (labels: nearest, probabilities: mean), then note it in the bookkeeping, so
    a resumed complete run does not write them again. Runs under the output's lease."""
    import zarr

    from sparseseg import labels_zarr as lz
    from sparseseg.engine.store import local_path, read_meta, write_meta
    from sparseseg.volume import store_error

    if record["levels"] <= 1 or (not recompute and (read_meta(out, PYRAMID_META, storage_options) or {}).get(
            "complete")):
        return
    t0 = time.time()
    zkw = {"storage_options": storage_options} if storage_options and local_path(out) is None else {}
    try:
        write_meta(out, PYRAMID_META, {"complete": False}, storage_options)
        group = zarr.open_group(str(out), mode="r+", **zkw)
        lz.write_pyramid(group, "nearest")
        if record["probabilities"] and isinstance(group["probabilities"], zarr.Group):
            lz.write_pyramid(group["probabilities"], "mean")
        write_meta(out, PYRAMID_META, {"complete": True, "levels": record["levels"],
                                       "seconds": round(time.time() - t0, 3)}, storage_options)
    except SparsesegError:
        raise
    except Exception as e:  # the blocks are safe; --resume writes the levels again
        raise SparsesegError(f"writing the coarser levels of {out} failed ({store_error(e)}); every block is "
                             f"written: rerun with --resume to write them") from None
    log.info("%d coarser levels written in %.1f s", record["levels"] - 1, time.time() - t0)


def _finish(out, lease, failed, storage_options) -> None:
    """Record the failed blocks beside the markers, then let the output go."""
    from sparseseg.engine.store import write_meta

    try:
        write_meta(out, "failed.json", {"failed": failed}, storage_options)
    except Exception as e:  # the blocks are safe; only this note is missing
        log.warning("could not record the failed blocks in %s: %s", out, _one_line(e))
    finally:
        lease.release()


def _cluster_threads(client) -> int:
    """Torch threads per worker so that the workers on one host never oversubscribe its cores."""
    from collections import Counter

    workers = client.scheduler_info().get("workers", {})
    per_host = Counter(w.get("host") for w in workers.values())
    try:
        cores = client.run(os.cpu_count)
    except Exception:
        return 0
    fits = [max(1, (cores.get(addr) or 1) // (per_host[w.get("host")] * max(1, w.get("nthreads", 1))))
            for addr, w in workers.items()]
    return min(fits) if fits else 0


def _with_dask(job, todo, advance, workers, scheduler, device, group_size, retries=2, cluster=None):
    import time as _time
    from dataclasses import replace

    if scheduler:
        from dask.distributed import Client

        try:
            client = Client(scheduler, timeout=10)
        except (OSError, TimeoutError) as e:
            raise SparsesegError(f"cannot reach the Dask scheduler at {scheduler}: {e}".splitlines()[0]) from None
        threads = _cluster_threads(client)
    elif cluster is not None:               # engine/cluster.py: SLURM jobs or dask-cuda, started here
        client, threads = cluster.start(device)
    else:
        client, threads = _local_cluster(workers, device)
    try:
        if threads:
            job = replace(job, backend=replace(job.backend, threads=threads))
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        # Small tasks, several per worker: good balance, and a lost worker loses little work.
        size = group_size or max(1, min(8, len(todo) // (4 * n_workers)))
        groups = (todo[i:i + size] for i in range(0, len(todo), size))
        cache = {"t": 0.0, "n": 2 * n_workers}

        def window():
            # Enough tasks queued to keep every worker thread busy; refreshed as workers come and go.
            if _time.monotonic() - cache["t"] > 5:
                info = client.scheduler_info().get("workers", {})
                cache["n"] = max(4, 3 * sum(w.get("nthreads", 1) for w in info.values()))
                cache["t"] = _time.monotonic()
            return cache["n"]

        def submit(blocks):
            return client.submit(run_group, job, blocks, pure=False)

        failed, info = _schedule(submit, groups, advance, retries, window)
        if info is None:                    # no block succeeded: name what was asked for
            from sparseseg.engine.backends import resolve_backend
            from sparseseg.engine.plan import resolve_device

            info = (resolve_backend(job.backend), resolve_device(job.backend.engine, device))
        return info[0], info[1], failed
    finally:
        cluster = None if scheduler else client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
