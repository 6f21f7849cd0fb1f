"""TFDS array_record shards -> grain -> paired RandomResizedCrop / flip -> uint8 host batches -> global arrays.

Record order: ``grain.MapDataset.source(src).shuffle(seed).repeat()`` (a fresh permutation every epoch), so
global position ``g = epoch * num_records + position`` names one example of the stream. Global batch ``s`` is
positions ``[s*B, (s+1)*B)``; process ``p`` of ``P`` reads the contiguous block ``[s*B + p*B/P, s*B + (p+1)*B/P)``
of it. The crop and flip of an example are drawn from ``np.random.default_rng((seed, epoch, g))`` and the device
keys its mask by ``g`` (``batch["index"]``), so the global batch (order, crops, masks) does not depend on the
number of processes or on how far the iterator was restored. Hence the iterator's whole state is ``s``, the next
global batch: a checkpoint written by K processes restores onto P (`GlobalBatchIterator`).

Augmentation is torchvision's ``RandomResizedCrop(scale, ratio)`` (same parameter sampling, 10 tries then the
centre-crop fallback) on PIL images: crop, then bicubic resize (PIL antialiases when shrinking) for the image and
nearest for the vessel map, then the same horizontal flip for both.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import grain
import jax
import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from vasomim_jax import config as config_lib

IMAGE_KEY = "image"
MAP_KEY = "vessel_map"


def crop_params(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) exactly as torchvision ``RandomResizedCrop.get_params`` (with a numpy generator)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def as_2d_uint8(value: Any, name: str) -> np.ndarray:
    """Encoded PNG bytes or a decoded array (H, W) / (H, W, 1) -> uint8 (H, W); errors name the feature."""
    if isinstance(value, (bytes, np.bytes_)):
        arr = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ValueError(f"feature {name!r}: bytes that OpenCV cannot decode")
    else:
        arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise ValueError(f"feature {name!r}: expected a uint8 grey image, got {arr.dtype} {arr.shape}")
    return arr




def augment(image: np.ndarray, vessel_map: np.ndarray, rng: np.random.Generator, *, size: int,
            scale: Sequence[float], ratio: Sequence[float], hflip_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Same RandomResizedCrop + flip for image (bicubic) and map (nearest): uint8 (H, W) x2 -> uint8 (size, size)."""
    if image.shape != vessel_map.shape:
        raise ValueError(f"image {image.shape} and vessel map {vessel_map.shape} differ in shape")
    top, left, h, w = crop_params(rng, *image.shape, scale, ratio)
    box = (slice(top, top + h), slice(left, left + w))
    img = np.asarray(Image.fromarray(image[box]).resize((size, size), Image.BICUBIC))
    vmap = np.asarray(Image.fromarray(vessel_map[box]).resize((size, size), Image.NEAREST))
    if rng.random() < hflip_prob:
        img, vmap = img[:, ::-1], vmap[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(vmap)


class PairedCropFlip:
    """The pre-training example: record {"image", "vessel_map"} -> the same crop/flip of both at ``size``
    (picklable for grain workers)."""

    def __init__(self, input_cfg: ConfigDict, size: int):
        self.size = size
        self.scale, self.ratio = tuple(input_cfg.crop_scale), tuple(input_cfg.crop_ratio)
        self.hflip_prob = float(input_cfg.hflip_prob)

    def __call__(self, record: dict, rng: np.random.Generator, g: int) -> dict[str, np.ndarray]:
        image, vmap = augment(as_2d_uint8(record[IMAGE_KEY], IMAGE_KEY), as_2d_uint8(record[MAP_KEY], MAP_KEY),
                              rng, size=self.size, scale=self.scale, ratio=self.ratio, hflip_prob=self.hflip_prob)
        if vmap.max(initial=0) > 1:
            raise ValueError(f"record at global position {g}: vessel map holds values > 1 (expected {{0, 1}})")
        return {"image": image, "vessel_map": vmap}


ExampleFn = Callable[[dict, np.random.Generator, int], dict]


class _ReadAt(grain.transforms.Map):
    """Local position k -> global position g -> record -> ``example_fn(record, rng, g)`` + {"index": g}, with
    ``rng`` keyed by (seed, epoch, g) (picklable for grain workers)."""

    def __init__(self, records: grain.MapDataset, num_records: int, *, global_batch: int, block_start: int,
                 local_batch: int, seed: int, example_fn: ExampleFn):
        self.records, self.num_records = records, num_records
        self.global_batch, self.block_start, self.local_batch = global_batch, block_start, local_batch
        self.seed, self.example_fn = seed, example_fn

    def map(self, k: int) -> dict[str, np.ndarray]:
        step, j = divmod(int(k), self.local_batch)
        g = step * self.global_batch + self.block_start + j
        rng = np.random.default_rng((self.seed, g // self.num_records, g))
        return {**self.example_fn(self.records[g], rng, g), "index": np.int32(g)}


def make_dataset(source: Sequence, *, global_batch: int, process_index: int, process_count: int, seed: int,
                 input_cfg: ConfigDict, size: int, example_fn: ExampleFn | None = None) -> grain.IterDataset:
    """Infinite iterator dataset of this process's block of every global batch.

    ``source``: random-access sequence of records. ``example_fn(record, rng, g) -> dict of arrays`` makes one
    example (default `PairedCropFlip`: records with ``image`` and ``vessel_map``, uint8 arrays or PNG bytes).
    ``input_cfg`` also sets the reader threads / prefetch / worker processes. Yields ``example_fn``'s keys
    batched, e.g. {"image": uint8 (b, size, size), "vessel_map": uint8 (b, size, size)}, plus
    "index": int32 (b,) (global positions), with ``b = global_batch // process_count``. Its iterators are
    `GlobalBatchIterator`s: their checkpoint state is the index of the next global batch.
    """
    if global_batch % process_count:
        raise ValueError(f"config.batch_size={global_batch} does not split over {process_count} processes")
    if len(source) == 0:
        raise ValueError("the dataset split has no records")
    local = global_batch // process_count
    records = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    read = _ReadAt(records, len(source), global_batch=global_batch, block_start=process_index * local,
                   local_batch=local, seed=seed, example_fn=example_fn or PairedCropFlip(input_cfg, size))
    batches = grain.MapDataset.range(sys.maxsize // global_batch * local).map(read).batch(local, drop_remainder=True)
    read_options = grain.ReadOptions(num_threads=max(1, int(input_cfg.num_threads)),
                                     prefetch_buffer_size=max(local * int(input_cfg.prefetch_batches), 1))
    workers = grain.MultiprocessingOptions(num_workers=int(input_cfg.num_workers),
                                           per_worker_buffer_size=int(input_cfg.worker_buffer_size))

    def pipeline_from(step: int) -> grain.IterDataset:
        it = batches[step:].to_iter_dataset(read_options)
        return it.mp_prefetch(workers) if workers.num_workers > 0 else it

    return _GlobalBatches(pipeline_from)


class _GlobalBatches(grain.IterDataset):
    """`make_dataset`'s result: each iterator starts at global batch 0."""

    def __init__(self, pipeline_from: Callable[[int], grain.IterDataset]):
        super().__init__()
        self._pipeline_from = pipeline_from

    def __iter__(self) -> GlobalBatchIterator:
        return GlobalBatchIterator(self._pipeline_from)


class GlobalBatchIterator(grain.DatasetIterator):
    """This process's block of global batches s, s+1, ... Its state is only ``{"next_global_batch": s}``, the same
    on every process: grain's own state (per worker of ``mp_prefetch``, per process) is never saved, and
    ``set_state`` / `seek` rebuild the grain pipeline at batch ``s``, so a checkpoint restores onto any process
    count or worker count."""

    STATE_KEY = "next_global_batch"

    def __init__(self, pipeline_from: Callable[[int], grain.IterDataset]):
        super().__init__()
        self._pipeline_from, self._next, self._pipeline = pipeline_from, 0, None

    def _iterator(self) -> grain.DatasetIterator:
        if self._pipeline is None:  # built lazily: a resume repositions before any record is read
            self._pipeline = iter(self._pipeline_from(self._next))
        return self._pipeline

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator())
        self._next += 1
        return batch

    def seek(self, step: int) -> None:
        """Next yields global batch ``step`` (the batch of train step ``step + 1``)."""
        if self._pipeline is not None:
            self._pipeline.close()  # stops mp_prefetch workers / reader threads of the old position
        self._next, self._pipeline = int(step), None

    def get_state(self) -> dict[str, int]:
        return {self.STATE_KEY: self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        if self.STATE_KEY not in state:
            raise ValueError(f"data iterator state {state}: no {self.STATE_KEY!r} (not written by this input "
                             f"pipeline)")
        self.seek(state[self.STATE_KEY])

    def start_prefetch(self) -> None:
        self._iterator().start_prefetch()

    def close(self) -> None:
        self.seek(self._next)
        super().close()


class ConcatSource(Sequence):
    """Random-access records of several sources one after another (picklable for grain workers when they are)."""

    def __init__(self, sources: Sequence[Sequence]):
        self.sources = list(sources)
        self.starts = np.cumsum([0] + [len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        k = bisect.bisect_right(self.starts, i) - 1
        return self.sources[k][i - self.starts[k]]


def tfds_source(dataset_cfg: ConfigDict) -> Sequence:
    """``tfds.data_source`` of ``config.dataset`` (array_record, no TensorFlow); images left as PNG bytes so the
    grain threads decode them with OpenCV (which releases the GIL). A comma-separated ``name`` reads the split of
    every named build as one source, in the order given (`make_dataset` shuffles the whole)."""
    import tensorflow_datasets as tfds

    names = config_lib.dataset_names(dataset_cfg.name)
    sources = []
    for name in names:
        where = f"config.dataset.name={dataset_cfg.name!r}" + (f" (build {name!r})" if len(names) > 1 else "")
        try:
            builder = tfds.builder(name, data_dir=dataset_cfg.data_dir or None)
        except Exception as e:
            raise ValueError(f"{where} (data_dir={dataset_cfg.data_dir!r}): {type(e).__name__}: {e}") from None
        if dataset_cfg.split not in builder.info.splits:
            raise ValueError(f"config.dataset.split={dataset_cfg.split!r}: dataset {name} has splits "
                             f"{list(builder.info.splits)} (is it built in "
                             f"{dataset_cfg.data_dir or 'the TFDS default'}?)")
        features = builder.info.features
        missing = {IMAGE_KEY, MAP_KEY} - set(features.keys())
        if missing:
            raise ValueError(f"{where}: features {sorted(missing)} missing (has {sorted(features.keys())})")
        decoders = {IMAGE_KEY: tfds.decode.SkipDecoding(), MAP_KEY: tfds.decode.SkipDecoding()}
        sources.append(builder.as_data_source(split=dataset_cfg.split, decoders=decoders))
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding,
              global_batch: int) -> dict[str, jax.Array]:
    """This process's block -> global arrays sharded over the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
            for k, v in batch.items()}
