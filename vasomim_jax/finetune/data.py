"""Fine-tuning data: TFDS splits (segmentation pairs or labelled images) -> augmented uint8 batches, and the
native-resolution evaluation reader.

The training stream is `vasomim_jax.input_pipeline.make_dataset` with this module's per-example function
(`AugmentRecord`): records ``shuffle(seed).repeat()``, global position ``g = epoch * num_records + position``,
process p reads the contiguous block p of every global batch, and the augmentation of an example is drawn from
``np.random.default_rng((seed, epoch, g))`` — batches do not depend on the process count or on where the
iterator was restored.

Augmentation (host, OpenCV): resize to ``size``, then random scale, rotation and horizontal flip in one warp
(reflect borders, bilinear image / nearest mask), then brightness / contrast jitter of the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import grain
import numpy as np
from ml_collections import ConfigDict

from vasomim_jax import input_pipeline
from vasomim_jax.input_pipeline import as_2d_uint8 as decode_grey  # PNG bytes | array -> uint8 (H, W)


def tfds_source(dataset_cfg: ConfigDict, split: str, keys: Sequence[str]):
    """Random-access ``tfds.data_source`` of ``split`` (slices like ``train[:32]`` allowed); ``keys`` must be
    features of the dataset; image features stay PNG bytes (decoded in the grain threads)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(dataset_cfg.name, data_dir=dataset_cfg.data_dir or None)
    except Exception as e:
        raise ValueError(f"config.dataset.name={dataset_cfg.name!r} (data_dir={dataset_cfg.data_dir!r}): "
                         f"{type(e).__name__}: {e}") from None
    base_split = split.split("[")[0]
    if base_split not in builder.info.splits:
        raise ValueError(f"split {split!r}: dataset {dataset_cfg.name} has splits {list(builder.info.splits)} "
                         f"(is it built in {dataset_cfg.data_dir or 'the TFDS default'}?)")
    features = builder.info.features
    missing = [k for k in keys if k not in features]
    if missing:
        raise ValueError(f"config.dataset: features {missing} are not in {dataset_cfg.name} "
                         f"(it has {sorted(features.keys())}); set config.dataset.*_key")
    decoders = {k: tfds.decode.SkipDecoding() for k in keys
                if isinstance(features[k], tfds.features.Image)}
    return builder.as_data_source(split=split, decoders=decoders)


def resize(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """uint8 (H, W) -> (size, size); bilinear (area when shrinking) or nearest."""
    h, w = image.shape
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR)
    return cv2.resize(image, (size, size), interpolation=interp)


def augment(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, *, size: int,
            input_cfg: ConfigDict) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 (H, W) image (and {0,1} mask of the same shape) -> uint8 (size, size) each, same geometry:
    resize to size (area / nearest), then one warp: scale and rotation about the centre, horizontal flip
    (reflect borders; bilinear image, nearest mask); then contrast / brightness jitter of the image."""
    angle = rng.uniform(-input_cfg.rotate_deg, input_cfg.rotate_deg)
    scale = rng.uniform(*input_cfg.scale)
    flip = rng.random() < input_cfg.hflip_prob
    contrast = 1.0 + rng.uniform(-input_cfg.contrast, input_cfg.contrast)
    brightness = 255.0 * rng.uniform(-input_cfg.brightness, input_cfg.brightness)
    c = (size - 1) / 2
    m = np.vstack([cv2.getRotationMatrix2D((c, c), angle, scale), [0.0, 0.0, 1.0]])
    if flip:  # x -> size - 1 - x after the rotation
        m = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    warp = lambda x, interp: cv2.warpAffine(x, m[:2], (size, size), flags=interp,
                                            borderMode=cv2.BORDER_REFLECT_101)
    img = warp(resize(image, size), cv2.INTER_LINEAR).astype(np.float32)
    mean = img.mean()
    img = np.round(np.clip((img - mean) * contrast + mean + brightness, 0, 255)).astype(np.uint8)
    return img, (None if mask is None else warp(resize(mask, size, nearest=True), cv2.INTER_NEAREST))


class AugmentRecord:
    """Fine-tuning example: record -> {"image", "mask"} or {"image", "label"}, augmented at
    ``config.model.img_size`` with the given generator (picklable for grain workers)."""

    def __init__(self, config: ConfigDict):
        self.size, self.input_cfg = config.model.img_size, config.input
        self.task, self.ds = config.task, config.dataset

    def __call__(self, record: dict, rng: np.random.Generator, g: int) -> dict[str, np.ndarray]:
        image = decode_grey(record[self.ds.image_key], self.ds.image_key)
        if self.task == "segmentation":
            mask = decode_grey(record[self.ds.mask_key], self.ds.mask_key)
            if mask.shape != image.shape:
                raise ValueError(f"record at global position {g}: mask {mask.shape} != image {image.shape}")
            image, mask = augment(image, (mask > 0).astype(np.uint8), rng, size=self.size, input_cfg=self.input_cfg)
            return {"image": image, "mask": mask}
        image, _ = augment(image, None, rng, size=self.size, input_cfg=self.input_cfg)
        return {"image": image, "label": np.int32(record[self.ds.label_key])}


def make_train_dataset(source: Sequence, config: ConfigDict, *, process_index: int,
                       process_count: int) -> grain.IterDataset:
    """Infinite iterator of this process's block of every global batch (`input_pipeline.make_dataset` with
    `AugmentRecord`): {"image": uint8 (b, S, S), "mask": uint8 (b, S, S) {0,1} | "label": int32 (b,),
    "index": int32 (b,)}, b = batch_size / process_count."""
    if len(source) == 0:
        raise ValueError(f"config.dataset.split={config.dataset.split!r}: the split has no records")
    return input_pipeline.make_dataset(source, global_batch=config.batch_size, process_index=process_index,
                                       process_count=process_count, seed=config.seed, input_cfg=config.input,
                                       size=config.model.img_size, example_fn=AugmentRecord(config))


def eval_examples(source: Sequence, dataset_cfg: ConfigDict, task: str):
    """Yields every record of an evaluation split in order, decoded at native resolution:
    {"file_name": str, "image": uint8 (H, W), "mask": uint8 {0,1} (H, W), "fov": uint8 {0,1} | None} or
    {"file_name", "image", "label": int}."""
    for i in range(len(source)):
        record = source[i]
        name = record.get("file_name", str(i))
        name = name.decode() if isinstance(name, bytes) else str(name)
        out = {"file_name": name, "image": decode_grey(record[dataset_cfg.image_key], dataset_cfg.image_key)}
        if task == "segmentation":
            out["mask"] = (decode_grey(record[dataset_cfg.mask_key], dataset_cfg.mask_key) > 0).astype(np.uint8)
            fov = dataset_cfg.fov_key
            out["fov"] = (decode_grey(record[fov], fov) > 0).astype(np.uint8) if fov else None
        else:
            out["label"] = int(record[dataset_cfg.label_key])
        yield out
