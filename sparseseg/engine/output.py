"""The output step of a run: where the segmentation goes (a standalone OME-Zarr image or a label
image of the input), its checks before anything is written (reachability, lease, the resume
contract), its layout (levels, probabilities), and after the blocks the coarser levels and the
note of failed blocks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sparseseg import labels_zarr as lz
from sparseseg.engine.resume import RUN_KEY
from sparseseg.engine.store import Lease, clear_store, local_path, read_meta, store_exists, write_meta
from sparseseg.errors import SparsesegError, one_line
from sparseseg.volume import check_output, is_url, join_store_path, open_volume, split_store_path, store_error

log = logging.getLogger("sparseseg.infer")

PYRAMID_META = "pyramid.json"
# What a resume must share with the run that created the output, and how a mismatch is named.
RESUME_KEYS = (("engine_sha256", "engine"), ("geometry", "network geometry"), ("block", "--block"),
               ("tile", "--tile"), ("overlap", "overlap"), ("input_shape", "input shape"),
               ("probabilities", "--probabilities"), ("levels", "number of levels (--pyramid)"))


@dataclass
class Output:
    """A created (or resumed) output, held under its lease until `finish`."""

    location: str
    label_image: Path | None
    record: dict            # the run record in the output's attributes (engine/resume.py reads it)
    lease: Lease
    storage_options: dict | None = None


def default_output(input_path: str) -> Path:
    store = Path(split_store_path(input_path)[0])
    return store.with_name(store.name.split(".")[0] + "_segmentation.zarr")


def output_location(output, input_path) -> str:
    """The output as a URL (kept as given) or a local path (absolute: workers may run elsewhere)."""
    if output:
        return str(output).rstrip("/") if is_url(output) else str(Path(output).resolve())
    store = split_store_path(str(input_path))[0]
    if is_url(store):
        raise SparsesegError("name the output with --output when the input is a URL")
    return str(default_output(input_path).resolve())


def worker_location(source: str) -> str:
    """A local `store[:inner]` made absolute for workers in other directories; URLs as they are."""
    if is_url(source):
        return source
    store, inner = split_store_path(source)
    return join_store_path(str(Path(store).resolve()), inner)


def resolve_output(output, input_path, as_label: str | None = None, input_inner: str | None = None):
    """(output location, the OME-Zarr image it is a label image of, or None).

    `as_label NAME` puts the segmentation beside an OME-Zarr image INPUT as INPUT/labels/NAME; an
    --output of the form IMAGE.zarr/labels/NAME (IMAGE.zarr an OME-Zarr image) does the same.
    Anything else is a standalone OME-Zarr image."""
    if as_label is not None:
        if output:
            raise SparsesegError("--output and --as-label exclude each other")
        if not as_label or any(c in as_label for c in "/\\:") or as_label.startswith("."):
            raise SparsesegError(f"--as-label {as_label!r}: give a plain name (no '/', ':' or leading '.')")
        store, inner = split_store_path(str(input_path))
        inner = (input_inner or inner or "").strip("/")
        if is_url(store):
            raise SparsesegError("--as-label needs a local OME-Zarr image as INPUT; for a URL input name --output")
        image = Path(store).joinpath(*inner.split("/")) if inner else Path(store)
        if inner and not lz.is_ome_image(image) and lz.is_ome_image(image.parent):
            image = image.parent            # INPUT named a level of the image (img.zarr:0): its image group
        if not lz.is_ome_image(image):
            raise SparsesegError(f"--as-label needs INPUT to be an OME-Zarr image group; {image} is not one")
        image = image.resolve()
        return str(image / "labels" / as_label), image
    out = output_location(output, input_path)
    if not is_url(out):
        p = Path(out)
        if p.parent.name == "labels" and lz.is_ome_image(p.parent.parent):
            return out, p.parent.parent
    return out, None


def check_output_target(out, label_image, input_path, overwrite: bool) -> None:
    """The output checks a command makes before long work (densify trains first): an existing
    output needs `overwrite`; a label image must fit its image. Nothing is written."""
    if label_image is None:
        if not is_url(out):
            check_output(out, overwrite)
        return
    lz.label_levels(label_image, open_volume(str(input_path)).shape)
    if lz.label_exists(label_image, Path(out).name) and not overwrite:
        raise SparsesegError(f"{out} exists; pass --overwrite to replace it")
    check_output(Path(label_image) / "labels", replace=True)


def output_levels(shape, voxel_size, pyramid: int, label_image) -> tuple[list, list]:
    """(z, y, x) shapes and scales of the output's levels: a label image has its image's levels
    (NGFF); a standalone output has 1 + `pyramid` (fewer when the volume is down to one voxel)."""
    if label_image is not None:
        shapes, scales = lz.label_levels(label_image, shape)
        if pyramid and pyramid != len(shapes) - 1:
            raise SparsesegError(f"a label image has the levels of its image ({len(shapes) - 1} downsampled); "
                                 f"drop --pyramid {pyramid}")
        return shapes, scales
    shapes, scales = lz.plan_levels(voxel_size, shape, 1 + max(0, int(pyramid or 0)))
    if pyramid and len(shapes) < pyramid + 1:
        log.warning("--pyramid %d: only %d downsampled levels before the volume is one voxel", pyramid,
                    len(shapes) - 1)
    return shapes, scales


def _zarr_options(out, options) -> dict:
    return {"storage_options": options} if options and local_path(out) is None else {}


def _check_resume(out: str, record: dict, options) -> None:
    """A resume continues only an output that sparseseg-infer wrote with the same run record."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(out), mode="r", **_zarr_options(out, options)).attrs)
    except Exception:
        raise SparsesegError(f"{out} exists but is not a sparseseg output; cannot resume into it") from None
    old = attrs.get(RUN_KEY)
    if old is None:
        raise SparsesegError(f"{out} was not written by sparseseg-infer; cannot resume into it")
    for key, what in RESUME_KEYS:
        was = old.get(key, 1 if key == "levels" else None)      # outputs from before levels had 1
        if was != record[key]:
            raise SparsesegError(f"cannot resume {out}: it was written with a different {what} "
                                 f"({was} vs {record[key]}); use --overwrite to start again")


def _check_existing(out: str, lease: Lease, record: dict, resume: bool, overwrite: bool, options) -> None:
    cur = lease.holder()
    if cur is not None:                 # one line, whatever the flags
        raise SparsesegError(lease.refusal(cur))
    if resume:
        _check_resume(out, record, options)
    elif not overwrite:
        raise SparsesegError(f"{out} exists; pass --resume to continue it or --overwrite to replace it")


def _acquire(lease: Lease, out: str, label_image) -> None:
    if label_image is not None:             # IMAGE.zarr/labels may not exist yet: IMAGE.zarr must be writable
        check_output(Path(label_image) / "labels", replace=True)
    elif local_path(out) is not None:
        check_output(local_path(out), replace=True)
    try:
        lease.acquire()                     # also proves the store is writable, before anything is removed
    except SparsesegError:
        raise
    except Exception as e:
        why = "its bucket or parent directory does not exist" if isinstance(e, FileNotFoundError) else store_error(e)
        raise SparsesegError(f"cannot write to the output store {out}: {why}") from None


def _create_layout(out: str, record: dict, levels, num_classes: int, label_image, options) -> None:
    """The output's arrays: labels at every level, and probabilities (one array, or their own
    NGFF image when there are levels). The group holds only our lease while they are written."""
    import zarr

    shape = tuple(record["input_shape"])
    shapes, scales = levels
    chunks = tuple(record["block"])
    names = record["class_names"]
    if label_image is not None:
        lz.init_label_image(label_image, Path(out).name, chunks, names, "uint8", extra_attrs={RUN_KEY: record})
        group = zarr.open_group(str(out), mode="r+")
    else:
        group = zarr.open_group(str(out), mode="a", zarr_format=3, **_zarr_options(out, options))
        lz.init_levels(group, shapes, scales, chunks, "uint8", "segmentation", None,
                       {"sparseseg": {"class_names": list(names)}, RUN_KEY: record})
    if not record["probabilities"]:
        return
    meta = {"sparseseg": {"axes": "czyx", "class_names": names,
                          "scale": "p*255" if record["probabilities"] == "uint8" else "probability"}}
    if len(shapes) == 1:
        group.create_array("probabilities", shape=(num_classes,) + shape, dtype=record["probabilities"],
                           chunks=(1,) + chunks, fill_value=0, dimension_names=["c", "z", "y", "x"],
                           attributes=meta)
    else:                           # its own NGFF image: levels like the labels', mean pyramid
        lz.init_levels(group.create_group("probabilities"), shapes, scales, chunks,
                       record["probabilities"], "probabilities", num_classes, meta)


def prepare_output(out: str, record: dict, levels, num_classes, resume: bool, overwrite: bool,
                   storage_options=None, label_image=None) -> Lease:
    """Check the output (nothing is touched before every check has passed), take its lease,
    then create it (or keep it, to resume). `levels`: (shapes, scales) of the output's levels.
    Returns the held Lease; the caller releases it."""
    options = storage_options or {}
    try:
        exists = store_exists(out, options)
    except Exception as e:  # unreachable store, bad credentials, missing fsspec backend
        raise SparsesegError(f"cannot reach the output store {out}: {store_error(e)}") from None
    lease = Lease(out, options)
    if exists:
        _check_existing(out, lease, record, resume, overwrite, options)
    _acquire(lease, out, label_image)
    if exists and resume:
        return lease
    try:
        if exists:
            clear_store(out, options)
        _create_layout(out, record, levels, num_classes, label_image, options)
    except Exception as e:
        lease.release()
        raise SparsesegError(f"cannot write to the output store {out}: {store_error(e)}") from None
    return lease


def write_levels(out, record, storage_options, recompute: bool) -> None:
    """Once every block is written (this run's or an earlier one's), fill the coarser levels
    chunk by chunk (labels: nearest, probabilities: mean), then note it in the bookkeeping, so
    a resumed complete run does not write them again. Runs under the output's lease."""
    import zarr

    if record["levels"] <= 1 or (not recompute and (read_meta(out, PYRAMID_META, storage_options) or {}).get(
            "complete")):
        return
    t0 = time.time()
    try:
        write_meta(out, PYRAMID_META, {"complete": False}, storage_options)
        group = zarr.open_group(str(out), mode="r+", **_zarr_options(out, storage_options))
        lz.write_pyramid(group, "nearest")
        if record["probabilities"] and isinstance(group["probabilities"], zarr.Group):
            lz.write_pyramid(group["probabilities"], "mean")
        write_meta(out, PYRAMID_META, {"complete": True, "levels": record["levels"],
                                       "seconds": round(time.time() - t0, 3)}, storage_options)
    except SparsesegError:
        raise
    except Exception as e:  # the blocks are safe; --resume writes the levels again
        raise SparsesegError(f"writing the coarser levels of {out} failed ({store_error(e)}); every block is "
                             f"written: rerun with --resume to write them") from None
    log.info("%d coarser levels written in %.1f s", record["levels"] - 1, time.time() - t0)


def finish(out, lease, failed, storage_options) -> None:
    """Record the failed blocks beside the markers, then let the output go."""
    try:
        write_meta(out, "failed.json", {"failed": failed}, storage_options)
    except Exception as e:  # the blocks are safe; only this note is missing
        log.warning("could not record the failed blocks in %s: %s", out, one_line(e))
    finally:
        lease.release()
