"""Flax (linen) ViT MAE: encoder on visible tokens, lightweight decoder, fixed MAE sin-cos position embeddings."""

from vasomim_jax.models.mae import MAE, build_mae, init_params
from vasomim_jax.models.patches import gather_patches, patchify, unpatchify
from vasomim_jax.models.pos_embed import sincos_2d
from vasomim_jax.models.preprocess import preprocess, to_grey_intensity
from vasomim_jax.models.vit import ViTEncoder

__all__ = ["MAE", "ViTEncoder", "build_mae", "init_params", "gather_patches", "patchify", "unpatchify", "sincos_2d", "preprocess",
           "to_grey_intensity"]
