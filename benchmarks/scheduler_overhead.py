"""The engine's bookkeeping cost per block, without compute: sparseseg-infer's Dask scheduling
path (bounded submission window, groups, retries bookkeeping, progress) over many tiny blocks,
with the block body replaced by a stub that only writes the block's done marker (fsync'd, as
the real writer does). What remains is what a block costs beyond its own read/forward/write:
task submission, scheduling, the marker, the client's bookkeeping.

For each block count: wall seconds and seconds per block; the start time (listing the done
markers + the first finished block); the client's peak RSS growth while scheduling (sampled
every 20 ms), which must stay flat as the block count grows (only a bounded window of futures is
held). For the largest count it also times one listing of that many markers (a --resume start).

    python benchmarks/scheduler_overhead.py --counts 100,1000,10000,100000 \
        --out benchmarks/results/scheduler_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import MISSING, fields
from datetime import datetime, timezone
from pathlib import Path

import sys

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/scheduler_overhead.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import record  # noqa: E402


def stub_process_blocks(job, blocks, on_block=None, **_):
    from sparseseg.engine.store import mark_done

    results = []
    for b in blocks:
        mark_done(job.output, b)
        results.append((b.key, b.voxels, 0.0))
        if on_block is not None:
            on_block(results[-1])
    return results


def patch():
    """No compute in this process or in a worker: run_group calls the stub."""
    import sparseseg.engine.schedule as schedule

    schedule.process_blocks = stub_process_blocks
    schedule.backend_info = lambda job: ("none", "cpu")
    return os.getpid()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


def one(n: int, client, address: str, root: Path) -> dict:
    from sparseseg.engine.backends import BackendSpec
    from sparseseg.engine.blocks import make_blocks
    from sparseseg.engine.schedule import with_dask
    from sparseseg.engine.store import done_keys
    from sparseseg.engine.worker import BlockJob

    out = root / f"out{n}.zarr"
    out.mkdir()
    kw = {f.name: None for f in fields(BlockJob) if f.default is MISSING and f.default_factory is MISSING}
    kw.update(output=str(out), backend=BackendSpec("none.pt"))
    job = BlockJob(**kw)
    shape = (max(1, n // 100), 10, 10)           # one voxel per block: the bookkeeping is all there is
    t_plan = time.perf_counter()
    blocks = make_blocks(shape, (1, 1, 1))
    t_planned = time.perf_counter()
    peak = [rss_mb()]
    base = peak[0]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first = []
    t0 = time.perf_counter()
    done = done_keys(out)
    todo = [b for b in blocks if b.key not in done]

    def advance(results):
        if not first:
            first.append(time.perf_counter())

    with_dask(job, todo, advance, None, address, "cpu", None, 2)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    t_list = time.perf_counter()
    marked = len(done_keys(out))
    t_listed = time.perf_counter() - t_list
    assert marked == len(blocks), (marked, len(blocks))
    return {"blocks": len(blocks), "seconds": round(wall, 3), "seconds_per_block": round(wall / len(blocks), 6),
            "start_seconds": round(first[0] - t0, 3), "plan_seconds": round(t_planned - t_plan, 3),
            "client_rss_growth_mb": round(peak[0] - base, 1),
            "listing_seconds_of_all_markers": round(t_listed, 3)}


@contextlib.contextmanager
def external_cluster(workers: int, tmp: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              **quiet)]
    time.sleep(2)
    procs += [subprocess.Popen(["dask", "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                                "--local-directory", tmp], **quiet) for _ in range(workers)]
    try:
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
            p.wait(30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="100,1000,10000")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--external", action="store_true",
                    help="scheduler and workers as `dask scheduler`/`dask worker` processes, so the client's "
                         "memory is the client's alone (a LocalCluster's scheduler lives in the client process)")
    args = ap.parse_args()
    from dask.distributed import Client, LocalCluster

    patch()
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if args.external:
            address = stack.enter_context(external_cluster(args.workers, tmp))
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                                       dashboard_address=None, silence_logs=40))
            address = cluster.scheduler_address
        client = stack.enter_context(Client(address))
        client.wait_for_workers(args.workers, timeout=120)
        client.run(patch)
        for n in map(int, args.counts.split(",")):
            rows.append(one(n, client, address, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "scheduler overhead per block, no compute (stub block body writing only the marker)",
              **record(),
              "load_average_before": [round(x, 2) for x in load],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "dask_workers": args.workers, "threads_per_worker": 1,
              "scheduler": "separate `dask scheduler` process" if args.external else
              "LocalCluster (scheduler inside the client process, as without --scheduler)", "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
