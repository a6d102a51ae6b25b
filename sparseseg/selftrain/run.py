"""Self-training end to end: base networks, pseudo-labels, the final network; what
`sparseseg-train --self-train` and `sparseseg-densify --self-train` call."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sparseseg.errors import SparsesegError
from sparseseg.model.checkpoint import load_checkpoint, save_checkpoint
from sparseseg.model.defaults import DEFAULTS
from sparseseg.selftrain.base import train_base
from sparseseg.selftrain.blockwise import lazy_targets
from sparseseg.selftrain.compose import ComposedMeta
from sparseseg.selftrain.config import SelfTrainConfig, check_options, check_output_name
from sparseseg.selftrain.distill import train_distilled
from sparseseg.selftrain.export import export_composed
from sparseseg.selftrain.meta import train_meta
from sparseseg.selftrain.planes import in_memory
from sparseseg.selftrain.pseudo import average, average_and_candidates, dense_targets

log = logging.getLogger("sparseseg.selftrain")


@dataclass
class SelfTrainResult:
    model: object            # the final SegmentationModel (meta: the ComposedMeta module)
    checkpoint: str | None
    iterations: int
    final_loss: float
    planes: list             # planes the 2D base network used
    predictions: list        # names of the pseudo-label predictions averaged
    seconds: dict            # base3d, base2d, pseudo, final, total
    base_checkpoints: dict


def base_paths(out_path, mode: str = "distill") -> dict:
    """model.pt -> model.base3d.pt and model.base2d.pt beside it, and model.meta.pt (the
    meta-network alone) in meta mode; None each without an out_path."""
    keys = ["3d", "2d"] + (["meta"] if mode == "meta" else [])
    if out_path is None:
        return {k: None for k in keys}
    p = Path(out_path)
    return {k: str(p.with_name(f"{p.stem}.{'base' + k if k != 'meta' else k}.pt")) for k in keys}


def self_train(vols, options: dict, st: SelfTrainConfig, out_path=None, progress=None) -> SelfTrainResult:
    """Train with self-training on TrainingVolumes (sparse labels, the ignore value elsewhere),
    held in memory, or read lazily (distill only: the 2D network on xy, pseudo-labels block-wise). `options`: the training options as `build_configs` takes them; they
    apply to every network trained. Output at `out_path`: distill, an ordinary checkpoint;
    meta, one ONNX engine file (.onnx) of the composed module. The base checkpoints (and the
    meta-network's) go beside it (see `base_paths`)."""
    check_options(options, mode=st.mode)
    check_output_name(st, out_path)
    if st.mode == "meta" and not options.get("normalization"):
        # The composed engine file takes raw intensities: every part normalizes in its graph.
        options = {**options, "normalization": "global"}
    if not options.get("iterations"):
        # A time budget is shared: the 3D and 2D base networks and the final one get a third each.
        options = {**options, "time_budget": (options.get("time_budget") or DEFAULTS["time_budget"]) / 3}
    lazy = not in_memory(vols)
    if lazy and st.mode == "meta":
        raise SparsesegError("--self-train-mode meta needs the volumes in memory (up to 2 GiB as float32)")
    with tempfile.TemporaryDirectory(prefix="sparseseg-selftrain-") as tmp:
        # Block-wise pseudo-labels run the engine on checkpoint files: keep them somewhere.
        paths = base_paths(out_path if out_path is not None or not lazy else Path(tmp) / "model.pt", st.mode)
        t0 = time.time()
        base = train_base(vols, options, paths, progress)
        t1 = time.time()
        k = base.model3d.cfg.num_classes
        if st.mode == "meta":
            final, names = _meta(vols, options, st, base, k, out_path, paths, progress)
        else:
            final, names = _distill(vols, options, st, base, k, out_path, progress, tmp if lazy else None)
        t3 = time.time()
    model, checkpoint, iterations, loss, t2 = final
    seconds = {"base3d": round(base.seconds["3d"], 2), "base2d": round(base.seconds["2d"], 2),
               "pseudo": round(t2 - t1, 2), "final": round(t3 - t2, 2), "total": round(t3 - t0, 2)}
    kept = base.checkpoints if out_path is not None else {key: None for key in base.checkpoints}   # tmp is gone
    return SelfTrainResult(model, checkpoint, iterations, loss, base.planes, names, seconds, kept)


def _distill(vols, options, st, base, k, out_path, progress, workdir=None):
    """`workdir`: volumes read lazily; pseudo-labels go block-wise through the engine there."""
    t1, ignore, targets, names = time.time(), options["ignore_label"], [], []
    for v in vols:
        if workdir is not None:
            target, names = lazy_targets(v, base.checkpoints, workdir, ignore, st.threshold, options["device"])
            targets.append(target)
            continue
        mean, names = average(v.image, base.model3d, base.model2d, base.planes, options["device"], st.backend)
        targets.append(dense_targets(mean, v.labels, ignore, st.threshold))
        del mean
    log.info("self-training: pseudo-labels averaged over %s (%.1f s)", ", ".join(names), time.time() - t1)
    t2 = time.time()
    res = train_distilled(vols, targets, options, k, st.iterations, out_path, progress)
    if res.checkpoint:
        _record(res.checkpoint, {**st.to_dict(), "planes": base.planes, "predictions": names,
                                 "base_checkpoints": base.checkpoints})
    return (res.model, res.checkpoint, res.iterations, res.final_loss, t2), names


def _meta(vols, options, st, base, k, out_path, paths, progress):
    t1, means, cands, names = time.time(), [], [], []
    for v in vols:
        mean, hard, names = average_and_candidates(v.image, base.model3d, base.model2d, base.planes,
                                                   options["device"], st.backend)
        means.append(mean)
        cands.append(hard)
    log.info("self-training: pseudo-labels %s (%.1f s)", ", ".join(names), time.time() - t1)
    t2 = time.time()
    meta, tcfg, class_names, history = train_meta(vols, means, cands, options, k, base.model3d.mean.tolist(),
                                                  base.model3d.std.tolist(),
                                                  st.iterations or options.get("iterations") or base.iterations["3d"],
                                                  progress)
    del means, cands
    composed = ComposedMeta(base.model3d.cpu(), base.model2d.cpu(), base.planes, meta.cpu()).eval()
    info = {**st.to_dict(), "planes": base.planes, "predictions": names, "base_checkpoints": base.checkpoints}
    written = None
    if out_path is not None:
        spacing = tcfg.voxel_size or next((v.voxel_size for v in vols if v.voxel_size), None)
        save_checkpoint(paths["meta"], meta, tcfg, class_names, tcfg.ignore_label, tcfg.iterations, spacing,
                        {"history": history, "self_train": info})

        written = export_composed(composed, class_names, tcfg.ignore_label, spacing, paths["meta"], out_path, info)
    final = history[-1]["loss"] if history else float("nan")
    return (composed, written, tcfg.iterations, final, t2), names


def _record(path, info: dict) -> None:
    """Note in the checkpoint how it was made (its `extra` holds "self_train")."""
    ck = load_checkpoint(path)
    save_checkpoint(path, ck.model, ck.train_config, ck.class_names, ck.ignore_label, ck.iteration, ck.voxel_size,
                    {**ck.extra, "self_train": info})
