"""Masked autoencoder (facebookresearch/mae structure) with a ViT encoder on visible tokens only.

Param tree (inside {"params": ...}): patch_embed/{kernel (p,p,C,D), bias}, cls_token (1,1,D),
encoder/{blocks (scanned, leading depth axis), norm}, decoder_embed, mask_token (1,1,Dd),
decoder/{blocks, norm}, decoder_pred. Position embeddings are fixed sin-cos constants, not params.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vasomim_jax.models.pos_embed import sincos_2d
from vasomim_jax.models.vit import REMAT_POLICIES, Transformer, dense

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Official MAE: xavier_uniform_ on the conv weight viewed as (D, p*p*C), i.e. fan_in = p*p*C, fan_out = D.
patch_embed_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
token_init = nn.initializers.normal(stddev=0.02)


class MAE(nn.Module):
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat_policy: str = "none"
    scan_unroll: int = 1

    def setup(self):
        p, d, dd = self.patch_size, self.embed_dim, self.decoder_embed_dim
        common = dict(mlp_ratio=self.mlp_ratio, dtype=self.dtype, remat_policy=self.remat_policy,
                      scan_unroll=self.scan_unroll)
        self.patch_embed = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                                   param_dtype=jnp.float32, kernel_init=patch_embed_init,
                                   bias_init=nn.initializers.zeros)
        self.cls_token = self.param("cls_token", token_init, (1, 1, d), jnp.float32)
        self.encoder = Transformer(d, self.depth, self.num_heads, **common)
        self.decoder_embed = dense(dd, self.dtype, "decoder_embed")
        self.mask_token = self.param("mask_token", token_init, (1, 1, dd), jnp.float32)
        self.decoder = Transformer(dd, self.decoder_depth, self.decoder_num_heads, **common)
        self.decoder_pred = dense(p * p * self.in_chans, self.dtype, "decoder_pred")

    def _grid(self, x: jnp.ndarray) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ValueError(f"MAE: x must be (B, H, W, in_chans={self.in_chans}), got shape {x.shape}")
        h, w, p = x.shape[1], x.shape[2], self.patch_size
        if h % p or w % p:
            raise ValueError(f"MAE: image size {h}x{w} is not divisible by patch_size={p}")
        return h // p, w // p

    def _embed(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(B, H, W, C) -> patch tokens + pos (B, L, D) float32, and the encoder pos table (1+L, D)."""
        gh, gw = self._grid(x)
        pos = jnp.asarray(sincos_2d(self.embed_dim, (gh, gw), cls_token=True))
        tokens = self.patch_embed(x).reshape(x.shape[0], gh * gw, self.embed_dim).astype(jnp.float32)
        return tokens + pos[1:], pos

    def _with_cls(self, tokens: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
        cls = jnp.broadcast_to(self.cls_token + pos[:1], (tokens.shape[0], 1, self.embed_dim))
        return jnp.concatenate([cls, tokens], axis=1)

    def encode(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Encoder on all patches, no masking (timm ``forward_features``).

        x: float (B, H, W, C) normalised. Returns tokens float32 (B, 1+L, D) after the final norm and the pooled
        feature float32 (B, D) = tokens[:, 0] (cls token).
        """
        tokens, pos = self._embed(x)
        tokens = self.encoder(self._with_cls(tokens, pos)).astype(jnp.float32)
        return tokens, tokens[:, 0]

    def __call__(self, x: jnp.ndarray, ids_keep: jnp.ndarray, ids_restore: jnp.ndarray) -> jnp.ndarray:
        """x float (B, H, W, C) normalised; ids_keep int32 (B, n_keep); ids_restore int32 (B, L).

        Returns the prediction float32 (B, L, p*p*C) for every patch in the original patch order.
        """
        tokens, pos = self._embed(x)
        b, num = tokens.shape[:2]
        if ids_restore.shape != (b, num) or ids_keep.ndim != 2 or ids_keep.shape[0] != b:
            raise ValueError(f"MAE: ids_keep {ids_keep.shape} / ids_restore {ids_restore.shape} do not match "
                             f"(B, n_keep) / (B, L) = ({b}, n_keep) / ({b}, {num})")
        visible = jnp.take_along_axis(tokens, ids_keep[..., None], axis=1)
        latent = self.encoder(self._with_cls(visible, pos))

        y = self.decoder_embed(latent).astype(jnp.float32)
        n_mask = num - ids_keep.shape[1]
        y_ = jnp.concatenate([y[:, 1:], jnp.broadcast_to(self.mask_token, (b, n_mask, y.shape[-1]))], axis=1)
        y_ = jnp.take_along_axis(y_, ids_restore[..., None], axis=1)  # unshuffle to the patch order
        gh, gw = self._grid(x)
        y = jnp.concatenate([y[:, :1], y_], axis=1) + sincos_2d(self.decoder_embed_dim, (gh, gw), cls_token=True)
        y = self.decoder_pred(self.decoder(y))
        return y[:, 1:].astype(jnp.float32)


def build_mae(model_cfg) -> MAE:
    """MAE from a ``config.model`` ConfigDict (configs/common.py `model_config`); checks the fields first."""
    c = model_cfg
    if c.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={c.dtype!r}: expected one of {sorted(DTYPES)}")
    if c.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat_policy={c.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
    for dim, heads, name in ((c.embed_dim, c.num_heads, ""), (c.decoder_embed_dim, c.decoder_num_heads, "decoder_")):
        if dim % heads:
            raise ValueError(f"config.model.{name}embed_dim={dim} is not divisible by {name}num_heads={heads}")
        if dim % 4:
            raise ValueError(f"config.model.{name}embed_dim={dim} must be a multiple of 4 (2-D sin-cos)")
    for field in ("patch_size", "in_chans", "depth", "decoder_depth"):
        if c[field] < 1:
            raise ValueError(f"config.model.{field}={c[field]} must be >= 1")
    return MAE(patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim, depth=c.depth,
               num_heads=c.num_heads, decoder_embed_dim=c.decoder_embed_dim, decoder_depth=c.decoder_depth,
               decoder_num_heads=c.decoder_num_heads, mlp_ratio=c.mlp_ratio, dtype=DTYPES[c.dtype],
               remat_policy=c.remat_policy)


def init_params(model: MAE, rng: jax.Array, batch_shape: tuple[int, int, int, int]) -> dict:
    """All parameters (the inner ``params`` dict) for inputs of shape (B, H, W, C); wrap in jax.jit / eval_shape
    as needed. Param shapes do not depend on B, H, W, so a (1, p, p, C) shape suffices."""
    b, h, w, _ = batch_shape
    num = (h // model.patch_size) * (w // model.patch_size)
    ids = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), (b, num))
    return model.init(rng, jnp.zeros(batch_shape, jnp.float32), ids, ids)["params"]
