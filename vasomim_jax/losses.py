"""The pre-training forward and its losses (METHOD §1, §4): norm-pix reconstruction, Frangi anatomical
consistency, and the one ``loss_fn``.

``forward`` (batch → masks → model → targets → grey images) is the one pre-training forward of the package:
``make_loss_fn``, ``visualize.intermediates`` and, through ``masked_forward``, ``Pretrained.reconstruct`` all read
its ``Forward``. ``loss = loss_rec + λ·loss_cons``:

- ``loss_rec``: MSE on the masked patches against per-patch normalised pixels (official MAE: unbiased variance,
  ``(t − mean)/√(var + 1e-6)``).
- ``loss_cons``: the decoder output for **all** patches is de-normalised with the target patches' mean/var (as the
  official code does; optionally the visible patches are pasted back), brought to the grey 0..255 intensity scale
  (``models.to_grey_intensity``), and compared with the input through the differentiable Frangi filter. γ (the
  structureness scale) is the input's own (skimage: max S at the first σ, halved, per image) and is reused for the
  reconstruction, so both sides are measured on the same scale and the reconstruction cannot move it.
  Distance "bce" is the Bernoulli KL divergence KL(v_in ‖ v_rec) per pixel = BCE − entropy(v_in): the same
  gradients as the official BCE, zero at equality. Both vesselness maps are first squeezed affinely into
  [ε, 1 − ε] (ε = 1e-4) so the logs stay finite without clipping away gradients. "l1" is the mean |v_rec − v_in|.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vasomim_jax import masking, models, vesselness
from vasomim_jax.config import DISTANCES, validate_model, validate_objective

BCE_EPS = 1e-4  # vesselness maps are squeezed into [ε, 1 − ε] before the Bernoulli KL


class Forward(NamedTuple):
    """One pre-training forward pass. B examples, L patches of D = p·p·C values, images H×W."""

    mask: masking.MaskResult  # the masks, with the guided patches and the guidance probability per patch
    beta: jax.Array  # float32 (): share of the masked patches the guidance drew
    x: jax.Array  # float32 (B, H, W, C): the normalised input
    pred: jax.Array  # float32 (B, L, D): decoder output for every patch (normalised pixels with norm-pix)
    target: jax.Array  # float32 (B, L, D): patchified x
    mean: jax.Array  # float32 (B, L, 1): per-patch target mean (0 without norm-pix)
    var: jax.Array  # float32 (B, L, 1): per-patch target variance (1 − 1e-6 without norm-pix)
    loss_rec: jax.Array  # float32 (): MSE on the masked patches
    grey_in: jax.Array  # float32 (B, H, W): the input on the grey 0..255 scale
    rec_grey: jax.Array  # float32 (B, H, W): the decoder's image on that scale (``reconstructed_grey``)


def reconstruction_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, *, norm_pix: bool = True,
                        unbiased: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MSE on masked patches. pred, target float (B, L, D); mask (B, L) 1 = masked.

    Returns (loss float32 (), mean (B, L, 1), var (B, L, 1)); mean = 0, var = 1 − 1e-6 when ``norm_pix`` is off,
    so that ``pred·√(var + 1e-6) + mean`` de-normalises in both cases.
    """
    target = target.astype(jnp.float32)
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1 if unbiased else 0)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    else:
        mean = jnp.zeros(target.shape[:-1] + (1,), jnp.float32)
        var = jnp.full(target.shape[:-1] + (1,), 1.0 - 1e-6, jnp.float32)
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask), mean, var


def reconstructed_grey(pred: jax.Array, target: jax.Array, mean: jax.Array, var: jax.Array, mask: jax.Array,
                       model_cfg, *, grid: tuple[int, int], paste_visible: bool = False) -> jax.Array:
    """The decoder's image on the grey 0..255 scale: float32 (B, H, W).

    pred (B, L, p·p·C) is de-normalised with the given per-patch statistics (``pred·√(var + 1e-6) + mean``; the
    target patches' own in the official code); with ``paste_visible`` the visible patches (mask 0) are the
    input's own. target is the patchified normalised input, grid the (rows, cols) of patches.
    """
    rec = pred * jnp.sqrt(var + 1e-6) + mean
    if paste_visible:
        rec = jnp.where(mask[..., None] > 0, rec, target)
    p = model_cfg.patch_size
    image = models.unpatchify(rec, p, grid[0], grid[1], model_cfg.in_chans)
    return models.to_grey_intensity(image, model_cfg)


def masked_forward(model, params, images: jax.Array, mk: masking.MaskResult, beta, model_cfg, *,
                   norm_pix: bool = True, unbiased: bool = True, paste_visible: bool = False) -> Forward:
    """The forward for given masks: images raw uint8 (B, H, W[, 1|C]) (the model gathers their visible patches
    as bytes) or float32 (B, H, W, C) normalised; ``mk`` from ``masking.guided_mask``, beta float32 () the β the
    masks were drawn with. Pure, jit-able (``model``/``model_cfg`` static)."""
    p = model_cfg.patch_size
    x = models.preprocess(images, model_cfg) if images.dtype == jnp.uint8 else images
    pred = model.apply({"params": params}, images, mk.ids_keep, mk.ids_restore)  # (B, L, p·p·C) float32
    target = models.patchify(x, p)
    loss_rec, mean, var = reconstruction_loss(pred, target, mk.mask, norm_pix=norm_pix, unbiased=unbiased)
    grid = (x.shape[1] // p, x.shape[2] // p)
    rec_grey = reconstructed_grey(pred, target, mean, var, mk.mask, model_cfg, grid=grid, paste_visible=paste_visible)
    return Forward(mask=mk, beta=jnp.asarray(beta, jnp.float32), x=x, pred=pred, target=target, mean=mean, var=var,
                   loss_rec=loss_rec, grey_in=models.to_grey_intensity(x, model_cfg), rec_grey=rec_grey)


def forward(model, config, params, batch: dict, rng: jax.Array, step, *, total_steps: int,
            steps_per_epoch: int) -> Forward:
    """The pre-training forward of one batch, exactly as trained.

    batch: {"image": uint8 (B, H, W), "vessel_map": uint8 (B, H, W) in {0, 1}, "index": int32 (B,)}; rng: the
    run's base key; step: int (may be traced). Masks from ``masking.mask_batch`` (keyed by step and global
    index); ``rec_grey`` pastes the visible patches back when ``config.loss.paste_visible``.
    """
    images, vessel_map = batch["image"], batch["vessel_map"]
    if images.ndim != 3 or vessel_map.shape != images.shape or batch["index"].shape != images.shape[:1]:
        raise ValueError(f"forward: batch image {images.shape}, vessel_map {vessel_map.shape}, index "
                         f"{batch['index'].shape} must be (B, H, W), (B, H, W), (B,)")
    mcfg, lc = config.model, config.loss
    mk, beta = masking.mask_batch(batch, rng, step, config.masking, patch_size=mcfg.patch_size,
                                  total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    return masked_forward(model, params, images, mk, beta, mcfg,
                          norm_pix=lc.norm_pix_loss, unbiased=lc.unbiased_var, paste_visible=lc.paste_visible)


def frangi_with_gamma(grey: jax.Array, gamma: jax.Array, *, sigmas, alpha: float, beta: float) -> jax.Array:
    """Frangi (dark ridges) of each image (B, H, W) with its own γ (B,) → float32 (B, H, W) clipped to [0, 1]."""
    # frangi's output is a product of exponential terms, already in [0, 1]; the clip only guards rounding.
    return jnp.clip(vesselness.frangi(grey, sigmas=tuple(sigmas), alpha=alpha, beta=beta, gamma=gamma,
                                      black_ridges=True), 0.0, 1.0)


def frangi_settings(loss_cfg) -> dict:
    """The Frangi arguments of ``config.loss``: {sigmas, alpha, beta} for ``frangi_on_input_scale``."""
    return dict(sigmas=tuple(loss_cfg.frangi_sigmas), alpha=loss_cfg.frangi_alpha, beta=loss_cfg.frangi_beta)


def frangi_on_input_scale(grey_in: jax.Array, *greys: jax.Array, sigmas, alpha: float,
                          beta: float) -> list[jax.Array]:
    """[Frangi(grey_in), Frangi(g) for g in greys], each float32 (B, H, W) in [0, 1], all with grey_in's γ.

    grey_in (the input, B×H×W on 0..255) and its γ are stop-gradient; one call per image set, so the backward
    pass covers only ``greys``.
    """
    grey_in = jax.lax.stop_gradient(grey_in.astype(jnp.float32))
    gamma = jax.lax.stop_gradient(vesselness.frangi_gamma(grey_in, sigmas[0]))
    return [frangi_with_gamma(g.astype(jnp.float32), gamma, sigmas=sigmas, alpha=alpha, beta=beta)
            for g in (grey_in, *greys)]


def consistency_loss(rec_grey: jax.Array, target_grey: jax.Array, *, sigmas=(1.0, 2.0, 3.0, 4.0),
                     alpha: float = 0.5, beta: float = 0.5, distance: str = "bce") -> jax.Array:
    """Anatomical consistency between (B, H, W) grey images on the 0..255 scale → float32 ().

    The target side (and its γ) is stop-gradient; see the module docstring for the distances.
    """
    if distance not in DISTANCES:
        raise ValueError(f"config.loss.consistency_distance must be one of {DISTANCES}, got {distance!r}")
    v_in, v_rec = frangi_on_input_scale(target_grey, rec_grey, sigmas=tuple(sigmas), alpha=alpha, beta=beta)
    if distance == "l1":
        return jnp.mean(jnp.abs(v_rec - v_in))
    t = BCE_EPS + (1 - 2 * BCE_EPS) * v_in
    q = BCE_EPS + (1 - 2 * BCE_EPS) * v_rec
    kl = t * (jnp.log(t) - jnp.log(q)) + (1 - t) * (jnp.log1p(-t) - jnp.log1p(-q))
    return jnp.mean(kl)


def vessel_shares(vessel_map: jax.Array, mask: jax.Array, patch_size: int,
                  min_fraction: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(vessel_share, vessel_share_random), float32 () each, pooled over the batch.

    A patch "contains vessel" when its fraction of vessel-map pixels exceeds ``min_fraction``.
    vessel_share = #(masked patches containing vessel) / #(masked patches); vessel_share_random = the share
    expected under uniform masking = #(patches containing vessel) / #(patches).
    vessel_map (B, H, W) in {0, 1}; mask (B, L) 1 = masked.
    """
    fraction = masking.patch_scores(vessel_map, patch_size) / patch_size**2
    has_vessel = (fraction > min_fraction).astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    return jnp.sum(mask * has_vessel) / jnp.sum(mask), jnp.mean(has_vessel)


def make_loss_fn(model, config, *, total_steps: int, steps_per_epoch: int):
    """The pre-training objective: ``loss_fn(params, batch, rng, step) -> (loss float32 (), metrics)``.

    batch, rng, step as ``forward``: the mask of example i is keyed by ``fold_in(fold_in(rng, step), index[i])``,
    so it depends on neither its batch position nor the process count.
    metrics: float32 scalars loss, loss_rec, loss_cons, beta, vessel_share, vessel_share_random.
    Pure and jit-able; differentiate with ``jax.value_and_grad(loss_fn, has_aux=True)``.
    Raises ``config.ConfigError`` naming a bad ``config.model`` / ``masking`` / ``loss`` field.
    """
    validate_model(config.model)
    validate_objective(config)
    if total_steps <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"make_loss_fn: total_steps={total_steps} and steps_per_epoch={steps_per_epoch} "
                         "must be > 0")
    lc = config.loss

    def loss_fn(params, batch, rng, step):
        f = forward(model, config, params, batch, rng, step, total_steps=total_steps,
                    steps_per_epoch=steps_per_epoch)
        if lc.consistency_weight > 0:
            loss_cons = consistency_loss(f.rec_grey, f.grey_in, distance=lc.consistency_distance,
                                         **frangi_settings(lc))
        else:
            loss_cons = jnp.float32(0.0)
        loss = f.loss_rec + lc.consistency_weight * loss_cons
        share, share_random = vessel_shares(batch["vessel_map"], f.mask.mask, config.model.patch_size,
                                            config.masking.vessel_patch_min_fraction)
        metrics = dict(loss=loss, loss_rec=f.loss_rec, loss_cons=loss_cons, beta=f.beta, vessel_share=share,
                       vessel_share_random=share_random)
        return loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return loss_fn
