"""uint8 images -> normalised model input, and back to the grey 0..255 intensity scale."""

from __future__ import annotations

import jax.numpy as jnp

# The official MAE / XA-SSL normalisation (grey angiograms turned into RGB, ImageNet statistics); for in_chans=1
# the averages of the three channels' statistics. Canonical here: configs and the weight loader import them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.449,)
GREY_STD = (0.226,)


def _stats(model_cfg, c: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    mean, std = tuple(model_cfg.mean), tuple(model_cfg.std)
    if len(mean) != c or len(std) != c:
        raise ValueError(
            f"config.model.mean={mean} / std={std} must each have in_chans={c} entries")
    return jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)


def preprocess(images, model_cfg) -> jnp.ndarray:
    """uint8 (B, H, W) or (B, H, W, C) -> float32 (B, H, W, in_chans): grey replicated, /255, (x - mean) / std."""
    if images.dtype != jnp.uint8:
        raise TypeError(f"preprocess: images must be uint8, got {images.dtype}")
    c = model_cfg.in_chans
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, c):
        raise ValueError(
            f"preprocess: images of shape {images.shape} are neither (B, H, W) nor (B, H, W, 1|{c}) "
            f"for config.model.in_chans={c}")
    mean, std = _stats(model_cfg, c)
    x = images.astype(jnp.float32) / 255.0
    x = jnp.broadcast_to(x, x.shape[:-1] + (c,))
    return (x - mean) / std


def to_grey_intensity(x_norm: jnp.ndarray, model_cfg) -> jnp.ndarray:
    """Inverse of `preprocess`: float (B, H, W, C) normalised -> float32 (B, H, W), channel mean on 0..255."""
    c = model_cfg.in_chans
    if x_norm.ndim != 4 or x_norm.shape[-1] != c:
        raise ValueError(f"to_grey_intensity: x_norm must be (B, H, W, {c}), got shape {x_norm.shape}")
    mean, std = _stats(model_cfg, c)
    return jnp.mean(x_norm.astype(jnp.float32) * std + mean, axis=-1) * 255.0
