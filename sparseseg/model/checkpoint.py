"""Checkpoints that carry their contract and never run code when opened.

A checkpoint is a `torch.save` of plain containers of tensors, strings and numbers, read back
with `torch.load(weights_only=True)` (the restricted unpickler), so opening a file from
someone else cannot execute anything. Configurations are stored as JSON strings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sparseseg.errors import CheckpointError, SparsesegError, first_line
from sparseseg.fsutil import atomic_path
from sparseseg.model.config import ModelConfig
from sparseseg.model.network import SegmentationModel
from sparseseg.version import __version__

FORMAT = "sparseseg-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model: SegmentationModel
    model_config: ModelConfig
    train_config: dict | None        # the trainer's TrainConfig as a dict (trainer.config reads it)
    class_names: list[str]
    ignore_label: int
    iteration: int
    voxel_size: tuple | None
    sparseseg_version: str
    extra: dict                       # optimizer/RNG state for --resume, training history

    @property
    def geometry(self):
        return self.model_config.geometry

    @property
    def normalization(self) -> dict:
        """{"mode", "in_graph", "mean", "std", "percentiles"} (sparseseg.model.normalization)."""
        return self.model.normalization


def save_checkpoint(path, model: SegmentationModel, train_config, class_names,
                    ignore_label: int, iteration: int = 0, voxel_size=None, extra: dict | None = None) -> Path:
    """Write atomically (temporary file + rename): a crash never leaves a truncated model.pt."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sparseseg_version": __version__,
        "model_config": json.dumps(model.cfg.to_dict()),
        "train_config": json.dumps(train_config if isinstance(train_config, dict) else train_config.to_dict())
        if train_config else "",
        "geometry": json.dumps(model.cfg.geometry.to_dict()),
        "normalization": json.dumps(model.normalization),
        "class_names": json.dumps(list(class_names)),
        "ignore_label": int(ignore_label),
        "iteration": int(iteration),
        "voxel_size": json.dumps(list(voxel_size) if voxel_size else None),
        "state_dict": state,
        "extra": extra or {},
    }

    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except OSError as e:
        raise SparsesegError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    return path


def read_payload(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed globals ...
        msg = first_line(e) or type(e).__name__
        raise CheckpointError(f"{path} is not a readable sparseseg checkpoint ({msg[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sparseseg checkpoint (no '{FORMAT}' marker)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version!r}, this sparseseg "
                              f"({__version__}) reads format <= {FORMAT_VERSION}; upgrade sparseseg")
    return payload


def load_checkpoint(path, device="cpu") -> Checkpoint:
    payload = read_payload(path)
    try:
        cfg = ModelConfig.from_dict(json.loads(payload["model_config"]))
        tcfg = json.loads(payload["train_config"]) if payload["train_config"] else None
        # Legacy files store only mean/std: global, inside the graph (the buffers carry them).
        norm = json.loads(payload.get("normalization") or "{}")
        model = SegmentationModel(cfg, normalization=norm.get("mode", "global"), percentiles=norm.get("percentiles"))
        model.load_state_dict(payload["state_dict"])
        ckpt = Checkpoint(
            model=model.to(device).eval(), model_config=cfg, train_config=tcfg,
            class_names=json.loads(payload["class_names"]), ignore_label=int(payload["ignore_label"]),
            iteration=int(payload["iteration"]), voxel_size=json.loads(payload["voxel_size"]),
            sparseseg_version=str(payload["sparseseg_version"]), extra=payload.get("extra", {}))
    except (KeyError, TypeError, ValueError, RuntimeError, SparsesegError) as e:
        msg = first_line(e) or type(e).__name__
        raise CheckpointError(f"{path} is a damaged sparseseg checkpoint ({msg[:160]})") from None
    return ckpt


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
