"""Checkpoint -> BioImage Model Zoo package (model spec 0.5, a zip with rdf.yaml).

What consumers (bioimageio.core, deepImageJ, ilastik, napari plugins) get:
  * input `raw` (batch, channel, z, y, x), float32, each spatial size `min + n*step` from the
    network's exact shape arithmetic (sparseseg.model.shapes), preprocessing
    `ensure_dtype` + `fixed_zero_mean_unit_variance` with the training data's per-channel
    statistics (so the normalization is visible to the consumer, not hidden in the graph);
  * output `probabilities` (batch, class, z, y, x), one channel per class name, softmax of the
    logits. A valid-convolution network returns an output smaller than its input by the context
    on each side; the package pads it back to the input's size and declares that border as the
    output `halo`, which is what a consumer's tiling crops and overlaps. Tiled prediction with the
    halo respected then equals one pass over the whole (padded) image;
  * ONNX weights (opset 18) and TorchScript weights (traced: the crop arithmetic stays dynamic),
    test input/output tensors computed with the packaged ONNX graph, a cover image, and a
    README with the training configuration.

The package is written to a temporary file, validated with bioimageio.spec (and, when
bioimageio.core is installed, its `test_model`), then renamed into place: a failed package
leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparseseg.errors import SparsesegError

log = logging.getLogger("sparseseg.export")

INPUT_ID = "raw"
OUTPUT_ID = "probabilities"
OPSET = 18


class ZooModel(nn.Module):
    """Normalized input -> class probabilities of the input's size (valid border padded with 0).

    The wrapped copy has mean 0 and std 1: the zoo's preprocessing normalizes instead."""

    def __init__(self, model, context):
        super().__init__()
        import copy

        self.model = copy.deepcopy(model).cpu().eval()
        self.model.mean.zero_()
        self.model.std.fill_(1.0)
        cz, cy, cx = (int(c) for c in context)
        self.pad = (cx, cx, cy, cy, cz, cz)
        # The wrapper too: exporters restore the caller's mode recursively, and a wrapper left in
        # training mode would put BatchNorm back on batch statistics.
        self.eval()

    def forward(self, x):
        p = torch.softmax(self.model(x), dim=1)
        return nn.functional.pad(p, self.pad)


def _identifier(name: str, index: int) -> str:
    """Channel names must be identifiers: letters, digits and underscores."""
    s = re.sub(r"\W+", "_", str(name)).strip("_")
    return s if s and not s[0].isdigit() else f"class_{index}" if not s else f"c{s}"


def test_input_shape(geometry) -> tuple[int, int, int]:
    """A small valid input with at least 16 output voxels per axis beyond the halo."""
    shape = []
    for rule in geometry.axes:
        want = max(rule.min_input, 2 * rule.context + 16)
        b = max(rule.b_min, -(-(want - rule.c_in) // rule.step))
        shape.append(rule.c_in + rule.step * b)
    return tuple(shape)


def _test_input(ckpt, shape, calibration, seed=0) -> np.ndarray:
    from sparseseg.export.onnx_export import verification_tiles

    tiles = verification_tiles(ckpt, calibration, seed=seed, shape=shape)
    return np.ascontiguousarray(tiles[-1][1].astype(np.float32))   # the real tile when given


def _normalize(x: np.ndarray, ckpt) -> np.ndarray:
    mean = np.asarray(ckpt.normalization["mean"], np.float32).reshape(1, -1, 1, 1, 1)
    std = np.asarray(ckpt.normalization["std"], np.float32).reshape(1, -1, 1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def _export_onnx(zoo: ZooModel, path: Path, shape, channels):
    import warnings

    dummy = torch.zeros((1, channels) + tuple(shape))
    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(zoo, (dummy,), str(path), input_names=[INPUT_ID], output_names=[OUTPUT_ID],
                          opset_version=OPSET, dynamo=False, dynamic_axes={INPUT_ID: axes, OUTPUT_ID: axes})


def _export_torchscript(zoo: ZooModel, path: Path, shape, channels):
    import warnings

    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(zoo, torch.zeros((1, channels) + tuple(shape)), check_trace=False)
    traced.save(str(path))


def _cover(path: Path, x: np.ndarray, probs: np.ndarray, class_names, given=None):
    """The eval figure when given (`--cover`), else the test tensors: raw centre slice beside the
    predicted classes in the label colours (2:1, as the zoo asks)."""
    if given:
        shutil.copyfile(given, path)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparseseg.labels_zarr import label_colours

    z = x.shape[2] // 2
    raw = x[0, 0, z]
    pred = probs[0, :, z].argmax(0)
    colours = np.asarray(label_colours(len(class_names)), np.float64) / 255
    lo, hi = np.percentile(raw, (1, 99))
    g = np.clip((raw - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.repeat(g[..., None], 3, -1)
    over = colours[pred]
    blend = rgb * (1 - 0.5 * over[..., 3:]) + 0.5 * over[..., :3] * over[..., 3:]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, im, title in zip(axes, (rgb, blend), ("input", "prediction")):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=64)
    plt.close(fig)


def _readme(ckpt, geometry, class_names, checkpoint_sha256) -> str:
    tc = ckpt.train_config or {}
    history = ckpt.extra.get("history") or []
    val = [h for h in history if "val_mean_foreground_iou" in h]
    lines = [
        "# sparseseg U-Net", "",
        "A sparse-supervised 3D U-Net (Çiçek et al., MICCAI 2016) trained with sparseseg on a few "
        "annotated slices; unannotated voxels carried the ignore value "
        f"{ckpt.ignore_label} and weighed 0 in the loss.", "",
        "## Input and output", "",
        f"- input `{INPUT_ID}`: (batch, channel, z, y, x), {ckpt.model_config.in_channels} channel(s), raw "
        "intensities; preprocessing casts to float32 and normalizes with the training data's per-channel "
        f"mean {ckpt.normalization['mean']} and std {ckpt.normalization['std']}.",
        "- valid spatial sizes (z, y, x): " + ", ".join(
            f"{a}: {r.min_input} + n*{r.step}" for a, r in zip("zyx", geometry.axes)),
        f"- output `{OUTPUT_ID}`: per-class softmax probabilities, classes {list(class_names)}, same size as "
        f"the input; the outer halo {list(geometry.context)} (z, y, x) per side is 0 and must be cropped "
        "(valid convolutions). Tiles that overlap by twice the halo reproduce a whole-image pass exactly.", "",
        "## Training", "",
        f"- network: {json.dumps(ckpt.model_config.to_dict())}",
        f"- iterations: {ckpt.iteration}; voxel size (z, y, x): {ckpt.voxel_size}",
        f"- training configuration: {json.dumps(tc)}",
    ]
    if history:
        lines.append(f"- final training loss: {history[-1].get('loss'):.4f}")
    if val:
        lines.append(f"- last validation mean foreground IoU (held-out annotated tiles): "
                     f"{val[-1]['val_mean_foreground_iou']}")
    lines += [f"- sparseseg {ckpt.sparseseg_version}, checkpoint sha256 {checkpoint_sha256}", ""]
    return "\n".join(lines)


def build_rdf(ckpt, geometry, class_names, test_shape, files: dict, authors, license_id, checkpoint_sha256,
              contract) -> dict:
    """The rdf.yaml content (spec 0.5) for files already in the package folder."""
    import torch as _torch

    from sparseseg.version import __version__

    channels = ckpt.model_config.in_channels
    scale = [float(s) for s in (ckpt.voxel_size or (1.0, 1.0, 1.0))]
    in_axes = [{"type": "batch"},
               {"type": "channel", "channel_names": [f"channel{i}" for i in range(channels)]}]
    out_axes = [{"type": "batch"},
                {"type": "channel", "channel_names": [_identifier(n, i) for i, n in enumerate(class_names)]}]
    for a, rule, s in zip("zyx", geometry.axes, scale):
        in_axes.append({"type": "space", "id": a, "size": {"min": rule.min_input, "step": rule.step}, "scale": s})
        out_axes.append({"type": "space", "id": a, "size": {"tensor_id": INPUT_ID, "axis_id": a, "offset": 0},
                         "halo": int(rule.context), "scale": s})
    mean = [float(m) for m in ckpt.normalization["mean"]]
    std = [max(float(v), 1e-6) for v in ckpt.normalization["std"]]
    from bioimageio.spec.model.v0_5 import ModelDescr

    return {
        "format_version": ModelDescr.implemented_format_version,
        "type": "model",
        "name": "sparseseg U-Net " + "-".join(_identifier(n, i) for i, n in enumerate(class_names)),
        "description": "Dense 3D segmentation from a few annotated slices: a sparse-supervised U-Net "
                       f"({ckpt.model_config.ndim}D, {ckpt.model_config.padding} convolutions) trained with "
                       "sparseseg.",
        "authors": [{"name": a} for a in authors],
        "cite": [{"text": "Çiçek et al., 3D U-Net: Learning Dense Volumetric Segmentation from Sparse "
                          "Annotation, MICCAI 2016", "doi": "10.1007/978-3-319-46723-8_49"}],
        "license": license_id,
        "tags": ["3d", "unet", "semantic-segmentation", "sparse-annotation", "sparseseg"],
        "documentation": {"source": files["readme"]},
        "covers": [{"source": files["cover"]}],
        "inputs": [{
            "id": INPUT_ID, "axes": in_axes, "test_tensor": {"source": files["test_input"]},
            "sample_tensor": {"source": files["sample_input"]},
            "data": {"type": "float32"},
            "preprocessing": [
                {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                {"id": "fixed_zero_mean_unit_variance",
                 "kwargs": {"mean": mean, "std": std, "axis": "channel"} if channels > 1 else
                 {"mean": mean[0], "std": std[0]}},
            ],
        }],
        "outputs": [{
            "id": OUTPUT_ID, "axes": out_axes, "test_tensor": {"source": files["test_output"]},
            "sample_tensor": {"source": files["sample_output"]},
            "data": {"type": "float32", "range": [0.0, 1.0]},
        }],
        "weights": {
            # Both come from the same traced module; TorchScript is the original, ONNX its conversion.
            "torchscript": {"source": files["torchscript"], "pytorch_version": _torch.__version__.split("+")[0]},
            "onnx": {"source": files["onnx"], "opset_version": OPSET, "parent": "torchscript"},
        },
        "config": {"sparseseg": {"version": __version__, "checkpoint_sha256": checkpoint_sha256,
                                 "class_names": list(class_names), "ignore_label": ckpt.ignore_label,
                                 "geometry": geometry.to_dict(), "test_input_shape": list(test_shape),
                                 "contract": contract}},
    }


def _validate(rdf_path: Path, run_test: bool):
    """bioimageio.spec validation, then bioimageio.core's inference test when installed."""
    from bioimageio.spec import load_model_description

    descr = load_model_description(str(rdf_path), perform_io_checks=True)
    summary = getattr(descr, "validation_summary", None)
    if summary is not None and summary.status not in ("passed", "valid-format"):
        raise SparsesegError(f"the bioimage.io package failed validation: {_first_error(summary)}")
    if not hasattr(descr, "inputs"):
        raise SparsesegError(f"the bioimage.io package failed validation: {_first_error(summary)}")
    if run_test:
        try:
            from bioimageio.core import test_model
        except ImportError:
            log.warning("bioimageio.core is not installed: the package was validated but not test-run")
            return descr, False
        result = test_model(descr)
        if result.status != "passed":
            raise SparsesegError(f"the bioimage.io package failed its inference test: {_first_error(result)}")
        return descr, True
    return descr, False


def _first_error(summary) -> str:
    try:
        for detail in summary.details:
            for err in detail.errors:
                return f"{'.'.join(map(str, err.loc))}: {err.msg}".splitlines()[0][:300]
            if detail.status == "failed":
                return str(detail.name)[:300]
    except Exception:
        pass
    return str(getattr(summary, "status", "failed"))


def export_bioimageio(model_path, out_zip, *, authors=("sparseseg user",), license_id="CC-BY-4.0", cover=None,
                      calibration=None, force: bool = False, test: bool = True) -> str:
    """Write the package `out_zip` from checkpoint `model_path`; returns the one-line report."""
    try:
        from bioimageio.spec import save_bioimageio_package_as_folder  # noqa: F401
    except ImportError:
        raise SparsesegError("--bioimageio needs bioimageio.spec: pip install 'sparseseg[bioimageio]'") from None
    from sparseseg.model.checkpoint import file_sha256, load_checkpoint
    from sparseseg.model.contract import contract_from_checkpoint
    from sparseseg.volume import check_output

    out_zip = Path(out_zip)
    if out_zip.suffix.lower() != ".zip":
        raise SparsesegError(f"--bioimageio must name a .zip file, got {out_zip}")
    check_output(out_zip, force, "--force")
    if cover is not None and Path(cover).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise SparsesegError(f"--cover must be a PNG or JPEG image, got {cover}")
    if cover is not None and not Path(cover).is_file():
        raise SparsesegError(f"no such cover image: {cover}")
    ckpt = load_checkpoint(model_path)
    sha = file_sha256(model_path)
    geometry = ckpt.model_config.geometry
    class_names = list(ckpt.class_names)
    channels = ckpt.model_config.in_channels
    shape = test_input_shape(geometry)

    tmp_dir = Path(tempfile.mkdtemp(prefix=".sparseseg-bioimageio-", dir=out_zip.parent))
    try:
        zoo = ZooModel(ckpt.model, geometry.context)
        files = {"onnx": "weights.onnx", "torchscript": "weights_torchscript.pt", "test_input": "test_input.npy",
                 "test_output": "test_output.npy", "cover": "cover.png", "readme": "README.md",
                 "sample_input": "sample_input.tif", "sample_output": "sample_output.tif"}
        _export_onnx(zoo, tmp_dir / files["onnx"], shape, channels)
        _export_torchscript(zoo, tmp_dir / files["torchscript"], shape, channels)
        x = _test_input(ckpt, shape, calibration)
        from sparseseg.export.onnx_export import ort_session

        y = ort_session(tmp_dir / files["onnx"]).run([OUTPUT_ID], {INPUT_ID: _normalize(x, ckpt)})[0]
        with torch.inference_mode():    # the package must predict what the checkpoint predicts
            ref = torch.softmax(ckpt.model.cpu()(torch.from_numpy(x)), 1).numpy()
        c = geometry.context
        inner = y[(slice(None), slice(None)) + tuple(slice(ci, n - ci) for ci, n in zip(c, y.shape[2:]))]
        if inner.shape != ref.shape or float(np.abs(inner - ref).max()) > 1e-4:
            raise SparsesegError("the packaged ONNX graph does not reproduce the checkpoint's probabilities")
        np.save(tmp_dir / files["test_input"], x)
        np.save(tmp_dir / files["test_output"], y)
        import tifffile     # sample tensors: images a person can open (the zoo reads them with imageio)

        tifffile.imwrite(tmp_dir / files["sample_input"], x[0])
        tifffile.imwrite(tmp_dir / files["sample_output"], y[0])
        _cover(tmp_dir / files["cover"], x, y, class_names, cover)
        (tmp_dir / files["readme"]).write_text(_readme(ckpt, geometry, class_names, sha), encoding="utf-8")
        rdf = build_rdf(ckpt, geometry, class_names, shape, files, list(authors), license_id, sha,
                        contract_from_checkpoint(ckpt, sha))
        import yaml

        (tmp_dir / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True), encoding="utf-8")
        descr, tested = _validate(tmp_dir / "rdf.yaml", test)
        from bioimageio.spec import save_bioimageio_package

        from sparseseg.fsutil import atomic_path

        with atomic_path(out_zip) as tmp_zip:
            save_bioimageio_package(descr, output_path=tmp_zip)
    except SparsesegError:
        raise
    except Exception as e:  # pydantic/IO errors from the zoo libraries: one line, nothing left behind
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        msg = lines[0]  # bioimageio.spec puts a heading ("Invalid model description:") above its errors
        if msg.endswith(":") and len(lines) > 1:
            msg = f"{msg} {lines[1].lstrip(':- ')}"
        raise SparsesegError(f"could not build the bioimage.io package: {msg[:300]}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    how = "validated with bioimageio.spec and test-run with bioimageio.core" if tested else \
        "validated with bioimageio.spec"
    return (f"packaged {out_zip} (bioimage.io model spec 0.5: ONNX + TorchScript, input {INPUT_ID} sizes "
            f"{'/'.join(f'{r.min_input}+n*{r.step}' for r in geometry.axes)}, halo {list(geometry.context)}): {how}")
