"""Patch (un)folding in the official MAE order: patches row-major; within a patch (p_row, p_col, channel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(x: jnp.ndarray, p: int) -> jnp.ndarray:
    """(B, H, W, C) -> (B, L, p*p*C) with L = (H/p) * (W/p)."""
    if x.ndim != 4:
        raise ValueError(f"patchify: x must be (B, H, W, C), got shape {x.shape}")
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"patchify: image size {h}x{w} is not divisible by patch_size={p}")
    gh, gw = h // p, w // p
    x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: jnp.ndarray, p: int, h: int, w: int, c: int) -> jnp.ndarray:
    """(B, L, p*p*C) -> (B, h*p, w*p, C); ``h``, ``w`` are the patch-grid sizes (as in MAE), not pixels."""
    b, num, dim = patches.shape
    if num != h * w or dim != p * p * c:
        raise ValueError(
            f"unpatchify: patches {patches.shape} do not fit a {h}x{w} patch grid (h, w count patches, not "
            f"pixels) with patch_size={p}, channels={c}: need L={h * w}, last dim={p * p * c}")
    x = patches.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def gather_patches(patches: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
    """(B, L, F) rows picked per example by ids int (B, n) -> (B, n, F), any dtype (uint8 patches stay bytes).

    A row gather per example: XLA CPU runs it faster than take_along_axis's element-wise gather."""
    return jax.vmap(lambda rows, i: jnp.take(rows, i, axis=0))(patches, ids)
