"""Small synthetic data and networks shared by tests."""

import numpy as np

from sparseseg.model.config import plan_model
from sparseseg.trainer.config import TrainConfig


def blobs(shape=(24, 40, 40), seed=0):
    """One channel with two classes: bright balls (1) on a dark noisy background (0)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.uint8)
    for _ in range(4):
        c = rng.uniform(0.2, 0.8, 3) * np.array(shape)
        r = rng.uniform(4, 7)
        labels[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r * r] = 1
    image = (labels * 2.0 + rng.normal(scale=0.3, size=shape)).astype(np.float32)[None] * 50 + 100
    return image, labels


def tiny_config(ndim=3, padding="valid", in_channels=1, classes=2, depth=2, width=4):
    return plan_model("small", in_channels, classes, ndim=ndim, padding=padding, base_width=width, depth=depth)


def fast_train_config(**kw):
    from sparseseg.trainer.config import AugmentConfig

    aug = AugmentConfig(elastic=False, rotate=False, scale=(), flip=False, gray=False, probability=0.0)
    base = dict(iterations=60, lr=1e-2, device="cpu", checkpoint_every=0, augment=aug)
    base.update(kw)
    # The paper's loss, weights and schedule: small, fast-converging runs the tests were tuned on.
    return TrainConfig.paper(**base)


def run_cli(*args):
    """`sparseseg <args>` in this process: (exit code, output)."""
    from click.testing import CliRunner

    from sparseseg.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def train_cli(tmp_path, vol, *options):
    """`sparseseg train` on a TrainingVolume written as i.tif / l.tif into tmp_path, to m.pt."""
    import tifffile

    tifffile.imwrite(tmp_path / "i.tif", vol.image[0])
    tifffile.imwrite(tmp_path / "l.tif", vol.labels)
    return run_cli("train", "--image", tmp_path / "i.tif", "--labels", tmp_path / "l.tif", *options,
                   "--out", tmp_path / "m.pt")


def tiny_engine_and_volume(d, shape=(16, 48, 48), chunks=(8, 16, 16)):
    """A depth-1 valid-padding engine (a 2-voxel halo, 3 classes) and a random uint8 OME-Zarr input:
    (engine path, input path, the input's data)."""
    import torch

    from sparseseg.model.checkpoint import save_checkpoint
    from sparseseg.model.network import SegmentationModel
    from sparseseg.volume import create_ome_zarr

    torch.manual_seed(0)
    model = SegmentationModel(tiny_config(depth=1, width=4, classes=3), mean=[100.0], std=[30.0])
    engine = save_checkpoint(d / "m.pt", model, None, ["a", "b", "c"], 255)
    data = (np.random.default_rng(0).random(shape) * 200).astype(np.uint8)
    create_ome_zarr(d / "in.zarr", shape, "uint8", chunks, voxel_size=(2.0, 1.0, 1.0))[...] = data
    return engine, d / "in.zarr", data
