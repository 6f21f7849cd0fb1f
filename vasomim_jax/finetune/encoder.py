"""The pre-training ViT encoder for fine-tuning: `models.vit.ViTEncoder` with stochastic depth (drop-path).

Its parameter tree is exactly the MAE's encoder subset (``ENCODER_KEYS``), so pre-trained weights drop in
unchanged; with ``train=False`` the output equals ``MAE.encode``'s tokens bit for bit (the same module code).
"""

from __future__ import annotations

from vasomim_jax.models.mae import check_model_config, encoder_kwargs
from vasomim_jax.models.vit import ViTEncoder

ENCODER_KEYS = ("patch_embed", "cls_token", "encoder")  # the MAE params this encoder uses


def build_encoder(model_cfg, drop_path_rate: float) -> ViTEncoder:
    """`ViTEncoder` from a ``config.model`` ConfigDict (configs/common.py `model_config`), called as
    ``(x float (B, H, W, C) normalised, *, train) -> tokens float32 (B, 1+L, D)``; drop-path needs a 'dropout'
    rng when ``train``. Bad fields raise a ValueError naming them."""
    check_model_config(model_cfg, decoder=False)
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"config.drop_path_rate={drop_path_rate}: must be in [0, 1)")
    return ViTEncoder(**encoder_kwargs(model_cfg), drop_path_rate=drop_path_rate)
