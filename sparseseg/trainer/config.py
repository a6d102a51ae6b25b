"""Training configuration: frozen dataclasses, parsed once at the edge (CLI) and saved into
every checkpoint as plain JSON-able dicts. The network's own configuration and presets live in
`sparseseg.model.config`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from sparseseg.errors import SparsesegError
from sparseseg.model.config import PRESETS, ModelConfig
from sparseseg.model.defaults import DEFAULTS as D
from sparseseg.model.defaults import PAPER
from sparseseg.model.normalization import MODES
from sparseseg.model.shapes import bank_context
from sparseseg.trainer.losses import LOSSES
from sparseseg.trainer.schedule import check_schedule


def patch_output_size(cfg: ModelConfig, preset: str, shape, requested=None,
                      sections: bool = False) -> tuple[int, int, int]:
    """Training patch output size (Z, Y, X): the largest valid size whose input fits the preset's
    patch budget and whose output fits the volume (the input may reach past the border, reflected
    as at inference, so that a small volume still trains on outputs as large as it is; measured in
    docs/history.md); a 2D network takes one slice at a time, and so does
    a 3D one, in its smallest valid depth, when the labels lie on separate sections (`sections`):
    deeper outputs would be mostly unlabelled sections, computed for nothing. Both then take the
    preset's wider in-plane `section_input`, so a 2D and a 3D network see as many labelled voxels
    per step (a 2D network on the 3D patch's 92 pixels had 3x fewer: 52x52 outputs against 92x92)."""
    geom = cfg.geometry
    budget = requested or PRESETS[preset]["patch_input"]
    if (sections or cfg.ndim == 2) and not requested:
        budget = (budget[0],) + tuple(PRESETS[preset]["section_input"])
    # The budget is the network's input: a filter bank in front reads its margin on top (its
    # responses are cheap next to the network's; its 23-voxel margin on top of the small preset's 20
    # would leave a 4-voxel patch).
    bank = bank_context(cfg.filters) if cfg.padding == "valid" else 0
    out = []
    for axis, (rule, size, want) in enumerate(zip(geom.axes, shape, budget)):
        if axis == 0 and (cfg.ndim == 2 or sections):
            out.append(rule.min_output)
            if rule.min_input > size:
                raise SparsesegError(f"volume too small for one valid patch without padding: axis z has {size} "
                                     f"voxels, the network needs at least {rule.min_input}")
            continue
        # A volume smaller than the smallest valid input stays an error: reflected into one, it
        # would be mostly mirror images.
        target = min(int(want) + (2 * bank if axis else 0) - 2 * rule.context, int(size))
        m = rule.output_at_most(target) if rule.min_input <= size else None
        if m is None:
            raise SparsesegError(
                f"volume too small for one valid patch without padding: axis {'zyx'[axis]} has {size} voxels, "
                f"the network needs at least {rule.min_input} (try --padding same or a smaller --depth)")
        out.append(m)
    return tuple(out)


AUGMENT_MODES = ("full", "lossless", "flips", "none")


@dataclass(frozen=True)
class AugmentConfig:
    elastic: bool = True
    elastic_sigma: float = 4.0      # voxels (paper: N(0, 4 voxels))
    elastic_grid: int = 32          # control-point spacing in voxels (paper: 32)
    rotate: bool = True             # in-plane (y, x) rotation, any angle
    right_angles: bool = False      # rotations by multiples of 90 degrees only (no resampling)
    scale: tuple = (0.85, 1.15)
    flip: bool = True
    gray: bool = True               # brightness, contrast, gamma
    probability: float = 0.9        # chance that a patch is deformed at all

    @classmethod
    def mode(cls, name: str) -> AugmentConfig:
        """full: the paper's elastic deformation, any rotation and scaling (all resample the
        image); lossless: flips, right-angle rotations and gray values only, so every voxel is
        read at an integer position and thin structures (2-voxel membranes) are not blurred;
        flips: flips and gray values only (no turn swaps a coarse axis for a fine one, as right
        angles do in the xz and yz planes of a confocal stack); none: the patch as stored."""
        if name == "full":
            return cls()
        if name == "lossless":
            return cls(elastic=False, right_angles=True, scale=())
        if name == "flips":
            return cls(elastic=False, rotate=False, scale=())
        if name == "none":
            return cls(elastic=False, rotate=False, scale=(), flip=False, gray=False, probability=0.0)
        raise SparsesegError(f"unknown --augment {name!r} (choose from {', '.join(AUGMENT_MODES)})")


def _augment_default() -> AugmentConfig:
    return AugmentConfig.mode(D["augment"])


@dataclass(frozen=True)
class TrainConfig:
    """Field defaults are the project's defaults (sparseseg.model.defaults), so the Python API,
    the CLI and the napari widget train the same model; `TrainConfig.paper()` gives the paper's."""
    preset: str = D["preset"]
    iterations: int = 0             # > 0 pins the count; 0: planned from `time_budget`
    time_budget: float = D["time_budget"]   # minutes for the whole run (sparseseg.trainer.budget)
    batch_size: int = D["batch_size"]
    optimizer: str = D["optimizer"]         # adam | sgd
    lr: float = D["lr"]
    schedule: str = D["schedule"]   # poly | step | constant (sparseseg.trainer.schedule)
    warmup: int = D["warmup"]       # linear warm-up iterations
    momentum: float = 0.99          # SGD only (the paper's value)
    weight_decay: float = D["weight_decay"]   # decoupled (AdamW) with adam, L2 with sgd
    patch_output: tuple = ()        # (Z, Y, X); empty: chosen from the preset and the volume
    class_weights: tuple | str = D["class_weights"]   # "uniform", "balanced" (or empty) or one per class
    max_weight_ratio: float = D["max_weight_ratio"]   # bound on balanced weights (largest / smallest); 0: unbounded
    class_sampling: float = D["class_sampling"]       # share of patches anchored on a voxel of a uniformly drawn class
    # Chance that a training patch loses an input channel (zeroed); None: RESPONSE_DROPOUT for a
    # network trained on a 3D bank's responses (sparseseg.trainer.responses), else 0.
    input_dropout: float | None = None if D["input_dropout"] == "auto" else D["input_dropout"]
    loss: str = D["loss"]           # ce | jaccard | ce+jaccard
    dice_weight: float = D["dice_weight"]             # weight of the soft Jaccard term
    normalization: str = D["normalization"]           # global | volume | percentile (sparseseg.model.normalization)
    percentiles: tuple = (0.5, 99.5)
    ignore_label: int = D["ignore_label"]
    seed: int = D["seed"]
    device: str = D["device"]
    amp: bool = not D["no_amp"]     # used on CUDA only
    val_slices: int = D["val_slices"]       # annotated slices held out per plane orientation
    val_fraction: float = D["val_fraction"]     # or: this share of the annotated slices held out
    val_every: int = D["val_every"]
    bn_recalibrate: int = D["bn_recalibrate"]   # un-augmented patches to re-estimate BatchNorm statistics on, at the end
    pretrain: int = D["pretrain"]   # self-supervised inpainting steps before training (trainer.pretrain)
    early_stop: int = D["early_stop"]       # stop after this many validations without a better IoU; 0: never
    checkpoint_every: int = D["checkpoint_every"]
    voxel_size: tuple = ()          # relative spacing used for the elastic field (Z, Y, X)
    augment: AugmentConfig = field(default_factory=_augment_default)

    @classmethod
    def paper(cls, **kw) -> TrainConfig:
        """Çiçek et al.'s training choices (sparseseg.model.defaults.PAPER) with `kw` on top."""
        base = {k: v for k, v in PAPER.items() if k in {f.name for f in fields(cls)}}
        base["augment"] = AugmentConfig.mode(PAPER["augment"])
        return cls(**{**base, **kw})

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise SparsesegError(f"unknown loss {self.loss!r} (choose from {', '.join(LOSSES)})")
        if self.normalization not in MODES:
            raise SparsesegError(f"unknown normalization {self.normalization!r} (choose from {', '.join(MODES)})")
        check_schedule(self.schedule)
        if self.input_dropout is not None and not 0.0 <= self.input_dropout < 1.0:
            raise SparsesegError(f"--input-dropout must be in [0, 1), got {self.input_dropout}")
        if not 0.0 <= self.class_sampling <= 1.0:
            raise SparsesegError(f"--class-sampling must be between 0 and 1, got {self.class_sampling}")
        if self.pretrain < 0:
            raise SparsesegError(f"--pretrain must be 0 or more iterations, got {self.pretrain}")
        if self.iterations < 0:
            raise SparsesegError(f"--iterations must be 1 or more, got {self.iterations}")
        if not self.iterations and not self.time_budget > 0:
            raise SparsesegError(f"--time-budget must be more than 0 minutes, got {self.time_budget}")
        if self.val_slices and self.val_fraction:
            raise SparsesegError("--val-slices and --val-fraction exclude each other; give one")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        aug = AugmentConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                               for k, v in d.pop("augment", {}).items()})
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(augment=aug, **d)
