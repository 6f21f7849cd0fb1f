"""Losses (METHOD §1, §4): norm-pix reconstruction, Frangi anatomical consistency, and the one ``loss_fn``.

``loss = loss_rec + λ·loss_cons``:

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

import jax
import jax.numpy as jnp

from vasomim_jax import masking, models

BCE_EPS = 1e-4  # vesselness maps are squeezed into [ε, 1 − ε] before the Bernoulli KL
DISTANCES = ("bce", "l1")


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

    pred (B, L, p·p·C) is de-normalised with the target patches' statistics (``pred·√(var + 1e-6) + mean``, as
    the official code); with ``paste_visible`` the visible patches (mask 0) are the input's own. target is the
    patchified normalised input, grid the (rows, cols) of patches.
    """
    rec = pred * jnp.sqrt(var + 1e-6) + mean
    if paste_visible:
        rec = jnp.where(mask[..., None] > 0, rec, target)
    p = model_cfg.patch_size
    image = models.unpatchify(rec, p, grid[0], grid[1], model_cfg.in_chans)
    return models.to_grey_intensity(image, model_cfg)


def frangi_gamma(grey: jax.Array, sigma: float) -> jax.Array:
    """skimage's automatic Frangi γ per image: max over pixels of S = √(λ1² + λ2²) at ``sigma``, halved (1 when 0).

    grey float (B, H, W) → float32 (B,).
    """
    from vasomim_jax import vesselness_filters as vf

    _, h, w = grey.shape
    left, right = vf.hessian_operators(h, (float(sigma),), 0), vf.hessian_operators(w, (float(sigma),), 1)
    e_hi, e_lo = vf.hessian_eigenvalues(grey.astype(jnp.float32), left, right)  # (1, H, B, W)
    peak = jnp.max(jnp.square(e_hi) + jnp.square(e_lo), axis=(0, 1, 3))
    return jnp.where(peak > 0, jnp.sqrt(jnp.where(peak > 0, peak, 1.0)) / 2, 1.0)


def frangi_with_gamma(grey: jax.Array, gamma: jax.Array, *, sigmas, alpha: float, beta: float) -> jax.Array:
    """Frangi (dark ridges) of each image (B, H, W) with its own γ (B,) → float32 (B, H, W) clipped to [0, 1]."""
    from vasomim_jax import vesselness

    def one(image, g):
        return vesselness.frangi(image, sigmas=tuple(sigmas), alpha=alpha, beta=beta, gamma=g, black_ridges=True)

    # frangi's output is a product of exponential terms, already in [0, 1]; the clip only guards rounding.
    return jnp.clip(jax.vmap(one)(grey, gamma), 0.0, 1.0)


def consistency_loss(rec_grey: jax.Array, target_grey: jax.Array, *, sigmas=(1.0, 2.0, 3.0, 4.0),
                     alpha: float = 0.5, beta: float = 0.5, distance: str = "bce") -> jax.Array:
    """Anatomical consistency between (B, H, W) grey images on the 0..255 scale → float32 ().

    The target side (and its γ) is stop-gradient; see the module docstring for the distances.
    """
    if distance not in DISTANCES:
        raise ValueError(f"config.loss.consistency_distance must be one of {DISTANCES}, got {distance!r}")
    target_grey = jax.lax.stop_gradient(target_grey.astype(jnp.float32))
    gamma = jax.lax.stop_gradient(frangi_gamma(target_grey, sigmas[0]))
    kw = dict(sigmas=sigmas, alpha=alpha, beta=beta)
    # Two calls of one function: identical inputs give identical maps, and the backward pass covers only v_rec.
    v_in = jax.lax.stop_gradient(frangi_with_gamma(target_grey, gamma, **kw))
    v_rec = frangi_with_gamma(rec_grey.astype(jnp.float32), gamma, **kw)
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


def _check_config(config, total_steps: int, steps_per_epoch: int) -> None:
    m, l, mdl = config.masking, config.loss, config.model
    if mdl.img_size % mdl.patch_size:
        raise ValueError(f"config.model.img_size={mdl.img_size} is not divisible by patch_size={mdl.patch_size}")
    if not 0.0 <= m.mask_ratio < 1.0:
        raise ValueError(f"config.masking.mask_ratio must be in [0, 1), got {m.mask_ratio}")
    for name in ("beta_start", "beta_end", "map_weight"):
        if not 0.0 <= m[name] <= 1.0:
            raise ValueError(f"config.masking.{name} must be in [0, 1], got {m[name]}")
    if m.beta_per not in ("epoch", "step"):
        raise ValueError(f"config.masking.beta_per must be 'epoch' or 'step', got {m.beta_per!r}")
    if m.guidance_filter not in ("frangi", "sato"):
        raise ValueError(f"config.masking.guidance_filter must be 'frangi' or 'sato', got {m.guidance_filter!r}")
    if l.consistency_distance not in DISTANCES:
        raise ValueError(f"config.loss.consistency_distance must be one of {DISTANCES}, got "
                         f"{l.consistency_distance!r}")
    if l.consistency_weight < 0:
        raise ValueError(f"config.loss.consistency_weight must be >= 0, got {l.consistency_weight}")
    for section, name, sigmas in (("loss", "frangi_sigmas", l.frangi_sigmas),
                                  ("masking", "guidance_sigmas", m.guidance_sigmas)):
        if not sigmas or any(s <= 0 for s in sigmas):
            raise ValueError(f"config.{section}.{name} must be positive scales, got {tuple(sigmas)}")
    if total_steps <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"make_loss_fn: total_steps={total_steps} and steps_per_epoch={steps_per_epoch} "
                         "must be > 0")


def make_loss_fn(model, config, *, total_steps: int, steps_per_epoch: int):
    """The pre-training objective: ``loss_fn(params, batch, rng, step) -> (loss float32 (), metrics)``.

    batch: {"image": uint8 (B, H, W), "vessel_map": uint8 (B, H, W) in {0, 1}, "index": int32 (B,)}; rng: the
    run's base key; step: int (may be traced). The mask of example i is keyed by
    ``fold_in(fold_in(rng, step), index[i])``, so it depends on neither its batch position nor the process count.
    metrics: float32 scalars loss, loss_rec, loss_cons, beta, vessel_share, vessel_share_random.
    Pure and jit-able; differentiate with ``jax.value_and_grad(loss_fn, has_aux=True)``.
    """
    _check_config(config, total_steps, steps_per_epoch)
    m, lc, mcfg = config.masking, config.loss, config.model
    p = mcfg.patch_size

    def loss_fn(params, batch, rng, step):
        images, vessel_map = batch["image"], batch["vessel_map"]
        if images.ndim != 3 or vessel_map.shape != images.shape or batch["index"].shape != images.shape[:1]:
            raise ValueError(f"loss_fn: batch image {images.shape}, vessel_map {vessel_map.shape}, index "
                             f"{batch['index'].shape} must be (B, H, W), (B, H, W), (B,)")
        mk, beta = masking.mask_batch(batch, rng, step, m, patch_size=p, total_steps=total_steps,
                                      steps_per_epoch=steps_per_epoch)
        x = models.preprocess(images, mcfg)  # (B, H, W, C)
        pred = model.apply({"params": params}, x, mk.ids_keep, mk.ids_restore)  # (B, L, p·p·C) float32
        target = models.patchify(x, p)
        loss_rec, mean, var = reconstruction_loss(pred, target, mk.mask, norm_pix=lc.norm_pix_loss,
                                                  unbiased=lc.unbiased_var)
        if lc.consistency_weight > 0:
            grid = (x.shape[1] // p, x.shape[2] // p)
            rec_grey = reconstructed_grey(pred, target, mean, var, mk.mask, mcfg, grid=grid,
                                          paste_visible=lc.paste_visible)
            grey_in = models.to_grey_intensity(x, mcfg)  # (B, H, W) on 0..255
            loss_cons = consistency_loss(rec_grey, grey_in, sigmas=tuple(lc.frangi_sigmas), alpha=lc.frangi_alpha,
                                         beta=lc.frangi_beta, distance=lc.consistency_distance)
        else:
            loss_cons = jnp.float32(0.0)
        loss = loss_rec + lc.consistency_weight * loss_cons
        share, share_random = vessel_shares(vessel_map, mk.mask, p, m.vessel_patch_min_fraction)
        metrics = dict(loss=loss, loss_rec=loss_rec, loss_cons=loss_cons, beta=beta, vessel_share=share,
                       vessel_share_random=share_random)
        return loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return loss_fn
