"""Command line: `sparseseg <sub>` and the `sparseseg-<sub>` console scripts.

Options are parsed here, once, into frozen configs; library functions take explicit
arguments. Every user error becomes `error: <one line>` and exit status 1 (2 for usage).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from sparseseg import __version__
from sparseseg.errors import SparsesegError
from sparseseg.trainer.options import parse_triple

log = logging.getLogger("sparseseg")


def _setup_logging(verbose: bool = False):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Dask's own INFO lines (scheduler/nanny start and stop) would drown ours.
    for name in ("distributed", "dask"):
        logging.getLogger(name).setLevel(logging.WARNING)


def user_errors(fn):
    """Turn user errors into one line and a non-zero exit; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SparsesegError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory (use smaller blocks, tiles or volumes)", err=True)
            sys.exit(1)
        except OSError as e:
            click.echo(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)

    return wrapper


# ------------------------------------------------------------------ shared training options

def training_options(fn):
    opts = [
        click.option("--preset", type=click.Choice(["small", "paper"]), default="small", show_default=True),
        click.option("--iterations", type=click.IntRange(1), default=1000, show_default=True),
        click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True),
        click.option("--lr", type=float, default=1e-3, show_default=True),
        click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True),
        click.option("--schedule", default="constant", show_default=True,
                     help="learning rate: poly (nnU-Net), step (x0.1 at 50%% and 75%%) or constant"),
        click.option("--warmup", type=click.IntRange(0), default=0, show_default=True,
                     help="linear learning-rate warm-up iterations"),
        click.option("--patch", help="training patch output size Z,Y,X (default: from preset and volume)"),
        click.option("--padding", type=click.Choice(["valid", "same"]), default="valid", show_default=True),
        click.option("--ndim", type=click.Choice(["2", "3"]), default="3", show_default=True,
                     help="2: the 2D network applied per xy slice (the paper's 2D baseline)"),
        click.option("--base-width", type=click.IntRange(1), help="channels of the first convolution"),
        click.option("--depth", type=click.IntRange(1, 8), help="resolution levels"),
        click.option("--arch", default="unet", show_default=True,
                     help="unet (Cicek 2016) or cheng (Cheng & Varshney 2017 residual encoder-decoder; pads)"),
        click.option("--factorized", is_flag=True, help="cheng: rank-1 (1D) convolutions instead of full kernels"),
        click.option("--feature-augment", is_flag=True,
                     help="cheng: stochastic sub-sampling in the downsampling shortcuts while training"),
        click.option("--feature-augment-t", type=click.IntRange(2), default=4, show_default=True,
                     help="cheng: region size of that sub-sampling"),
        click.option("--batchnorm/--no-batchnorm", default=None, help="default: the preset's"),
        click.option("--num-classes", type=click.IntRange(2, 255), help="default: largest label + 1"),
        click.option("--class-names", help="comma-separated, one per class"),
        click.option("--class-weights", help="comma-separated per-class loss weights (default: balanced)"),
        click.option("--loss", default="ce", show_default=True, help="ce, jaccard or ce+jaccard"),
        click.option("--dice-weight", type=float, default=0.0, show_default=True,
                     help="weight of the Jaccard term (ce+jaccard: 1 when 0)"),
        click.option("--max-weight-ratio", type=click.FloatRange(0), default=10.0, show_default=True,
                     help="bound on balanced class weights, largest/smallest (0: unbounded)"),
        click.option("--normalization", default="global", show_default=True,
                     help="global (z-score over the training volumes, in the graph), volume (per-volume "
                          "z-score) or percentile (per volume: clip to 0.5/99.5 percentiles, z-score)"),
        click.option("--ignore-label", type=click.IntRange(0, 255), default=255, show_default=True),
        click.option("--voxel-size", help="Z,Y,X voxel size (default: from file metadata, else from shape)"),
        click.option("--no-augment", is_flag=True, help="switch off all augmentation"),
        click.option("--val-slices", type=click.IntRange(0), default=0, show_default=True,
                     help="annotated slices held out per plane orientation for validation IoU (and best.pt)"),
        click.option("--val-fraction", type=click.FloatRange(0, 0.9), default=0.0, show_default=True,
                     help="or: this share of the annotated slices held out"),
        click.option("--val-every", type=click.IntRange(1), default=100, show_default=True),
        click.option("--early-stop", type=click.IntRange(0), default=0, show_default=True,
                     help="stop after this many validations without a better IoU (0: never)"),
        click.option("--checkpoint-every", type=click.IntRange(0), default=500, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--no-amp", is_flag=True, help="no mixed precision on GPU"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _train_options_only(kwargs):
    from sparseseg.trainer.options import OPTION_KEYS

    return {k: kwargs[k] for k in OPTION_KEYS}


# ------------------------------------------------------------------ commands

@click.command("train")
@click.option("--image", "images", multiple=True, required=True, help="training image (repeatable)")
@click.option("--labels", "labels", multiple=True, required=True, help="its sparse labels (repeatable)")
@click.option("--out", default="model.pt", show_default=True, type=click.Path(dir_okay=False))
@click.option("--resume", type=click.Path(dir_okay=False), help="continue from this checkpoint")
@click.option("--force", is_flag=True, help="replace an existing --out")
@training_options
@user_errors
def train_cmd(images, labels, out, resume, force, **kwargs):
    """Train the U-Net on sparsely annotated volumes (fully automated use case)."""
    _setup_logging()
    from sparseseg.trainer.data import load_pairs
    from sparseseg.trainer.options import build_configs
    from sparseseg.trainer.train import train
    from sparseseg.volume import check_output

    if not resume or Path(resume).resolve() != Path(out).resolve():
        check_output(out, force, "--force")
    vols = load_pairs(images, labels, kwargs["ignore_label"])
    mcfg, tcfg, names = build_configs(vols, _train_options_only(kwargs))
    res = train(vols, mcfg, tcfg, names, out_path=out, resume=resume)
    click.echo(f"trained {res.iterations} iterations in {res.seconds:.1f} s, final loss {res.final_loss:.4f}; "
               f"checkpoint: {res.checkpoint}")


@click.command("densify")
@click.argument("image")
@click.argument("labels")
@click.option("--out", required=True, help="dense segmentation, OME-Zarr (.zarr)")
@click.option("--model-out", type=click.Path(dir_okay=False), help="also keep the trained checkpoint here")
@click.option("--tile", help="prediction tile output size Z,Y,X")
@click.option("--overwrite", is_flag=True, help="replace existing outputs")
@training_options
@user_errors
def densify_cmd(image, labels, out, model_out, tile, overwrite, **kwargs):
    """Train on one volume's own sparse labels and write its dense segmentation (semi-automated)."""
    _setup_logging()
    from sparseseg.pipeline import densify
    from sparseseg.volume import check_output

    check_output(out, overwrite)
    if model_out:
        check_output(model_out, overwrite)
    summary = densify(image, labels, out, _train_options_only(kwargs), model_out=model_out,
                      tile=parse_triple(tile, "--tile"), overwrite=overwrite)
    click.echo(f"dense segmentation written to {summary['output']} ({summary['train_seconds']:.1f} s training, "
               f"{summary['predict_seconds']:.1f} s prediction)")


@click.command("eval")
@click.argument("pred")
@click.argument("labels")
@click.option("--ignore-label", type=click.IntRange(0, 255), default=255, show_default=True)
@click.option("--num-classes", type=click.IntRange(2, 255), help="default: from the data")
@click.option("--json", "as_json", is_flag=True, help="print a JSON object")
@click.option("--figure", type=click.Path(dir_okay=False), help="write orthogonal-slice figure (PNG)")
@click.option("--image", help="image to draw under the figure")
@user_errors
def eval_cmd(pred, labels, ignore_label, num_classes, as_json, figure, image):
    """IoU per class on annotated voxels: TP / (TP + FP + FN), and the foreground mean."""
    import numpy as np

    from sparseseg.trainer.metrics import iou_per_class
    from sparseseg.volume import open_volume

    p = open_volume(pred).read_labels()
    lab = open_volume(labels).read_labels()
    if p.shape != lab.shape:
        raise SparsesegError(f"prediction shape {p.shape} and label shape {lab.shape} differ")
    if not (lab != ignore_label).any():
        raise SparsesegError(f"{labels}: no annotated voxel (every voxel is {ignore_label})")
    k = num_classes or int(max(lab[lab != ignore_label].max(), p.max())) + 1
    res = iou_per_class(p, lab, k, ignore_label)
    if figure:
        from sparseseg.trainer.figure import draw_figure

        img = open_volume(image).read(dtype=np.float32) if image else None
        draw_figure(figure, p, lab, ignore_label, img, title=f"mean foreground IoU {res['mean_foreground_iou']:.3f}")
        res["figure"] = figure
    if as_json:
        click.echo(json.dumps(res))
    else:
        for c, v in enumerate(res["iou"]):
            click.echo(f"class {c}: IoU {'n/a' if v is None else f'{v:.4f}'}")
        mf = res["mean_foreground_iou"]
        click.echo(f"mean foreground IoU: {'n/a' if mf is None else f'{mf:.4f}'} over {res['voxels']} voxels")


@click.command("demo")
@click.option("--workdir", default="sparseseg-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--iterations", type=click.IntRange(1), default=None, help="training iterations (default: demo's)")
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def demo_cmd(workdir, iterations, seed):
    """Synthetic tubules, 3+3+2 annotated slices, train, densify, evaluate: all on CPU in minutes."""
    _setup_logging()
    from sparseseg.demo import run_demo

    summary = run_demo(workdir, iterations=iterations, seed=seed)
    click.echo(f"mean foreground IoU on unannotated voxels: {summary['mean_foreground_iou']:.3f} "
               f"(per class {', '.join(f'{v:.3f}' for v in summary['iou'])}); total {summary['seconds_total']:.0f} s")
    click.echo(f"outputs in {Path(workdir).resolve()}: " + ", ".join(summary["files"]))


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), help="default: MODEL with .onnx suffix")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="also build a TensorRT engine here")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default=None,
              help="ONNX: fp32 (default) or fp16; plans: fp16 (default), fp32, bf16, int8")
@click.option("--tile", "tiles", multiple=True, help="plan: output tile Z,Y,X to optimize for (repeatable)")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="plan: largest batch")
@click.option("--workspace", type=click.FloatRange(0.1), default=4.0, show_default=True, help="plan: GB")
@click.option("--calibration", help="volume for a real-tile check (and INT8 calibration)")
@click.option("--version-compatible", is_flag=True, help="plan: runnable on newer TensorRT and Ampere+ GPUs")
@click.option("--no-verify", is_flag=True, help="keep the export even if the parity check fails")
@click.option("--no-simplify", is_flag=True, help="skip onnxslim/onnxsim even when installed")
@click.option("--force", is_flag=True, help="replace existing outputs")
@user_errors
def export_cmd(model, onnx_path, plan_path, precision, tiles, batch, workspace, calibration, version_compatible,
               no_verify, no_simplify, force):
    """Freeze a checkpoint to a self-contained ONNX model (and a TensorRT engine)."""
    _setup_logging()
    from sparseseg.export.cli import run_export

    for line in run_export(model, onnx_path, plan_path, precision, [parse_triple(t, "--tile") for t in tiles], batch,
                           workspace, calibration, version_compatible, not no_verify, not no_simplify, force):
        click.echo(line)


@click.command("infer")
@click.option("--engine", required=True, help="unet.plan (TensorRT), unet.onnx (onnxruntime) or model.pt (PyTorch)")
@click.argument("input_path", metavar="INPUT")
@click.option("--output", help="OME-Zarr output (default: INPUT_segmentation.zarr beside the input)")
@click.option("--workers", type=click.IntRange(0), help="local Dask worker processes (0: run in this process)")
@click.option("--scheduler", help="address of an existing Dask scheduler to join")
@click.option("--block", help="write block (= output chunk) size Z,Y,X")
@click.option("--tile", help="network output tile size Z,Y,X (default: from the engine and block)")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="tiles per forward pass")
@click.option("--overlap", type=click.FloatRange(0, 0.9), default=0.5, show_default=True,
              help="tile overlap for same-padding networks (valid networks need none)")
@click.option("--probabilities", "probabilities", type=click.Choice(["uint8", "float16"]), default=None,
              help="also write per-class probabilities (uint8: p*255)")
@click.option("--resume", is_flag=True, help="continue an interrupted run: compute only unfinished blocks")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help=".pt engines on CUDA")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
@user_errors
def infer_cmd(engine, input_path, output, workers, scheduler, block, tile, batch, overlap, probabilities, resume,
              overwrite, device, precision, as_json):
    """Seamless overlap-tile prediction over a volume of any size, Dask-parallel and resumable."""
    _setup_logging()
    from sparseseg.engine.run import run_inference

    if workers is not None and scheduler:
        raise SparsesegError("--workers and --scheduler exclude each other")
    s = run_inference(engine, input_path, output, workers=workers, scheduler=scheduler,
                      block=parse_triple(block, "--block"), tile=parse_triple(tile, "--tile"), batch=batch,
                      overlap=overlap, probabilities=probabilities, resume=resume, overwrite=overwrite,
                      device=device, precision=precision)
    click.echo(f"{s['voxels_computed']} voxels in {s['seconds']:.1f} s ({s['voxels_per_second']:.4g} voxels/s), "
               f"{s['blocks_computed']} blocks computed, {s['blocks_skipped']} skipped, {s['backend']} on "
               f"{s['device']}: {s['output']}")
    if as_json:
        click.echo(json.dumps(s))


@click.group()
@click.version_option(__version__, prog_name="sparseseg")
def main():
    """sparseseg: dense 3D segmentation from a few annotated slices."""


for _cmd in (train_cmd, densify_cmd, eval_cmd, demo_cmd, export_cmd, infer_cmd):
    main.add_command(_cmd)


if __name__ == "__main__":
    main()
