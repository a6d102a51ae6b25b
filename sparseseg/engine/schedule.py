"""The execute step's scheduling: block groups run in this process or as small Dask tasks in a
bounded window; a failed group is split, its blocks retried alone, then recorded. `dask_client`
is the one place a Dask client is made (an existing scheduler, or a local cluster)."""

from __future__ import annotations

import logging
import os
import queue
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import replace

from sparseseg.engine.backends import cached_backend
from sparseseg.engine.backends.select import resolve_backend, resolve_device
from sparseseg.engine.worker import process_blocks
from sparseseg.errors import SparsesegError, one_line

log = logging.getLogger("sparseseg.infer")


def backend_info(job):
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
        return finished, None, backend_info(job)
    except Exception as e:
        return finished, one_line(e), None


def _failure(block, error: str) -> dict:
    return {"key": block.key, "region": [[s.start, s.stop] for s in block.slices], "error": error}


class _Retries:
    """The blocks of failed groups: rerun alone up to `retries` times, then recorded as failed."""

    def __init__(self, retries: int):
        self.retries, self.solo, self.attempts, self.failed = retries, deque(), {}, []

    def add(self, blocks, finished, error: str) -> None:
        finished_keys = {r[0] for r in finished}
        for b in blocks:
            if b.key in finished_keys:
                continue
            n = self.attempts[b.key] = self.attempts.get(b.key, 0) + 1
            if n <= self.retries:
                self.solo.append(b)
            else:
                log.debug("block %s failed for good: %s", b.key, error)
                self.failed.append(_failure(b, error))


def schedule(submit, groups, advance, retries: int, window):
    """Run block groups through `submit(blocks) -> future of run_group's result`, at most
    `window()` tasks in flight (backpressure: the client holds a bounded number of futures, so
    memory stays flat and the first tasks start at once however many blocks there are).

    A group that fails is split: its unfinished blocks are rerun alone (wherever the scheduler
    puts them), each up to `retries` times; a block that still fails is recorded and the run
    goes on. A task lost with its worker (KilledWorker) is a failed attempt like any other.
    Returns (failed blocks as dicts, backend info or None)."""
    done_q: queue.Queue = queue.Queue()
    again = _Retries(retries)
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
            if again.solo:
                launch([again.solo.popleft()], True)
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
            finished, error, got = [], one_line(e), None
        info = info or got
        if finished and advance is not None:
            advance(finished)
        if error is not None:
            again.add(blocks, finished, error)
    again.failed.sort(key=lambda f: f["key"])
    return again.failed, info


def in_process(job, todo, advance, retries):
    # One group: reading the next block and writing the previous one overlap with compute.
    def submit(blocks):
        f = Future()
        f.set_result(run_group(job, blocks, on_block=lambda result: advance([result])))
        return f

    failed, info = schedule(submit, iter([todo]), None, retries, lambda: 1)
    if info is None:
        info = backend_info(job)
    return info[0], info[1], failed


def local_cluster(workers: int | None, device: str):
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


def cluster_threads(client) -> int:
    """Torch threads per worker so that the workers on one host never oversubscribe its cores."""
    workers = client.scheduler_info().get("workers", {})
    per_host = Counter(w.get("host") for w in workers.values())
    try:
        cores = client.run(os.cpu_count)
    except Exception:
        return 0
    fits = [max(1, (cores.get(addr) or 1) // (per_host[w.get("host")] * max(1, w.get("nthreads", 1))))
            for addr, w in workers.items()]
    return min(fits) if fits else 0


def dask_client(workers, scheduler, device, cluster=None):
    """The one place a Dask client is made: (client, torch threads per worker, whether this run
    owns the cluster and closes it). `cluster`: engine/cluster.py's SLURM jobs or dask-cuda,
    started here."""
    if cluster is not None:
        client, threads = cluster.start(device)
        return client, threads, True
    if scheduler:
        from dask.distributed import Client

        try:
            client = Client(scheduler, timeout=10)
        except (OSError, TimeoutError) as e:
            raise SparsesegError(f"cannot reach the Dask scheduler at {scheduler}: {e}".splitlines()[0]) from None
        return client, cluster_threads(client), False
    client, threads = local_cluster(workers, device)
    return client, threads, True


def _window(client):
    """Enough tasks queued to keep every worker thread busy; refreshed as workers come and go."""
    cache = {"t": 0.0, "n": 2 * max(1, len(client.scheduler_info().get("workers", {})))}

    def window():
        if time.monotonic() - cache["t"] > 5:
            info = client.scheduler_info().get("workers", {})
            cache["n"] = max(4, 3 * sum(w.get("nthreads", 1) for w in info.values()))
            cache["t"] = time.monotonic()
        return cache["n"]

    return window


def with_dask(job, todo, advance, workers, scheduler, device, group_size, retries=2, cluster=None):
    client, threads, owned = dask_client(workers, scheduler, device, cluster)
    try:
        if threads:
            job = replace(job, backend=replace(job.backend, threads=threads))
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        # Small tasks, several per worker: good balance, and a lost worker loses little work.
        size = group_size or max(1, min(8, len(todo) // (4 * n_workers)))
        groups = (todo[i:i + size] for i in range(0, len(todo), size))

        def submit(blocks):
            return client.submit(run_group, job, blocks, pure=False)

        failed, info = schedule(submit, groups, advance, retries, _window(client))
        if info is None:                    # no block succeeded: name what was asked for
            info = (resolve_backend(job.backend), resolve_device(device, job.backend.engine))
        return info[0], info[1], failed
    finally:
        cluster = client.cluster if owned else None
        client.close()
        if cluster is not None:
            cluster.close()
