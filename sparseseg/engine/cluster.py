"""Clusters sparseseg-infer starts itself: SLURM jobs (dask-jobqueue) and dask-cuda's LocalCUDACluster.

`--cluster slurm` submits SLURM jobs through dask-jobqueue (one Dask worker per job),
`--cluster local-cuda` starts dask-cuda's LocalCUDACluster; `--cluster local` (the default) is
run.py's LocalCluster.

Every check that can fail on the user's input runs in `check()`, before the output is touched;
`start()` returns (client, torch threads per worker) and leaves no job behind when the run ends,
fails or is interrupted."""

from __future__ import annotations

import atexit
import copy
import logging
import re
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sparseseg.errors import SparsesegError

log = logging.getLogger("sparseseg.infer")

KINDS = ("local", "slurm", "local-cuda")
# SLURM's own time formats (sbatch --time): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_WALLTIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
# Job states in which a job still holds (or will hold) its worker.
_ALIVE = ("PENDING", "CONFIGURING", "RUNNING", "RESIZING", "SUSPENDED", "REQUEUED")


def walltime_seconds(text: str) -> int:
    """Seconds of a walltime in any format sbatch --time takes; SparsesegError otherwise."""
    m = _WALLTIME.match(str(text).strip())
    if not m:
        raise SparsesegError(f"--walltime {text!r}: give minutes, MM:SS, HH:MM:SS or D-HH:MM:SS (SLURM's formats)")
    d, dh, dm, ds, mm, ms, hs = (int(g) if g else 0 for g in m.groups())
    if m.group(1) is not None:
        return ((d * 24 + dh) * 60 + dm) * 60 + ds
    if m.group(7) is not None:              # H:M:S
        return (mm * 60 + ms) * 60 + hs
    return mm * 60 + ms                     # M or M:S


def cluster_from_options(kind="local", jobs=None, partition=None, account=None, walltime=None, cores=None,
                         memory=None, gpus_per_job=None, job_extra=(), jobqueue_config=None, job_wait=120.0,
                         retries=2):
    """The cluster the options ask for, or None for the default local cluster (then every
    SLURM option is refused: they would be silently ignored)."""
    slurm = {"--jobs": jobs, "--partition": partition, "--account": account, "--walltime": walltime,
             "--cores": cores, "--memory": memory, "--gpus-per-job": gpus_per_job,
             "--job-extra": job_extra or None, "--jobqueue-config": jobqueue_config}
    given = [k for k, v in slurm.items() if v is not None]
    if kind == "slurm":
        return SlurmJobs(jobs=1 if jobs is None else jobs, partition=partition, account=account, walltime=walltime,
                         cores=cores, memory=memory, gpus_per_job=gpus_per_job or 0,
                         job_extra=tuple(job_extra or ()), jobqueue_config=jobqueue_config,
                         job_wait=float(job_wait), resubmits=max(0, retries) * (1 if jobs is None else max(jobs, 0)))
    if given:
        raise SparsesegError(f"{given[0]} applies with --cluster slurm only")
    if kind == "local-cuda":
        return LocalCuda()
    if kind not in KINDS:
        raise SparsesegError(f"--cluster {kind!r}: one of {', '.join(KINDS)}")
    return None


def _import_jobqueue():
    """dask_jobqueue, imported without the SIGINT handler it sets at import (sys.exit(): a Ctrl-C
    would end the run with status 0); Ctrl-C stays a KeyboardInterrupt, which cancels the jobs."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError:
        raise SparsesegError("--cluster slurm needs dask-jobqueue: pip install 'sparseseg[slurm]'") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)
    return dask_jobqueue


def _run(cmd, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@dataclass
class SlurmJobs:
    """`jobs` SLURM jobs, each running one Dask worker that computes one block group at a time
    with `cores` torch threads."""
    jobs: int = 1
    partition: str | None = None
    account: str | None = None
    walltime: str | None = None
    cores: int | None = None
    memory: str | None = None
    gpus_per_job: int = 0
    job_extra: tuple = ()
    jobqueue_config: str | None = None
    job_wait: float = 120.0
    resubmits: int = 2
    name: str = field(default_factory=lambda: "sparseseg-" + uuid.uuid4().hex[:8])
    _config: dict | None = field(default=None, repr=False)
    _cluster: object = field(default=None, repr=False)
    _resubmitted: int = field(default=0, repr=False)
    _target: int = field(default=0, repr=False)     # jobs wanted now: --jobs less the losses not replaced

    # ------------------------------------------------------------------ before anything is written
    def check(self) -> None:
        if self.jobs < 1:
            raise SparsesegError(f"--jobs {self.jobs}: give at least 1 job")
        if self.walltime is not None:
            walltime_seconds(self.walltime)
        if self.cores is not None and self.cores < 1:
            raise SparsesegError(f"--cores {self.cores}: give at least 1 core per job")
        if self.gpus_per_job not in (0, 1):
            raise SparsesegError(f"--gpus-per-job {self.gpus_per_job}: each job runs one worker on one GPU; "
                                 "ask for more --jobs instead")
        if self.memory is not None:
            from dask.utils import parse_bytes

            try:
                parse_bytes(self.memory)
            except (ValueError, TypeError):
                raise SparsesegError(f"--memory {self.memory!r}: give a size such as 8GB or 16GiB") from None
        self.config()
        _import_jobqueue()
        missing = [c for c in ("sbatch", "squeue", "scancel", "sinfo") if shutil.which(c) is None]
        if missing:
            raise SparsesegError(f"--cluster slurm: {missing[0]} not found on PATH (is SLURM installed here?)")
        r = _run(["sinfo", "-h", "-o", "%P"])
        if r.returncode != 0:
            raise SparsesegError(f"--cluster slurm: sinfo failed: {_last_line(r.stderr) or r.returncode}")
        partitions = [p.rstrip("*") for p in r.stdout.split()]
        partition = self.partition or self._setting("queue")
        if partition is not None and partition not in partitions:
            raise SparsesegError(f"--partition {partition}: no such SLURM partition (there are: "
                                 f"{', '.join(partitions) or 'none'})")
        r = subprocess.run(["sbatch", "--test-only"], input=self.job_script(), capture_output=True, text=True,
                           timeout=30, check=False)
        if r.returncode != 0:
            raise SparsesegError(f"SLURM refuses the job: {_last_line(r.stderr) or r.returncode}")

    def config(self) -> dict:
        """dask-jobqueue's YAML (its `jobqueue: slurm:` section) as dotted dask config keys."""
        if self._config is None:
            self._config = self._read_config()
        return self._config

    def _read_config(self) -> dict:
        if self.jobqueue_config is None:
            return {}
        import yaml

        path = Path(self.jobqueue_config)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise SparsesegError(f"--jobqueue-config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise SparsesegError(f"--jobqueue-config {path}: not YAML ({str(e).splitlines()[0]})") from None
        section = ((data or {}).get("jobqueue") or {}).get("slurm") if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise SparsesegError(f"--jobqueue-config {path}: no 'jobqueue: slurm:' section (dask-jobqueue's format)")
        return {f"jobqueue.slurm.{k}": v for k, v in section.items()}

    def _setting(self, key):
        import dask

        with dask.config.set(self.config()):
            return dask.config.get(f"jobqueue.slurm.{key}", None)

    def _job_kwargs(self) -> dict:
        """SLURMCluster's keywords: the command line over the config file over dask-jobqueue's
        config. One Dask thread per job (one block group at a time); the job's cores are torch's."""
        import sys

        import dask

        with dask.config.set(self.config()):
            cfg = copy.deepcopy(dask.config.get("jobqueue.slurm"))     # the context restores it in place
        extra = list(cfg.get("job-extra-directives") or []) + list(self.job_extra)
        if self.gpus_per_job:
            extra.append(f"--gres=gpu:{self.gpus_per_job}")
        kw = {"cores": 1, "processes": 1, "job_cpu": self.threads(), "memory": self.memory or cfg.get("memory") or "4GB",
              "job_name": self.name, "job_extra_directives": extra, "python": cfg.get("python") or sys.executable,
              "scheduler_options": {"dashboard_address": None, **(cfg.get("scheduler-options") or {})}}
        for opt, key in ((self.partition, "queue"), (self.account, "account"), (self.walltime, "walltime")):
            if opt is not None:
                kw[key] = opt
        return kw

    def threads(self) -> int:
        return int(self.cores or self._setting("job-cpu") or self._setting("cores") or 1)

    def job_script(self) -> str:
        import dask

        SLURMJob = _import_jobqueue().slurm.SLURMJob
        kw = self._job_kwargs()
        kw.pop("scheduler_options")
        with dask.config.set(self.config()):
            return SLURMJob("tcp://SCHEDULER:PORT", name="WORKER", **kw).job_script()

    def describe(self) -> str:
        """What --dry-run prints: the jobs, then the script each one runs."""
        kw = self._job_kwargs()
        where = ", ".join(f"{k} {kw[k]}" for k in ("queue", "account") if kw.get(k)) or "the default partition"
        return (f"SLURM: {self.jobs} job(s) named {self.name} in {where}, each {kw['job_cpu']} core(s), "
                f"{kw['memory']}, walltime {kw.get('walltime') or self._setting('walltime')}"
                f"{', 1 GPU' if self.gpus_per_job else ''}: one Dask worker per job, {kw['job_cpu']} torch "
                f"threads; up to {self.resubmits} replacement job(s) for jobs that end early\n"
                f"job script (sbatch):\n{self.job_script()}")

    # ------------------------------------------------------------------ the run
    def start(self, device: str):
        """Submit the jobs, wait until one worker has joined (job_wait seconds at most), and
        watch the jobs while the run goes on. Returns (client, torch threads per worker)."""
        import dask
        from dask.distributed import Client

        SLURMCluster = _import_jobqueue().SLURMCluster

        atexit.register(self.cancel_all)
        try:
            with dask.config.set(self.config()):
                cluster = SLURMCluster(**self._job_kwargs())
            self._cluster = cluster
            self._target = self.jobs
            cluster.scale(jobs=self.jobs)
            client = Client(cluster)
            self._wait_for_a_worker(client)
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._watch, name="sparseseg-slurm-watch", daemon=True).start()
        log.info("SLURM: %d job(s) %s submitted, %d worker(s) joined", self.jobs, self.name,
                 len(client.scheduler_info().get("workers", {})))
        return client, self.threads()

    def _wait_for_a_worker(self, client) -> None:
        t0 = time.monotonic()
        while not client.scheduler_info().get("workers"):
            if time.monotonic() - t0 > self.job_wait:
                raise SparsesegError(self._stuck_message(time.monotonic() - t0))
            time.sleep(0.25)

    def queue(self) -> list[tuple[str, str, str, str]]:
        """This run's jobs in the queue: (job id, state, partition, reason)."""
        r = _run(["squeue", "-h", "-n", self.name, "-o", "%i|%T|%P|%r"])
        rows = [tuple(line.split("|", 3)) for line in r.stdout.splitlines() if line.count("|") == 3]
        return [row for row in rows if row[1] in _ALIVE]

    def _stuck_message(self, waited: float) -> str:
        rows = self.queue()
        running = [r for r in rows if r[1] == "RUNNING"]
        text = f"{len(running)} of {self.jobs} jobs running after {waited:.0f} s"
        pending = [r for r in rows if r[1] != "RUNNING"]
        if pending:
            reasons = sorted({f"{r[2]} ({r[3]})" for r in pending})
            return f"{text}: {len(pending)} pending in partition {', '.join(reasons)}"
        if running:
            return (f"{text} but no Dask worker joined: see the jobs' output files and check that the compute "
                    f"nodes reach this host ({self._cluster.scheduler_address})")
        return f"{text}: none in the queue (see the log above for what sbatch said)"

    def _watch(self) -> None:
        """Replace jobs that end before the run does (scancel, walltime, preemption), at most
        `resubmits` times; once every job is gone and none may be replaced, let the scheduler
        fail the blocks still waiting (they are recorded; --resume computes them)."""
        from distributed.core import Status

        cluster = self._cluster
        seen_gone: set[str] = set()
        while cluster.status not in (Status.closing, Status.closed):
            time.sleep(1.0)
            try:
                alive = {row[0] for row in self.queue()}
            except (OSError, subprocess.SubprocessError):
                continue
            if cluster.status in (Status.closing, Status.closed):
                return
            jobs = {name: getattr(job, "job_id", None) for name, job in list(cluster.workers.items())}
            for name, jid in jobs.items():
                if jid and jid not in alive and jid not in seen_gone:
                    seen_gone.add(jid)
                    replace = self._resubmitted < self.resubmits
                    self._resubmitted += replace
                    self._target -= not replace
                    log.warning("SLURM job %s ended before the run%s", jid,
                                f": submitting a replacement ({self._resubmitted} of {self.resubmits})" if replace
                                else "; no replacement left")
            # every tick, not once per loss: the correction is idempotent, so a race with the
            # cluster's own bookkeeping is made good a second later
            dead = [name for name, jid in jobs.items() if jid in seen_gone]
            cluster.loop.add_callback(self._reconcile, dead)
            if seen_gone and not alive and self._target == 0:
                log.error("every SLURM job of this run has ended and no replacement is left: the blocks not "
                          "yet computed fail (rerun with --resume)")
                cluster.scheduler.no_workers_timeout = 0.5      # fail the waiting tasks now, not never
                return

    def _reconcile(self, dead) -> None:
        """Drop the ended jobs from the cluster's spec and scale back to the target count."""
        cluster = self._cluster
        for name in dead:
            cluster.worker_spec.pop(name, None)
        if len(cluster.worker_spec) != self._target:
            cluster.scale(jobs=self._target)

    def close(self) -> None:
        if self._cluster is not None:
            try:
                self._cluster.close()
            finally:
                self.cancel_all()
            atexit.unregister(self.cancel_all)

    def cancel_all(self) -> None:
        """scancel whatever job of this run is still queued or running: the last guard (at exit)
        where the cluster did not close; its own close cancels them."""
        from distributed.core import Status

        if self._cluster is None or self._cluster.status == Status.closed or not shutil.which("scancel"):
            return
        try:
            _run(["scancel", "-n", self.name], timeout=10)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("could not cancel the SLURM jobs named %s (%s): check squeue", self.name, e)


@dataclass
class LocalCuda:
    """dask-cuda's LocalCUDACluster: one worker per visible GPU, each pinned to its GPU through
    CUDA_VISIBLE_DEVICES. Written against dask-cuda's documented API; not yet run on a GPU."""

    def check(self) -> None:
        try:
            import dask_cuda  # noqa: F401
        except ImportError:
            raise SparsesegError("--cluster local-cuda needs dask-cuda: pip install dask-cuda") from None
        import torch

        if not torch.cuda.is_available():
            raise SparsesegError("--cluster local-cuda: no CUDA GPU is visible")

    def describe(self) -> str:
        import os

        visible = os.environ.get("CUDA_VISIBLE_DEVICES") or "all"
        return f"dask-cuda LocalCUDACluster: one worker per visible GPU (CUDA_VISIBLE_DEVICES={visible})"

    def start(self, device: str):
        from dask.distributed import Client
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(threads_per_worker=1, dashboard_address=None)
        return Client(cluster), 2           # two torch threads feed each GPU, as run.py's local GPU workers
