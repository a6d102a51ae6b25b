"""A one-node SLURM on loopback for the tests: munged, slurmctld and slurmd started in the
foreground from a generated slurm.conf, with their key, state, spool and logs in one temporary
directory, and stopped (jobs cancelled first) afterwards. No accounting daemon (slurmdbd), so
sacct has nothing to show: the tests look at jobs through squeue."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def missing() -> str | None:
    """Why a local SLURM cannot start here, or None."""
    gone = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    return f"not installed: {', '.join(gone)} (apt-get install slurmctld slurmd slurm-client munge)" if gone else None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_line() -> str:
    """This machine as slurmd sees it (`slurmd -C`: name, CPUs, sockets, memory), on loopback."""
    out = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"


def write_conf(root: Path, node: str, partition: str = "debug") -> Path:
    user = getpass.getuser()
    name = node.split()[0].split("=", 1)[1]
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=sparseseg-test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
InactiveLimit=0
KillWait=2
MinJobAge=2
{node}
PartitionName={partition} Nodes={name} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    return conf


class LocalSlurm:
    """`with LocalSlurm() as s:` a running one-node cluster; `s.env` points clients at it."""

    def __init__(self, root: Path | None = None, ready_timeout: float = 60.0):
        self.root = Path(root or tempfile.mkdtemp(prefix="sps-"))      # short: unix socket paths <= 108
        self.ready_timeout = ready_timeout
        self.procs: list[subprocess.Popen] = []
        self.conf: Path | None = None

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def _daemon(self, *cmd):
        log = open(self.root / "log" / f"{Path(cmd[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                           env={**os.environ, **self.env}))
        log.close()

    def start(self) -> "LocalSlurm":
        why = missing()
        if why:
            raise RuntimeError(why)
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf = write_conf(self.root, node_line())
        self._daemon(_exe("munged"), "--foreground", "--force", f"--socket={self.root}/munge.sock",
                     f"--key-file={key}", f"--pid-file={self.root}/munged.pid", f"--seed-file={self.root}/munge.seed",
                     f"--log-file={self.root}/log/munged.log")
        self._wait(lambda: (self.root / "munge.sock").exists(), "munged's socket")
        self._daemon(_exe("slurmctld"), "-D", "-c", "-f", str(self.conf))
        self._daemon(_exe("slurmd"), "-D", "-f", str(self.conf))
        self._wait(lambda: self.sinfo() == "idle", "the node to be idle in sinfo")
        return self

    def sinfo(self) -> str:
        r = self.run("sinfo", "-h", "-o", "%t")
        return r.stdout.strip() if r.returncode == 0 else ""

    def run(self, *cmd) -> subprocess.CompletedProcess:
        return subprocess.run([_exe(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=30,
                              env={**os.environ, **self.env}, check=False)

    def jobs(self) -> list[dict]:
        """Jobs in the queue: id, name, state."""
        r = self.run("squeue", "-h", "-o", "%i|%j|%T")
        return [dict(zip(("id", "name", "state"), ln.split("|"))) for ln in r.stdout.splitlines() if ln.count("|") == 2]

    def _wait(self, ok, what: str) -> None:
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            if ok():
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{Path(dead[0].args[0]).name} exited ({dead[0].returncode}) while waiting for "
                                   f"{what}: {self.log_tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {self.ready_timeout:.0f} s waiting for {what}: {self.log_tail()}")

    def log_tail(self) -> str:
        lines = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").strip().splitlines()
            lines += [f"{f.name}: {ln}" for ln in text[-2:]]
        return " | ".join(lines) or "no log"

    def stop(self) -> None:
        if self.conf is not None and self.procs and self.procs[-1].poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", "--full", "-u", getpass.getuser())
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
