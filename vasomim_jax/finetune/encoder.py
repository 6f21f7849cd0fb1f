"""The pre-training ViT encoder for fine-tuning, with stochastic depth (drop-path).

`vasomim_jax.models` has no drop-path, so this module rebuilds the encoder from the models' own pieces
(`Attention`, `Mlp`, `layer_norm`, the patch-embed / token initialisers, the MAE sin-cos table) with a drop-path
residual. The parameter tree is exactly the MAE's encoder subset, so pre-trained weights drop in unchanged:
``patch_embed/{kernel,bias}``, ``cls_token``, ``encoder/blocks/...`` (scanned, leading depth axis),
``encoder/norm``. With ``train=False`` (or rate 0) the output equals ``MAE.encode``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vasomim_jax.models.mae import DTYPES, patch_embed_init, token_init
from vasomim_jax.models.pos_embed import sincos_2d
from vasomim_jax.models.vit import REMAT_POLICIES, Attention, Mlp, layer_norm

ENCODER_KEYS = ("patch_embed", "cls_token", "encoder")  # the MAE params this encoder uses


def drop_path(x: jnp.ndarray, rate: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
    """Zeroes whole examples of a residual branch with probability ``rate`` and rescales the rest by 1/(1-rate)
    (timm ``drop_path``). x (B, ...); rate a float scalar (may be traced: it is scanned over depth)."""
    keep = 1.0 - rate
    mask = jax.random.uniform(rng, (x.shape[0],) + (1,) * (x.ndim - 1)) < keep
    return jnp.where(mask, x / jnp.maximum(keep, 1e-12).astype(x.dtype), jnp.zeros_like(x))


class DropPathBlock(nn.Module):
    """models.vit.Block with drop-path on both residual branches; same submodule names (norm1/attn/norm2/mlp).

    ``(x (B, N, D), rate float32 scalar) -> (x, None)`` so that it is a `nn.scan` body scanning the rates."""

    dim: int
    num_heads: int
    mlp_hidden: int
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, rate: jnp.ndarray) -> tuple[jnp.ndarray, None]:
        def residual(y):
            y = y.astype(x.dtype)
            return y if self.deterministic else drop_path(y, rate, self.make_rng("dropout"))

        x = x + residual(Attention(self.dim, self.num_heads, self.dtype, name="attn")(
            layer_norm(self.dtype, "norm1")(x)))
        x = x + residual(Mlp(self.mlp_hidden, self.dim, self.dtype, name="mlp")(
            layer_norm(self.dtype, "norm2")(x)))
        return x, None


class DropPathTransformer(nn.Module):
    """``depth`` scanned `DropPathBlock`s + final LayerNorm; drop rate rises linearly 0 -> ``drop_path_rate``
    over depth (timm)."""

    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat_policy: str = "none"
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """(B, N, D) float32 -> (B, N, D) after the final norm."""
        block = DropPathBlock
        if self.remat_policy != "none":
            block = nn.remat(DropPathBlock, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=0, length=self.depth)
        rates = jnp.asarray(np.linspace(0.0, self.drop_path_rate, self.depth), jnp.float32)
        deterministic = not train or self.drop_path_rate == 0.0
        x, _ = stack(self.dim, self.num_heads, int(self.dim * self.mlp_ratio), self.dtype, deterministic,
                     name="blocks")(x, rates)
        return layer_norm(self.dtype, "norm")(x)


class ViTEncoder(nn.Module):
    """Patch embedding + cls token + fixed sin-cos positions + `DropPathTransformer` (MAE encoder, all patches)."""

    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat_policy: str = "none"
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """x float (B, H, W, C) normalised, H and W multiples of patch_size -> tokens float32 (B, 1+L, D)."""
        p, d = self.patch_size, self.embed_dim
        if x.ndim != 4 or x.shape[-1] != self.in_chans or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"ViTEncoder: x must be (B, H, W, {self.in_chans}) with H, W multiples of "
                             f"patch_size={p}, got {x.shape}")
        gh, gw = x.shape[1] // p, x.shape[2] // p
        pos = jnp.asarray(sincos_2d(d, (gh, gw), cls_token=True))
        tokens = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=patch_embed_init, bias_init=nn.initializers.zeros, name="patch_embed")(x)
        tokens = tokens.reshape(x.shape[0], gh * gw, d).astype(jnp.float32) + pos[1:]
        cls = self.param("cls_token", token_init, (1, 1, d), jnp.float32) + pos[:1]
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), tokens], axis=1)
        tokens = DropPathTransformer(d, self.depth, self.num_heads, self.mlp_ratio, self.dtype, self.remat_policy,
                                     self.drop_path_rate, name="encoder")(tokens, train=train)
        return tokens.astype(jnp.float32)


def build_encoder(model_cfg, drop_path_rate: float) -> ViTEncoder:
    """`ViTEncoder` from a ``config.model`` ConfigDict (configs/common.py `model_config`)."""
    c = model_cfg
    if c.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={c.dtype!r}: expected one of {sorted(DTYPES)}")
    if c.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat_policy={c.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"config.drop_path_rate={drop_path_rate}: must be in [0, 1)")
    return ViTEncoder(patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim, depth=c.depth,
                      num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, dtype=DTYPES[c.dtype],
                      remat_policy=c.remat_policy, drop_path_rate=drop_path_rate)
