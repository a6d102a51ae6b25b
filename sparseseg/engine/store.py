"""The engine's side of storage: open a job's input and output arrays (local paths or fsspec
URLs), write a block's chunks and then its done marker, list the done markers once.

Markers and the run's bookkeeping live inside the output store, under `.sparseseg/` (zarr
ignores names it does not know), so they travel with the output: `OUT.zarr/.sparseseg/done/<key>`,
or `IMAGE.zarr/labels/NAME/.sparseseg/` for a label image. `.sparseseg/` holds no zarr.json, so it
is no zarr node: NGFF validators and viewers (ome-zarr-models, ome-zarr-py, napari) never list it
(tests/test_ome_outputs.py).
A marker is written only after the block's chunks are stored; on a local filesystem the chunk
files, the marker and their directories are fsync'd first, so a power cut never leaves a block
that looks finished but is not. On an object store a PUT is durable when it returns.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

META_DIR = ".sparseseg"
DONE_DIR = f"{META_DIR}/done"


def local_path(url) -> Path | None:
    """The local filesystem path behind `url` (a plain path or file://), else None."""
    s = str(url)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if "://" in s:
        return None
    return Path(s)


def filesystem(url, storage_options=None):
    """(fsspec filesystem, path inside it) for a store URL or local path."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(url), **(storage_options or {}))


def join(url, *parts) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


_OPEN: dict = {}


def open_io(job):
    """(input volume, label array, probability array or None), opened once per process."""
    options = getattr(job, "storage_options", None) or {}
    key = (job.input, job.output, repr(sorted(options.items())), getattr(job, "run_id", ""))
    if key not in _OPEN:
        while len(_OPEN) >= 4:              # a worker serving run after run keeps only recent ones
            _OPEN.pop(next(iter(_OPEN)))
        import zarr

        from sparseseg.volume import open_volume

        # Chunks a block's halo shares with the next block of its task are read once.
        cache = int(float(os.environ.get("SPARSESEG_CHUNK_CACHE_MB", "256")) * (1 << 20))
        vol = open_volume(job.input, storage_options=options or None, cache_bytes=cache)
        kwargs = {"storage_options": options} if options and local_path(job.output) is None else {}
        group = zarr.open_group(str(job.output), mode="r+", **kwargs)
        labels = group["0"]
        probs = group["probabilities"] if job.probabilities else None
        if isinstance(probs, zarr.Group):   # with a pyramid, probabilities are an image of their own
            probs = probs["0"]
        _OPEN[key] = (vol, labels, probs)
    return _OPEN[key]


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunk_files(array_dir: Path, block, chunks, lead=()) -> list[Path]:
    """Files of the chunks a block covers (zarr v3 default key encoding c/i/j/k: the encoding
    of every output array the engine creates)."""
    ranges = [range(s // c, (s + n - 1) // c + 1) for s, n, c in zip(block.start, block.shape, chunks[-3:])]
    files = []
    for i in ranges[0]:
        for j in ranges[1]:
            for k in ranges[2]:
                files.append(array_dir.joinpath("c", *map(str, lead), str(i), str(j), str(k)))
    return files


def _fsync_files(files) -> None:
    dirs = set()
    for p in files:
        if p.is_file():         # a chunk equal to the fill value is not written at all
            _fsync(p)
            dirs.add(p.parent)
    for d in dirs:
        _fsync(d, directory=True)


def done_marker(output, block) -> str:
    return join(output, DONE_DIR, block.key)


def _marker_text(block) -> bytes:
    return f"{list(block.start)} {list(block.shape)}\n".encode()


def write_block(job, block, labels: np.ndarray, probs: np.ndarray | None) -> None:
    """Write a block's chunks, make them durable, then mark the block done."""
    _, label_arr, prob_arr = open_io(job)
    label_arr[block.slices] = labels
    if prob_arr is not None:
        prob_arr[(slice(None),) + block.slices] = probs
    root = local_path(job.output)
    if root is not None:                    # an object store's PUT is durable when it returns
        files = _chunk_files(root.joinpath(*label_arr.path.split("/")), block, label_arr.chunks)
        if prob_arr is not None:
            prob_dir = root.joinpath(*prob_arr.path.split("/"))
            for c in range(0, prob_arr.shape[0], prob_arr.chunks[0]):
                lead = (c // prob_arr.chunks[0],)
                files += _chunk_files(prob_dir, block, prob_arr.chunks, lead=lead)
        _fsync_files(files)
    mark_done(job.output, block, getattr(job, "storage_options", None))


def mark_done(output, block, storage_options=None) -> None:
    """Write a block's done marker (after its chunks: see write_block), durably."""
    root = local_path(output)
    if root is None:
        fs, path = filesystem(output, storage_options)
        fs.pipe_file(f"{path.rstrip('/')}/{DONE_DIR}/{block.key}", _marker_text(block))
        return
    marker = root / DONE_DIR / block.key
    marker.parent.mkdir(parents=True, exist_ok=True)
    with open(marker, "wb") as f:
        f.write(_marker_text(block))
        f.flush()
        os.fsync(f.fileno())
    _fsync(marker.parent, directory=True)


def done_keys(output, storage_options=None) -> set[str]:
    """Keys of the blocks marked done: one directory listing (one paginated LIST on a store)."""
    root = local_path(output)
    if root is not None:
        try:
            return set(os.listdir(root / DONE_DIR))
        except FileNotFoundError:
            return set()
    fs, path = filesystem(output, storage_options)
    prefix = f"{path.rstrip('/')}/{DONE_DIR}"
    fs.invalidate_cache(prefix)
    try:
        names = fs.ls(prefix, detail=False)
    except FileNotFoundError:
        return set()
    return {n.rstrip("/").rsplit("/", 1)[-1] for n in names}


# ---------------------------------------------------------------- the output's lease

LEASE = f"{META_DIR}/lease"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True                         # alive, owned by someone else
    return True


class Lease:
    """One run at a time per output store: a small file under `.sparseseg/` holding its owner
    and a heartbeat that a background thread renews. Another run refuses the output while the
    heartbeat is fresher than `ttl` seconds; a crashed run stops renewing, so its lease expires.

    Local files are created with O_EXCL (atomic). Object stores have no portable create-if-absent,
    so there a new owner writes, waits a moment and reads back: two runs starting within that
    moment could both believe they won (the later writer wins the file, the earlier one notices at
    its next heartbeat and logs an error)."""

    def __init__(self, output, storage_options=None, ttl: float | None = None):
        import socket
        import uuid

        self.output, self.options = str(output), storage_options or {}
        self.ttl = float(ttl if ttl is not None else os.environ.get("SPARSESEG_LEASE_TTL", 60))
        self.interval = max(0.2, self.ttl / 6)
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._local = local_path(output)
        self._stop = None
        self._thread = None
        self.lost = False

    # -- file access
    def _path(self):
        if self._local is not None:
            return self._local / LEASE
        fs, path = filesystem(self.output, self.options)
        return fs, f"{path.rstrip('/')}/{LEASE}"

    def _text(self) -> bytes:
        import json
        import time

        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def read(self) -> dict | None:
        import json

        try:
            if self._local is not None:
                raw = self._path().read_bytes()
            else:
                fs, path = self._path()
                fs.invalidate_cache(path)
                raw = fs.cat_file(path)
            return json.loads(raw)
        except FileNotFoundError:
            return None
        except ValueError:                  # torn or foreign content: treat as expired
            return {"heartbeat": 0}

    def _write(self, exclusive: bool = False) -> bool:
        if self._local is None:
            fs, path = self._path()
            fs.pipe_file(path, self._text())
            return True
        path = self._path()
        path.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._text())
            return True
        tmp = path.with_name(f"lease.tmp-{self.owner['id']}")
        tmp.write_bytes(self._text())
        os.replace(tmp, path)               # atomic: a reader never sees half a lease
        return True

    def holder(self) -> dict | None:
        """The live lease of another run, or None."""
        import time

        cur = self.read()
        if cur is None or cur.get("id") == self.owner["id"]:
            return None
        if cur.get("host") == self.owner["host"] and not _pid_alive(cur.get("pid")):
            return None                     # its process is gone: no need to wait for the expiry
        return cur if time.time() - float(cur.get("heartbeat", 0)) < self.ttl else None

    def refusal(self, cur: dict) -> str:
        import time

        age = time.time() - float(cur.get("heartbeat", 0))
        return (f"{self.output} is in use by another sparseseg-infer run (pid {cur.get('pid')} on "
                f"{cur.get('host')}, alive {age:.0f} s ago); if that run has crashed, its lease "
                f"expires {max(0.0, self.ttl - age):.0f} s from now")

    # -- life cycle
    def acquire(self) -> Lease:
        import threading
        import time

        from sparseseg.errors import SparsesegError

        for _ in range(3):
            cur = self.holder()
            if cur is not None:
                raise SparsesegError(self.refusal(cur))
            if self._local is not None:
                if self._write(exclusive=True):
                    break
                if self.read() is None:
                    continue                # released meanwhile: try again
                self._write()               # an expired lease: take it over atomically
            else:
                self._write()
            time.sleep(min(0.5, self.ttl / 10))
            cur = self.read()
            if cur is not None and cur.get("id") == self.owner["id"]:
                break
        else:
            cur = self.holder()
            raise SparsesegError(self.refusal(cur) if cur else f"{self.output}: could not take its lease")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sparseseg-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        import logging

        log = logging.getLogger("sparseseg.infer")
        while not self._stop.wait(self.interval):
            try:
                cur = self.read()
                if cur is not None and cur.get("id") not in (None, self.owner["id"]):
                    if not self.lost:
                        log.error("the lease on %s was taken by pid %s on %s", self.output, cur.get("pid"),
                                  cur.get("host"))
                    self.lost = True
                    continue
                self._write()
            except Exception as e:  # a heartbeat that fails once is retried at the next beat
                log.warning("lease heartbeat on %s failed: %s", self.output, e)

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._stop = None
        try:
            cur = self.read()
            if cur is not None and cur.get("id") == self.owner["id"]:
                if self._local is not None:
                    self._path().unlink()
                else:
                    fs, path = self._path()
                    fs.rm_file(path)
        except Exception:  # a store that cannot delete (or is gone): an unreleased lease simply expires
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------- output store housekeeping

def store_exists(output, storage_options=None) -> bool:
    """Is there anything at the output (a zarr group, or at least our bookkeeping)?"""
    root = local_path(output)
    if root is not None:
        return root.exists()
    fs, path = filesystem(output, storage_options)
    fs.invalidate_cache(path)
    return fs.exists(f"{path.rstrip('/')}/zarr.json") or fs.exists(f"{path.rstrip('/')}/{META_DIR}")


def clear_store(output, storage_options=None) -> None:
    """Remove everything in the output store except our lease (the run replacing it holds it)."""
    import shutil

    root = local_path(output)
    if root is not None:
        for child in root.iterdir():
            if child.name == META_DIR:
                for sub in child.iterdir():
                    if sub.name != "lease":
                        shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
            else:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        return
    fs, path = filesystem(output, storage_options)
    path = path.rstrip("/")
    keep = f"{path}/{LEASE}"
    fs.invalidate_cache(path)
    files = [f for f in fs.find(path) if f.rstrip("/") != keep]
    if files:
        fs.rm(files)


def read_meta(output, name: str, storage_options=None) -> dict | None:
    """A JSON file written by write_meta, or None when there is none (or it is unreadable)."""
    import json

    try:
        root = local_path(output)
        if root is not None:
            return json.loads((root / META_DIR / name).read_bytes())
        fs, path = filesystem(output, storage_options)
        fs.invalidate_cache(f"{path.rstrip('/')}/{META_DIR}")
        return json.loads(fs.cat_file(f"{path.rstrip('/')}/{META_DIR}/{name}"))
    except (FileNotFoundError, ValueError):
        return None


def write_meta(output, name: str, data: dict, storage_options=None) -> None:
    """A small JSON file under `.sparseseg/` (the summary of the last run, its failed blocks)."""
    import json

    text = json.dumps(data, indent=1).encode()
    root = local_path(output)
    if root is None:
        fs, path = filesystem(output, storage_options)
        fs.pipe_file(f"{path.rstrip('/')}/{META_DIR}/{name}", text)
        return
    from sparseseg.fsutil import atomic_path

    target = root / META_DIR / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_bytes(text)


# ---------------------------------------------------------------- what the reads cost

def read_cost(geometry, volume_shape, block, tile, overlap, chunks, itemsize: int, channels: int = 1) -> dict:
    """Bytes and requests the blocks' reads cost against an input stored in `chunks`.

    A block reads its region (block + halo) in one call, and zarr fetches every chunk that region
    touches once: so the store serves whole chunks, the chunk-aligned superset of the region, one
    request per chunk. Regions are separable per axis (a Cartesian grid of blocks), so the totals
    are products of per-axis sums: O(blocks per axis), instant for a 10,000^3 volume.
    Returns the totals and the bytes per output voxel (what the halo and chunk alignment cost)."""
    from sparseseg.engine.blocks import Block, read_plan

    n_blocks = [-(-n // b) for n, b in zip(volume_shape, block)]
    exact = aligned = requests = 1
    for a, (n, b, c) in enumerate(zip(volume_shape, block, chunks[-3:])):
        e = al = rq = 0
        for i in range(n_blocks[a]):
            start = [0, 0, 0]
            shape = [min(bb, nn) for bb, nn in zip(block, volume_shape)]
            start[a], shape[a] = i * b, min(b, n - i * b)
            r = read_plan(Block((0, 0, 0), tuple(start), tuple(shape)), volume_shape, geometry, tile,
                          overlap).region[a]
            first, last = r.start // c, (r.stop - 1) // c
            e += r.stop - r.start
            al += min(n, (last + 1) * c) - first * c
            rq += last - first + 1
        exact, aligned, requests = exact * e, aligned * al, requests * rq
    voxels = 1
    for n in volume_shape:
        voxels *= n
    per = itemsize * channels
    # A channel axis stored in its own chunks multiplies requests, not bytes.
    lead_chunks = -(-channels // chunks[0]) if len(chunks) == 4 else 1
    return {"input_bytes_read": aligned * per, "input_bytes_in_regions": exact * per,
            "input_chunk_requests": requests * lead_chunks,
            "input_bytes_per_output_voxel": round(aligned * per / voxels, 4)}
