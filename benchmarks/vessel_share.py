"""vessel_share vs vessel_share_random on the 300 real ARCADE images (γ = 0.5, 224 px, β = 0 and β = 0.5).

Vessel maps by the official recipe (`vesselness.vessel_maps`: Sato σ 1-4, border 20, percentile 92, region
growing) on the 512² originals; views at 224 px: the whole image resized (bicubic image, nearest map) and the
training augmentation (`input_pipeline.augment`: RandomResizedCrop 0.2-1 + flip). A patch "contains vessel" when
its vessel-pixel fraction exceeds the threshold; shares pooled over all images and mask draws.

    .venv/bin/python benchmarks/vessel_share.py [--data DIR] [--crops 4] [--draws 8]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vasomim_jax import input_pipeline, losses, masking, vesselness

SIZE, PATCH, RATIO = 224, 16, 0.5


def load_images(data_dir: pathlib.Path) -> list[np.ndarray]:
    folder = data_dir / "arcade_stenosis_test" / "images"
    files = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))
    if not files:
        raise SystemExit(f"no ARCADE images under {folder} (set --data or VASOMIM_REAL_DATA)")
    return [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files]


def views(images, maps, crops: int, seed: int = 0):
    """{"resized": (N, 224, 224) x2, "crops": (N·crops, 224, 224) x2} uint8 image / map stacks."""
    resized = ([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BICUBIC)) for im in images],
               [np.asarray(Image.fromarray(m).resize((SIZE, SIZE), Image.NEAREST)) for m in maps])
    rng = np.random.default_rng(seed)
    pairs = [input_pipeline.augment(im, m, rng, size=SIZE, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip_prob=0.5)
             for im, m in zip(images, maps) for _ in range(crops)]
    return {"resized": tuple(map(np.stack, resized)),
            "random crops": (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))}


def shares(vmaps: np.ndarray, beta: float, draws: int, thresholds, seed: int = 0) -> dict[float, tuple[float, float]]:
    """{threshold: (vessel_share, vessel_share_random)} pooled over `draws` masks per view."""
    scores = masking.patch_scores(jnp.asarray(vmaps), PATCH)
    sample = jax.jit(lambda k: masking.guided_mask(k, scores, mask_ratio=RATIO, beta=beta).mask)
    out = {}
    masks = [sample(jax.random.split(jax.random.fold_in(jax.random.key(seed), d), len(vmaps))) for d in range(draws)]
    for t in thresholds:
        per_draw = [losses.vessel_shares(jnp.asarray(vmaps), m, PATCH, t) for m in masks]
        out[t] = (float(np.mean([s for s, _ in per_draw])), float(per_draw[0][1]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("VASOMIM_REAL_DATA", str(pathlib.Path(__file__).resolve().parents[2] / "shared/data"))
    parser.add_argument("--data", default=default)
    parser.add_argument("--crops", type=int, default=4)
    parser.add_argument("--draws", type=int, default=8)
    args = parser.parse_args()
    images = load_images(pathlib.Path(args.data))
    t0 = time.perf_counter()
    maps = vesselness.vessel_maps(images, batch_size=16)
    print(f"{len(images)} ARCADE images, official-recipe maps in {time.perf_counter() - t0:.1f} s; "
          f"γ = {RATIO}, {SIZE} px, patch {PATCH}, {args.draws} mask draws per view")
    thresholds = (0.0, 0.05)
    print("| views | β | share threshold | vessel_share | vessel_share_random |")
    print("|---|---|---|---|---|")
    for name, (_, vmaps) in views(images, maps, args.crops).items():
        for beta in (0.0, 0.5):
            for t, (share, random) in shares(vmaps, beta, args.draws, thresholds).items():
                label = "any vessel pixel" if t == 0 else f"> {t:.0%} vessel pixels"
                print(f"| {name} ({len(vmaps)}) | {beta} | {label} | {share:.1%} | {random:.1%} |")


if __name__ == "__main__":
    main()
