"""The engine's bookkeeping cost per block through SLURM jobs (`sparseseg-infer --cluster slurm`)
against a LocalCluster in the same session: scheduler_overhead.py's stub block body (no compute,
only the done marker) run through `--jobs` SLURM jobs of one Dask worker each, then through a
LocalCluster of as many workers. Also: seconds from submitting the jobs to the first worker
joining, and from `scancel` of one job to its replacement's worker joining.

Starts a one-node SLURM on loopback (tests/slurm_local.py) unless $SLURM_CONF names a running one.

    python benchmarks/slurm_overhead.py --counts 1000,5000 --out benchmarks/results/slurm_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/slurm_overhead.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import record  # noqa: E402
from benchmarks.scheduler_overhead import one, patch  # noqa: E402


def _workers(client) -> set:
    return {w["name"] for w in client.scheduler_info().get("workers", {}).values()}


def _wait(ok, timeout=180.0):
    t0 = time.perf_counter()
    while not ok():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("timed out")
        time.sleep(0.05)
    return time.perf_counter() - t0


def through_slurm(counts, jobs, root: Path) -> dict:
    from sparseseg.engine.cluster import cluster_from_options

    cluster = cluster_from_options("slurm", jobs=jobs, retries=1)
    cluster.check()
    t0 = time.perf_counter()
    client, _ = cluster.start("cpu")
    first = time.perf_counter() - t0
    try:
        all_up = _wait(lambda: len(_workers(client)) >= jobs) + first
        client.run(patch)
        address = client.cluster.scheduler_address
        rows = []
        for n in counts:
            rows.append(one(n, client, address, root))
            print(json.dumps({"slurm": rows[-1]}), flush=True)
        before = _workers(client)
        victim = cluster.queue()[0][0]
        t = time.perf_counter()
        subprocess.run(["scancel", victim], check=True)
        _wait(lambda: len(_workers(client)) < jobs)
        gone = time.perf_counter() - t
        replaced = _wait(lambda: len(_workers(client)) >= jobs and _workers(client) != before) + gone
    finally:
        client.close()
        cluster.close()
    return {"jobs": jobs, "first_worker_seconds": round(first, 2), "all_workers_seconds": round(all_up, 2),
            "scancel_to_worker_gone_seconds": round(gone, 2),
            "scancel_to_replacement_worker_seconds": round(replaced, 2), "rows": rows}


def through_local(counts, workers, root: Path) -> list:
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers, timeout=120)
        client.run(patch)
        rows = []
        for n in counts:
            rows.append(one(n, client, cluster.scheduler_address, root))
            print(json.dumps({"local": rows[-1]}), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1000,5000")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    counts = [int(n) for n in args.counts.split(",")]
    # the jobs' workers import benchmarks.scheduler_overhead (the stub) and sparseseg from here
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
    patch()
    load = os.getloadavg()
    with contextlib.ExitStack() as stack:
        if not os.environ.get("SLURM_CONF"):
            from tests.slurm_local import LocalSlurm

            os.environ.update(stack.enter_context(LocalSlurm()).env)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (tmp / "slurm").mkdir()
        (tmp / "local").mkdir()
        cwd = os.getcwd()
        os.chdir(tmp)                   # the jobs' slurm-JOBID.out files
        try:
            slurm = through_slurm(counts, args.jobs, tmp / "slurm")
        finally:
            os.chdir(cwd)
        local = through_local(counts, args.jobs, tmp / "local")
    result = {"benchmark": "scheduler overhead per block, no compute (stub block body writing only the marker), "
                           "through SLURM jobs (one Dask worker each, scheduler in this process) against a LocalCluster",
              **record(load_before=load),
              "slurm": {"cluster": "one-node SLURM on loopback (slurmctld + slurmd + munged, tests/slurm_local.py)",
                        **slurm},
              "local": {"workers": args.jobs, "threads_per_worker": 1, "rows": local}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
