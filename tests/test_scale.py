"""The engine against real components on loopback only: an S3-compatible server (moto's server
mode) started here on 127.0.0.1, a Dask cluster started from its own command line (`dask
scheduler` + `dask worker` processes), processes killed with SIGKILL, a corrupted input chunk,
two runs racing for one output. Every run goes through the `sparseseg infer` command line."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from sparseseg.engine.blocks import make_blocks, read_plan
from sparseseg.model.contract import geometry_of_contract, read_contract
from sparseseg.volume import create_ome_zarr, open_volume
from tests.helpers import tiny_engine_and_volume

pytestmark = pytest.mark.timeout(300)

SHAPE = (16, 48, 48)
BLOCK = "8,16,16"           # 2 x 3 x 3 = 18 blocks
N_BLOCKS = 18


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny valid-padding engine, an OME-Zarr input with 8x16x16 chunks, and the output of a
    clean local run (the reference every other run must reproduce exactly)."""
    d = tmp_path_factory.mktemp("scale")
    # depth 1: a 2-voxel halo, so one input chunk can belong to one block's read alone
    engine, _, data = tiny_engine_and_volume(d, SHAPE)
    r = infer(engine, d / "in.zarr", "--output", d / "ref.zarr")
    assert r.returncode == 0, r.stderr
    return {"dir": d, "engine": engine, "input": d / "in.zarr", "data": data, "ref": labels(d / "ref.zarr")}


def _env(extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.update(extra or {})
    return env


def _cmd(engine, inp, *args):
    """`sparseseg infer` in this process (--workers 0) unless a --scheduler is named."""
    local = [] if "--scheduler" in map(str, args) else ["--workers", "0"]
    return [sys.executable, "-m", "sparseseg.cli", "infer", "--engine", str(engine), str(inp), "--block", BLOCK,
            *local, "--json", *map(str, args)]


def infer(engine, inp, *args, env=None, timeout=120, process=False):
    """Run `sparseseg infer`: in this process (click's runner: no interpreter and torch start-up per
    run) unless `process`, which a run must be when its environment decides where or how it
    connects (fsspec caches filesystem instances per process)."""
    if process:
        return subprocess.run(_cmd(engine, inp, *args), capture_output=True, text=True, env=_env(env),
                              timeout=timeout)
    from click.testing import CliRunner

    from sparseseg.cli import main

    import logging

    root = logging.getLogger()
    root.handlers.clear()               # let the command's logging.basicConfig use this run's stderr
    try:
        r = CliRunner().invoke(main, _cmd(engine, inp, *args)[3:], env=env, catch_exceptions=False)
    finally:
        root.handlers.clear()
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def start(engine, inp, *args, env=None):
    return subprocess.Popen(_cmd(engine, inp, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(env), start_new_session=True)


def summary(r) -> dict:
    return json.loads(r.stdout.strip().splitlines()[-1])


def labels(url, **opts) -> np.ndarray:
    return np.asarray(zarr.open_group(str(url), mode="r", storage_options=opts or None)["0"][...]) \
        if "://" in str(url) else open_volume(url).read_labels()


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def killed_at_exit(*procs):
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


# ------------------------------------------------------------------ S3 (moto server on loopback)

@pytest.fixture(scope="module")
def s3(work):
    # moto's S3 server in its own process (in a thread here it would share the GIL with the runs)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    with killed_at_exit(server):
        wait_for(lambda: _port_open(port), 60, "the S3 server")
        os.environ.update(env)
        try:
            import s3fs

            fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"])
            fs.mkdir("bucket")
            public = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",
                      "Action": "s3:GetObject", "Resource": "arn:aws:s3:::bucket/*"}]}
            fs.call_s3("put_bucket_policy", Bucket="bucket", Policy=json.dumps(public))   # for plain HTTP
            fs.put(str(work["input"]), "bucket/in.zarr", recursive=True)
            yield {"env": env, "fs": fs, "endpoint": env["AWS_ENDPOINT_URL"]}
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_s3_input_and_output_match_the_local_run(work, s3):
    # credentials and endpoint from the environment; the inner-path form URL#path
    r = infer(work["engine"], "s3://bucket/in.zarr#0", "--output", "s3://bucket/out.zarr", env=s3["env"],
              process=True)
    assert r.returncode == 0, r.stderr
    s = summary(r)
    assert s["blocks_computed"] == N_BLOCKS and s["blocks_failed"] == 0 and s["output"] == "s3://bucket/out.zarr"
    assert np.array_equal(labels("s3://bucket/out.zarr"), work["ref"])
    assert len(s3["fs"].ls("bucket/out.zarr/.sparseseg/done")) == N_BLOCKS
    assert not s3["fs"].exists("bucket/out.zarr/.sparseseg/lease")          # released at the end
    # the same store read over plain HTTP (read-only), as a public bucket is
    assert np.array_equal(open_volume(f"{s3['endpoint']}/bucket/in.zarr#0").read()[0], work["data"])
    # --storage-options instead of the environment's endpoint, --input-path instead of #path
    env = {k: v for k, v in s3["env"].items() if k != "AWS_ENDPOINT_URL"}
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"                         # wrong on purpose: options win
    r = infer(work["engine"], "s3://bucket/in.zarr", "--input-path", "0", "--output", "s3://bucket/out2.zarr",
              "--storage-options", json.dumps({"endpoint_url": s3["endpoint"]}), env=env)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(labels("s3://bucket/out2.zarr"), work["ref"])


def test_s3_resume_after_sigkill(work, s3):
    fs = s3["fs"]
    p = start(work["engine"], "s3://bucket/in.zarr", "--output", "s3://bucket/killed.zarr",
              env={**s3["env"], "SPARSESEG_BLOCK_DELAY": "0.3"})
    with killed_at_exit(p):
        def some_done():
            fs.invalidate_cache()
            return fs.exists("bucket/killed.zarr/.sparseseg/done") and \
                len(fs.ls("bucket/killed.zarr/.sparseseg/done")) >= 3
        wait_for(some_done, what="3 blocks marked done on S3")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
    fs.invalidate_cache()
    finished = len(fs.ls("bucket/killed.zarr/.sparseseg/done"))
    assert 3 <= finished < N_BLOCKS
    r = infer(work["engine"], "s3://bucket/in.zarr", "--output", "s3://bucket/killed.zarr", "--resume",
              env=s3["env"])                      # the dead run's lease does not block this one
    assert r.returncode == 0, r.stderr
    s = summary(r)
    assert s["blocks_skipped"] == finished and s["blocks_computed"] == N_BLOCKS - finished
    assert np.array_equal(labels("s3://bucket/killed.zarr"), work["ref"])


def test_bad_stores_give_one_line_errors(work, s3, tmp_path):
    def one_line_error(r, fragment):
        assert r.returncode == 1, r.stderr
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert lines[-1].startswith("error: ") and fragment in lines[-1], r.stderr
        assert "Traceback" not in r.stderr

    eng = work["engine"]
    dead = {**s3["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    one_line_error(infer(eng, "s3://bucket/in.zarr", "--output", tmp_path / "o.zarr", env=dead, process=True),
                   "cannot open")
    nocred = {k: v for k, v in s3["env"].items() if not k.startswith("AWS_ACCESS") and "SECRET" not in k}
    nocred.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    env = {k: v for k, v in _env(nocred).items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    r = subprocess.run(_cmd(eng, "s3://bucket/in.zarr", "--output", tmp_path / "o.zarr"), capture_output=True,
                       text=True, env=env, timeout=120)
    one_line_error(r, "credentials")
    s3["fs"].pipe("bucket/notzarr/readme.txt", b"hello")
    one_line_error(infer(eng, "s3://bucket/notzarr", "--output", tmp_path / "o.zarr", env=s3["env"]),
                   "no zarr array or group")
    one_line_error(infer(eng, work["input"], "--output", "s3://no-such-bucket/o.zarr"), "does not exist")
    # an output store the run may not write to: http(s) stores are read-only
    r = infer(eng, work["input"], "--output", f"{s3['endpoint']}/bucket/http-out.zarr")
    one_line_error(r, "cannot write to the output store")
    # a read-only local directory (nothing is created there)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):          # root may write anywhere: nothing to check then
            one_line_error(infer(eng, work["input"], "--output", ro / "o.zarr"), "not writable")
            assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------ a real multi-process Dask cluster

@pytest.fixture
def cluster(tmp_path):
    """`dask scheduler` on a loopback port and two `dask worker` processes (no nanny, so a killed
    worker stays dead), each from its own command line."""
    port = _free_port()
    env = _env({"SPARSESEG_BLOCK_DELAY": "0.15"})
    procs = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)]
    addr = f"tcp://127.0.0.1:{port}"
    for _ in range(2):
        procs.append(subprocess.Popen(["dask", "worker", addr, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                       "--host", "127.0.0.1", "--local-directory", str(tmp_path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                      start_new_session=True))
    from distributed import Client

    with killed_at_exit(*procs):
        wait_for(lambda: _port_open(port), 60, "the scheduler")
        with Client(addr, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield {"address": addr, "workers": procs[1:]}


def _port_open(port) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cli_started_cluster_survives_a_killed_worker(work, cluster, tmp_path):
    out = tmp_path / "o.zarr"
    p = start(work["engine"], work["input"], "--output", out, "--scheduler", cluster["address"])
    with killed_at_exit(p):
        done = out / ".sparseseg" / "done"
        # a generous deadline: under load (experiments beside the suite) two blocks took over 90 s
        wait_for(lambda: done.exists() and len(list(done.iterdir())) >= 2, 240, "2 blocks done")
        os.kill(cluster["workers"][0].pid, signal.SIGKILL)       # mid-run: the other worker takes over
        stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr
    s = json.loads(stdout.strip().splitlines()[-1])
    assert s["blocks_computed"] == N_BLOCKS and s["blocks_failed"] == 0
    assert np.array_equal(labels(out), work["ref"])
    assert "Traceback" not in stderr


# ------------------------------------------------------------------ partial failure, resume, lease

def test_corrupt_chunk_fails_only_its_blocks_then_resume_repairs(work, tmp_path):
    inp = tmp_path / "in.zarr"
    create_ome_zarr(inp, SHAPE, "uint8", (4, 4, 4))[...] = work["data"]
    chunk = inp / "0" / "c" / "0" / "5" / "5"                       # z 0:4, y 20:24, x 20:24
    good = chunk.read_bytes()
    chunk.write_bytes(b"garbage, not a chunk" * 7)
    # the blocks whose read region (block + halo) touches that chunk, and only those, must fail
    contract = read_contract(work["engine"])
    geometry = geometry_of_contract(contract)
    bad = set()
    for b in make_blocks(SHAPE, (8, 16, 16)):
        region = read_plan(b, SHAPE, geometry, (8, 16, 16), 0.5).region
        if all(r.start < hi and lo < r.stop for r, (lo, hi) in zip(region, ((0, 4), (20, 24), (20, 24)))):
            bad.add(b.key)
    assert bad == {"0_1_1"}                                          # inside that block, beyond its neighbours' halos
    out = tmp_path / "o.zarr"
    r = infer(work["engine"], inp, "--output", out, "--retries", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    s = summary(r)
    assert {f["key"] for f in s["failed"]} == bad and s["blocks_failed"] == len(bad)
    assert s["blocks_computed"] == N_BLOCKS - len(bad)
    assert all(f"block {k}" in r.stderr for k in bad)
    every = {b.key for b in make_blocks(SHAPE, (8, 16, 16))}
    assert set(os.listdir(out / ".sparseseg" / "done")) == every - bad      # every other block is written
    recorded = json.loads((out / ".sparseseg" / "failed.json").read_text())["failed"]
    assert {f["key"] for f in recorded} == bad
    chunk.write_bytes(good)
    r = infer(work["engine"], inp, "--output", out, "--resume")
    assert r.returncode == 0, r.stderr
    s = summary(r)
    assert s["blocks_computed"] == len(bad) and s["blocks_skipped"] == N_BLOCKS - len(bad)
    assert np.array_equal(labels(out), work["ref"])


def test_second_run_on_a_leased_output_is_refused(work, tmp_path):
    out = tmp_path / "o.zarr"
    p = start(work["engine"], work["input"], "--output", out, env={"SPARSESEG_BLOCK_DELAY": "1"})  # ~20 s
    with killed_at_exit(p):
        wait_for(lambda: (out / "zarr.json").exists() and (out / ".sparseseg" / "lease").exists(), 60, "the lease")
        for flags in ((), ("--resume",), ("--overwrite",)):
            r = infer(work["engine"], work["input"], "--output", out, *flags)
            assert r.returncode == 1, r.stderr
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "in use by another sparseseg-infer run" in lines[0], r.stderr
        assert p.poll() is None                                  # the first run was not disturbed
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
    r = infer(work["engine"], work["input"], "--output", out, "--resume")   # its owner is dead: free
    assert r.returncode == 0, r.stderr
    assert np.array_equal(labels(out), work["ref"])
