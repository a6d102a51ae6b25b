"""Training data: images (C, Z, Y, X) with sparse labels (Z, Y, X), read lazily.

A TrainingVolume holds either arrays in memory or lazily read volumes (sparseseg.volume.Volume:
zarr, OME-Zarr, .npy memory maps). Everything the trainer reads goes through two views:
`ImageView` (crops as float32, normalized per volume when the mode asks for it) and
`LabelView` (crops with held-out slices masked). Labels are summarised in one pass over z-slabs
(`scan_labels`): per-slice counts, never a list of labelled voxel coordinates, so the sparse
annotation of a 2048^3 volume costs a few kilobytes of index, not 12 bytes per labelled voxel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from sparseseg.engine.tiling import reflect_index
from sparseseg.errors import SparsesegError
from sparseseg.model import normalization as norm
from sparseseg.model.network import PLANES
from sparseseg.volume import Volume, check_finite, open_volume

log = logging.getLogger("sparseseg.train")

# Images up to this many bytes as float32 are loaded into memory: random crops from memory are
# far cheaper than decompressing chunks for every patch; bigger ones stay in the store.
IN_MEMORY_BYTES = 2 << 30
SLAB_VOXELS = 1 << 25            # label scan reads ~32 M voxels at a time


@dataclass
class TrainingVolume:
    image: object            # (C, Z, Y, X) array or a lazily read Volume, raw intensities
    labels: object           # (Z, Y, X) array or Volume, ignore_label where not annotated
    name: str
    voxel_size: tuple | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.labels.shape[-3:])

    @property
    def channels(self) -> int:
        return channels_of(self.image)

    def scan(self, ignore_label: int) -> LabelScan:
        """The label scan, computed once per volume and ignore value."""
        cache = self.__dict__.setdefault("_scans", {})
        if ignore_label not in cache:
            cache[ignore_label] = scan_labels(self.labels, ignore_label)
        return cache[ignore_label]


def channels_of(image) -> int:
    return image.channels if isinstance(image, Volume) else int(image.shape[0])


def read_image(image, region) -> np.ndarray:
    """(C, z, y, x) float32 of a spatial region of an array or Volume."""
    if isinstance(image, Volume):
        return image.read(region, dtype=np.float32)
    return np.asarray(image[(slice(None),) + tuple(region)], dtype=np.float32)


def read_labels(labels, region) -> np.ndarray:
    """(z, y, x) uint8 of a spatial region (a fresh copy: callers may write into it)."""
    if isinstance(labels, Volume):
        out = labels.read(region)[0]
    else:
        out = labels[tuple(region)]
    return np.array(out, dtype=np.uint8)


def read_reflected(image, start, shape) -> np.ndarray:
    """(C, *shape) input window at `start` (may reach past the border: numpy 'reflect',
    as the engine pads at inference)."""
    idx = [reflect_index(np.arange(s, s + n), size) for s, n, size in zip(start, shape, image.shape[1:])]
    region = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    crop = image[(slice(None),) + region]
    return crop[np.ix_(range(crop.shape[0]), *[i - r.start for i, r in zip(idx, region)])]


class ImageView:
    """Crops of one training image, float32, normalized with `stats` when given (per-volume
    modes); `image[(slice(None), zs, ys, xs)]` like an array, which is all the augmenter needs."""

    def __init__(self, image, stats: dict | None = None):
        self.image, self.stats = image, stats
        self.shape = (channels_of(image),) + tuple(int(s) for s in image.shape[-3:])

    def __getitem__(self, key):
        x = read_image(self.image, key[1:])
        if not np.isfinite(x).all():
            raise SparsesegError("a training image holds NaN or infinite values; clean it before training")
        if self.stats is not None:
            x = norm.apply(x, self.stats)
        return x


class LabelView:
    """Crops of one label volume where held-out slices are ignored ("train") or where only the
    held-out slices are kept ("val"). `held_out` maps axis -> sorted slice indices."""

    def __init__(self, labels, held_out: dict, ignore_label: int, keep: str = "train"):
        self.labels, self.held_out, self.ignore, self.keep = labels, held_out, ignore_label, keep
        self.shape = tuple(int(s) for s in labels.shape[-3:])

    def __getitem__(self, key):
        key = tuple(key)
        lab = read_labels(self.labels, key)
        hit = np.zeros(lab.shape, bool) if self.keep == "val" else None
        for axis, indices in self.held_out.items():
            sl = key[axis]
            start, stop = sl.indices(self.shape[axis])[:2]
            local = [i - start for i in indices if start <= i < stop]
            if not local:
                continue
            index = [slice(None)] * 3
            index[axis] = local
            if hit is None:
                lab[tuple(index)] = self.ignore
            else:
                hit[tuple(index)] = True
        if hit is not None:
            lab[~hit] = self.ignore
        return lab


@dataclass
class LabelScan:
    """What one pass over a label volume tells: labelled voxels per class per z-slice and per
    y- and x-plane (annotated-slice detection, the sampler, class weights)."""

    per_z: np.ndarray          # (Z, 256) int64 voxels of each value per z-slice (ignore included)
    per_plane: list            # [per z, per y, per x] labelled (non-ignore) voxel counts
    ignore_label: int

    def class_counts(self, num_classes: int) -> np.ndarray:
        counts = self.per_z.sum(0)
        counts[self.ignore_label] = 0
        return counts[:num_classes]

    def labelled_per_z(self) -> np.ndarray:
        return self.per_z.sum(1) - self.per_z[:, self.ignore_label]

    def values(self) -> np.ndarray:
        present = np.flatnonzero(self.per_z.sum(0))
        return present[present != self.ignore_label]


def scan_labels(labels, ignore_label: int) -> LabelScan:
    z, y, x = (int(s) for s in labels.shape[-3:])
    per_z = np.zeros((z, 256), np.int64)
    per_y, per_x = np.zeros(y, np.int64), np.zeros(x, np.int64)
    step = max(1, SLAB_VOXELS // max(1, y * x))
    for z0 in range(0, z, step):
        slab = read_labels(labels, (slice(z0, min(z, z0 + step)), slice(None), slice(None)))
        for i, plane in enumerate(slab):
            per_z[z0 + i] = np.bincount(plane.ravel(), minlength=256)
        labelled = slab != ignore_label
        per_y += labelled.sum((0, 2))
        per_x += labelled.sum((0, 1))
    return LabelScan(per_z, [per_z.sum(1) - per_z[:, ignore_label], per_y, per_x], ignore_label)


def on_separate_sections(vols, ignore_label: int) -> bool:
    """True when every volume's labels lie on separate xy sections (painted every k-th section,
    or one): the labelled z-slices fill at most half of their span plus one. Then a training
    patch one section deep wastes no output on unlabelled sections (sparseseg.trainer.config).
    Orthogonal (xz, yz) slices put labels on every section, dense sub-volumes on adjacent ones:
    both keep full-depth patches."""
    for v in vols:
        z = np.flatnonzero(v.scan(ignore_label).per_plane[0])
        if len(z) == 0 or v.shape[0] < 2 or len(z) > (z[-1] - z[0] + 2) / 2:
            return False
    return True


def annotated_planes(vol: TrainingVolume, ignore_label: int) -> dict:
    """{axis: [indices]} of the planes normal to each axis that hold painted slices: a plane holds
    at least half the labelled voxels of the fullest plane of its axis and more than twice
    either neighbour's (so a dense block or a plane's crossings with others do not count)."""
    planes = {}
    for axis, counts in enumerate(vol.scan(ignore_label).per_plane):
        if vol.shape[axis] < 2 or not counts.any():
            continue
        side = np.maximum(np.r_[0, counts[:-1]], np.r_[counts[1:], 0])
        hit = np.flatnonzero((counts >= 0.5 * counts.max()) & (counts > 2 * side))
        if len(hit):
            planes[axis] = hit.tolist()
    return planes


def on_orthogonal_planes(vols, ignore_label: int) -> bool:
    """True when every volume's labels lie on painted planes of at least two orientations (the
    xy, xz and yz slices of Çiçek et al.): at least 90% of its labelled voxels lie on them (the
    planes' crossings counted once per plane, a small overcount)."""
    for v in vols:
        planes = annotated_planes(v, ignore_label)
        per_plane = v.scan(ignore_label).per_plane
        total = per_plane[0].sum()
        on = sum(per_plane[a][ix].sum() for a, ix in planes.items())
        if len(planes) < 2 or total == 0 or on < 0.9 * total:
            return False
    return True


def plane_volume(vol: TrainingVolume, plane: str, keep=None, ignore_label: int = 255) -> TrainingVolume:
    """`vol` with `plane`'s normal as z: a transpose of its in-memory arrays, not a copy. `keep`:
    only these sections' labels (indices along the new z), the rest ignored (then a copy)."""
    order = PLANES[plane]
    labels = vol.labels.transpose(order)
    if keep is not None:
        kept = np.full(labels.shape, ignore_label, np.uint8)
        kept[keep] = labels[keep]
        labels = kept
    voxel = tuple(vol.voxel_size[a] for a in order) if vol.voxel_size else None
    return TrainingVolume(vol.image.transpose((0,) + tuple(1 + a for a in order)), labels, f"{vol.name} ({plane})",
                          voxel)


def plane_views(vols, ignore_label: int) -> list:
    """Per volume and annotated orientation, the plane's view (`plane_volume`) holding only that
    orientation's painted planes: training patches then lie in a painted plane, one section deep.
    A volume without painted planes (dense labels, a labelled block) trains on every plane of each
    orientation that holds a label, so `--planes all` works on any labels."""
    views = []
    for v in vols:
        if not (isinstance(v.image, np.ndarray) and isinstance(v.labels, np.ndarray)):
            raise SparsesegError(f"{v.name}: a 2D network on all three planes trains from volumes in memory; "
                                 "this one is read from the store (use --planes xy or --ndim 3)")
        painted = annotated_planes(v, ignore_label) or {
            axis: np.flatnonzero(counts).tolist()
            for axis, counts in enumerate(v.scan(ignore_label).per_plane) if v.shape[axis] > 1 and counts.any()}
        for axis, indices in painted.items():
            plane = next(p for p, order in PLANES.items() if order[0] == axis)
            views.append(plane_volume(v, plane, indices, ignore_label))
    return views


def check_pair(vol: TrainingVolume, num_classes: int | None, ignore_label: int):
    name, scan = vol.name, vol.scan(ignore_label)
    if tuple(vol.image.shape[-3:]) != vol.shape:
        raise SparsesegError(f"{name}: image shape {tuple(vol.image.shape[-3:])} and label shape {vol.shape} differ")
    if isinstance(vol.image, np.ndarray):
        check_finite(vol.image, f"image {name}")
    annotated = scan.values()
    if annotated.size == 0:
        raise SparsesegError(f"{name}: labels contain no annotated voxel (every voxel is {ignore_label})")
    if num_classes is not None and (annotated >= num_classes).any():
        bad = annotated[annotated >= num_classes].tolist()
        raise SparsesegError(f"{name}: label values {bad} >= number of classes {num_classes} "
                             f"(and not the ignore value {ignore_label})")


def _open_labels(path):
    lv = open_volume(path)
    if lv.has_channels and lv.channels != 1:
        raise SparsesegError(f"{path}: labels must have one channel, found {lv.channels}")
    dt = lv.dtype
    if dt != np.uint8 and not (dt == bool or np.issubdtype(dt, np.integer)):
        raise SparsesegError(f"{path}: labels must be integers, got {dt}")
    return lv


def load_pairs(image_paths, label_paths, ignore_label: int, num_classes: int | None = None,
               in_memory_bytes: int = IN_MEMORY_BYTES):
    """Open image/label pairs. Small images (and their labels) are read into memory; larger
    ones stay lazily read volumes and training reads patches from the store."""
    if len(image_paths) != len(label_paths):
        raise SparsesegError(f"got {len(image_paths)} --image but {len(label_paths)} --labels; give them in pairs")
    if not image_paths:
        raise SparsesegError("no training volume given (--image/--labels)")
    vols = []
    for ip, lp in zip(image_paths, label_paths):
        iv, lv = open_volume(ip), _open_labels(lp)
        voxel = iv.voxel_size or lv.voxel_size
        if iv.channels * int(np.prod(iv.shape)) * 4 <= in_memory_bytes:
            image = np.array(iv.read(dtype=np.float32))   # in memory and writable (not a read-only memmap)
            labels = lv.read_labels()
            if labels.dtype != np.uint8 and (labels.min(initial=0) < 0 or labels.max(initial=0) > 255):
                raise SparsesegError(f"{lp}: label values must lie in 0..255")
            vols.append(TrainingVolume(image, labels.astype(np.uint8), str(ip), voxel))
        else:
            if lv.dtype.itemsize > 1 or lv.dtype.kind == "i":
                raise SparsesegError(f"{lp}: labels of a volume trained from the store must be uint8")
            log.info("%s: %s voxels, training reads patches lazily from the store", ip, "x".join(map(str, iv.shape)))
            vols.append(TrainingVolume(iv, lv, str(ip), voxel))
    channels = {v.channels for v in vols}
    if len(channels) > 1:
        raise SparsesegError(f"training images have different channel counts: {sorted(channels)}")
    return vols


def infer_num_classes(vols, ignore_label: int) -> int:
    top = max(int(v.scan(ignore_label).values().max()) for v in vols)
    return max(2, top + 1)
