"""What a resumed run reuses from the run that started the output: its block, tile and batch.

The default tile and batch depend on the device (on a GPU, on the memory free at that moment),
so recomputing them on resume could give another tile, and a different tile would refuse the
resume (the finished blocks were computed with the recorded one). A resume therefore takes
the recorded plan; only an explicitly different --block/--tile is refused, in one line.
"""

from __future__ import annotations

from sparseseg.errors import SparsesegError

RUN_KEY = "sparseseg_run"      # the output group's attribute holding the run record


def recorded_run(out: str, storage_options=None) -> dict | None:
    """The run record in the output's attributes (written when the output was created), or
    None when there is none to read (the resume checks that follow name the problem)."""
    import zarr

    from sparseseg.engine.store import local_path, store_exists

    options = storage_options or {}
    try:
        if not store_exists(out, options):
            return None
        zkw = {"storage_options": options} if options and local_path(out) is None else {}
        record = dict(zarr.open_group(str(out), mode="r", **zkw).attrs).get(RUN_KEY)
    except Exception:       # not a zarr group, unreachable: output.prepare_output says so in one line
        return None
    return record if isinstance(record, dict) else None


def _triple(value):
    return None if value is None else tuple(int(v) for v in value)


def resume_choice(out: str, engine_sha256: str, block, tile, batch, storage_options=None):
    """(block, tile, batch) for resuming into `out` with the engine of this sha256: the recorded
    ones where the user gave none; an explicit --block/--tile that differs from the record is a
    one-line error. Batch only groups tiles, so an explicit --batch is taken as given (older
    records have no batch). Another engine's record is not reused (the resume is refused
    afterwards, naming the engine)."""
    record = recorded_run(out, storage_options)
    if record is None or record.get("engine_sha256") != engine_sha256:
        return block, tile, batch
    x = "x".join
    for name, given, key in (("--block", block, "block"), ("--tile", tile, "tile")):
        old = _triple(record.get(key))
        if given is not None and old is not None and _triple(given) != old:
            raise SparsesegError(f"cannot resume {out}: it was written with a different {name} ({x(map(str, old))}, "
                                 f"not {x(map(str, _triple(given)))}); leave {name} out to reuse it, or use "
                                 "--overwrite to start again")
    block = block if block is not None else _triple(record.get("block"))
    tile = tile if tile is not None else _triple(record.get("tile"))
    if batch is None and record.get("batch") is not None:
        batch = int(record["batch"])
    return block, tile, batch
