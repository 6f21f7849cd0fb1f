"""Downstream heads on the ViT encoder: a UNETR-style segmentation decoder and a linear classification head.

UNETR-style decoder (METHOD §6, CheXWorld protocol), for patch size p = 2^n, all branches from the LAST block's
tokens (after the final norm, cls dropped), reshaped to z (B, H/p, W/p, D); f = ``features``:
  * branches ``branch_x{2^k}``, k = n-1 .. 1 (×8, ×4, ×2 for p = 16): k × [ConvTranspose 2×2/2 → conv3×3-IN-LReLU]
    with f·2^(n-k) channels, giving skip features at H/2^(n-k);
  * ``stem``: 2 × conv3×3-IN-LReLU on the raw (normalised) image, f channels at H;
  * main path ``up_to_{2^j}``, j = n-1 .. 0: ConvTranspose 2×2/2 of the previous level, concatenated with the
    skip of that resolution (the branch, or the stem at j = 0), 2 × conv3×3-IN-LReLU (f·2^j channels);
  * ``out``: 1×1 conv to ``num_classes`` logits at the input size H×W.
IN = instance norm (UNETR's choice; independent of batch size), LReLU slope 0.01.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vasomim_jax.models.vit import ViTEncoder


class ConvNormAct(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(x)
        x = nn.InstanceNorm(epsilon=1e-5, dtype=self.dtype)(x)
        return nn.leaky_relu(x, 0.01)


class DoubleConv(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return ConvNormAct(self.features, self.dtype)(ConvNormAct(self.features, self.dtype)(x))


def up2(features: int, dtype: Any) -> nn.ConvTranspose:
    return nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype)


class Branch(nn.Module):
    """``num_up`` × [×2 transposed conv → ConvNormAct]: (B, h, w, D) -> (B, h·2^num_up, w·2^num_up, features)."""

    features: int
    num_up: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        for _ in range(self.num_up):
            z = ConvNormAct(self.features, self.dtype)(up2(self.features, self.dtype)(z))
        return z


class UpFuse(nn.Module):
    """×2 transposed conv, concat with the skip of the new resolution, 2 × ConvNormAct."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, skip: jnp.ndarray) -> jnp.ndarray:
        x = jnp.concatenate([up2(self.features, self.dtype)(x), skip.astype(x.dtype)], axis=-1)
        return DoubleConv(self.features, self.dtype)(x)


def num_levels(patch_size: int) -> int:
    """n with patch_size = 2^n (n >= 1); the decoder needs a power-of-two patch."""
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(f"config.model.patch_size={patch_size}: the UNETR decoder needs a power of two >= 2")
    return n


class UNETRDecoder(nn.Module):
    """See the module docstring. ``branch_x{2^k}`` for k = n-1..1, ``stem``, ``up_to_{2^j}`` for j = n-1..0."""

    patch_size: int
    features: int = 16
    num_classes: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, image: jnp.ndarray) -> jnp.ndarray:
        """tokens float (B, 1+L, D) (cls first), image float (B, H, W, C) -> logits float32 (B, H, W, classes)."""
        n, p = num_levels(self.patch_size), self.patch_size
        b, h, w, _ = image.shape
        gh, gw = h // p, w // p
        if tokens.shape[1] != 1 + gh * gw:
            raise ValueError(f"UNETRDecoder: {tokens.shape[1]} tokens do not match a {gh}x{gw} grid + cls")
        z = tokens[:, 1:].reshape(b, gh, gw, tokens.shape[-1]).astype(self.dtype)
        skips = {k: Branch(self.features * 2 ** (n - k), k, self.dtype, name=f"branch_x{2**k}")(z)
                 for k in range(n - 1, 0, -1)}  # branch ×2^k lands at level j = n - k
        skips[n] = DoubleConv(self.features, self.dtype, name="stem")(image.astype(self.dtype))
        x = z
        for j in range(n - 1, -1, -1):  # x at H/2^(j+1) -> H/2^j
            x = UpFuse(self.features * 2**j, self.dtype, name=f"up_to_{2**j}")(x, skips[n - j])
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="out")(x)
        return logits.astype(jnp.float32)


class SegmentationModel(nn.Module):
    """ViT encoder (drop-path) + UNETR decoder: x float (B, H, W, C) normalised -> logits (B, H, W, classes)."""

    backbone: ViTEncoder
    head: UNETRDecoder

    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        return self.head(self.backbone(x, train=train), x)


class ClassificationModel(nn.Module):
    """ViT encoder + linear head on the pooled (cls) feature, as ``MAE.encode``'s pooled output.

    ``linear_probe``: the encoder runs in eval mode under stop_gradient (the optimizer also freezes it)."""

    backbone: ViTEncoder
    num_classes: int
    linear_probe: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """x float (B, H, W, C) normalised -> logits float32 (B, num_classes)."""
        pooled = self.backbone(x, train=train and not self.linear_probe)[:, 0]
        if self.linear_probe:
            pooled = jax.lax.stop_gradient(pooled)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01),
                        name="head")(pooled).astype(jnp.float32)
