"""Realism metrics for angiograms with vessel masks, and the bands the synthetic generator must meet.

Each metric takes an image (H, W) uint8 / uint16 / float in [0, 1] and/or its binary mask (H, W) in {0, 1},
and is computed identically on real (CIMAT) and synthetic images so that the two can be compared.

Definitions (used by the tests, the benchmark and the report):
- vessel_fraction: mask mean.
- cnr: (mean local background - mean vessel) / std local background, intensities scaled to [0, 1]. The local
  background is the ring of pixels at distance BG_RING_PX (lo, hi] from the mask: a ring rather than all
  non-vessel pixels keeps the collimator's black corners out of the statistics.
- frangi_auc: ROC AUC of `skimage.filters.frangi(image, sigmas=FRANGI_SIGMAS, black_ridges=True)` against the
  mask (Mann-Whitney rank formula with tie-averaged ranks).
- branch_points: pixels of `skeletonize(mask)` with >= 3 skeleton 8-neighbours; 8-connected clusters of them
  count once.
- taper: Spearman correlation between radius (Euclidean distance transform of the mask at skeleton pixels) and
  geodesic distance along the skeleton from the root, on the largest skeleton component. The root is the
  skeleton end point with the largest mean radius within ROOT_WINDOW_PX along the skeleton (the ostium is the
  thickest end). Negative: vessels thin towards the leaves.
- relief: std over far background (distance > BG_FAR_PX from the mask) of the image smoothed by a Gaussian of
  sigma RELIEF_SIGMA * side; 0 for a flat background.
- noise: std over far background of image - Gaussian(image, sigma=NOISE_SIGMA_PX).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage, sparse, stats
from scipy.sparse import csgraph
from skimage.filters import frangi
from skimage.morphology import skeletonize

FRANGI_SIGMAS = (1, 2, 3, 4)
BG_RING_PX = (3.0, 12.0)
BG_FAR_PX = 8.0
ROOT_WINDOW_PX = 15.0
RELIEF_SIGMA = 0.03
NOISE_SIGMA_PX = 2.0

_EIGHT = np.ones((3, 3), bool)


def to_unit(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 / uint16 / float -> float64 in [0, 1] (floats are taken as already scaled)."""
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float64) / 65535.0
    return image.astype(np.float64)


def vessel_fraction(mask: np.ndarray) -> float:
    return float(np.mean(mask > 0))


def cnr(image: np.ndarray, mask: np.ndarray) -> float:
    """Vessel-to-local-background contrast-to-noise ratio (positive for dark vessels)."""
    img, m = to_unit(image), mask > 0
    dist = ndimage.distance_transform_edt(~m)
    ring = (dist > BG_RING_PX[0]) & (dist <= BG_RING_PX[1])
    bg = img[ring]
    return float((bg.mean() - img[m].mean()) / (bg.std() + 1e-12))


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC of `score` for binary `label` (same shape), ties counted half."""
    s, y = score.ravel(), label.ravel() > 0
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: label needs both classes, got {n_pos} positives of {y.size}")
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def frangi_auc(image: np.ndarray, mask: np.ndarray) -> float:
    score = frangi(to_unit(image), sigmas=FRANGI_SIGMAS, black_ridges=True)
    return roc_auc(score, mask)


def _neighbour_count(skel: np.ndarray) -> np.ndarray:
    k = np.ones((3, 3), np.float32)
    k[1, 1] = 0
    return np.rint(cv2.filter2D(skel.astype(np.float32), -1, k, borderType=cv2.BORDER_CONSTANT)).astype(int)


def branch_points(mask: np.ndarray) -> int:
    """Number of skeleton junctions (clusters of pixels with >= 3 skeleton neighbours)."""
    skel = skeletonize(mask > 0)
    junction = skel & (_neighbour_count(skel) >= 3)
    return int(ndimage.label(junction, structure=_EIGHT)[1])


def _skeleton_graph(skel: np.ndarray) -> sparse.csr_matrix:
    """8-connected pixel graph of a skeleton, edge weights 1 (axial) or sqrt(2) (diagonal)."""
    h, w = skel.shape
    index = -np.ones((h + 2, w + 2), np.int64)
    ys, xs = np.nonzero(skel)
    index[ys + 1, xs + 1] = np.arange(ys.size)
    rows, cols, weights = [], [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        nb = index[ys + 1 + dy, xs + 1 + dx]
        ok = nb >= 0
        rows.append(np.arange(ys.size)[ok])
        cols.append(nb[ok])
        weights.append(np.full(ok.sum(), np.hypot(dy, dx)))
    r, c, wgt = map(np.concatenate, (rows, cols, weights))
    g = sparse.coo_matrix((wgt, (r, c)), shape=(ys.size, ys.size))
    return (g + g.T).tocsr()


def taper(mask: np.ndarray) -> float:
    """Spearman rho of radius vs geodesic distance from the root (see module docstring); nan if < 10 px."""
    m = mask > 0
    skel = skeletonize(m)
    lab, n = ndimage.label(skel, structure=_EIGHT)
    if n == 0:
        return float("nan")
    sizes = np.bincount(lab.ravel())[1:]
    skel = lab == (1 + int(np.argmax(sizes)))
    if skel.sum() < 10:
        return float("nan")
    radius = ndimage.distance_transform_edt(m)[skel]
    graph = _skeleton_graph(skel)
    ends = np.flatnonzero(_neighbour_count(skel)[skel] == 1)
    if ends.size == 0:
        ends = np.arange(radius.size)
    near = csgraph.dijkstra(graph, indices=ends, limit=ROOT_WINDOW_PX)
    within = np.isfinite(near)
    mean_r = (within * radius).sum(1) / within.sum(1)
    root = ends[int(np.argmax(mean_r))]
    geo = csgraph.dijkstra(graph, indices=root)
    ok = np.isfinite(geo)
    return float(stats.spearmanr(radius[ok], geo[ok])[0])


def _far_background(mask: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(mask == 0) > BG_FAR_PX


def relief(image: np.ndarray, mask: np.ndarray) -> float:
    img = to_unit(image)
    smooth = ndimage.gaussian_filter(img, RELIEF_SIGMA * max(img.shape))
    return float(smooth[_far_background(mask)].std())


def noise(image: np.ndarray, mask: np.ndarray) -> float:
    img = to_unit(image)
    high = img - ndimage.gaussian_filter(img, NOISE_SIGMA_PX)
    return float(high[_far_background(mask)].std())


METRICS = {
    "vessel_fraction": lambda im, m: vessel_fraction(m),
    "cnr": cnr,
    "frangi_auc": frangi_auc,
    "branch_points": lambda im, m: float(branch_points(m)),
    "taper": lambda im, m: taper(m),
    "relief": relief,
    "noise": noise,
}


def measure(images: np.ndarray, masks: np.ndarray, names=tuple(METRICS)) -> dict[str, np.ndarray]:
    """Per-image metrics of a stack (N, H, W) of images and masks -> {name: (N,) float64}."""
    if images.shape != masks.shape or images.ndim != 3:
        raise ValueError(f"measure: images {images.shape} and masks {masks.shape} must both be (N, H, W)")
    return {k: np.array([METRICS[k](im, m) for im, m in zip(images, masks)]) for k in names}


def real_data_dir() -> Path:
    """`$VASOMIM_REAL_DATA`, default `<repo>/../shared/data`."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("VASOMIM_REAL_DATA", default))


def load_cimat(root: Path | None = None, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The CIMAT training images and masks as (N, 300, 300) uint8 stacks (masks binarised > 127), sorted by number."""
    base = (root or real_data_dir()) / "cimat_xca80"
    files = sorted((base / "images" / "training").glob("*.png"), key=lambda p: int(p.stem))[:limit]
    if not files:
        raise FileNotFoundError(f"load_cimat: no images under {base / 'images' / 'training'}")
    images, masks = [], []
    for f in files:
        gt = base / "masks" / "training" / f"{f.stem}_gt.png"
        im, m = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), cv2.imread(str(gt), cv2.IMREAD_GRAYSCALE)
        if im is None or m is None:
            raise FileNotFoundError(f"load_cimat: cannot read {f} or {gt}")
        images.append(im)
        masks.append((m > 127).astype(np.uint8))
    return np.stack(images), np.stack(masks)


# Real CIMAT values (40 images, 300 px; mean, std) measured with the functions above, and the band the mean of a
# set of synthetic images must fall in: roughly the real mean +- 0.5..1 std (tighter where the real spread is wide).
REAL_CIMAT = {
    "vessel_fraction": (0.05537, 0.01630),
    "cnr": (2.0370, 1.3840),
    "frangi_auc": (0.8674, 0.07012),
    "branch_points": (5.725, 3.058),
    "taper": (-0.5233, 0.2251),
    "relief": (0.1179, 0.07302),
    "noise": (0.01228, 0.004319),
}
BANDS = {
    "vessel_fraction": (0.04, 0.075),
    "cnr": (1.3, 3.0),
    "frangi_auc": (0.82, 0.92),
    "branch_points": (4.0, 12.0),
    "taper": (-0.8, -0.3),
    "relief": (0.06, 0.18),
    "noise": (0.008, 0.018),
}
MIN_BRANCH_POINTS = 2  # every synthetic image: a tree, not a single tube (real minimum: 1)
