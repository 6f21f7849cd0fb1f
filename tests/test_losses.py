"""Specification of the losses (METHOD §1, §4) and of the one pre-training loss_fn."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_tiny
from vasomim_jax import losses, masking, models, synthetic, vesselness

SIGMAS = (1.0, 2.0)


# ------------------------------------------------------------------------------------------- reconstruction
@pytest.mark.parametrize("unbiased", [True, False])
def test_reconstruction_loss_is_norm_pix_mse_on_masked_patches(unbiased):
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 2, 5, 12))
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], np.float32)
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1 if unbiased else 0)
    ref = (((pred - (target - mean) / np.sqrt(var + 1e-6)) ** 2).mean(-1) * mask).sum() / mask.sum()
    got, m, v = losses.reconstruction_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                                           jnp.asarray(mask), norm_pix=True, unbiased=unbiased)
    assert float(got) == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(v, var, rtol=1e-5)
    # Visible patches do not count; without norm-pix the raw pixels are the target.
    pred_vis = np.where(mask[..., None] == 0, 100.0, pred)
    again, _, _ = losses.reconstruction_loss(jnp.asarray(pred_vis, jnp.float32), jnp.asarray(target, jnp.float32),
                                             jnp.asarray(mask), norm_pix=True, unbiased=unbiased)
    assert float(again) == pytest.approx(float(got), rel=1e-6)
    raw, m0, v0 = losses.reconstruction_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                                             jnp.asarray(mask), norm_pix=False)
    assert float(raw) == pytest.approx((((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum(), rel=1e-5)
    np.testing.assert_array_equal(m0, 0.0)
    np.testing.assert_allclose(np.sqrt(np.asarray(v0) + 1e-6), 1.0, rtol=1e-7)


@pytest.mark.parametrize("in_chans, norm_pix", [(1, True), (3, True), (3, False)])
def test_reconstructed_grey_inverts_the_targets_and_pastes_visible(in_chans, norm_pix):
    from configs import common

    cfg = common.model_config("ti", patch_size=4, img_size=8, in_chans=in_chans)
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8)).astype(np.uint8)
    x = models.preprocess(jnp.asarray(images), cfg)
    target = models.patchify(x, 4)
    mask = jnp.asarray([[1, 0, 1, 0], [0, 0, 1, 1]], jnp.float32)
    _, mean, var = losses.reconstruction_loss(target, target, mask, norm_pix=norm_pix)
    perfect = (target - mean) / jnp.sqrt(var + 1e-6)  # what the loss asks the decoder to predict
    grey = losses.reconstructed_grey(perfect, target, mean, var, mask, cfg, grid=(2, 2))
    np.testing.assert_allclose(grey, images, atol=2e-3)
    garbage = jnp.full_like(target, 50.0)
    pasted = np.asarray(losses.reconstructed_grey(garbage, target, mean, var, mask, cfg, grid=(2, 2),
                                                  paste_visible=True))
    visible = np.kron(1 - np.asarray(mask).reshape(2, 2, 2), np.ones((4, 4))) > 0
    np.testing.assert_allclose(pasted[visible], images[visible], atol=2e-3)
    assert np.all(np.abs(pasted[~visible] - images[~visible]) > 1)


# ---------------------------------------------------------------------------------------------- consistency
@pytest.fixture(scope="module")
def angiogram():
    """A synthetic 64² angiogram (float grey, (1, H, W)), a copy with half its vessels erased, one with all erased."""
    image, mask = synthetic.angiogram(3, 64)
    kernel = np.ones((3, 3), np.uint8)
    half = mask.copy()
    half[:, 32:] = 0
    erase = [cv2.inpaint(image, cv2.dilate(m, kernel), 5, cv2.INPAINT_TELEA) for m in (half, mask)]
    return [jnp.asarray(x, jnp.float32)[None] for x in (image, *erase)]


def test_frangi_gamma_reproduces_the_automatic_gamma(angiogram):
    image = angiogram[0]
    auto = vesselness.frangi(image, sigmas=SIGMAS, black_ridges=True)
    explicit = losses.frangi_with_gamma(image, vesselness.frangi_gamma(image, SIGMAS[0]), sigmas=SIGMAS, alpha=0.5,
                                        beta=0.5)
    np.testing.assert_allclose(explicit, auto, atol=1e-6)
    assert float(vesselness.frangi_gamma(jnp.full((1, 16, 16), 7.0), 1.0)[0]) == 1.0  # flat: skimage's γ = 1


@pytest.mark.parametrize("distance", ["bce", "l1"])
def test_consistency_zero_at_equality_and_grows_as_vessels_are_erased(angiogram, distance):
    image, half, erased = angiogram
    value = jax.jit(lambda r: losses.consistency_loss(r, image, sigmas=SIGMAS, distance=distance))
    same, part, full = (float(value(x)) for x in (image, half, erased))
    assert abs(same) < 1e-7
    assert 10 * abs(same) < part < full, (same, part, full)


def test_consistency_bce_is_kl_form_of_bce(angiogram):
    image, _, erased = angiogram
    gamma = vesselness.frangi_gamma(image, SIGMAS[0])
    v_in, v_rec = (np.asarray(losses.frangi_with_gamma(x, gamma, sigmas=SIGMAS, alpha=0.5, beta=0.5), np.float64)
                   for x in (image, erased))
    eps = losses.BCE_EPS
    t, q = eps + (1 - 2 * eps) * v_in, eps + (1 - 2 * eps) * v_rec
    bce = -(t * np.log(q) + (1 - t) * np.log(1 - q)).mean()
    entropy = -(t * np.log(t) + (1 - t) * np.log(1 - t)).mean()
    got = float(losses.consistency_loss(erased, image, sigmas=SIGMAS, distance="bce"))
    assert got == pytest.approx(bce - entropy, rel=1e-4)


def test_consistency_finite_on_flat_images(angiogram):
    flat = jnp.full((1, 64, 64), 120.0)
    for rec, target in ((flat, flat), (flat, angiogram[0]), (angiogram[0], flat)):
        value, grad = jax.value_and_grad(lambda r: losses.consistency_loss(r, target, sigmas=SIGMAS))(rec)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


def test_consistency_rejects_unknown_distance(angiogram):
    with pytest.raises(ValueError, match="consistency_distance"):
        losses.consistency_loss(angiogram[0], angiogram[0], distance="mse")


# ------------------------------------------------------------------------------------------- vessel shares
def test_vessel_shares_on_a_hand_made_example():
    # Two 8×8 maps, 4×4 patches → 4 patches each (row-major). Vessel pixels per patch (of 16):
    #   image 0: [0, 1, 4, 0]   image 1: [16, 0, 0, 2]
    vmap = np.zeros((2, 8, 8), np.uint8)
    vmap[0, 0, 4] = 1
    vmap[0, 4:6, 0:2] = 1
    vmap[1, 0:4, 0:4] = 1
    vmap[1, 7, 6:8] = 1
    mask = np.array([[1, 1, 0, 0], [0, 1, 0, 1]], np.float32)  # masked: img0 {0, 1}, img1 {1, 3}
    share, random = losses.vessel_shares(jnp.asarray(vmap), jnp.asarray(mask), 4, 0.0)
    assert float(share) == pytest.approx(2 / 4)  # img0 patch 1, img1 patch 3
    assert float(random) == pytest.approx(4 / 8)  # patches 1, 2 of img0 and 0, 3 of img1
    share, random = losses.vessel_shares(jnp.asarray(vmap), jnp.asarray(mask), 4, 0.1)  # > 1.6 pixels
    assert float(share) == pytest.approx(1 / 4)  # only img1 patch 3 (2/16)
    assert float(random) == pytest.approx(3 / 8)


# ------------------------------------------------------------------------------------------------- loss_fn
@pytest.fixture(scope="module")
def tiny():
    """The demo config's Ti/8 model at 64 px, two synthetic angiograms, one jitted forward/backward."""
    config = demo_tiny.get_config()
    config.masking.beta_start, config.masking.beta_end = 0.5, 0.5
    model = models.build_mae(config.model)
    params = models.init_params(model, jax.random.key(0), (1, 64, 64, 1))
    images, maps = synthetic.angiograms([5, 6], size=64)
    batch = dict(image=jnp.asarray(images), vessel_map=jnp.asarray(maps), index=jnp.array([17, 4], jnp.int32))
    loss_fn = losses.make_loss_fn(model, config, total_steps=300, steps_per_epoch=10)

    def both(params, batch, rng, step):
        grad_cons = jax.grad(lambda q: loss_fn(q, batch, rng, step)[1]["loss_cons"])(params)
        return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, step), grad_cons

    run = jax.jit(both)
    return config, params, batch, run, run(params, batch, jax.random.key(1), jnp.int32(7))


def test_ti_forward_backward_metrics(tiny):
    config, _, batch, _, (((loss, metrics), grads), _) = tiny
    assert set(metrics) == {"loss", "loss_rec", "loss_cons", "beta", "vessel_share", "vessel_share_random"}
    assert all(v.dtype == jnp.float32 and v.shape == () and np.isfinite(float(v)) for v in metrics.values())
    assert float(loss) == pytest.approx(float(metrics["loss_rec"] + metrics["loss_cons"]), rel=1e-6)
    assert float(metrics["loss_cons"]) > 0 and float(metrics["beta"]) == pytest.approx(0.5)
    mask, _ = masking.mask_batch(batch, jax.random.key(1), 7, config.masking, patch_size=8, total_steps=300,
                                 steps_per_epoch=10)
    share, random = losses.vessel_shares(batch["vessel_map"], mask.mask, 8)
    assert float(metrics["vessel_share"]) == float(share) and float(metrics["vessel_share_random"]) == float(random)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("name", ["decoder_pred", "decoder", "encoder", "patch_embed", "cls_token"])
def test_consistency_gradient_reaches_encoder_and_decoder(tiny, name):
    _, grad_cons = tiny[-1]
    leaves = jax.tree_util.tree_leaves(grad_cons[name])
    assert max(float(jnp.abs(g).max()) for g in leaves) > 0


def test_loss_fn_masks_follow_the_example_index(tiny):
    _, params, batch, run, (((loss, _), _), _) = tiny
    flipped = {k: v[::-1] for k, v in batch.items()}
    (loss_f, _), _ = run(params, flipped, jax.random.key(1), jnp.int32(7))[0]
    assert float(loss_f) == pytest.approx(float(loss), rel=1e-5)
    (loss_s, _), _ = run(params, batch, jax.random.key(1), jnp.int32(8))[0]
    assert float(loss_s) != pytest.approx(float(loss), rel=1e-5)


def test_mask_batch_keys_by_step_and_global_index(tiny):
    config, _, batch, *_ = tiny
    kw = dict(patch_size=8, total_steps=300, steps_per_epoch=10)
    rng = jax.random.key(2)
    a, _ = masking.mask_batch(batch, rng, 3, config.masking, **kw)
    b, _ = masking.mask_batch({k: v[::-1] for k, v in batch.items()}, rng, 3, config.masking, **kw)
    c, _ = masking.mask_batch(batch, rng, 4, config.masking, **kw)
    np.testing.assert_array_equal(np.asarray(a.mask)[::-1], b.mask)
    assert not np.array_equal(a.mask, c.mask)


@pytest.mark.parametrize("section, field, value", [
    ("loss", "consistency_distance", "mse"), ("masking", "beta_per", "epochs"), ("masking", "map_weight", 2.0),
    ("masking", "guidance_filter", "hessian"), ("masking", "mask_ratio", 1.0), ("loss", "frangi_sigmas", ()),
])
def test_make_loss_fn_names_a_bad_config_field(section, field, value):
    config = demo_tiny.get_config()
    config[section][field] = value
    with pytest.raises(ValueError, match=f"config.{section}.{field}"):
        losses.make_loss_fn(None, config, total_steps=10, steps_per_epoch=5)
