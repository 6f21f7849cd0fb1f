"""Vesselness benchmark: JAX frangi/sato and vessel maps against scikit-image, measured in the same run.

    .venv/bin/python benchmarks/vesselness.py [--limit N] [--repeats R]

Prints (a) frangi forward on 16×224² vs `skimage.filters.frangi` looped, with the parity check (max |ours − skimage|
relative to the map's max, frangi and sato, both ridge polarities); (b) forward+backward cost relative to forward;
(c) `vessel_maps` on the real 512² ARCADE angiograms vs the official recipe per image with skimage (+ the published
flood fill) in this process, with per-image IoU statistics and the sato parity on every image. Runs on whatever
backend JAX has (CPU, GPU, TPU): the parity lines are the accelerator-precision check.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import skimage.filters
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from vasomim_jax import synthetic  # noqa: E402
from vasomim_jax.vesselness import frangi, sato, vessel_maps  # noqa: E402
from vasomim_jax.vesselness_maps import published_recipe  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_angiograms(limit: int) -> tuple[list[np.ndarray], str]:
    folder = pathlib.Path(os.environ.get("VASOMIM_REAL_DATA", ROOT / ".." / "shared" / "data")) / "arcade_stenosis_test" / "images"
    paths = sorted(folder.glob("*.png"))[:limit]
    if paths:
        return [np.array(Image.open(p).convert("L")) for p in paths], f"ARCADE stenosis test ({folder})"
    images, _ = synthetic.angiograms(range(min(limit, 32)), size=512)
    return list(images), "synthetic angiograms (real data not found)"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / max(float(ref.max()), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300, help="number of real angiograms for (c)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images, source = load_angiograms(args.limit)
    print(f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.devices()}")
    print(f"data: {len(images)} images from {source}")

    # (a) frangi forward, 16×224², default σ = 1, 3, 5, 7, 9, and the parity check.
    crops = np.stack([im[100:324, 150:374] for im in (images * 16)[:16]])
    t0 = time.perf_counter()
    jax.block_until_ready(frangi(crops))
    compile_s = time.perf_counter() - t0
    ours_s = best_of(lambda: frangi(crops), args.repeats)
    t0 = time.perf_counter()
    ref = np.stack([skimage.filters.frangi(c) for c in crops])
    sk_s = time.perf_counter() - t0
    print(f"(a) frangi 16x224^2: jax {16 / ours_s:.1f} img/s ({1e3 * ours_s / 16:.1f} ms/img, first call incl. "
          f"compile {compile_s:.1f} s), skimage {16 / sk_s:.1f} img/s ({1e3 * sk_s / 16:.1f} ms/img): "
          f"ratio {sk_s / ours_s:.1f}x")
    worst = rel_err(np.asarray(frangi(crops)), ref)
    for name, ours_fn, sk_fn, sig in (("frangi", frangi, skimage.filters.frangi, range(1, 10, 2)),
                                      ("sato", sato, skimage.filters.sato, (1, 2, 3, 4))):
        for black in (True, False):
            got = np.asarray(ours_fn(crops, sigmas=sig, black_ridges=black))
            err = max(rel_err(g, sk_fn(c, sigmas=sig, black_ridges=black)) for g, c in zip(got, crops))
            worst = max(worst, err)
            print(f"    parity {name} black_ridges={black}: max rel err {err:.2e}")
    print(f"    parity worst {worst:.2e} ({'OK' if worst <= 1e-5 else 'FAIL'} at 1e-5)")

    # (b) forward + backward relative to forward (loss = mean vesselness, gradient w.r.t. the image).
    x = jnp.asarray(crops, jnp.float32)
    fwd = jax.jit(lambda v: jnp.mean(frangi(v)))
    both = jax.jit(jax.value_and_grad(lambda v: jnp.mean(frangi(v))))
    jax.block_until_ready((fwd(x), both(x)))
    f_s, b_s = best_of(lambda: fwd(x), args.repeats), best_of(lambda: both(x), args.repeats)
    print(f"(b) frangi 16x224^2 forward {1e3 * f_s:.0f} ms, forward+backward {1e3 * b_s:.0f} ms: {b_s / f_s:.2f}x forward")

    # (c) vessel maps on all images vs the recipe per image with skimage.
    jax.block_until_ready(vessel_maps(images[:16]))  # compile outside the timing
    t0 = time.perf_counter()
    ours = vessel_maps(images)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    refs = [published_recipe(im) for im in images]
    sk_s = time.perf_counter() - t0
    n = len(images)
    print(f"(c) vessel_maps {n} images: jax {n / ours_s:.1f} img/s ({1e3 * ours_s / n:.1f} ms/img), skimage recipe "
          f"{n / sk_s:.2f} img/s ({1e3 * sk_s / n:.0f} ms/img): ratio {sk_s / ours_s:.1f}x")
    ious = []
    for got, (_, want) in zip(ours, refs):
        union = np.logical_or(got, want).sum()
        ious.append(1.0 if union == 0 else float(np.logical_and(got, want).sum() / union))
    ious = np.array(ious)
    print(f"    IoU vs recipe: min {ious.min():.4f} (image #{int(ious.argmin())}), mean {ious.mean():.5f}, "
          f"identical maps {int((ious == 1).sum())}/{n}")
    errs = []
    for start in range(0, n, 16):
        got = np.asarray(sato(np.stack(images[start : start + 16]), sigmas=(1, 2, 3, 4)))
        errs += [rel_err(g, r) for g, (r, _) in zip(got, refs[start : start + 16])]
    print(f"    parity sato σ1-4 on all {n}: max rel err {max(errs):.2e}, median {np.median(errs):.2e}")


if __name__ == "__main__":
    main()
