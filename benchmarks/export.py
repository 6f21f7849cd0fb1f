"""Export / import speed of a ViT-B/16 (224) and encoder parity against timm, in one run.

    .venv/bin/python benchmarks/export.py [--reps 3]

Ours: `export.to_timm` + safetensors write (the ``vasomim export --format=timm`` work after loading), and the
import `load_pretrained(file.safetensors)` (read + `from_torch` conversion). Reference, measured in the same run on
the same tensors: timm's own ``state_dict()`` written with ``safetensors.torch.save_file``, and read back with
``load_file`` + ``load_state_dict(strict=True)`` — the floor any PyTorch user pays. Prints medians, the ratios,
and the max abs difference of ``encode`` vs timm ``forward_features`` on a batch of 2 (needs torch + timm).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from export_testlib import random_images, random_params, tiny_config  # noqa: E402
from vasomim_jax import export, models  # noqa: E402
from vasomim_jax.pretrained import load_pretrained  # noqa: E402


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import timm

    config = tiny_config("b", 16, 224, 3, depth=12)
    params = random_params(config.model)
    out = Path(tempfile.mkdtemp())
    ours_file, ref_file = out / "ours.safetensors", out / "ref.safetensors"

    def ours_export():
        export.save_state_dict(export.to_timm(params, config.model), ours_file, fmt="timm", model_cfg=config.model)

    t_export = median_time(ours_export, args.reps)
    with torch.device("meta"):
        tm = eval(export.timm_create_model_call(config.model), {"timm": timm})
    tm.load_state_dict(load_file(str(ours_file)), strict=True, assign=True)
    tm.eval()
    t_ref_save = median_time(lambda: save_file(tm.state_dict(), str(ref_file)), args.reps)
    t_import = median_time(lambda: load_pretrained(ours_file), args.reps)
    t_ref_load = median_time(lambda: tm.load_state_dict(load_file(str(ref_file)), strict=True), args.reps)

    images = random_images((2, 224, 224))
    tokens, pooled = load_pretrained(ours_file).encode(images)
    with torch.no_grad():
        x = torch.from_numpy(np.array(models.preprocess(jnp.asarray(images), config.model)).transpose(0, 3, 1, 2))
        err = max(np.abs(tm.forward_features(x).numpy() - tokens).max(), np.abs(tm(x).numpy() - pooled).max())
    size = ours_file.stat().st_size / 2**20
    print(f"ViT-B/16 224 encoder, {size:.0f} MiB float32, median of {args.reps}")
    print(f"export (to_timm + safetensors): {t_export:.2f} s; timm state_dict -> save_file: {t_ref_save:.2f} s; "
          f"ratio {t_export / t_ref_save:.2f}x")
    print(f"import (load_pretrained): {t_import:.2f} s; load_file + load_state_dict: {t_ref_load:.2f} s; "
          f"ratio {t_import / t_ref_load:.2f}x")
    print(f"encode vs timm forward_features / pooled, batch 2: max abs err {err:.2e}")


if __name__ == "__main__":
    main()
