"""The CUDA kernels' own source on the CPU: each .cu file compiled with a host C++ compiler
against `host/host_cuda.h` (CUDA's names defined for the host) into a shared library, loaded
with ctypes, and launched over its grid by OS threads, one call per (block, thread).

`launch` and `kernel` take the place of `gpu._launch` and `loader.kernel`, so the launchers of
kernels/gpu.py run unchanged on CPU tensors (their data pointers are host pointers). This shows
the index arithmetic, argument order and dtype handling; it cannot show races between real
GPU threads, stream ordering, launch limits or the GPU's own expf.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sparseseg.errors import SparsesegError
from sparseseg.kernels.loader import HERE, SOURCES

HOST = HERE / "host"
FLAGS = ("-O1", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-x", "c++")
GRID, BLOCK = 3, 5                  # a small grid: every thread runs several grid-stride steps


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "sparseseg-host-kernels"


@functools.lru_cache(maxsize=None)
def library(name: str) -> ctypes.CDLL:
    """The .cu file `name` compiled for the host (cached by source and flags in a temp dir)."""
    if name not in SOURCES:
        raise SparsesegError(f"unknown kernel source {name!r} (expected one of {', '.join(SOURCES)})")
    cxx = compiler()
    if cxx is None:
        raise SparsesegError("the host kernels need a C++ compiler (g++, or $CXX)")
    texts = [(HERE / name).read_bytes(), (HERE / "common.cuh").read_bytes()] + \
        [p.read_bytes() for p in sorted(HOST.glob("*.h"))] + [" ".join((cxx,) + FLAGS).encode()]
    digest = hashlib.sha256(b"\0".join(texts)).hexdigest()[:16]
    out = cache_dir() / f"{Path(name).stem}-{digest}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run([cxx, *FLAGS, "-I", str(HOST), "-I", str(HERE), str(HERE / name), "-o", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SparsesegError(f"{name} does not compile for the host: {r.stderr.strip()[:400]}")
        os.replace(tmp, out)        # parallel test runs never load half a library
    return ctypes.CDLL(str(out))


def kernel(name: str, function: str):
    fn = getattr(library(name), function)
    fn.restype = None
    fn.lib = library(name)
    return fn


def _c_args(args):
    # numpy int64 scalars are the kernels' i64 values; plain ints are pointers (0: null).
    return [ctypes.c_longlong(int(a)) if isinstance(a, np.integer) else ctypes.c_void_p(int(a) or None)
            for a in args]


def launch(fn, total: int, args, grid: int = GRID, block: int = BLOCK):
    """Run `fn` over a grid of `grid` x `block` threads, each (block, thread) in its own call,
    spread over OS threads (ctypes releases the GIL) so overlapping writes would show."""
    c_args = _c_args(args)
    fn.lib.host_set_dims(ctypes.c_uint(grid), ctypes.c_uint(block))

    def one(index):
        b, t = divmod(index, block)
        fn.lib.host_set_index(ctypes.c_uint(b), ctypes.c_uint(t))
        fn(*c_args)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(grid * block)))
