"""The fine-tuning task: config checks, model, initialisation (random or pre-trained), loss, prediction.

Param tree: {"backbone": {patch_embed, cls_token, encoder}, "head": {...}}; ``backbone`` is exactly the MAE
encoder subset, so pre-trained weights (a workdir, an export, an official .pth via `load_pretrained`) drop in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from vasomim_jax import models
from vasomim_jax.finetune import encoder as encoder_lib
from vasomim_jax.finetune import heads

TASKS = ("segmentation", "classification")


def validate(config: ConfigDict) -> None:
    """Fine-tuning specific fields (the shared ones: `config.validate_common`); errors name the field."""
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r}: must be one of {TASKS}")
    if config.eval_every_steps < 0:
        raise ValueError(f"config.eval_every_steps={config.eval_every_steps}: must be >= 0 (0 = last step only)")
    if config.num_classes < 1 or (config.task == "classification" and config.num_classes < 2):
        raise ValueError(f"config.num_classes={config.num_classes}: segmentation needs 1 (binary), "
                         "classification >= 2")
    if config.task == "segmentation":
        if config.num_classes != 1:
            raise ValueError(f"config.num_classes={config.num_classes}: segmentation is binary (1)")
        heads.num_levels(config.model.patch_size)
        if config.linear_probe:
            raise ValueError("config.linear_probe=True: only for task='classification'")
    if not 0.0 <= config.eval.threshold <= 1.0:
        raise ValueError(f"config.eval.threshold={config.eval.threshold}: must be in [0, 1]")


def build_model(config: ConfigDict):
    """`SegmentationModel` or `ClassificationModel` for ``config.task``."""
    backbone = encoder_lib.build_encoder(config.model, config.drop_path_rate)
    if config.task == "segmentation":
        return heads.SegmentationModel(backbone, heads.UNETRDecoder(config.model.patch_size,
                                                                    config.decoder.features, 1))
    return heads.ClassificationModel(backbone, config.num_classes, bool(config.linear_probe))


def input_shape(config: ConfigDict) -> tuple[int, int, int, int]:
    m = config.model
    return (1, m.img_size, m.img_size, m.in_chans)


def load_backbone(config: ConfigDict) -> dict | None:
    """Encoder params (numpy) from ``config.init_from`` (at ``config.init_step``) adapted to ``config.model``;
    None for random init. Fine-tuning drops any decoder the source has."""
    if not config.init_from:
        return None
    from vasomim_jax.pretrained import load_init_from  # torch / orbax only when needed

    step = None if config.init_step < 0 else int(config.init_step)
    params = load_init_from(config.init_from, config.model, step)
    return {k: params[k] for k in encoder_lib.ENCODER_KEYS}


def check_backbone(loaded: dict, abstract_backbone, source: str) -> None:
    """Same tree and shapes as the model's encoder, else a ValueError naming ``source`` and the first mismatch."""
    want = jax.tree_util.tree_flatten_with_path(abstract_backbone)[0]
    have = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    for path, leaf in want:
        got = have.get(path)
        if got is None or tuple(np.shape(got)) != tuple(leaf.shape):
            name = jax.tree_util.keystr(path)
            raise ValueError(f"config.init_from={source!r}: {name} is "
                             f"{'missing' if got is None else np.shape(got)}, the model needs {leaf.shape} "
                             f"(check config.model against the pre-trained architecture)")


def seg_loss(logits: jnp.ndarray, mask: jnp.ndarray, loss_cfg: ConfigDict) -> tuple[jnp.ndarray, dict]:
    """logits float32 (B, H, W, 1), mask uint8 {0,1} (B, H, W) -> dice_weight * soft Dice loss (per image, smooth
    1) + bce_weight * mean BCE."""
    x, y = logits[..., 0], mask.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(x, y).mean()
    p = jax.nn.sigmoid(x)
    soft_dice = (2 * (p * y).sum((1, 2)) + 1) / (p.sum((1, 2)) + y.sum((1, 2)) + 1)
    dice_loss = 1.0 - soft_dice.mean()
    loss = loss_cfg.dice_weight * dice_loss + loss_cfg.bce_weight * bce
    return loss, {"loss": loss, "loss_dice": dice_loss, "loss_bce": bce}


def make_loss_fn(model, config: ConfigDict):
    """loss_fn(params, batch, rng, step) -> (loss, metrics float32 scalars), the trainer's step contract.
    Drop-path keys: fold_in(rng, step) (per batch; drop-path draws one mask per example)."""

    def loss_fn(params, batch, rng, step):
        x = models.preprocess(batch["image"], config.model)
        out = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.fold_in(rng, step)})
        if config.task == "segmentation":
            return seg_loss(out, batch["mask"], config.loss)
        loss = optax.softmax_cross_entropy_with_integer_labels(out, batch["label"]).mean()
        acc = jnp.mean(jnp.argmax(out, -1) == batch["label"]).astype(jnp.float32)
        return loss, {"loss": loss, "train_accuracy": acc}

    return loss_fn


def make_predict_fn(model, config: ConfigDict, out_sharding):
    """jitted (params, images uint8 (B, S, S)) -> probabilities float32: (B, S, S) vessel (sigmoid) or (B, K)
    class (softmax), laid out as ``out_sharding`` (replicated: every process reads all of it)."""

    def predict(params, images):
        out = model.apply({"params": params}, models.preprocess(images, config.model), train=False)
        return jax.nn.sigmoid(out[..., 0]) if config.task == "segmentation" else jax.nn.softmax(out, -1)

    return jax.jit(predict, out_shardings=out_sharding)
