"""Write-to-a-temporary-sibling-then-rename: the one way sparseseg puts a file or directory in
place, so a crash or an error never leaves a half-written artifact under the final name."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def temporary_sibling(path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def replace_atomically(tmp, path) -> Path:
    """Rename a finished temporary file or directory onto `path` (replacing what is there)."""
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir() and path.exists():
        _remove(path)                  # os.replace cannot replace a non-empty directory
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(p) as tmp:` write tmp (a file or a directory); on success it is renamed
    onto p, on any error it is removed and p is left as it was."""
    path = Path(path)
    tmp = temporary_sibling(path)
    _remove(tmp)
    try:
        yield tmp
        replace_atomically(tmp, path)
    finally:
        _remove(tmp)
