"""The record every benchmark result carries: how it was made and on what.

`record()` gives the command line, the commit the run started from, the date, the machine (CPU
model, core count, the CPU features that change results: avx512f, avx512_bf16, amx; GPU name and
driver where one is visible) and the versions of the libraries that compute (torch, onnxruntime,
openvino). Every script in benchmarks/ puts it into what it writes.
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_FEATURES = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
LIBRARIES = ("torch", "onnxruntime", "openvino", "numpy", "sparseseg")


def data_dir() -> Path:
    """Where the datasets live: $SPARSESEG_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("SPARSESEG_DATA", ROOT.parent / "shared" / "data"))


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed from the repository root: `python benchmarks/x.py --opt ...`."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0]:
        p = Path(argv[0]).resolve()
        argv[0] = p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else argv[0]
    return shlex.join(["python"] + argv)


def commit() -> str:
    """HEAD's short hash, marked when sparseseg/ or benchmarks/ has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "sparseseg", "benchmarks")
    return head + ("+uncommitted changes" if dirty else "")


def _cpuinfo() -> dict:
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags") and key not in info:
                info[key] = value.strip()
    except OSError:
        pass
    return info


def _gpu() -> dict | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = [dict(zip(("name", "driver"), (s.strip() for s in row.split(",")))) for row in out.splitlines() if row]
    return {"count": len(gpus), **gpus[0]} if gpus else None


def machine() -> dict:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"host": platform.node(), "arch": platform.machine(),
            "cpu": info.get("model name") or platform.processor() or "unknown",
            "cores": os.cpu_count(),
            "cpu_features": {f: f in flags for f in CPU_FEATURES},
            "gpu": _gpu()}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def record(*, commit_at_start: str | None = None, load_before=None, argv: list[str] | None = None) -> dict:
    """The record of a run; call it at the end, passing `commit()` taken at the start (and the load
    average then) when the run is long."""
    rec = {"command": command_line(argv), "commit": commit_at_start or commit(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "versions": versions()}
    if load_before is not None:
        rec["load_before"] = [round(x, 2) for x in load_before]
        rec["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return rec
