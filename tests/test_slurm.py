"""`sparseseg infer --cluster slurm` against a real one-node SLURM (slurmctld, slurmd and munged on
loopback, tests/slurm_local.py): labels identical to a local run, jobs visible in squeue while it
runs and gone afterwards, a cancelled job replaced, every job cancelled -> exit 1 and --resume,
bad input refused in one line before anything is written or submitted."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparseseg.engine.cluster import cluster_from_options, walltime_seconds
from sparseseg.errors import SparsesegError
from tests.slurm_local import LocalSlurm
# the same engine, input and reference labels (a local in-process run) as the loopback cluster tests
from tests.test_scale import killed_at_exit, labels, summary, wait_for, work  # noqa: F401

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "8,16,16"           # 18 blocks
N_BLOCKS = 18


# ------------------------------------------------------------------ without SLURM

@pytest.mark.parametrize("text, seconds", [("30", 1800), ("5:30", 330), ("1:00:00", 3600), ("2-0", 172800),
                                           ("1-2:03", 93780), ("1-02:03:04", 93784)])
def test_walltime_takes_slurms_formats(text, seconds):
    assert walltime_seconds(text) == seconds


@pytest.mark.parametrize("text", ["1h", "1:2:3:4", "-5", "", "ten"])
def test_walltime_refuses_the_rest(text):
    with pytest.raises(SparsesegError, match="--walltime"):
        walltime_seconds(text)


def test_slurm_options_need_cluster_slurm():
    assert cluster_from_options("local") is None
    with pytest.raises(SparsesegError, match="--jobs applies with --cluster slurm only"):
        cluster_from_options("local", jobs=2)
    with pytest.raises(SparsesegError, match="--partition applies"):
        cluster_from_options("local-cuda", partition="gpu")


def test_dry_run_script_without_slurm(tmp_path):
    """The job script is dask-jobqueue's, with the options and a jobqueue config folded in."""
    pytest.importorskip("dask_jobqueue")
    cfg = tmp_path / "jobqueue.yaml"
    cfg.write_text("jobqueue:\n  slurm:\n    memory: 2GB\n    walltime: '00:10:00'\n"
                   "    job-extra-directives: ['--qos=short']\n")
    c = cluster_from_options("slurm", jobs=3, partition="gpu", walltime="1:00:00", cores=4, job_extra=("--exclusive",),
                             jobqueue_config=str(cfg), gpus_per_job=1)
    text = c.describe()
    for line in ("#SBATCH -p gpu", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=2G", "#SBATCH -t 1:00:00",
                 "#SBATCH --qos=short", "#SBATCH --exclusive", "#SBATCH --gres=gpu:1", "--nthreads 1"):
        assert line in text, (line, text)
    assert "3 job(s)" in text and "4 torch threads" in text


# ------------------------------------------------------------------ a real one-node SLURM

@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = LocalSlurm().start()
    except Exception as e:
        why = f"a local SLURM did not start: {str(e)[:400]}"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def out(tmp_path):
    return tmp_path / "o.zarr"


def _env(slurm, extra=None):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **slurm.env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path,
            **(extra or {})}


def _cmd(engine, inp, *args):
    return [sys.executable, "-m", "sparseseg.cli", "infer", "--engine", str(engine), str(inp), "--block", BLOCK,
            "--json", *map(str, args)]


def run(slurm, work, *args, extra=None, timeout=180):
    """`sparseseg infer` as its own process (its SLURM jobs inherit its environment), run in the
    work directory so the jobs' slurm-JOBID.out files land there."""
    return subprocess.run(_cmd(work["engine"], work["input"], *args), cwd=work["dir"], capture_output=True, text=True,
                          env=_env(slurm, extra), timeout=timeout)


def run_here(slurm, work, *args, env=None):
    """`sparseseg infer` in this process, for runs that stop before anything starts."""
    from click.testing import CliRunner

    from sparseseg.cli import main

    r = CliRunner().invoke(main, _cmd(work["engine"], work["input"], *args)[3:], env={**slurm.env, **(env or {})},
                           catch_exceptions=False)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def start(slurm, work, *args, extra=None):
    return subprocess.Popen(_cmd(work["engine"], work["input"], *args), cwd=work["dir"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(slurm, extra), start_new_session=True)


def _done(out: Path) -> int:
    d = out / ".sparseseg" / "done"
    return len(list(d.iterdir())) if d.exists() else 0


def cancel_mid_run(slurm, work, out, which, *args):
    """Start a 2-job run, scancel `which(jobs in the queue)` once 2 blocks are done, wait for the
    end: (exit status, the --json summary, stderr)."""
    p = start(slurm, work, "--output", out, "--cluster", "slurm", "--jobs", 2, *args,
              extra={"SPARSESEG_BLOCK_DELAY": "0.5"})
    with killed_at_exit(p):
        wait_for(lambda: _done(out) >= 2, 120, "2 blocks done")
        assert slurm.run("scancel", *which(slurm.jobs())).returncode == 0
        stdout, stderr = p.communicate(timeout=180)
    return p.returncode, json.loads(stdout.strip().splitlines()[-1]), stderr


def _no_jobs_left(slurm):
    wait_for(lambda: not slurm.jobs(), 30, "every job to leave the queue")



@pytest.mark.slurm
def test_two_jobs_give_the_local_labels_and_leave_the_queue(slurm, work, out):
    seen = {}
    p = start(slurm, work, "--output", out, "--cluster", "slurm", "--jobs", 2, extra={"SPARSESEG_BLOCK_DELAY": "0.2"})
    with killed_at_exit(p):
        def two_jobs():
            seen.update({j["id"]: j for j in slurm.jobs()})
            return len(seen) >= 2
        wait_for(two_jobs, 60, "two jobs in squeue")
        stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr
    assert all(j["name"].startswith("sparseseg-") for j in seen.values())
    s = json.loads(stdout.strip().splitlines()[-1])
    assert s["blocks_computed"] == N_BLOCKS and s["blocks_failed"] == 0
    assert np.array_equal(labels(out), work["ref"])
    assert not slurm.jobs()                     # cancelled before sparseseg exited
    assert "Traceback" not in stderr


@pytest.mark.slurm
def test_a_cancelled_job_is_replaced_and_the_labels_hold(slurm, work, out):
    victims = []

    def first_job(jobs):
        victims.append(jobs[0]["id"])
        return victims

    rc, s, stderr = cancel_mid_run(slurm, work, out, first_job)
    assert rc == 0, stderr
    assert f"SLURM job {victims[0]} ended before the run: submitting a replacement" in stderr
    assert s["blocks_computed"] == N_BLOCKS and s["blocks_failed"] == 0
    assert np.array_equal(labels(out), work["ref"])
    _no_jobs_left(slurm)


@pytest.mark.slurm
def test_every_job_cancelled_fails_the_rest_then_resume_finishes(slurm, work, out):
    # --retries 0: no replacement job and no second attempt, so cancelling both jobs ends the run
    rc, s, stderr = cancel_mid_run(slurm, work, out, lambda jobs: ["-n", jobs[0]["name"]], "--retries", 0)
    assert rc == 1, stderr
    assert s["blocks_failed"] > 0 and s["blocks_computed"] + s["blocks_failed"] == N_BLOCKS
    assert all(f"block {f['key']}" in stderr for f in s["failed"][:20])
    recorded = json.loads((out / ".sparseseg" / "failed.json").read_text())["failed"]
    assert {f["key"] for f in recorded} == {f["key"] for f in s["failed"]}
    assert "Traceback" not in stderr
    _no_jobs_left(slurm)
    r = run(slurm, work, "--output", out, "--resume", "--cluster", "slurm", "--jobs", 2)
    assert r.returncode == 0, r.stderr
    s2 = summary(r)
    # a block written by a task lost with its job counts as failed (its report never came back), and is skipped here
    assert s2["blocks_computed"] <= s["blocks_failed"] and s2["blocks_computed"] + s2["blocks_skipped"] == N_BLOCKS
    assert np.array_equal(labels(out), work["ref"])
    _no_jobs_left(slurm)


@pytest.mark.slurm
def test_interrupt_cancels_the_jobs(slurm, work, out):
    p = start(slurm, work, "--output", out, "--cluster", "slurm", "--jobs", 2, extra={"SPARSESEG_BLOCK_DELAY": "1"})
    with killed_at_exit(p):
        wait_for(lambda: _done(out) >= 1, 120, "a block done")
        os.killpg(p.pid, signal.SIGINT)                 # Ctrl-C
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    _no_jobs_left(slurm)


@pytest.mark.slurm
def test_a_job_that_never_starts_gives_up_with_the_reason(slurm, work, out):
    r = run(slurm, work, "--output", out, "--cluster", "slurm", "--job-extra=--begin=now+1hour", "--job-wait", 3)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(
        "error: 0 of 1 jobs running after 3 s: 1 pending in partition debug (BeginTime)"), r.stderr
    _no_jobs_left(slurm)


@pytest.mark.slurm
def test_dry_run_prints_the_job_script_and_submits_nothing(slurm, work, out):
    r = run(slurm, work, "--output", out, "--cluster", "slurm", "--jobs", 4, "--walltime", "0:20:00", "--dry-run")
    assert r.returncode == 0, r.stderr
    text = summary(r)["cluster"]
    assert "SLURM: 4 job(s)" in text and "#SBATCH -t 0:20:00" in text and "distributed.cli.dask_worker" in text
    assert not out.exists() and not slurm.jobs()


@pytest.mark.slurm
@pytest.mark.parametrize("args, message", [
    (("--partition", "nope"), "error: --partition nope: no such SLURM partition (there are: debug)"),
    (("--jobs", 0), "error: --jobs 0: give at least 1 job"),
    (("--walltime", "1h"), "error: --walltime '1h': give minutes"),
    (("--memory", "lots"), "error: --memory 'lots': give a size"),
    (("--memory", "900TB"), "error: SLURM refuses the job:"),
    (("--jobqueue-config", "missing.yaml"), "error: --jobqueue-config missing.yaml:"),
    ((), "error: --cluster slurm: sbatch not found on PATH"),
])
def test_bad_input_is_one_line_and_writes_nothing(slurm, work, out, tmp_path, args, message):
    extra = {"PATH": str(tmp_path)} if not args else None      # SLURM's commands out of reach
    r = run_here(slurm, work, "--output", out, "--cluster", "slurm", *args, env=extra)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert not out.exists() and not slurm.jobs()
