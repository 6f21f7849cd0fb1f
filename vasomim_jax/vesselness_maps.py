"""Offline vessel maps: the XA-SSL recipe (METHOD §2) with the filter on device and vectorised host post-processing.

Recipe per image: filter (Sato σ 1–4, black ridges) → uint8 (truncation) → zero a `border` px frame →
keep pixels ≥ the `percentile`-th percentile → the 4-connected component of non-zero pixels holding the arg-max
pixel (first in C order) → {0, 1}. `backend="skimage"` runs the same recipe with `skimage.filters` per image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage as ndi

from vasomim_jax.vesselness_filters import check_finite, frangi, sato

FILTERS = ("sato", "frangi")
BACKENDS = ("jax", "skimage")
# 4-connectivity inside each image of a (B, H, W) stack, none across images.
_CROSS_2D = ndi.generate_binary_structure(2, 1)
_CROSS_IN_PLANE = np.stack([np.zeros_like(_CROSS_2D), _CROSS_2D, np.zeros_like(_CROSS_2D)])


def _validate(images, filter: str, sigmas, border: int, percentile: float, backend: str) -> np.ndarray:
    if filter not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(border, (int, np.integer)) or border < 0:
        raise ValueError(f"border must be an int >= 0, got {border!r}")
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    if len(tuple(sigmas)) == 0:
        raise ValueError("sigmas must hold at least one scale")
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(f"image_uint8 must have dtype uint8 (the recipe loads 8-bit grayscale), got {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"image_uint8 must be (H, W) or (B, H, W), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"image_uint8 is empty (shape {arr.shape})")
    return arr


def _to_uint8(response: np.ndarray) -> np.ndarray:
    """The recipe's `astype(np.uint8)`: truncation toward zero (numpy's float -> uint8 cast)."""
    return np.asarray(response).astype(np.uint8)


def _zero_border(maps: np.ndarray, border: int) -> np.ndarray:
    """Zero a `border`-pixel frame of (B, H, W) maps in place. border = 0 leaves them unchanged (the reference's
    `result[-0:, :] = 0` would blank the whole map)."""
    if border > 0:
        maps[:, :border, :] = 0
        maps[:, -border:, :] = 0
        maps[:, :, :border] = 0
        maps[:, :, -border:] = 0
    return maps


def percentile_uint8(maps: np.ndarray, q: float) -> np.ndarray:
    """`np.percentile(map, q)` (linear method) of each (H, W) uint8 map of a (B, H, W) stack, from histograms -> (B,).

    The two order statistics come from cumulative 256-bin counts; interpolation follows numpy's `_lerp`.
    """
    b = maps.shape[0]
    n = maps[0].size
    counts = np.bincount((maps.reshape(b, -1) + (np.arange(b) * 256)[:, None]).ravel(), minlength=b * 256)
    cum = counts.reshape(b, 256).cumsum(axis=1)
    quantile = np.true_divide(q, 100)
    virtual = (n - 1) * quantile  # numpy's 'linear' virtual index
    lo = int(np.floor(virtual))
    hi = min(lo + 1, n - 1)
    t = virtual - lo
    below = (cum <= lo).sum(axis=1).astype(np.float64)  # value of the order statistic `lo` (0-based)
    above = (cum <= hi).sum(axis=1).astype(np.float64)
    diff = above - below
    return np.where(t >= 0.5, above - diff * (1 - t), below + diff * t)


def grow_from_argmax(kept: np.ndarray) -> np.ndarray:
    """(B, H, W) thresholded maps -> uint8 {0, 1}: per image, the 4-connected component of non-zero pixels that
    holds the first arg-max pixel; all zeros where the map is all zero. One labelling call for the whole stack."""
    b = kept.shape[0]
    labels, _ = ndi.label(kept > 0, structure=_CROSS_IN_PLANE)
    flat = labels.reshape(b, -1)
    seeds = flat[np.arange(b), np.argmax(kept.reshape(b, -1), axis=1)]  # 0 where the map is all zero
    return ((labels == seeds[:, None, None]) & (seeds[:, None, None] > 0)).astype(np.uint8)


def recipe_from_response(response: np.ndarray, border: int, percentile: float) -> np.ndarray:
    """(B, H, W) filter responses -> (B, H, W) uint8 {0, 1} maps: cast, border, threshold, region growing."""
    maps = _zero_border(_to_uint8(response), border)
    thresh = percentile_uint8(maps, percentile)
    kept = np.where(maps >= thresh[:, None, None], maps, 0)
    return grow_from_argmax(kept)


def published_flood_fill(kept: np.ndarray) -> np.ndarray:
    """XA-SSL's region growing as published: a stack flood fill over non-zero pixels of one (H, W) map from its
    first arg-max, 4-connected -> uint8 {0, 1}. A Python pixel loop: the reference `grow_from_argmax` is pinned to."""
    mask = np.zeros(kept.shape, np.uint8)
    if not kept.any():
        return mask
    stack = [np.unravel_index(np.argmax(kept), kept.shape)]
    while stack:
        r, c = stack.pop()
        if 0 <= r < kept.shape[0] and 0 <= c < kept.shape[1] and kept[r, c] and not mask[r, c]:
            mask[r, c] = 1
            stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return mask


def published_recipe(image: np.ndarray, *, border: int = 20, percentile: float = 92.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The authors' offline step for one uint8 (H, W) image, line by line as published (skimage Sato σ 1–4,
    numpy percentile, stack flood fill): (float64 response, uint8 {0, 1} map). The reference of tests/benchmarks."""
    from skimage import filters as skfilters

    response = skfilters.sato(image, sigmas=[1, 2, 3, 4], black_ridges=True, mode="reflect", cval=0)
    vessel = response.astype(np.uint8)
    vessel[:border, :] = 0
    vessel[-border:, :] = 0
    vessel[:, :border] = 0
    vessel[:, -border:] = 0
    kept = np.where(vessel >= np.percentile(vessel, percentile), vessel, 0)
    return response, published_flood_fill(kept)


def _skimage_response(images: np.ndarray, filter: str, sigmas) -> np.ndarray:
    from skimage import filters as skfilters

    fn = skfilters.sato if filter == "sato" else skfilters.frangi
    return np.stack([fn(im, sigmas=list(sigmas), black_ridges=True, mode="reflect", cval=0) for im in images])


def _jax_response(images: np.ndarray, filter: str, sigmas):
    fn = sato if filter == "sato" else frangi
    return fn(images, sigmas=tuple(sigmas))


def vessel_map(
    image_uint8,
    *,
    filter: str = "sato",
    sigmas: Sequence[float] = (1, 2, 3, 4),
    border: int = 20,
    percentile: float = 92.0,
    backend: str = "jax",
) -> np.ndarray:
    """The official XA-SSL vessel map of an (H, W) or (B, H, W) uint8 image -> uint8 {0, 1} of the same shape.

    `backend="jax"` filters on the default JAX device; `backend="skimage"` calls `skimage.filters` per image
    (the authors' exact numbers). Post-processing runs on host, vectorised over the batch.
    """
    arr = _validate(image_uint8, filter, sigmas, border, percentile, backend)
    batch = arr[None] if arr.ndim == 2 else arr
    if backend == "skimage":
        response = _skimage_response(batch, filter, sigmas)
    else:
        response = np.asarray(_jax_response(batch, filter, sigmas))
    out = recipe_from_response(response, int(border), float(percentile))
    return out[0] if arr.ndim == 2 else out


def _batches(images: Sequence[np.ndarray], batch_size: int, pad: bool) -> Iterator[tuple[list[int], np.ndarray]]:
    """Indices and stacked arrays of same-shape images, `batch_size` per batch, in first-seen order.

    With `pad`, a short last batch of a group larger than `batch_size` is padded with copies of its last image
    (results for the copies are dropped) so that one compiled shape serves the whole group.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(np.shape(image), []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            rows = chunk + chunk[-1:] * (batch_size - len(chunk)) if pad and len(idx) > batch_size else chunk
            yield chunk, np.stack([np.asarray(images[i]) for i in rows])


def vessel_maps(images: Sequence[np.ndarray], *, batch_size: int = 16, **kw) -> list[np.ndarray]:
    """Vessel maps of many (H, W) uint8 images of possibly different sizes, in input order.

    Same-size images are filtered together in batches of up to `batch_size`; with the JAX backend the next
    batch is dispatched to the device before the host post-processes the current one.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for i, image in enumerate(images):
        if np.ndim(image) != 2:
            raise ValueError(f"images[{i}] must be (H, W), got shape {np.shape(image)}")
    check_finite(list(images), "images")
    opts = dict(filter="sato", sigmas=(1, 2, 3, 4), border=20, percentile=92.0, backend="jax")
    unknown = set(kw) - set(opts)
    if unknown:
        raise TypeError(f"vessel_maps got unknown keyword arguments {sorted(unknown)}; allowed: {sorted(opts)}")
    opts |= kw
    if opts["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {opts['backend']!r}")
    out: list[np.ndarray | None] = [None] * len(images)
    if opts["backend"] == "skimage":
        for idx, batch in _batches(images, batch_size, pad=False):
            out_batch = vessel_map(batch, **opts)
            for j, i in enumerate(idx):
                out[i] = out_batch[j]
        return out
    pending = None
    for idx, batch in _batches(images, batch_size, pad=True):
        _validate(batch, opts["filter"], opts["sigmas"], opts["border"], opts["percentile"], "jax")
        response = _jax_response(batch, opts["filter"], opts["sigmas"])  # async dispatch
        if pending is not None:
            _finish(out, *pending, opts)
        pending = (idx, response)
    if pending is not None:
        _finish(out, *pending, opts)
    return out


def _finish(out: list, idx: list[int], response, opts: dict) -> None:
    maps = recipe_from_response(np.asarray(response), int(opts["border"]), float(opts["percentile"]))
    for j, i in enumerate(idx):
        out[i] = maps[j]


__all__ = ("FILTERS", "BACKENDS", "grow_from_argmax", "percentile_uint8", "recipe_from_response",
           "vessel_map", "vessel_maps")
