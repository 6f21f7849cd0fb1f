"""AdamW with layer-wise learning-rate decay (BEiT / MAE fine-tuning recipe) for the fine-tuning param trees.

Fine-tuning params are ``{"backbone": {patch_embed, cls_token, encoder/{blocks, norm}}, "head": {...}}``.
Layer ids as MAE's ``param_groups_lrd`` with ``num_layers = depth + 1``: embeddings (patch_embed, cls_token) 0,
block i (0-based) i + 1, everything else (encoder/norm, head) depth + 1. The multiplier of layer id l is
``decay ** (depth + 1 - l)``: embeddings decay^(depth+1), block i decay^(depth - i), head 1.
The scanned blocks hold all depths in one array (leading axis), so the multipliers are a per-leaf array
broadcast along that axis and the whole AdamW update (lr and weight-decay term, as torch's per-group lr) is scaled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from vasomim_jax import sharding

EMBEDDING_KEYS = ("patch_embed", "cls_token")


def layer_multipliers(params, depth: int, decay: float):
    """Pytree like ``params`` of float32 multipliers: scalars, or (depth, 1, ...) for scanned block leaves."""

    def mult(path, leaf):
        name = sharding.path_str(path)
        parts = name.split("/")
        if parts[0] == "backbone" and parts[1] in EMBEDDING_KEYS:
            return np.float32(decay ** (depth + 1))
        if parts[0] == "backbone" and parts[1:3] == ["encoder", "blocks"]:
            if np.shape(leaf)[0] != depth:
                raise ValueError(f"{name}: leading axis {np.shape(leaf)[0]} != config.model.depth = {depth}")
            per_block = decay ** (depth - np.arange(depth, dtype=np.float64))
            return per_block.astype(np.float32).reshape((depth,) + (1,) * (np.ndim(leaf) - 1))
        return np.float32(1.0)

    return jax.tree_util.tree_map_with_path(mult, params)


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiplies each update leaf by the matching (broadcastable) multiplier; stateless."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def decay_mask(params):
    """Weight decay on kernels only (no biases, norms, cls token: MAE fine-tuning's no-decay list)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: sharding.path_str(p).endswith("kernel"), params)


def trainable_labels(params, linear_probe: bool):
    """"train" / "frozen" per leaf: a linear probe trains only the head."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if linear_probe and sharding.path_str(p).startswith("backbone/") else "train", params)


def make_optimizer(config: ConfigDict, params, total_steps: int):
    """(optax transform, lr schedule): warm-up + cosine AdamW, layer decay ``optim.layer_decay``, frozen backbone
    for ``linear_probe``. ``params`` may be abstract (shapes only)."""
    o = config.optim
    if not 0.0 < o.layer_decay <= 1.0:
        raise ValueError(f"config.optim.layer_decay={o.layer_decay}: must be in (0, 1]")
    peak = o.lr if o.lr > 0 else o.base_lr * config.batch_size / 256
    warmup = int(round(o.warmup_fraction * total_steps))
    lr = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), o.min_lr)
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
    if not config.linear_probe:  # a linear probe trains only the head (multiplier 1)
        tx = optax.chain(tx, scale_by_tree(layer_multipliers(params, config.model.depth, o.layer_decay)))
    if o.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
    if config.linear_probe:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   trainable_labels(params, True))
    return tx, lr
