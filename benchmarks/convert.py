"""Conversion speed: a full `angio_folder` build (maps computed, not supplied) vs the official per-image recipe.

  .venv/bin/python benchmarks/convert.py [--images DIR] [--ref_images 20] [--num_workers 0]

Reference, measured in the same run: the XA-SSL offline step done per image, one after another — read the 8-bit
grey image, skimage Sato (σ 1-4) + border + percentile + region growing (`vessel_map(backend="skimage")`), write
the map PNG — timed on the first `--ref_images` images. Ours: `vasomim convert angio_folder` on all images of
`--images` (default: the 300 real ARCADE test images), i.e. checking every file, decoding and PNG-encoding in
worker processes, maps in batches on the JAX device, array_record shards written by TFDS; end-to-end wall time
including worker start-up and JIT compilation. Prints images/s of both and the ratio (goal >= 8x), by wall
clock and by CPU time (this process, its threads and its reaped worker processes): on a shared, oversubscribed
box the CPU-time ratio is the one that does not depend on the other tenants.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its terminated, reaped child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def official_rates(files: list[Path], out_dir: Path) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of the per-image official recipe."""
    from vasomim_jax import vesselness

    wall, cpu = time.perf_counter(), cpu_seconds()
    for path in files:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        vmap = vesselness.vessel_map(img, backend="skimage")
        cv2.imwrite(str(out_dir / path.name), vmap * 255)
    return len(files) / (time.perf_counter() - wall), len(files) / (cpu_seconds() - cpu)


def main() -> None:
    default = Path(os.environ.get("VASOMIM_REAL_DATA", REPO.parent / "shared" / "data")) / "arcade_stenosis_test"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=default / "images")
    parser.add_argument("--ref_images", type=int, default=20)
    parser.add_argument("--num_workers", type=int, default=0)
    args = parser.parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"--images {args.images}: no such folder (set VASOMIM_REAL_DATA or pass --images)")
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() == ".png")

    from vasomim_jax import convert

    with tempfile.TemporaryDirectory() as tmp:
        ref_wall, ref_cpu = official_rates(files[: args.ref_images], Path(tmp))
        cpu = cpu_seconds()
        summary = convert.run("angio_folder", manual_dir=str(args.images), data_dir=str(Path(tmp) / "data"),
                              num_workers=args.num_workers)
        ours_cpu = len(files) / (cpu_seconds() - cpu)
    print(summary.text())
    print(f"official per-image recipe: {ref_wall:.2f} images/s wall, {ref_cpu:.2f} images/CPU-s "
          f"({args.ref_images} images)")
    print(f"vasomim convert angio_folder: {summary.images_per_s:.2f} images/s wall, {ours_cpu:.2f} images/CPU-s "
          f"({len(files)} images, {summary.wall_s:.1f} s end to end, cpu_count={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f})")
    print(f"ratio: {summary.images_per_s / ref_wall:.1f}x wall, {ours_cpu / ref_cpu:.1f}x CPU time (goal >= 8x)")


if __name__ == "__main__":
    main()
