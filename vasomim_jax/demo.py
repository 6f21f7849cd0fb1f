"""End-to-end demo on synthetic angiograms; everything it writes goes under --out (default demo_out/).

Generates seeded synthetic angiograms with their ground-truth vessel masks and writes a labelled PNG grid of
eight of them (image above, mask overlay below).
"""

from __future__ import annotations

import pathlib
import time

import numpy as np

_FLAGS = None


def define_flags():
    global _FLAGS
    from absl import flags

    flags.DEFINE_string("out", "demo_out", "Folder for everything the demo writes.")
    flags.DEFINE_integer("size", 256, "Synthetic image size in pixels.")
    flags.DEFINE_integer("seed", 0, "First seed of the synthetic angiograms.")
    _FLAGS = flags.FLAGS


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8 image + {0,1} mask -> (H, W, 3) uint8 with the mask tinted red."""
    rgb = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    red = np.array([230.0, 40.0, 40.0], np.float32)
    m = mask.astype(bool)
    rgb[m] = 0.45 * rgb[m] + 0.55 * red
    return rgb.astype(np.uint8)


def sample_grid(images: np.ndarray, masks: np.ndarray, pad: int = 4) -> np.ndarray:
    """(N, H, W) images and masks -> one (2H + 3pad, N*(W+pad)+pad, 3) uint8 grid: images over overlays."""
    n, h, w = images.shape
    grid = np.full((2 * h + 3 * pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        x = pad + i * (w + pad)
        grid[pad:pad + h, x:x + w] = images[i][..., None]
        grid[2 * pad + h:2 * pad + 2 * h, x:x + w] = overlay(images[i], masks[i])
    return grid


def write_samples(out: pathlib.Path, seed: int = 0, size: int = 256, n: int = 8) -> pathlib.Path:
    from PIL import Image

    from vasomim_jax import synthetic

    images, masks = synthetic.angiograms(list(range(seed, seed + n)), size)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "synthetic_samples.png"
    Image.fromarray(sample_grid(images, masks)).save(path)
    return path


def main(argv):
    del argv
    out = pathlib.Path(_FLAGS.out)
    t0 = time.time()
    path = write_samples(out, _FLAGS.seed, _FLAGS.size)
    print(f"wrote {path} (8 synthetic angiograms, {_FLAGS.size}px, masks in red) in {time.time() - t0:.1f}s")
