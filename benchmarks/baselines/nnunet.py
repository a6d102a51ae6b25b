"""nnU-Net v2 on the same sparse labels, with its ignore label, on CPU under a wall-clock budget.

What it does, in nnU-Net's own terms (documentation/ignore_label.md): the unannotated voxels become
the label `ignore` (the highest integer, one above the last class) in a raw dataset
(imagesTr/case_0000.tif, labelsTr/case.tif, a case.json beside each with the voxel spacing, read by
nnU-Net's Tiff3DIO; dataset.json), then nnU-Net's own fingerprint, planner (ExperimentPlanner,
3d_fullres) and preprocessing, training of the 3d_fullres plan on fold "all" (the one case trains and
validates), and its predictor on each test volume. Everything lives under a temporary directory
(nnUNet_raw / nnUNet_preprocessed / nnUNet_results are set here, before nnunetv2 reads them).

Changes from nnU-Net's defaults, and why (nothing else differs: plan, network, loss with the ignore
label, augmentation, optimizer, learning rate, data-augmentation workers):
- `nnUNetTrainerBudget`: training stops when `budget_minutes` of wall clock are spent (checked after
  every iteration), where nnU-Net runs 1000 epochs of 250 iterations (days on 2 CPU cores). An epoch is
  `iterations_per_epoch` (default 25) training and a fifth of that validation iterations, nnU-Net's
  ratio (250 / 50), so epochs end, checkpoints exist and the pseudo-Dice log fills within minutes;
  the epoch the budget ends validates on one batch only. Training can overrun the budget by the
  iteration in flight and that validation (recorded: `training.train_loop_seconds`).
  After every epoch the epoch count is re-planned from the mean epoch time so that the poly schedule
  (lr 0.01 * (1 - epoch / epochs)^0.9) reaches its end at the budget, as it reaches it at epoch 1000
  in a full run; otherwise the rate would stay near 0.01 for the whole budget.
- No final cross-validation pass (`perform_actual_validation`): fold "all" would only re-predict the
  training case; the benchmark predicts its own test volumes.
- Prediction: nnU-Net's sliding window (step 0.5, Gaussian weighting); mirroring test-time
  augmentation only with `mirroring=True` (off by default: 8x the prediction time, and the
  sparseseg networks and the forest do not use it either).

    from benchmarks.baselines.nnunet import fit_predict
    preds, info = fit_predict(image, sparse_labels, ["bg", "fg"], spacing=(1, 1, 1),
                              predict_images=[test_image], budget_minutes=10)

The pure parts (raw-format conversion, dataset.json, epoch planning) need no nnunetv2; training does.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET_ID = 901
CONFIGURATION = "3d_fullres"


def raw_labels(sparse: np.ndarray, ignore_label: int, num_classes: int) -> np.ndarray:
    """Sparse labels (classes 0..K-1, `ignore_label` where unannotated) -> nnU-Net's labels: the
    classes unchanged, unannotated = K (nnU-Net's ignore label must be the highest value)."""
    annotated = sparse != ignore_label
    if not annotated.any():
        raise ValueError("no annotated voxel")
    if int(sparse[annotated].max()) >= num_classes or int(sparse[annotated].min()) < 0:
        raise ValueError(f"labels outside 0..{num_classes - 1} besides the ignore label {ignore_label}")
    dtype = np.uint8 if num_classes < 255 else np.uint16
    return np.where(annotated, sparse, num_classes).astype(dtype)


def dataset_json(class_names, channel: str = "microscopy", num_training: int = 1, file_ending: str = ".tif") -> dict:
    """dataset.json for K classes plus the ignore label K. A channel name other than "CT" gives
    nnU-Net's z-score normalization per image."""
    labels = {("background" if i == 0 else name): i for i, name in enumerate(class_names)}
    if len(set(labels)) != len(class_names) or "ignore" in labels:
        raise ValueError(f"class names must be distinct and not 'ignore': {class_names}")
    labels["ignore"] = len(class_names)
    return {"channel_names": {"0": channel}, "labels": labels, "numTraining": num_training,
            "file_ending": file_ending, "overwrite_image_reader_writer": "Tiff3DIO"}


def dataset_name(dataset_id: int = DATASET_ID, name: str = "sparseseg") -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def write_raw(raw_root: Path, image: np.ndarray, sparse: np.ndarray, class_names, spacing, *,
              ignore_label: int = 255, dataset_id: int = DATASET_ID, name: str = "sparseseg",
              channel: str = "microscopy") -> Path:
    """Write one training case in nnU-Net's raw format under `raw_root`; returns the dataset folder.
    `spacing` is in the arrays' (Z, Y, X) order, as Tiff3DIO reads it."""
    import tifffile

    if image.ndim != 3 or image.shape != sparse.shape:
        raise ValueError(f"need a (Z, Y, X) image and labels of the same shape, got {image.shape} and {sparse.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x), got {spacing}")
    d = Path(raw_root) / dataset_name(dataset_id, name)
    (d / "imagesTr").mkdir(parents=True, exist_ok=True)
    (d / "labelsTr").mkdir(parents=True, exist_ok=True)
    spacing_file = json.dumps({"spacing": [float(s) for s in spacing]})
    tifffile.imwrite(d / "imagesTr" / "case_0000.tif", np.ascontiguousarray(image, dtype=np.float32))
    (d / "imagesTr" / "case.json").write_text(spacing_file)
    tifffile.imwrite(d / "labelsTr" / "case.tif", raw_labels(sparse, ignore_label, len(class_names)))
    (d / "labelsTr" / "case.json").write_text(spacing_file)
    (d / "dataset.json").write_text(json.dumps(dataset_json(class_names, channel), indent=2))
    return d


def plan_epochs(epochs_done: int, elapsed: float, budget: float, minimum: int = 1) -> int:
    """Total epochs that fit in `budget` seconds at the mean epoch time so far (at least one more
    than done while time remains, never fewer than done)."""
    if epochs_done <= 0:
        return 1000                            # nnU-Net's default until the first epoch is timed
    per_epoch = elapsed / epochs_done
    more = math.floor(max(budget - elapsed, 0.0) / per_epoch) if per_epoch > 0 else 0
    return max(epochs_done + more, epochs_done, minimum)


def plan_summary(plans: dict, configuration: str = CONFIGURATION) -> dict:
    """What nnU-Net's planner chose for `configuration`: patch, batch, spacing, network."""
    c = plans["configurations"][configuration]
    arch = c.get("architecture", {})
    kw = arch.get("arch_kwargs", {})
    return {"configuration": configuration, "patch_size": c.get("patch_size"), "batch_size": c.get("batch_size"),
            "spacing": c.get("spacing"), "median_image_size_in_voxels": c.get("median_image_size_in_voxels"),
            "normalization_schemes": c.get("normalization_schemes"),
            "network": arch.get("network_class_name"),
            "n_stages": kw.get("n_stages"), "features_per_stage": kw.get("features_per_stage"),
            "strides": kw.get("strides"), "kernel_sizes": kw.get("kernel_sizes"),
            "configurations_planned": sorted(plans["configurations"])}


def budget_trainer_class():
    """nnUNetTrainer subclass that stops at a wall-clock budget (module docstring: what and why)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    import torch

    class nnUNetTrainerBudget(nnUNetTrainer):
        budget_seconds = 600.0
        iterations_per_epoch = 25

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = self.iterations_per_epoch
            self.num_val_iterations_per_epoch = max(1, self.iterations_per_epoch // 5)
            self.iterations_run = 0
            self.budget_log = {}

        def run_training(self):
            self.on_train_start()
            t0 = time.time()
            stopped = False
            while self.current_epoch < self.num_epochs and not stopped:
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = []
                for _ in range(self.num_iterations_per_epoch):
                    outputs.append(self.train_step(next(self.dataloader_train)))
                    self.iterations_run += 1
                    if time.time() - t0 >= self.budget_seconds:
                        stopped = True
                        break
                self.on_train_epoch_end(outputs)
                with torch.no_grad():
                    # Past the budget, one validation batch keeps nnU-Net's log complete at the least cost.
                    n_val = 1 if stopped else self.num_val_iterations_per_epoch
                    self.on_validation_epoch_start()
                    val = [self.validation_step(next(self.dataloader_val)) for _ in range(n_val)]
                    self.on_validation_epoch_end(val)
                self.on_epoch_end()               # increments current_epoch
                elapsed = time.time() - t0
                planned = plan_epochs(self.current_epoch, elapsed, self.budget_seconds)
                if planned <= self.current_epoch:
                    stopped = True
                else:
                    self.num_epochs = planned
                    self.lr_scheduler.max_steps = planned
                self.budget_log.setdefault("planned_epochs", []).append(planned)
            self.budget_log.update(epochs=self.current_epoch, iterations=self.iterations_run,
                                   train_loop_seconds=round(time.time() - t0, 1),
                                   final_lr=self.optimizer.param_groups[0]["lr"])
            self.on_train_end()

    return nnUNetTrainerBudget


def _set_env(work: Path) -> dict:
    env = {"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
           "nnUNet_results": str(work / "nnUNet_results")}
    for k, v in env.items():
        Path(v).mkdir(parents=True, exist_ok=True)
        os.environ[k] = v
    return env


def fit_predict(image: np.ndarray, labels: np.ndarray, class_names, *, spacing=(1.0, 1.0, 1.0),
                predict_images=(), ignore_label: int = 255, budget_minutes: float = 10.0,
                iterations_per_epoch: int = 25, mirroring: bool = False, threads: int | None = None,
                workdir: str | None = None, keep: bool = False, channel: str = "microscopy"):
    """Train nnU-Net (3d_fullres, its plan) on labels != ignore_label of a (Z, Y, X) image for
    `budget_minutes` of training wall clock and predict each of `predict_images` (the training image
    itself for the semi-automated case). Returns ([predictions uint8], info)."""
    import torch

    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    work = Path(workdir or tempfile.mkdtemp(prefix="nnunet_"))
    info = {"baseline": "nnU-Net v2 (ignore label), 3d_fullres, fold all, CPU", "workdir": str(work)}
    try:
        _set_env(work)
        import nnunetv2
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                           preprocess)
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        info["nnunetv2"] = nnunetv2.__version__ if hasattr(nnunetv2, "__version__") else _version("nnunetv2")
        t0 = time.time()
        write_raw(work / "nnUNet_raw", image, labels, class_names, spacing, ignore_label=ignore_label, channel=channel)
        t_convert = time.time() - t0
        extract_fingerprints([DATASET_ID], num_processes=threads, check_dataset_integrity=True,
                             show_progress_bar=False)
        plan_experiments([DATASET_ID])
        preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(threads,),
                   show_progress_bar=False)
        t_pre = time.time() - t0
        pre = work / "nnUNet_preprocessed" / dataset_name()
        plans = load_json(str(pre / "nnUNetPlans.json"))
        info["plan"] = plan_summary(plans)
        info["annotated_voxels"] = int((labels != ignore_label).sum())

        t1 = time.time()
        cls = budget_trainer_class()
        cls.budget_seconds = budget_minutes * 60.0
        cls.iterations_per_epoch = iterations_per_epoch
        plans["continue_training"] = False
        trainer = cls(plans=plans, configuration=CONFIGURATION, fold="all",
                      dataset_json=load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
        trainer.run_training()
        t_train = time.time() - t1
        from sparseseg.model.network import count_parameters

        info["parameters"] = count_parameters(trainer.network)
        info["training"] = {**trainer.budget_log, "budget_minutes": budget_minutes,
                            "iterations_per_epoch": trainer.num_iterations_per_epoch,
                            "val_iterations_per_epoch": trainer.num_val_iterations_per_epoch,
                            "batch_size": trainer.batch_size, "initial_lr": trainer.initial_lr,
                            "final_train_loss": _last(trainer.logger, "train_losses"),
                            "final_val_pseudo_dice": _last(trainer.logger, "dice_per_class_or_region"),
                            "data_augmentation_processes": _n_proc_da()}

        trainer.set_deep_supervision_enabled(False)
        trainer.network.eval()
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose=False, allow_tqdm=False)
        predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                        [trainer.network.state_dict()], trainer.dataset_json,
                                        cls.__name__, trainer.inference_allowed_mirroring_axes)
        preds, seconds = [], []
        for img in predict_images:
            t2 = time.time()
            seg = predictor.predict_single_npy_array(np.asarray(img, np.float32)[None],
                                                     {"spacing": [float(s) for s in spacing]})
            preds.append(np.asarray(seg).astype(np.uint8))
            seconds.append(round(time.time() - t2, 1))
        torch.set_num_threads(threads)          # nnU-Net's predictor changes it
        info.update(mirroring=mirroring, tile_step_size=0.5,
                    seconds={"convert": round(t_convert, 1), "preprocess": round(t_pre - t_convert, 1),
                             "train": round(t_train, 1), "predict": seconds,
                             "total": round(time.time() - t0, 1)})
        return preds, info
    finally:
        if not keep and workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _last(logger, key):
    try:
        v = logger.get_value(key, step=-1)
    except (KeyError, IndexError):
        return None
    return [round(float(x), 4) for x in v] if isinstance(v, (list, tuple)) else round(float(v), 4)


def _n_proc_da() -> int:
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    return get_allowed_n_proc_DA()


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
