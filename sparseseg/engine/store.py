"""The engine's side of storage: open a job's input and output arrays (local paths or fsspec
URLs), write a block's chunks and then its done marker, list the done markers once.

Markers and the run's bookkeeping live inside the output store, under `.sparseseg/` (zarr
ignores names it does not know), so they travel with the output: `OUT.zarr/.sparseseg/done/<key>`.
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
    key = (job.input, job.output, repr(sorted(options.items())))
    if key not in _OPEN:
        import zarr

        from sparseseg.volume import open_volume

        vol = open_volume(job.input, storage_options=options) if options else open_volume(job.input)
        kwargs = {"storage_options": options} if options and local_path(job.output) is None else {}
        group = zarr.open_group(str(job.output), mode="r+", **kwargs)
        labels = group["0"]
        probs = group["probabilities"] if job.probabilities else None
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
    if root is None:
        fs, path = filesystem(job.output, getattr(job, "storage_options", None))
        fs.pipe_file(f"{path.rstrip('/')}/{DONE_DIR}/{block.key}", _marker_text(block))
        return
    files = _chunk_files(root / "0", block, label_arr.chunks)
    if prob_arr is not None:
        for c in range(0, prob_arr.shape[0], prob_arr.chunks[0]):
            files += _chunk_files(root / "probabilities", block, prob_arr.chunks, lead=(c // prob_arr.chunks[0],))
    _fsync_files(files)
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
