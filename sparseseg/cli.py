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

from sparseseg.errors import SparsesegError
from sparseseg.model.defaults import DEFAULTS
from sparseseg.version import __version__

log = logging.getLogger("sparseseg")


def _setup_logging(verbose: bool = False):
    import os

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Dask's own lines (scheduler/nanny/worker start and stop, a restarted worker, connection
    # noise at shutdown) would drown ours: only errors unless --verbose. Dask reads its logging
    # levels from its config when `distributed` is first imported, in this process and in the
    # worker processes it spawns: the environment reaches both.
    level = "info" if verbose else "error"
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", level)
    for name in ("distributed", "dask"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    for name in ("botocore", "s3fs", "fsspec", "aiobotocore", "urllib3", "asyncio"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def parse_triple(value, name, cast=int):
    """"Z,Y,X" -> a tuple of three positive numbers (None stays None)."""
    if value is None:
        return None
    try:
        parts = tuple(cast(v) for v in str(value).split(","))
    except ValueError:
        raise SparsesegError(f"{name} must be three comma-separated numbers Z,Y,X, got {value!r}") from None
    if len(parts) != 3 or any(p <= 0 for p in parts):
        raise SparsesegError(f"{name} must be three positive numbers Z,Y,X, got {value!r}")
    return parts


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

# Help text per training option; the option's name and default come from the one dict of
# defaults (sparseseg.model.defaults.DEFAULTS), so the CLI cannot drift from the Python API.
TRAINING_HELP = {
    "preset": dict(type=click.Choice(["small", "paper"])),
    "time_budget": dict(type=float, metavar="MINUTES",
                        help="minutes for the whole run, prediction included for densify: the step time is "
                             "measured and the iterations planned to fit  [default: "
                             f"{DEFAULTS['time_budget']:g}]"),
    "iterations": dict(type=click.IntRange(1), help="pin an exact iteration count instead of a --time-budget"),
    "batch_size": dict(type=click.IntRange(1)),
    "lr": dict(type=float),
    "optimizer": dict(type=click.Choice(["adam", "sgd"])),
    "weight_decay": dict(type=click.FloatRange(0), help="weight decay (decoupled, AdamW, with adam)"),
    "schedule": dict(help="learning rate: poly (nnU-Net), step (x0.1 at 50% and 75%) or constant; "
                          "it follows the planned iteration count"),
    "warmup": dict(type=click.IntRange(0), help="linear learning-rate warm-up iterations"),
    "patch": dict(help="training patch output size Z,Y,X (default: from preset and volume)"),
    "padding": dict(type=click.Choice(["valid", "same"])),
    "ndim": dict(type=click.Choice(["auto", "2", "3"]), help="3: the 3D network; 2: a 2D network (per xy slice, "
                                                              "or all planes: --planes); auto: 2 on all planes when "
                                                              "the labels lie on xy, xz and yz slices, else 3"),
    "planes": dict(type=click.Choice(["auto", "xy", "all"]), help="2D networks: applied per xy slice, or along xy, "
                                                                   "xz and yz with their probabilities averaged; "
                                                                   "auto: all when the labels lie on slices of two "
                                                                   "or three orientations"),
    "base_width": dict(type=click.IntRange(1), help="channels of the first convolution"),
    "depth": dict(type=click.IntRange(1, 8), help="resolution levels"),
    "arch": dict(help="unet (Cicek 2016) or cheng (Cheng & Varshney 2017 residual encoder-decoder; pads)"),
    "factorized": dict(is_flag=True, help="cheng: rank-1 (1D) convolutions instead of full kernels"),
    "feature_augment": dict(is_flag=True, help="cheng: stochastic sub-sampling in the downsampling shortcuts"),
    "feature_augment_t": dict(type=click.IntRange(2), help="cheng: region size of that sub-sampling"),
    "filters": dict(help="fixed filter bank in front of the network, per section: ilastik (its 40 features: "
                         "scales 0.7,1,1.6,3.5,5), auto (those scales whose margin fits the volume), "
                         "comma-separated scales, or none"),
    "filter_dims": dict(type=click.Choice(["auto", "2", "3"]),
                        help="3: the bank filters the volume in 3D (10 responses per scale; 2D networks on all "
                             "planes, which share them); 2: each section; auto: 3 on all planes when the "
                             "responses fit in memory"),
    "batchnorm": dict(decls=("--batchnorm/--no-batchnorm",), help="default: the preset's"),
    "num_classes": dict(type=click.IntRange(2, 255), help="default: largest label + 1"),
    "class_names": dict(help="comma-separated, one per class"),
    "class_weights": dict(help="balanced (inverse frequency), uniform, or comma-separated per-class loss weights"),
    "loss": dict(help="ce, jaccard or ce+jaccard"),
    "dice_weight": dict(type=float, help="weight of the Jaccard term (ce+jaccard: 1 when 0)"),
    "max_weight_ratio": dict(type=click.FloatRange(0), help="bound on balanced class weights, largest/smallest "
                                                             "(0: unbounded)"),
    "input_dropout": dict(help="chance that each input channel of a training patch is zeroed (the rest scaled "
                               "up), against overfitting a few slices' filter responses; auto: 0.2 on a 3D "
                               "filter bank's responses, else 0"),
    "class_sampling": dict(type=click.FloatRange(0, 1), help="share of patches placed around a voxel of a class "
                                                              "drawn uniformly (rare classes seen more often, "
                                                              "without reweighting voxels)"),
    "pretrain": dict(type=click.IntRange(0), help="self-supervised steps first: the network inpaints masked "
                                                  "blocks of the raw volume, all voxels, labelled or not"),
    "normalization": dict(help="global (z-score over the training volumes, in the graph), volume (per-volume "
                               "z-score) or percentile (per volume: clip to 0.5/99.5 percentiles, z-score)  "
                               f"[default: {DEFAULTS['normalization']}; meta self-training: global]"),
    "ignore_label": dict(type=click.IntRange(0, 255)),
    "voxel_size": dict(help="Z,Y,X voxel size (default: from file metadata, else from shape)"),
    "augment": dict(help="full (elastic, any rotation, scaling, flips, gray values), lossless (flips, "
                         "right-angle rotations, gray values: no resampling), flips (flips, gray values) or none"),
    "no_augment": dict(is_flag=True, help="switch off all augmentation (= --augment none)"),
    "val_slices": dict(type=click.IntRange(0), help="annotated slices held out per plane orientation for "
                                                    "validation IoU (and best.pt)"),
    "val_fraction": dict(type=click.FloatRange(0, 0.9), help="or: this share of the annotated slices held out"),
    "val_every": dict(type=click.IntRange(1)),
    "early_stop": dict(type=click.IntRange(0), help="stop after this many validations without a better IoU "
                                                    "(0: never)"),
    "bn_recalibrate": dict(type=click.IntRange(0), help="re-estimate BatchNorm statistics on this many "
                                                        "un-augmented patches at the end"),
    "checkpoint_every": dict(type=click.IntRange(0)),
    "seed": dict(type=int),
    "device": dict(type=click.Choice(["auto", "cpu", "cuda"])),
    "no_amp": dict(is_flag=True, help="no mixed precision on GPU"),
}
# Defaults click must not fill in: giving both --iterations and --time-budget is caught, and an
# unset --normalization lets meta self-training use the one it supports (None: the default).
UNSET_DEFAULTS = ("iterations", "time_budget", "normalization")


def training_options(fn):
    for key in reversed(list(TRAINING_HELP)):
        kw = dict(TRAINING_HELP[key])
        decls = kw.pop("decls", ("--" + key.replace("_", "-"),))
        default = None if key in UNSET_DEFAULTS else DEFAULTS[key]
        show = default is not None and not kw.get("is_flag")
        fn = click.option(*decls, key, default=default, show_default=show, **kw)(fn)
    return fn


def self_train_options(fn):
    opts = [
        click.option("--self-train", "self_train", is_flag=True,
                     help="self-training (Zheng et al. 2020): 2D and 3D base networks on the sparse labels, "
                          "their averaged predictions as dense pseudo-labels for the final network"),
        click.option("--self-train-mode", default="distill", show_default=True,
                     help="distill: one plain 3D network trained on the pseudo-labels (a checkpoint); meta: "
                          "Zheng's meta-network on image + pseudo-labels, composed with the base networks "
                          "into one ONNX engine file (--out NAME.onnx)"),
        click.option("--self-train-iterations", type=click.IntRange(0), default=0, show_default=True,
                     help="iterations of the final network (0: --iterations)"),
        click.option("--self-train-threshold", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                     show_default=True, help="ignore pseudo-labelled voxels whose averaged probability is lower"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _self_train_config(kwargs):
    """SelfTrainConfig when --self-train is given, else None (other --self-train-* refused)."""
    from sparseseg.selftrain.config import SelfTrainConfig

    if not kwargs["self_train"]:
        given = [n for n, default in (("mode", "distill"), ("iterations", 0), ("threshold", 0.0))
                 if kwargs[f"self_train_{n}"] != default]
        if given:
            raise SparsesegError(f"--self-train-{given[0]} applies with --self-train only")
        return None
    return SelfTrainConfig(mode=kwargs["self_train_mode"], iterations=kwargs["self_train_iterations"],
                           threshold=kwargs["self_train_threshold"])


def _train_options_only(kwargs):
    """The training options out of a command's keyword arguments (None: the default), the Z,Y,X
    ones as tuples."""
    if kwargs["iterations"] is not None and kwargs["time_budget"] is not None:
        raise SparsesegError("give --iterations or --time-budget, not both (--iterations pins the count)")
    o = {k: (DEFAULTS[k] if kwargs[k] is None and k in UNSET_DEFAULTS[:2] else kwargs[k]) for k in DEFAULTS}
    return dict(o, patch=parse_triple(o["patch"], "--patch"),
                voxel_size=parse_triple(o["voxel_size"], "--voxel-size", float))


# ------------------------------------------------------------------ commands

@click.command("train")
@click.option("--image", "images", multiple=True, required=True, help="training image (repeatable)")
@click.option("--labels", "labels", multiple=True, required=True, help="its sparse labels (repeatable)")
@click.option("--out", default="model.pt", show_default=True, type=click.Path(dir_okay=False))
@click.option("--resume", type=click.Path(dir_okay=False), help="continue from this checkpoint")
@click.option("--force", is_flag=True, help="replace an existing --out")
@training_options
@self_train_options
@user_errors
def train_cmd(images, labels, out, resume, force, **kwargs):
    """Train the U-Net on sparsely annotated volumes (fully automated use case)."""
    _setup_logging()
    from sparseseg.trainer.data import load_pairs
    from sparseseg.trainer.options import build_configs
    from sparseseg.trainer.train import train
    from sparseseg.volume import check_output

    st = _self_train_config(kwargs)
    if st:
        from sparseseg.selftrain.config import check_options, check_output_name
        from sparseseg.selftrain.run import base_paths, self_train

        check_options(_train_options_only(kwargs), resume, st.mode)
        check_output_name(st, out)
        for path in [out, *base_paths(out, st.mode).values()]:
            check_output(path, force, "--force")
        vols = load_pairs(images, labels, kwargs["ignore_label"])
        res = self_train(vols, _train_options_only(kwargs), st, out_path=out)
        click.echo(f"self-trained ({st.mode}, 2D planes {','.join(res.planes)}) in {res.seconds['total']:.1f} s, "
                   f"final loss {res.final_loss:.4f}; {'engine file' if st.mode == 'meta' else 'checkpoint'}: "
                   f"{res.checkpoint}")
        return
    if not resume or Path(resume).resolve() != Path(out).resolve():
        check_output(out, force, "--force")
    vols = load_pairs(images, labels, kwargs["ignore_label"])
    mcfg, tcfg, names = build_configs(vols, _train_options_only(kwargs))
    res = train(vols, mcfg, tcfg, names, out_path=out, resume=resume)
    budget = f" (planned for a {res.plan['minutes']:g}-min budget at {res.plan['step_seconds']:.2f} s/it)" \
        if res.plan else ""
    click.echo(f"trained {res.iterations} iterations{budget} in {res.seconds:.1f} s, final loss "
               f"{res.final_loss:.4f}; checkpoint: {res.checkpoint}")


@click.command("densify")
@click.argument("image")
@click.argument("labels")
@click.option("--out", help="dense segmentation, OME-Zarr (.zarr); IMAGE.zarr/labels/NAME writes a label image "
                            "beside the OME-Zarr image IMAGE.zarr")
@click.option("--as-label", "as_label", metavar="NAME",
              help="IMAGE is an OME-Zarr image: write the segmentation beside it as IMAGE/labels/NAME")
@click.option("--model-out", type=click.Path(dir_okay=False), help="also keep the trained checkpoint here")
@click.option("--tile", help="prediction tile output size Z,Y,X")
@click.option("--pyramid", type=click.IntRange(0), default=0, show_default=True,
              help="also write this many downsampled levels (as sparseseg-infer --pyramid)")
@click.option("--overwrite", is_flag=True, help="replace existing outputs")
@training_options
@self_train_options
@user_errors
def densify_cmd(image, labels, out, as_label, model_out, tile, pyramid, overwrite, **kwargs):
    """Train on one volume's own sparse labels and write its dense segmentation (semi-automated)."""
    _setup_logging()
    from sparseseg.engine.output import check_output_target, resolve_output
    from sparseseg.pipeline import densify
    from sparseseg.volume import check_output

    if not out and not as_label:
        raise SparsesegError("name the output: --out OUT.zarr, or --as-label NAME beside an OME-Zarr IMAGE")
    st = _self_train_config(kwargs)
    if st:
        from sparseseg.selftrain.config import check_options, check_output_name

        check_options(_train_options_only(kwargs), mode=st.mode)
        if model_out:
            check_output_name(st, model_out)
    out, label_image = resolve_output(out, image, as_label)
    check_output_target(out, label_image, image, overwrite)        # before minutes of training
    if model_out:
        from sparseseg.selftrain.run import base_paths

        for path in [model_out, *(base_paths(model_out, st.mode).values() if st else [])]:
            check_output(path, overwrite)
    summary = densify(image, labels, out, _train_options_only(kwargs), model_out=model_out,
                      tile=parse_triple(tile, "--tile"), overwrite=overwrite, pyramid=pyramid, self_train=st)
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
@click.option("--report", type=click.Path(dir_okay=False),
              help="write an HTML report (IoU per class, orthogonal views, annotated slices)")
@click.option("--model", "model_path", type=click.Path(dir_okay=False), help="report: checkpoint for classes + curve")
@user_errors
def eval_cmd(pred, labels, ignore_label, num_classes, as_json, figure, image, report, model_path):
    """IoU per class on annotated voxels: TP / (TP + FP + FN), and the foreground mean."""
    import numpy as np

    from sparseseg.eval.metrics import iou_per_class
    from sparseseg.volume import open_volume

    p = open_volume(pred).read_labels()
    lab = open_volume(labels).read_labels()
    if p.shape != lab.shape:
        raise SparsesegError(f"prediction shape {p.shape} and label shape {lab.shape} differ")
    if not (lab != ignore_label).any():
        raise SparsesegError(f"{labels}: no annotated voxel (every voxel is {ignore_label})")
    k = num_classes or int(max(lab[lab != ignore_label].max(), p.max())) + 1
    res = iou_per_class(p, lab, k, ignore_label)
    if figure or report:
        from sparseseg.eval.figure import draw_figure
        from sparseseg.eval.report import class_names_of, write_report

        img = open_volume(image).read(dtype=np.float32) if image else None
        names, history = class_names_of(pred, model_path)
        mf = res["mean_foreground_iou"]
        if figure:
            draw_figure(figure, p, lab, ignore_label, img, title="mean foreground IoU "
                        + ("n/a" if mf is None else f"{mf:.3f}"), class_names=names)
            res["figure"] = figure
        if report:
            write_report(report, p, lab, dict(res), ignore_label, img, names, history,
                         sources={"prediction": pred, "labels": labels, "image": image, "model": model_path})
            res["report"] = report
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
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False),
              help="default: MODEL with .onnx suffix; with --plan, the graph the plan is built from")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="also build a TensorRT engine here")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default=None,
              help="ONNX: fp32 (default), fp16 or int8; plans: fp16 (default), fp32, bf16, int8. "
                   "int8 needs --calibration")
@click.option("--tile", default=None, help="plan: output tile Z,Y,X to optimize for (default: the tile the engine "
                                           "would choose on this GPU)")
@click.option("--tile-min", default=None, help="plan: smallest output tile Z,Y,X (default: the smallest valid)")
@click.option("--tile-max", default=None, help="plan: largest output tile Z,Y,X (default: --tile)")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="plan: largest batch")
@click.option("--workspace", type=click.FloatRange(0.1), default=4.0, show_default=True, help="plan: GB")
@click.option("--calibration", help="volume for a real-tile check and int8 calibration")
@click.option("--version-compatible", is_flag=True, help="plan: runnable on newer TensorRT of the same major version")
@click.option("--hardware-compatible", is_flag=True,
              help="plan: runnable on any Ampere or newer GPU (TensorRT's AMPERE_PLUS: drops Hopper-only tactics)")
@click.option("--no-verify", is_flag=True, help="keep the export even if the parity check fails")
@click.option("--no-simplify", is_flag=True, help="skip onnxslim/onnxsim even when installed")
@click.option("--force", is_flag=True, help="replace existing outputs")
@click.option("--bioimageio", "bioimageio_zip", type=click.Path(dir_okay=False),
              help="write a BioImage Model Zoo package (.zip) instead of (or, with --onnx/--plan, besides) ONNX")
@click.option("--author", "authors", multiple=True, help="bioimageio: author name (repeatable)")
@click.option("--license", "license_id", default="CC-BY-4.0", show_default=True, help="bioimageio: SPDX id")
@click.option("--cover", type=click.Path(dir_okay=False), help="bioimageio: cover image (e.g. the eval figure)")
@user_errors
def export_cmd(model, onnx_path, plan_path, precision, tile, tile_min, tile_max, batch, workspace, calibration,
               version_compatible, hardware_compatible, no_verify, no_simplify, force,
               bioimageio_zip, authors, license_id, cover):
    """Freeze a checkpoint to a self-contained ONNX model (and a TensorRT engine)."""
    _setup_logging()
    from sparseseg.export.run import run_export

    if bioimageio_zip:
        from sparseseg.export.bioimageio import export_bioimageio

        click.echo(export_bioimageio(model, bioimageio_zip, authors=authors or ("sparseseg user",),
                                     license_id=license_id, cover=cover, calibration=calibration, force=force))
        if not onnx_path and not plan_path:
            return
    for line in run_export(model, onnx_path, plan_path, precision, parse_triple(tile, "--tile"), batch, workspace,
                           calibration, version_compatible, not no_verify, not no_simplify, force,
                           tile_min=parse_triple(tile_min, "--tile-min"), tile_max=parse_triple(tile_max, "--tile-max"),
                           hardware_compatible=hardware_compatible):
        click.echo(line)


def cluster_options(fn):
    """Where the blocks run: a local cluster (default), SLURM jobs or dask-cuda (engine/cluster.py)."""
    opts = [
        click.option("--cluster", "kind", type=click.Choice(["local", "slurm", "local-cuda"]), default="local",
                     show_default=True, help="local: Dask worker processes here (--workers); slurm: SLURM jobs "
                                             "through dask-jobqueue, one worker each; local-cuda: dask-cuda, one "
                                             "worker per visible GPU (unverified: never run on a GPU)"),
        click.option("--jobs", type=int, help="slurm: jobs to submit  [default: 1]"),
        click.option("--partition", help="slurm: partition (sbatch -p)"),
        click.option("--account", help="slurm: account (sbatch -A)"),
        click.option("--walltime", help="slurm: time limit per job, SLURM's format (e.g. 2:00:00)  "
                                        "[default: the jobqueue config's, 00:30:00]"),
        click.option("--cores", type=int, help="slurm: CPU cores per job, all of them torch's  [default: 1]"),
        click.option("--memory", help="slurm: memory per job (e.g. 16GB)  [default: 4GB]"),
        click.option("--gpus-per-job", type=int, help="slurm: 1 asks each job for a GPU (--gres=gpu:1)"),
        click.option("--job-extra", multiple=True, help="slurm: any other #SBATCH directive, e.g. "
                                                        "'--qos=short' (repeatable)"),
        click.option("--jobqueue-config", type=click.Path(dir_okay=False),
                     help="slurm: dask-jobqueue's YAML (its jobqueue: slurm: section) with site defaults; "
                          "the options above override it"),
        click.option("--job-wait", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
                     help="slurm: seconds to wait for the first job's worker before giving up"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _cluster_of(cluster_kw: dict, workers, scheduler, retries):
    """The checked cluster the options ask for (None: the local one); nothing is submitted."""
    from sparseseg.engine.cluster import cluster_from_options

    cluster = cluster_from_options(retries=retries, **cluster_kw)
    if cluster is not None:
        given = "--workers" if workers is not None else "--scheduler" if scheduler else None
        if given:
            raise SparsesegError(f"{given} and --cluster {cluster_kw['kind']} exclude each other")
        cluster.check()
    return cluster


@click.command("infer")
@click.option("--engine", required=True, help="unet.plan (TensorRT), unet.onnx (onnxruntime) or model.pt (PyTorch)")
@click.argument("input_path", metavar="INPUT")
@click.option("--output", help="OME-Zarr output (default: INPUT_segmentation.zarr beside the input); "
                               "IMAGE.zarr/labels/NAME writes a label image beside the OME-Zarr image IMAGE.zarr")
@click.option("--as-label", "as_label", metavar="NAME",
              help="INPUT is an OME-Zarr image: write the segmentation beside it as the label image "
                   "INPUT/labels/NAME (NGFF 0.5 image-label, class names and colours)")
@click.option("--pyramid", type=click.IntRange(0), default=0, show_default=True,
              help="also write N downsampled levels (labels: nearest, probabilities: mean), block-wise, once "
                   "every block is written; a label image always has its image's levels")
@click.option("--workers", type=click.IntRange(0), help="local Dask worker processes (0: run in this process)")
@click.option("--scheduler", help="address of an existing Dask scheduler to join")
@click.option("--block", help="write block (= output chunk) size Z,Y,X")
@click.option("--tile", help="network output tile size Z,Y,X (default: from the engine and block)")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="tiles per forward pass (default: from the device's memory, or the plan's profile)")
@click.option("--overlap", type=click.FloatRange(0, 0.9), default=0.5, show_default=True,
              help="tile overlap for same-padding networks (valid networks need none)")
@click.option("--probabilities", "probabilities", type=click.Choice(["uint8", "float16"]), default=None,
              help="also write per-class probabilities (uint8: p*255)")
@click.option("--resume", is_flag=True, help="continue an interrupted run: compute only unfinished blocks")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "tf32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="fp32 is IEEE fp32 everywhere (TF32 off on CUDA); tf32, fp16, bf16: .pt engines on CUDA "
                   "(TF32 tensor cores, autocast); on CPU bf16 runs OpenVINO on bf16 units (AMX, AVX512-BF16)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout and nothing else")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "openvino", "tensorrt"]),
              default="auto", show_default=True,
              help="what runs the network (auto: by engine file; a .pt on CPU runs through onnxruntime)")
@click.option("--dry-run", is_flag=True, help="print the plan (blocks, tile, batch, cost per voxel) without computing")
@click.option("--assume-voxels-per-second", type=click.FloatRange(min=0, min_open=True),
              help="with --dry-run: project the wall time at this throughput")
@click.option("--input-path", "input_inner",
              help="array or group inside the INPUT store (same as URL#PATH or store.zarr:PATH)")
@click.option("--storage-options", help="fsspec options for URL stores as JSON, e.g. '{\"endpoint_url\": "
                                        "\"http://...\"}' (default: from the environment, e.g. AWS_*)")
@click.option("--retries", type=click.IntRange(0), default=2, show_default=True,
              help="extra attempts for a failing block before it is recorded as failed")
@click.option("--kernels", type=click.Choice(["torch", "cuda"]), default=None,
              help="gather/stitch on the device: torch functions (default, or $SPARSESEG_KERNELS) or the CUDA "
                   "kernels (experimental: never run on a GPU yet; needs CuPy and a CUDA device)")
@click.option("--verbose", is_flag=True, help="debug logging, and the Dask cluster's own logs")
@cluster_options
@user_errors
def infer_cmd(engine, input_path, output, as_label, pyramid, workers, scheduler, block, tile, batch, overlap,
              probabilities, resume, overwrite, device, precision, as_json, backend, dry_run, assume_voxels_per_second,
              input_inner, storage_options, retries, kernels, verbose, **cluster_kw):
    """Seamless overlap-tile prediction over a volume of any size, Dask-parallel and resumable.

    INPUT and --output may be local paths or zarr URLs (s3://, gs://, http(s):// read-only,
    file://); name an array inside a URL store as URL#path/in/group."""
    _setup_logging(verbose)
    from sparseseg.engine.run import run_inference
    from sparseseg.volume import storage_options_from

    if workers is not None and scheduler:
        raise SparsesegError("--workers and --scheduler exclude each other")
    cluster = _cluster_of(cluster_kw, workers, scheduler, retries)
    s = run_inference(engine, input_path, output, workers=workers, scheduler=scheduler,
                      block=parse_triple(block, "--block"), tile=parse_triple(tile, "--tile"), batch=batch,
                      overlap=overlap, probabilities=probabilities, resume=resume, overwrite=overwrite,
                      device=device, precision=precision, storage_options=storage_options_from(storage_options),
                      input_inner=input_inner, retries=retries, backend=backend, dry_run=dry_run,
                      assume_voxels_per_second=assume_voxels_per_second, kernels=kernels, pyramid=pyramid,
                      as_label=as_label, cluster=cluster)
    if dry_run and cluster is not None:
        s["cluster"] = cluster.describe()
    _echo_failed(s)                                  # on stderr
    if as_json:
        click.echo(json.dumps(s))
        sys.exit(1 if s.get("blocks_failed") else 0)
    if dry_run:
        click.echo(_plan_text(s) + (f"\n{s['cluster']}" if cluster is not None else ""))
        return
    click.echo(f"{s['voxels_computed']} voxels in {s['seconds']:.1f} s ({s['voxels_per_second']:.4g} voxels/s), "
               f"{s['blocks_computed']} blocks computed, {s.get('blocks_failed', 0)} failed, "
               f"{s['blocks_skipped']} skipped, {s['backend']} on "
               f"{s['device']}: {s['output']}")
    if s.get("blocks_failed"):
        sys.exit(1)


def _plan_text(s: dict) -> str:
    x = "x".join
    lines = [f"volume {x(map(str, s['volume']))} ({s['voxels']:.4g} voxels), {s['blocks']} blocks of "
             f"{x(map(str, s['block']))}, {s['backend']} on {s['device']}",
             f"tile {x(map(str, s['tile_input']))} in -> {x(map(str, s['tile_output']))} out ({s['padding']} padding), "
             f"batch {s['batch']}, {s['tiles']} tiles",
             f"input voxels read per output voxel {s['input_voxels_per_output_voxel']:.3g}, "
             f"tile input voxels per output voxel {s['tile_input_voxels_per_output_voxel']:.3g}",
             f"{s['flops_per_output_voxel'] / 1e6:.4g} MFLOP per output voxel "
             f"({s['flops_per_tile'] / 1e9:.4g} GFLOP per tile), recomputed fraction {s['recomputed_fraction']:.3f}",
             f"each tile keeps {x(map(str, s['tile_kept']))} of {x(map(str, s['tile_output']))}: "
             f"{s['flops_per_kept_voxel'] / 1e6:.4g} MFLOP per kept voxel"]
    if "projected_seconds" in s:
        lines.append(f"projected wall time {s['projected_seconds']:.1f} s at {s['assumed_voxels_per_second']:.4g} "
                     "voxels/s")
    return "\n".join(lines)


def _echo_failed(s: dict, shown: int = 20) -> None:
    """The failed blocks, one line each (all of them are in --json and OUTPUT/.sparseseg/failed.json)."""
    failed = s.get("failed") or []
    if not failed:
        return
    click.echo(f"error: {len(failed)} of {s['blocks_computed'] + len(failed)} blocks failed "
               f"(rerun with --resume to retry only those):", err=True)
    for f in failed[:shown]:
        region = ", ".join(f"{a} {lo}:{hi}" for a, (lo, hi) in zip("zyx", f["region"]))
        click.echo(f"  block {f['key']} ({region}): {f['error']}", err=True)
    if len(failed) > shown:
        click.echo(f"  ... and {len(failed) - shown} more (all in {s['output']}/.sparseseg/failed.json)",
                   err=True)


@click.command("suggest")
@click.argument("image")
@click.option("--budget", required=True, help="slices to suggest per plane: N, or P% of the plane's slices")
@click.option("--planes", help="comma-separated: xy (z fixed), xz (y fixed), yz (x fixed); "
                               "default: every plane the image has")
@click.option("--features", type=click.Choice(["filterbank", "autoencoder"]), default="filterbank",
              show_default=True, help="slice embedding: training-free filter-bank histograms, or a small "
                                      "autoencoder trained on the volume's own slices")
@click.option("--annotated", help="labels already painted: their slices count as chosen")
@click.option("--template", help="write a labels volume (OME-Zarr, all ignore value) to paint")
@click.option("--overwrite", is_flag=True, help="replace an existing --template")
@click.option("--ignore-label", type=click.IntRange(0, 255), default=255, show_default=True)
@click.option("--size", type=click.IntRange(16), default=256, show_default=True,
              help="slices are shrunk to at most this many pixels per side before embedding")
@click.option("--max-block-voxels", type=click.IntRange(1024), default=1 << 24, show_default=True,
              help="the most voxels read at once")
@click.option("--ae-steps", type=click.IntRange(1), default=300, show_default=True,
              help="autoencoder training steps")
@click.option("--ae-seconds", type=click.FloatRange(1), default=120.0, show_default=True,
              help="autoencoder training time bound")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@user_errors
def suggest_cmd(image, budget, planes, features, annotated, template, overwrite, ignore_label, size,
                max_block_voxels, ae_steps, ae_seconds, seed, as_json):
    """Which slices to paint: order each plane's slices by greedy max-cover of their similarity."""
    _setup_logging()
    from sparseseg.suggest.features import AutoencoderConfig
    from sparseseg.suggest.run import SuggestConfig, suggest

    cfg = SuggestConfig(budget=budget, planes=tuple(planes.split(",")) if planes is not None else None,
                        features=features, size=size, ignore_label=ignore_label, max_block_voxels=max_block_voxels,
                        autoencoder=AutoencoderConfig(steps=ae_steps, seconds=ae_seconds, seed=seed))
    res = suggest(image, cfg, annotated=annotated, template=template, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(res))
        return
    for p, r in res["planes"].items():
        done = f", {len(r['annotated'])} already annotated (coverage {r['coverage_before']:.3f})" \
            if r["annotated"] else ""
        click.echo(f"plane {p} ({r['slices']} slices, {r['axis']} fixed{done}):")
        for rank, s in enumerate(r["suggested"], 1):
            click.echo(f"  {rank:3d}. {r['axis']}={s['index']:<6d} gain {s['gain']:10.3f}   coverage {s['coverage']:.3f}")
    if "template" in res:
        click.echo(f"template to paint: {res['template']}")


@click.group()
@click.version_option(__version__, prog_name="sparseseg")
def main():
    """sparseseg: dense 3D segmentation from a few annotated slices."""


for _cmd in (train_cmd, densify_cmd, eval_cmd, demo_cmd, export_cmd, infer_cmd, suggest_cmd):
    main.add_command(_cmd)


if __name__ == "__main__":
    main()
