"""The incumbent: an ilastik-style pixel classifier on the same sparse labels.

A random forest (100 trees, scikit-learn) on ilastik's default filter bank: Gaussian smoothing,
Laplacian of Gaussian, gradient magnitude, difference of Gaussians, structure-tensor
eigenvalues and Hessian-of-Gaussian eigenvalues at sigma 0.7, 1.0, 1.6, 3.5, 5.0 (ilastik's
choices for the companion scales: DoG = G(sigma) - G(0.66 sigma), structure tensor with inner
scale 0.5 sigma and outer scale sigma). Thin anisotropic stacks (z under half the in-plane size,
or a z spacing over twice the in-plane one) are filtered in 2D per section, as ilastik users do
with serial-section EM; other volumes in 3D.

Trained on the annotated voxels only (a uniform random subsample of at most `max_samples`, as
a user's brush strokes would be), it predicts every voxel of the volume.

    from benchmarks.baselines.forest import fit_predict
    pred, info = fit_predict(image_zyx, sparse_labels_zyx, ignore_label=255)
"""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage as ndi

from sparseseg.model.config import ILASTIK_SIGMAS as SIGMAS  # the network's filter bank uses them too

FILTERS = ("gaussian", "log", "gradient_magnitude", "dog", "structure_tensor_ev", "hessian_ev")


def _sym_eigvals(mats: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Eigenvalues (descending) of per-voxel symmetric matrices given as a nested list of arrays."""
    n = len(mats)
    stack = np.stack([np.stack(row, -1) for row in mats], -2)  # (..., n, n)
    ev = np.linalg.eigvalsh(stack.astype(np.float64))[..., ::-1]
    return [ev[..., i].astype(np.float32) for i in range(n)]


def _features(img: np.ndarray, sigmas=SIGMAS, truncate: float = 4.0, mode: str = "reflect") -> np.ndarray:
    """(n_features, *img.shape) float32 filter responses of a 2D or 3D image (scipy.ndimage's
    kernel truncation and border mode; the network's bank uses 3 and numpy's reflect, "mirror")."""
    img = img.astype(np.float32)
    kw = dict(truncate=truncate, mode=mode)
    nd = img.ndim
    out = []
    for s in sigmas:
        g = ndi.gaussian_filter(img, s, **kw)
        out.append(g)
        out.append(ndi.gaussian_laplace(img, s, **kw))
        out.append(ndi.gaussian_gradient_magnitude(img, s, **kw))
        out.append(g - ndi.gaussian_filter(img, 0.66 * s, **kw))
        # Structure tensor: gradients at the inner scale, their products smoothed at the outer.
        grads = [ndi.gaussian_filter(img, 0.5 * s, order=tuple(int(i == a) for i in range(nd)), **kw)
                 for a in range(nd)]
        st = [[ndi.gaussian_filter(grads[a] * grads[b], s, **kw) for b in range(nd)] for a in range(nd)]
        out.extend(_sym_eigvals(st))
        hess = [[None] * nd for _ in range(nd)]
        for a in range(nd):
            for b in range(a, nd):
                order = [0] * nd
                order[a] += 1
                order[b] += 1
                hess[a][b] = hess[b][a] = ndi.gaussian_filter(img, s, order=tuple(order), **kw)
        out.extend(_sym_eigvals(hess))
    return np.stack(out).astype(np.float32)


def is_thin(shape, voxel_size=None) -> bool:
    """Filter per section (2D) when z is thin or much coarser than y, x."""
    if voxel_size is not None and voxel_size[0] > 2 * min(voxel_size[1:]):
        return True
    return shape[0] * 2 <= min(shape[1:])


def fit_predict(image: np.ndarray, labels: np.ndarray, ignore_label: int = 255, *, n_trees: int = 100,
                max_samples: int = 200_000, voxel_size=None, two_d: bool | None = None, n_jobs: int = 2,
                seed: int = 0, sigmas=SIGMAS, predict_image: np.ndarray | None = None,
                predict_images=None):
    """Train on labels != ignore_label of a (Z, Y, X) image, predict all of it (or all of
    `predict_image`, another volume of the same kind, e.g. the held-out half of a stack).

    Returns (prediction (Z, Y, X) uint8, info dict with sample counts and seconds). With
    `predict_images` (a list) the one fitted forest predicts the training image and then each of
    them: ([training image's prediction, *theirs], info)."""
    if predict_images is not None:
        if predict_image is not None:
            raise ValueError("give predict_image or predict_images, not both")
        return _fit_predict_many(image, labels, ignore_label, list(predict_images), n_trees=n_trees,
                                 max_samples=max_samples, voxel_size=voxel_size, two_d=two_d, n_jobs=n_jobs,
                                 seed=seed, sigmas=sigmas)
    if image.ndim == 4:               # (C, Z, Y, X) with one channel, as the trainer stores it
        image = image[0]
    same = predict_image is None
    target = image if same else (predict_image[0] if predict_image.ndim == 4 else predict_image)
    clf, x, y, two_d, cache, info = _fit(image, labels, ignore_label, n_trees, max_samples, voxel_size, two_d,
                                         n_jobs, seed, sigmas, keep_features=same)
    t0 = time.time()
    pred = _predict(clf, target, two_d, sigmas, cache)
    info["predict_seconds"] = round(time.time() - t0, 1)
    info["total_seconds"] = round(info["total_seconds"] + info["predict_seconds"], 1)
    return pred, info


def _fit_predict_many(image, labels, ignore_label, others, **kw):
    if image.ndim == 4:
        image = image[0]
    clf, x, y, two_d, cache, info = _fit(image, labels, ignore_label, kw["n_trees"], kw["max_samples"],
                                         kw["voxel_size"], kw["two_d"], kw["n_jobs"], kw["seed"], kw["sigmas"],
                                         keep_features=True)
    preds, seconds = [], []
    for target in [image] + [o[0] if o.ndim == 4 else o for o in others]:
        t0 = time.time()
        preds.append(_predict(clf, target, two_d, kw["sigmas"], cache if target is image else {}))
        seconds.append(round(time.time() - t0, 1))
    info["predict_seconds"] = seconds
    info["total_seconds"] = round(info["total_seconds"] + sum(seconds), 1)
    return preds, info


def _fit(image, labels, ignore_label, n_trees, max_samples, voxel_size, two_d, n_jobs, seed, sigmas,
         keep_features):
    """The fitted forest, its samples, the mode, the training image's features (when kept) and info."""
    from sklearn.ensemble import RandomForestClassifier

    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ")
    two_d = is_thin(image.shape, voxel_size) if two_d is None else two_d
    rng = np.random.default_rng(seed)
    t0 = time.time()
    annotated = labels != ignore_label
    n_annotated = int(annotated.sum())
    if n_annotated == 0:
        raise ValueError("no annotated voxel")
    # Filter only the parts that hold annotations first (sections in 2D), then the rest for prediction.
    if two_d:
        parts = [(z,) for z in range(image.shape[0])]
        feat_of = lambda vol, p: _features(vol[p[0]], sigmas)
    else:
        parts = [()]
        feat_of = lambda vol, p: _features(vol, sigmas)
    keep = rng.random(n_annotated) < min(1.0, max_samples / n_annotated)
    xs, ys = [], []
    cache = {}
    offset = 0
    for p in parts:
        m = annotated[p] if p else annotated
        n = int(m.sum())
        if not n:
            continue
        f = feat_of(image, p)
        if keep_features:
            cache[p] = f
        k = keep[offset:offset + n]
        offset += n
        xs.append(f[:, m][:, k].T)
        ys.append((labels[p] if p else labels)[m][k])
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    t_feat = time.time() - t0
    clf = RandomForestClassifier(n_estimators=n_trees, n_jobs=n_jobs, random_state=seed)
    clf.fit(x, y)
    t_fit = time.time() - t0 - t_feat
    info = {"classifier": "random forest (ilastik filter bank)", "trees": n_trees,
            "mode": "2D per section" if two_d else "3D",
            "sigmas": list(sigmas), "features": int(x.shape[1]), "annotated_voxels": n_annotated,
            "training_samples": len(y), "feature_seconds_train": round(t_feat, 1),
            "fit_seconds": round(t_fit, 1), "total_seconds": round(time.time() - t0, 1)}
    return clf, x, y, two_d, cache, info


def _predict(clf, target, two_d, sigmas, cache) -> np.ndarray:
    """Every voxel of `target` (features from `cache` where the training image's were kept)."""
    pred = np.zeros(target.shape, np.uint8)
    parts = [(z,) for z in range(target.shape[0])] if two_d else [()]
    for p in parts:
        f = cache.pop(p) if p in cache else _features(target[p[0]] if p else target, sigmas)
        flat = f.reshape(f.shape[0], -1).T
        out = clf.predict(flat).astype(np.uint8)
        if p:
            pred[p] = out.reshape(target.shape[1:])
        else:
            pred[...] = out.reshape(target.shape)
    return pred
