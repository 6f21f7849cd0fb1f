"""Input pipeline throughput: PNG records -> grain (decode, paired RandomResizedCrop 224 + flip, batch) per core.

    .venv/bin/python benchmarks/input_pipeline.py [--threads 1] [--batches 20]

Records are the real 512^2 ARCADE angiograms ($VASOMIM_REAL_DATA/arcade_stenosis_test/images) as PNG bytes, each
with a PNG binary vessel map (a dark-pixel threshold stands in for the offline recipe's map: it decodes like one),
served from memory through the same ``make_dataset`` the trainer uses (array_record reads cost ~0.05 ms a record
and are left out); then the same images resized to 256^2 (an ``r256`` build). Reference measured in the same run:
bare ``cv2.imdecode`` of image + map, the floor any PNG pipeline pays. The closing lines compare the rate with the
ViT-B/16 step's demand from the analytic FLOPs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np

from configs import common
from vasomim_jax import input_pipeline, metrics

REPO = Path(__file__).resolve().parents[1]


def _records(folder: Path, size: int | None) -> list[dict[str, bytes]]:
    out = []
    for path in sorted(folder.glob("*.png")):
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if size is not None:
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        vmap = (img < np.percentile(img, 8)).astype(np.uint8)
        out.append({"image": cv2.imencode(".png", img)[1].tobytes(),
                    "vessel_map": cv2.imencode(".png", vmap)[1].tobytes()})
    return out


def _decode_rate(records) -> float:
    t = time.perf_counter()
    for r in records:
        cv2.imdecode(np.frombuffer(r["image"], np.uint8), cv2.IMREAD_UNCHANGED)
        cv2.imdecode(np.frombuffer(r["vessel_map"], np.uint8), cv2.IMREAD_UNCHANGED)
    return len(records) / (time.perf_counter() - t)


def _pipeline_rate(records, threads: int, batches: int, batch: int = 32) -> float:
    cfg = common.pretrain_config().input
    cfg.num_threads, cfg.prefetch_batches = threads, 2
    it = iter(input_pipeline.make_dataset(records, global_batch=batch, process_index=0, process_count=1, seed=0,
                                          input_cfg=cfg, size=224))
    next(it)  # warm-up: threads started, first batch in flight
    t = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    assert b["image"].shape == (batch, 224, 224)
    return batches * batch / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="grain reader threads (= cores used)")
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    data = Path(os.environ.get("VASOMIM_REAL_DATA", REPO.parent / "shared" / "data"))
    folder = data / "arcade_stenosis_test" / "images"
    if not folder.is_dir():
        raise SystemExit(f"{folder} not found: set VASOMIM_REAL_DATA to the real-data folder")
    print(f"cores used: {args.threads} reader thread(s), {os.cpu_count()} visible")
    rates = {}
    for name, size in (("PNG 512", None), ("r256", 256)):
        records = _records(folder, size)
        dec = _decode_rate(records)
        rate = _pipeline_rate(records, args.threads, args.batches)
        rates[name] = rate / args.threads
        print(f"{name:8s}: {rate / args.threads:7.1f} img/s/core to 224^2 batches | bare decode "
              f"{dec:7.1f} img/s ({1e3 / dec:.2f} ms/image+map) | pipeline/decode = {rate / args.threads / dec:.2f}")
    cfg = common.pretrain_config()
    flops = metrics.mae_train_flops_per_example(cfg.model, cfg.masking.mask_ratio)
    for device, tflops in (("2-core CPU at 250 GFLOP/s", 0.25), ("H200 bf16 at 45% MFU", 989 * 0.45)):
        demand = tflops * 1e12 / flops
        print(f"step demand on {device}: {demand:9.1f} img/s -> {demand / rates['PNG 512']:.2f} cores of "
              f"PNG-512 decoding ({flops / 1e9:.1f} GFLOP per image, ViT-B/16, gamma 0.5)")


if __name__ == "__main__":
    main()
