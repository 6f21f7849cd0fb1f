"""Masked autoencoder (facebookresearch/mae structure) with a ViT encoder on visible tokens only.

Param tree (inside {"params": ...}): patch_embed/{kernel (p,p,C,D), bias}, cls_token (1,1,D),
encoder/{blocks (scanned, leading depth axis), norm} (the `ViTEncoder` part), decoder_embed, mask_token (1,1,Dd),
decoder/{blocks, norm}, decoder_pred. Position embeddings are fixed sin-cos constants, not params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vasomim_jax.models.patches import gather_patches
from vasomim_jax.models.pos_embed import sincos_2d
from vasomim_jax.models.vit import REMAT_POLICIES, Transformer, ViTEncoder, dense, token_init

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class MAE(ViTEncoder):
    """`ViTEncoder` (its ``encode`` is the all-patch encoder) + the MAE decoder. Decoder defaults are the official
    MAE's (width 512, 8 blocks, 16 heads); ``drop_path_rate`` acts on the encoder only."""

    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16

    def setup(self):
        super().setup()
        dd = self.decoder_embed_dim
        self.decoder_embed = dense(dd, self.dtype, "decoder_embed")
        self.mask_token = self.param("mask_token", token_init, (1, 1, dd), jnp.float32)
        self.decoder = Transformer(dd, self.decoder_depth, self.decoder_num_heads, mlp_ratio=self.mlp_ratio,
                                   dtype=self.dtype, remat_policy=self.remat_policy, scan_unroll=self.scan_unroll)
        self.decoder_pred = dense(self.patch_size**2 * self.in_chans, self.dtype, "decoder_pred")

    def __call__(self, x: jnp.ndarray, ids_keep: jnp.ndarray, ids_restore: jnp.ndarray, *,
                 train: bool = False) -> jnp.ndarray:
        """x: float (B, H, W, C) normalised, or raw uint8 (B, H, W[, 1|C]) normalised inside (the training
        input: the visible patches are gathered as bytes, then embedded; `PatchEmbed`); ids_keep int32
        (B, n_keep); ids_restore int32 (B, L).

        Returns the prediction float32 (B, L, p*p*C) for every patch in the original patch order. ``train``
        enables the encoder's drop-path ('dropout' rng).
        """
        patches, pos = self._patches(x)
        b, num = patches.shape[:2]
        if ids_restore.shape != (b, num) or ids_keep.ndim != 2 or ids_keep.shape[0] != b:
            raise ValueError(f"MAE: ids_keep {ids_keep.shape} / ids_restore {ids_restore.shape} do not match "
                             f"(B, n_keep) / (B, L) = ({b}, n_keep) / ({b}, {num})")
        # Gather, then embed: only the visible patches are embedded (the same values as embedding all).
        visible = self.patch_embed(gather_patches(patches, ids_keep)) + jnp.take(pos[1:], ids_keep, axis=0)
        latent = self.encoder(self._with_cls(visible, pos), deterministic=not train)

        y = self.decoder_embed(latent).astype(jnp.float32)
        n_mask = num - ids_keep.shape[1]
        y_ = jnp.concatenate([y[:, 1:], jnp.broadcast_to(self.mask_token, (b, n_mask, y.shape[-1]))], axis=1)
        y_ = gather_patches(y_, ids_restore)  # unshuffle to the patch order
        grid = (x.shape[1] // self.patch_size, x.shape[2] // self.patch_size)
        y = jnp.concatenate([y[:, :1], y_], axis=1) + sincos_2d(self.decoder_embed_dim, grid, cls_token=True)
        y = self.decoder_pred(self.decoder(y))
        return y[:, 1:].astype(jnp.float32)


def check_model_config(model_cfg, *, decoder: bool) -> None:
    """ValueError naming the ``config.model`` field that cannot build the encoder (and the decoder if asked)."""
    c = model_cfg
    if c.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={c.dtype!r}: expected one of {sorted(DTYPES)}")
    if c.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat_policy={c.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
    stacks = [(c.embed_dim, c.num_heads, "")] + [(c.decoder_embed_dim, c.decoder_num_heads, "decoder_")] * decoder
    for dim, heads, name in stacks:
        if dim % heads:
            raise ValueError(f"config.model.{name}embed_dim={dim} is not divisible by {name}num_heads={heads}")
        if dim % 4:
            raise ValueError(f"config.model.{name}embed_dim={dim} must be a multiple of 4 (2-D sin-cos)")
    for field in ("patch_size", "in_chans", "depth") + ("decoder_depth",) * decoder:
        if c[field] < 1:
            raise ValueError(f"config.model.{field}={c[field]} must be >= 1")


def encoder_kwargs(model_cfg) -> dict:
    """The `ViTEncoder` fields of a ``config.model`` ConfigDict (configs/common.py `model_config`)."""
    c = model_cfg
    return dict(patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim, depth=c.depth,
                num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, dtype=DTYPES[c.dtype], remat_policy=c.remat_policy,
                mean=tuple(c.mean), std=tuple(c.std))


def build_mae(model_cfg) -> MAE:
    """MAE from a ``config.model`` ConfigDict (configs/common.py `model_config`); checks the fields first."""
    c = model_cfg
    check_model_config(c, decoder=True)
    return MAE(**encoder_kwargs(c), decoder_embed_dim=c.decoder_embed_dim, decoder_depth=c.decoder_depth,
               decoder_num_heads=c.decoder_num_heads)


def init_params(model: MAE, rng: jax.Array, batch_shape: tuple[int, int, int, int]) -> dict:
    """All parameters (the inner ``params`` dict) for inputs of shape (B, H, W, C); wrap in jax.jit / eval_shape
    as needed. Param shapes do not depend on B, H, W, so a (1, p, p, C) shape suffices."""
    b, h, w, _ = batch_shape
    num = (h // model.patch_size) * (w // model.patch_size)
    ids = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), (b, num))
    return model.init(rng, jnp.zeros(batch_shape, jnp.float32), ids, ids)["params"]
