"""Seeded synthetic X-ray coronary angiograms with ground-truth vessel masks (pure numpy / scipy / OpenCV).

Model, in the log-attenuation domain (an X-ray image is I = I0 * exp(-sum of attenuations)):
- a vessel tree grown generation by generation from a root near an image edge: each branch is a tortuous
  centre-line (heading integrated from smoothed curvature noise plus a gentle bias), its radius tapers linearly
  along the branch, and children start at random points along it with radius = parent's local radius *
  `child_radius_ratio`; trees that mostly leave the frame are redrawn;
- vessels attenuate in proportion to the path length through a cylinder, 2 * sqrt(r^2 - d^2) (d = distance to the
  centre-line), so they are dark and soft-edged; the mask marks the lumen d <= r of the labelled generations;
- the deepest, thinnest twigs are drawn but left out of the mask (hand-drawn ground truth skips them too);
- background: a smooth low-frequency field, a large soft-edged organ shadow (heart / diaphragm), rib-like curved
  bands, mottled soft-tissue texture, vignetting and, in a fraction of frames, a circular collimator whose shadow
  also hides the vessels from the mask (an annotator cannot see them);
- in a fraction of frames a catheter: a uniform-width, gently curved contrast-filled tube from the tree root out
  through the image edge, not in the mask (the CIMAT ground truth excludes catheters);
- quantum-like noise with variance proportional to intensity, then a slight Gaussian blur.
Lengths are fractions of the image side; radii and blur are pixels at REFERENCE_SIZE and scale with the side.
All randomness comes from `np.random.default_rng(seed)`, so an image is a pure function of (seed, size, params).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np
from scipy import ndimage

REFERENCE_SIZE = 300  # CIMAT frames are 300 px: radii below are in pixels at this size
MIN_SIZE, MAX_SIZE = 64, 1024

Range = tuple[float, float]
MAX_TREE_TRIES = 50  # redraws of a tree that leaves the frame; the last one is kept regardless
MIN_IN_FRAME = 0.75  # fraction of the labelled centre-line inside the image
MIN_BRANCHES_IN_FRAME = 4  # labelled branches (root included) that start inside the image


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
    """Generator parameters; (lo, hi) ranges are drawn uniformly per image (per branch where it says so)."""

    labelled_generations: int = 3  # generations 0 .. n-1 are drawn and in the mask
    twig_generations: int = 1  # further generations drawn faintly, not in the mask
    children: tuple[tuple[int, int], ...] = ((1, 3), (0, 2), (3, 7))  # per generation, inclusive
    root_radius: Range = (3.8, 6.0)  # px at REFERENCE_SIZE
    child_radius_ratio: Range = (0.65, 0.85)  # child start radius / parent radius at the branching point
    child_opacity_ratio: Range = (0.6, 1.0)  # child contrast opacity / parent's
    taper: Range = (0.6, 0.85)  # end radius / start radius of each branch
    min_radius: float = 1.2  # px at REFERENCE_SIZE; labelled radii are clipped here
    twig_radius: Range = (0.6, 1.0)  # px at REFERENCE_SIZE
    root_length: Range = (0.8, 1.3)  # fraction of the side
    child_length_ratio: Range = (0.35, 0.7)
    branch_angle_deg: Range = (25.0, 70.0)
    curvature: float = 2.5  # std of the smoothed curvature noise, radians per side length
    curvature_bias: float = 3.0  # max |constant curvature| per branch, radians per side length
    curvature_corr: float = 0.04  # correlation length of the curvature noise, fraction of the side
    vessel_mu: Range = (0.015, 0.15)  # attenuation per px of path length at REFERENCE_SIZE
    twig_contrast: Range = (0.5, 1.0)  # twig attenuation relative to vessel_mu
    catheter_probability: float = 0.35
    catheter_radius: Range = (2.0, 3.0)  # px at REFERENCE_SIZE
    collimator_probability: float = 0.55
    organ_shadow: Range = (0.1, 0.8)  # log-attenuation step of the heart / diaphragm shadow
    rib_contrast: Range = (0.02, 0.08)
    low_frequency: Range = (0.03, 0.3)  # std of the smooth background field (log attenuation)
    mottle: Range = (0.015, 0.04)  # std of the soft-tissue texture (coarse scale; the fine one gets half)
    vignetting: Range = (0.0, 0.4)
    brightness: Range = (0.65, 0.9)  # intensity of the least attenuated background, before noise
    photons: Range = (110.0, 500.0)  # counts at intensity 1: noise std = sqrt(I / photons)
    blur: Range = (0.6, 1.4)  # Gaussian sigma, px at REFERENCE_SIZE

    def __post_init__(self):
        if self.labelled_generations < 1:
            raise ValueError(f"SyntheticParams.labelled_generations must be >= 1, got {self.labelled_generations}")
        n = self.labelled_generations + self.twig_generations - 1
        if len(self.children) < n:
            raise ValueError(f"SyntheticParams.children needs {n} entries (one per parent generation), "
                             f"got {len(self.children)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "Range" and not (len(v) == 2 and v[0] <= v[1]):
                raise ValueError(f"SyntheticParams.{f.name} must be a (lo, hi) pair with lo <= hi, got {v}")
        if self.twig_generations < 0:
            raise ValueError(f"SyntheticParams.twig_generations must be >= 0, got {self.twig_generations}")
        if any(not 0 <= lo <= hi for lo, hi in self.children):
            raise ValueError(f"SyntheticParams.children must hold (lo, hi) pairs with 0 <= lo <= hi, "
                             f"got {self.children}")
        if not 0.0 <= self.catheter_probability <= 1.0 or not 0.0 <= self.collimator_probability <= 1.0:
            raise ValueError("SyntheticParams.catheter_probability / collimator_probability must be in [0, 1]")


DEFAULT_PARAMS = SyntheticParams()


class Branch(NamedTuple):
    """One branch of the tree: centre-line (n, 2) float64 (x, y) in pixels, radius (n,) in pixels, and the
    contrast-agent opacity relative to the root (distal branches fill less)."""

    generation: int
    points: np.ndarray
    radius: np.ndarray
    labelled: bool
    opacity: float


def _centreline(rng, start, heading, length, size, curvature, bias, corr) -> tuple[np.ndarray, np.ndarray]:
    """Tortuous centre-line of `length` px from `start` (x, y): (n, 2) points 1 px apart and (n,) headings.

    curvature: std of the curvature noise, bias: max |constant curvature| (both radians per side length),
    corr: noise correlation length (fraction of the side). The noise is white at knots `corr` apart, linearly
    interpolated: smooth enough for a vessel, ~10x cheaper than filtering per-step noise, and the same number
    of draws at every image size (a seed gives much the same tree at 128 and 512 px).
    Points 1 px apart round to 8-connected pixels, so the rasterised centre-line has no gaps.
    """
    n = max(int(length), 4)
    knots = rng.standard_normal(int(length / size / corr) + 2)  # as many draws at every size: same shape
    kappa = np.interp(np.arange(n) / (corr * size), np.arange(len(knots)), knots) * (curvature / size)
    kappa += rng.uniform(-bias, bias) / size
    theta = heading + np.cumsum(kappa)
    xy = start + np.cumsum(np.stack([np.cos(theta), np.sin(theta)], 1), 0)
    return xy, theta


def vessel_tree(seed: int, size: int = 256, params: SyntheticParams = DEFAULT_PARAMS) -> list[Branch]:
    """The tree `angiogram(seed, size, params=params)` draws, root branch first (for inspection and tests)."""
    _check(seed, size)
    return _grow_tree(_streams(seed)[0], size, params)


def _in_frame(tree: list[Branch], size: int) -> tuple[float, int]:
    """(fraction of labelled centre-line points inside the image, labelled branches starting inside it)."""
    inside = lambda xy: ((xy >= 0) & (xy < size)).all(-1)
    lab = [b for b in tree if b.labelled]
    frac = np.mean(np.concatenate([inside(b.points) for b in lab]))
    return float(frac), sum(bool(inside(b.points[0])) for b in lab)


def _grow_tree(rng: np.random.Generator, size: int, p: SyntheticParams) -> list[Branch]:
    """A tree that stays mostly in the frame: trees that wander out are redrawn from the same generator."""
    for _ in range(MAX_TREE_TRIES):
        tree = _grow_once(rng, size, p)
        frac, starts = _in_frame(tree, size)
        if frac >= MIN_IN_FRAME and starts >= MIN_BRANCHES_IN_FRAME:
            break
    return tree


def _grow_once(rng: np.random.Generator, size: int, p: SyntheticParams) -> list[Branch]:
    scale = size / REFERENCE_SIZE
    edge = rng.integers(4)
    along, inset = rng.uniform(0.15, 0.85) * size, rng.uniform(0.0, 0.12) * size
    # Root on a random edge, heading for a random point of the central region.
    start = [np.array([along, inset]), np.array([size - inset, along]),
             np.array([along, size - inset]), np.array([inset, along])][edge]
    aim = rng.uniform(0.3, 0.7, 2) * size - start
    heading = np.arctan2(aim[1], aim[0])
    r0 = rng.uniform(*p.root_radius) * scale
    length = rng.uniform(*p.root_length) * size
    twig_r = rng.uniform(*p.twig_radius) * scale  # one twig width per image: twigs render with a plain DT
    total = p.labelled_generations + p.twig_generations
    branches: list[Branch] = []
    stack = [(0, start, heading, r0, length, 0.0, 1.0)]
    while stack:
        gen, xy0, th0, r_start, length, r_parent, opacity = stack.pop()
        labelled = gen < p.labelled_generations
        xy, theta = _centreline(rng, xy0, th0, length, size, p.curvature, p.curvature_bias, p.curvature_corr)
        t = np.linspace(0.0, 1.0, len(xy))
        if labelled:
            radius = np.maximum(r_start * (1.0 - (1.0 - rng.uniform(*p.taper)) * t), p.min_radius * scale)
        else:
            radius = np.full(len(xy), twig_r)
        # Start the child's centre-line at the parent's wall: inside the parent lumen it would only carve the
        # nearest-centre-line radius down and notch the mask.
        inside = np.hypot(*(xy - xy0).T) < r_parent
        if not inside.all():
            first = int(np.argmin(inside))
            branches.append(Branch(gen, xy[first:], radius[first:], labelled, opacity))
        if gen + 1 >= total:
            continue
        lo, hi = p.children[gen]
        for u in np.sort(rng.uniform(0.1, 0.9, rng.integers(lo, hi + 1))):
            i = int(u * (len(xy) - 1))
            side = rng.choice((-1.0, 1.0))
            child_heading = theta[i] + side * np.deg2rad(rng.uniform(*p.branch_angle_deg))
            child_r = radius[i] * rng.uniform(*p.child_radius_ratio)
            child_len = length * rng.uniform(*p.child_length_ratio)
            child_opacity = opacity * rng.uniform(*p.child_opacity_ratio)
            stack.append((gen + 1, xy[i], child_heading, child_r, child_len, radius[i], child_opacity))
    return branches


def _rasterise(points: np.ndarray, priority: np.ndarray, size: int) -> np.ndarray:
    """(size, size) int64 map: index into `points` (n, 2) (x, y) of the point rounded to each pixel, -1 for none.

    The highest `priority` (n,) wins where points collide, so a thick vessel keeps its centre-line where a thin
    one crosses it.
    """
    out = np.full((size, size), -1, np.int64)
    ij = np.rint(points).astype(np.int64)
    ok = np.flatnonzero((ij >= 0).all(1) & (ij < size).all(1))
    order = ok[np.argsort(priority[ok], kind="stable")]
    out[ij[order, 1], ij[order, 0]] = order
    return out


def _tube_length(dist: np.ndarray, radius) -> np.ndarray:
    """Path length of a ray through a cylinder of `radius` at distance `dist` from its axis: 2 sqrt(r^2 - d^2)."""
    return 2.0 * np.sqrt(np.maximum(radius * radius - dist * dist, 0.0, dtype=np.float32))


def _vessels(tree: list[Branch], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Path length through labelled vessels, through twigs (both (size, size) float32 px) and the lumen mask."""
    lab = [b for b in tree if b.labelled]
    radius = np.concatenate([b.radius for b in lab])
    opacity = np.concatenate([np.full(len(b.radius), b.opacity) for b in lab])
    index = _rasterise(np.concatenate([b.points for b in lab]), radius, size)
    if (index < 0).all():
        raise RuntimeError("synthetic: the vessel tree left the image before its first pixel")
    # Every pixel takes the radius and opacity of its nearest centre-line pixel. OpenCV numbers the zero pixels
    # of its input in raster order (labels 1..K); its label pass is approximate (<~0.6 px), its precise pass exact.
    free = (index < 0).astype(np.uint8)
    _, label = cv2.distanceTransformWithLabels(free, cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL)
    dist = cv2.distanceTransform(free, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    nearest = index.ravel()[np.flatnonzero(free.ravel() == 0)][label - 1]
    r = radius[nearest].astype(np.float32)
    mask = (dist <= r).astype(np.uint8)
    vessel = _tube_length(dist, r) * opacity[nearest].astype(np.float32)
    twigs = [b for b in tree if not b.labelled]
    twig = np.zeros_like(vessel)
    if twigs:
        pts = np.concatenate([b.points for b in twigs])
        tmap = _rasterise(pts, np.zeros(len(pts)), size)
        if (tmap >= 0).any():
            tdist = cv2.distanceTransform((tmap < 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            twig = _tube_length(tdist, np.float32(twigs[0].radius[0]))
    return vessel, twig, mask


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _background(rng: np.random.Generator, size: int, p: SyntheticParams) -> np.ndarray:
    """(size, size) float32 log-attenuation of the anatomy behind the vessels (collimator excluded)."""
    g = 96  # every term is smooth: compute on a coarse grid (the same at every size) and resize
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32) / (g - 1)
    coarse = rng.standard_normal((4, 4)).astype(np.float32) * rng.uniform(*p.low_frequency)
    att = cv2.resize(coarse, (g, g), interpolation=cv2.INTER_CUBIC)
    # Organ shadow: the soft edge of a large disc centred outside the frame crosses the image.
    phi, far = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.3)
    cx, cy = 0.5 + far * np.cos(phi), 0.5 + far * np.sin(phi)
    edge = far - rng.uniform(-0.1, 0.5)
    d = np.hypot(xx - cx, yy - cy)
    att += rng.uniform(*p.organ_shadow) * _sigmoid((edge - d) / rng.uniform(0.01, 0.06))
    # Ribs: parallel soft-edged arcs of a large circle.
    phi, far = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 2.0)
    d = np.hypot(xx - 0.5 - far * np.cos(phi), yy - 0.5 - far * np.sin(phi))
    first, spacing = far - 0.6, rng.uniform(0.12, 0.2)
    for k in range(int(1.4 / spacing)):
        r_in, width, w = first + k * spacing, rng.uniform(0.04, 0.08), rng.uniform(0.005, 0.02)
        att += rng.uniform(*p.rib_contrast) * (_sigmoid((d - r_in) / w) - _sigmoid((d - r_in - width) / w))
    # Soft-tissue mottle: band-limited noise.
    for m, weight in ((g // 8, 1.0), (g // 2, 0.5)):
        mottle = cv2.resize(rng.standard_normal((m, m)).astype(np.float32), (g, g), interpolation=cv2.INTER_CUBIC)
        att += weight * rng.uniform(*p.mottle) * mottle / (mottle.std() + 1e-6)
    vx, vy = rng.uniform(0.3, 0.7, 2)
    att += rng.uniform(*p.vignetting) * ((xx - vx) ** 2 + (yy - vy) ** 2)
    att -= att.min()  # the least attenuated point shows at `brightness`: no clipped white patches
    return cv2.resize(att, (size, size), interpolation=cv2.INTER_LINEAR)


def _catheter(rng, tree: list[Branch], size: int, p: SyntheticParams) -> np.ndarray:
    """(size, size) float32 path length through a catheter: a gently bent tube (quadratic Bezier) from the tree
    root to a point just beyond a border at least 0.6 side away, so it crosses a good part of the frame."""
    start = tree[0].points[0]
    for _ in range(20):
        edge, along = rng.integers(4), rng.uniform(-0.05, 1.05) * size
        end = [np.array([along, -0.05 * size]), np.array([1.05 * size, along]),
               np.array([along, 1.05 * size]), np.array([-0.05 * size, along])][edge]
        if np.hypot(*(end - start)) >= 0.6 * size:
            break
    chord = end - start
    bend = start + 0.5 * chord + rng.uniform(-0.25, 0.25) * np.array([-chord[1], chord[0]])
    t = np.linspace(0.0, 1.0, int(2 * np.hypot(*chord)) + 2)[:, None]  # <= 1 px apart: an unbroken line
    xy = (1 - t) ** 2 * start + 2 * t * (1 - t) * bend + t**2 * end
    cmap = _rasterise(xy, np.zeros(len(xy)), size)
    if (cmap < 0).all():
        return np.zeros((size, size), np.float32)
    dist = cv2.distanceTransform((cmap < 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    radius = rng.uniform(*p.catheter_radius) * size / REFERENCE_SIZE
    return _tube_length(dist, np.float32(radius))


def _collimator(rng, size: int) -> np.ndarray:
    """(size, size) float32 log-attenuation of a circular collimator: ~0 inside, ~3 (nearly black) outside."""
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    radius = rng.uniform(0.6, 0.85) * size
    yy, xx = np.ogrid[0:size, 0:size]
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2, dtype=np.float32)
    return 3.0 * _sigmoid((d - radius) / (size / REFERENCE_SIZE))


def _check(seed, size) -> None:
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"synthetic: size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"synthetic: seed must be a non-negative int, got {seed!r}")


def _image_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"synthetic: dtype must be numpy.uint8 or numpy.uint16, got {dtype!r}") from e
    if dt not in (np.uint8, np.uint16):
        raise ValueError(f"synthetic: dtype must be numpy.uint8 or numpy.uint16, got {dt}")
    return dt


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent generators for the tree, the look of the frame, the catheter and the noise: switching the
    catheter (or any other option) off leaves everything else of the frame unchanged."""
    return np.random.default_rng(seed).spawn(4)


def angiogram(seed: int, size: int = 256, *, dtype=np.uint8,
              params: SyntheticParams = DEFAULT_PARAMS) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic angiogram: image (size, size) `dtype` (uint8, or uint16 over the full 16-bit range) with
    dark vessels on a bright background, and mask (size, size) uint8 in {0, 1} marking the vessel lumen.

    Deterministic in (seed, size, params); 64 <= size <= 1024.
    """
    _check(seed, size)
    dt = _image_dtype(dtype)
    rng_tree, rng_look, rng_catheter, rng_noise = _streams(seed)
    scale = size / REFERENCE_SIZE
    tree = _grow_tree(rng_tree, size, params)
    vessel, twig, mask = _vessels(tree, size)
    mu = rng_look.uniform(*params.vessel_mu) / scale
    att = _background(rng_look, size, params)
    att += mu * (vessel + rng_look.uniform(*params.twig_contrast) * twig)
    if rng_look.uniform() < params.catheter_probability:
        att += mu * rng_catheter.uniform(0.8, 1.2) * _catheter(rng_catheter, tree, size, params)
    if rng_look.uniform() < params.collimator_probability:
        collimator = _collimator(rng_look, size)
        att += collimator
        mask &= collimator < 1.5
    image = rng_look.uniform(*params.brightness) * np.exp(-att)
    image += np.sqrt(image / rng_look.uniform(*params.photons)) * rng_noise.standard_normal(image.shape, np.float32)
    image = cv2.GaussianBlur(image, (0, 0), rng_look.uniform(*params.blur) * scale, borderType=cv2.BORDER_REFLECT)
    top = np.iinfo(dt).max
    return np.rint(np.clip(image, 0.0, 1.0) * top).astype(dt), mask


def angiograms(seeds: Sequence[int] | int, size: int = 256, *, dtype=np.uint8,
               params: SyntheticParams = DEFAULT_PARAMS) -> tuple[np.ndarray, np.ndarray]:
    """Stacked `angiogram`s: images (N, size, size) `dtype`, masks (N, size, size) uint8; an int n means range(n)."""
    seeds = range(seeds) if isinstance(seeds, (int, np.integer)) else list(seeds)
    if len(seeds) == 0:
        raise ValueError("angiograms: seeds is empty")
    pairs = [angiogram(s, size, dtype=dtype, params=params) for s in seeds]
    return np.stack([im for im, _ in pairs]), np.stack([m for _, m in pairs])
