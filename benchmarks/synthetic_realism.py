"""Realism of the synthetic angiograms against the 40 CIMAT images, and the generator's speed.

Prints, per metric of `vasomim_jax.synthetic_metrics`, the real mean +- std, the synthetic mean +- std and the band
the tests require of the synthetic mean; then images/s at 256^2 on one core (OpenCV limited to one thread; the
rest is single-threaded numpy/scipy), by wall clock and by process CPU time, against a reference measured in the
same run: one `skimage.filters.frangi` call on a 256^2 image (a fixed amount of work on the same machine).

    .venv/bin/python benchmarks/synthetic_realism.py [--n 40] [--size 300] [--grid /tmp/synth_grid.png]
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
from skimage.filters import frangi

from vasomim_jax import synthetic, synthetic_metrics as sm


def _table(real: dict[str, np.ndarray] | None, synth: dict[str, np.ndarray]) -> str:
    lines = ["| metric | real (CIMAT) mean ± std | synthetic mean ± std | band for the synthetic mean |",
             "|---|---|---|---|"]
    for k, v in synth.items():
        r = f"{np.nanmean(real[k]):.4g} ± {np.nanstd(real[k]):.3g}" if real is not None else "n/a"
        lo, hi = sm.BANDS[k]
        lines.append(f"| {k} | {r} | {np.nanmean(v):.4g} ± {np.nanstd(v):.3g} | [{lo:g}, {hi:g}] |")
    return "\n".join(lines)


def _speed(n: int, size: int = 256) -> dict[str, float]:
    """Synthetic images/s and frangi calls/s at size^2, one thread, interleaved so both see the same load.

    Both wall-clock and process-CPU rates are returned: on a shared box the CPU rate is the one-core cost.
    """
    cv2.setNumThreads(1)
    ref = synthetic.angiogram(0, size)[0]
    synthetic.angiogram(0, size)  # warm up
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    spent = {f"{what}_{c}": 0.0 for what in ("gen", "ref") for c in clocks}
    n_ref = 0
    for s in range(n):
        t0 = {c: f() for c, f in clocks.items()}
        synthetic.angiogram(s, size)
        t1 = {c: f() for c, f in clocks.items()}
        for c in clocks:
            spent[f"gen_{c}"] += t1[c] - t0[c]
        if s % 10 == 0:
            frangi(ref, sigmas=sm.FRANGI_SIGMAS, black_ridges=True)
            n_ref += 1
            for c, f in clocks.items():
                spent[f"ref_{c}"] += f() - t1[c]
    return {k: (n if k.startswith("gen") else n_ref) / v for k, v in spent.items()}


def _grid(path: str, images: np.ndarray, masks: np.ndarray) -> None:
    """2 rows of 4: each tile is the image above the image with a red mask overlay."""
    tiles = []
    for im, m in zip(images[:8], masks[:8]):
        rgb = cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
        ov = rgb.copy()
        ov[m > 0] = (0.5 * ov[m > 0] + np.array([0, 0, 127])).astype(np.uint8)
        tiles.append(np.concatenate([rgb, ov], 0))
    cv2.imwrite(path, np.concatenate([np.concatenate(tiles[:4], 1), np.concatenate(tiles[4:8], 1)], 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40, help="synthetic images to measure")
    ap.add_argument("--size", type=int, default=300, help="side of the synthetic images measured")
    ap.add_argument("--seed0", type=int, default=1000, help="first seed of the measured synthetic images")
    ap.add_argument("--speed-n", type=int, default=200, help="images timed for images/s")
    ap.add_argument("--grid", default="/tmp/synth_grid.png", help="PNG of 8 synthetic images with mask overlays")
    args = ap.parse_args()

    try:
        real = sm.measure(*sm.load_cimat())
    except FileNotFoundError as e:
        print(f"real data unavailable ({e}); synthetic column only")
        real = None
    images, masks = synthetic.angiograms(range(args.seed0, args.seed0 + args.n), args.size)
    synth = sm.measure(images, masks)
    _grid(args.grid, images, masks)
    print(f"realism: {args.n} synthetic images at {args.size}px (seeds {args.seed0}..) vs 40 CIMAT 300px images")
    print(_table(real, synth))
    rate = _speed(args.speed_n)
    for c in ("cpu", "wall"):
        print(f"speed at 256^2, one thread, {c} clock: {rate[f'gen_{c}']:.1f} synthetic images/s; "
              f"reference frangi(256^2, sigmas 1-4) {rate[f'ref_{c}']:.2f} calls/s; "
              f"ratio {rate[f'gen_{c}'] / rate[f'ref_{c}']:.1f} images per frangi call")


if __name__ == "__main__":
    main()
