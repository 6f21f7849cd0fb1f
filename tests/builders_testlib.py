"""Helpers shared by the builder tests: real-data location, miniature corpora, reading shards back."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("VASOMIM_REAL_DATA", REPO.parent / "shared" / "data"))


def real(sub: str) -> Path:
    path = REAL / sub
    if not path.is_dir():
        pytest.skip(f"real angiograms not found at {path} (set VASOMIM_REAL_DATA to the shared data folder)")
    return path


def write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":  # OpenCV's GIF writer dithers; PIL writes the grey levels as they are
        from PIL import Image

        Image.fromarray(img).save(path)
    else:
        assert cv2.imwrite(str(path), img)
    return path


def synthetic(path: Path, seed: int, size: int = 64) -> np.ndarray:
    from vasomim_jax import synthetic as syn

    img = syn.angiogram(seed, max(size, syn.MIN_SIZE))[0][:size, :size]  # crop below the generator's minimum
    write(path, img)
    return img


def read_split(name: str, data_dir: Path, split: str = "train") -> dict[str, dict]:
    """All records of a split by file_name (str), decoded with tfds.data_source (no TensorFlow)."""
    import tensorflow_datasets as tfds

    import tfds_builders  # noqa: F401

    src = tfds.data_source(name, split=split, data_dir=str(data_dir))
    out = {}
    for i in range(len(src)):
        rec = dict(src[i])
        for k, v in rec.items():
            if isinstance(v, bytes):
                rec[k] = v.decode()
        out[rec["file_name"]] = rec
    return out


def shard_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in Path(data_dir).rglob("*array_record*"))
