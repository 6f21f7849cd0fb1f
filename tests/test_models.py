"""Specifications of vasomim_jax.models: MAE conventions (pos-embed, patch order, param tree, init) and timm-exact
block arithmetic, checked against numpy float64 references written here from the published formulas."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from configs import common, demo_tiny
from vasomim_jax import models, synthetic
from vasomim_jax.models import vit


def tiny_cfg(**overrides):
    cfg = common.model_config("ti", patch_size=8, img_size=32, in_chans=1)
    cfg.embed_dim, cfg.depth, cfg.num_heads = 32, 2, 2
    cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads = 16, 2, 2
    cfg.update(overrides)
    return cfg


def random_masks(key, b, num, n_keep):
    """MAE random_masking ids: ids_keep (B, n_keep), ids_restore (B, L), mask (B, L) with 1 = masked."""
    ids_shuffle = jnp.argsort(jax.random.uniform(key, (b, num)), axis=1).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    mask = jnp.ones((b, num)).at[:, :n_keep].set(0.0)
    return ids_shuffle[:, :n_keep], ids_restore, jnp.take_along_axis(mask, ids_restore, axis=1)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_cfg()
    model = models.build_mae(cfg)
    params = jax.jit(models.init_params, static_argnums=(0, 2))(model, jax.random.key(0), (2, 32, 48, 1))
    return cfg, model, params


# ---------------------------------------------------------------- position embeddings
def mae_get_2d_sincos_pos_embed(embed_dim, grid_h_size, grid_w_size, cls_token):
    """facebookresearch/mae util/pos_embed.py, in float64, extended to a (gh, gw) grid."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w_size, dtype=np.float64), np.arange(grid_h_size, dtype=np.float64))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h_size, grid_w_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize("dim,grid", [(768, 14), (192, 4), (512, (3, 5)), (64, (6, 2))])
def test_sincos_2d_matches_official_mae_formula(dim, grid):
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    got = models.sincos_2d(dim, grid, cls_token=True)
    assert got.dtype == np.float32 and got.shape == (1 + gh * gw, dim)
    np.testing.assert_allclose(got, mae_get_2d_sincos_pos_embed(dim, gh, gw, True), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(models.sincos_2d(dim, grid, cls_token=False), got[1:])


def test_sincos_2d_first_half_encodes_column_second_half_row():
    dim, gh, gw = 16, 3, 4
    emb = models.sincos_2d(dim, (gh, gw), cls_token=False).reshape(gh, gw, dim)
    assert np.all(emb[0, :, : dim // 2] == emb[2, :, : dim // 2])  # first half constant down a column
    assert np.all(emb[:, 0, dim // 2:] == emb[:, 3, dim // 2:])  # second half constant along a row
    np.testing.assert_allclose(emb[0, 1, : dim // 4], np.sin(1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))),
                               atol=1e-7)
    np.testing.assert_array_equal(models.sincos_2d(dim, 2)[0], 0.0)


def test_sincos_2d_rejects_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="embed_dim=18"):
        models.sincos_2d(18, 4)


# ---------------------------------------------------------------- patches
def test_patchify_matches_official_mae_order_and_round_trips():
    rng = np.random.default_rng(0)
    b, h, w, c, p = 2, 12, 8, 3, 4
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    # Official MAE on NCHW: reshape(N, C, h, p, w, p) -> einsum('nchpwq->nhwpqc') -> (N, h*w, p*p*C).
    xt = x.transpose(0, 3, 1, 2).reshape(b, c, h // p, p, w // p, p)
    ref = np.einsum("nchpwq->nhwpqc", xt).reshape(b, (h // p) * (w // p), p * p * c)
    got = np.asarray(models.patchify(jnp.asarray(x), p))
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got[1, 1 * (w // p) + 1].reshape(p, p, c), x[1, 4:8, 4:8])  # row 1, col 1
    np.testing.assert_array_equal(np.asarray(models.unpatchify(jnp.asarray(got), p, h // p, w // p, c)), x)


def test_patchify_and_unpatchify_reject_mismatched_sizes():
    with pytest.raises(ValueError, match="not divisible by patch_size=5"):
        models.patchify(jnp.zeros((1, 12, 12, 1)), 5)
    with pytest.raises(ValueError, match="not pixels"):
        models.unpatchify(jnp.zeros((1, 6, 16)), 4, 12, 8, 1)


# ---------------------------------------------------------------- param tree and init
def test_param_tree_names_and_shapes_follow_the_interface(tiny):
    cfg, _, params = tiny
    p, c, d, dd, n, nd = 8, 1, 32, 16, cfg.depth, cfg.decoder_depth

    def block(depth, dim):
        return {"norm1": {"scale": (depth, dim), "bias": (depth, dim)},
                "attn": {"qkv": {"kernel": (depth, dim, 3 * dim), "bias": (depth, 3 * dim)},
                         "proj": {"kernel": (depth, dim, dim), "bias": (depth, dim)}},
                "norm2": {"scale": (depth, dim), "bias": (depth, dim)},
                "mlp": {"fc1": {"kernel": (depth, dim, 4 * dim), "bias": (depth, 4 * dim)},
                        "fc2": {"kernel": (depth, 4 * dim, dim), "bias": (depth, dim)}}}

    expected = {
        "patch_embed": {"kernel": (p, p, c, d), "bias": (d,)},
        "cls_token": (1, 1, d),
        "encoder": {"blocks": block(n, d), "norm": {"scale": (d,), "bias": (d,)}},
        "decoder_embed": {"kernel": (d, dd), "bias": (dd,)},
        "mask_token": (1, 1, dd),
        "decoder": {"blocks": block(nd, dd), "norm": {"scale": (dd,), "bias": (dd,)}},
        "decoder_pred": {"kernel": (dd, p * p * c), "bias": (p * p * c,)},
    }
    assert jax.tree.map(lambda a: tuple(a.shape), params) == expected
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))


def test_init_follows_official_mae():
    cfg = tiny_cfg(embed_dim=256, num_heads=4, decoder_embed_dim=512, decoder_num_heads=4, in_chans=3,
                   mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD)
    model = models.build_mae(cfg)
    params = jax.jit(models.init_params, static_argnums=(0, 2))(model, jax.random.key(1), (1, 8, 8, 3))
    for name in ("cls_token", "mask_token"):
        tok = np.asarray(params[name])
        assert abs(tok.std() - 0.02) < 0.003 and abs(tok.mean()) < 0.004, name

    def check_uniform(w, fan_in, fan_out, what):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.97 * bound, what
        assert abs(w.var() / (bound**2 / 3) - 1) < 0.1, what

    # Patch embed: xavier on the kernel viewed as (p*p*C, D), not conv fans (p*p*C, p*p*D).
    check_uniform(np.asarray(params["patch_embed"]["kernel"]), 8 * 8 * 3, 256, "patch_embed")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in flat if k[-1].key == "kernel"]
    for path, w in kernels:
        if "blocks" in path:  # every scanned layer initialised separately with its own (fan_in, fan_out)
            for layer in w:
                check_uniform(layer, *layer.shape, path)
            assert not np.array_equal(w[0], w[1]), path
        elif "patch_embed" not in path:
            check_uniform(w, *w.shape, path)
    for k, v in flat:
        if k[-1].key == "bias":
            np.testing.assert_array_equal(v, 0.0)
        if k[-1].key == "scale":
            np.testing.assert_array_equal(v, 1.0)


# ---------------------------------------------------------------- numerics against a timm-style float64 reference
def np_layer_norm(x, p):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"] + p["bias"]


def np_block(x, p, heads):
    """timm Block / Attention / Mlp forward (qkv reshaped (B, N, 3, heads, hd), exact GELU)."""
    b, n, d = x.shape
    hd = d // heads
    y = np_layer_norm(x, p["norm1"])
    qkv = (y @ p["attn"]["qkv"]["kernel"] + p["attn"]["qkv"]["bias"]).reshape(b, n, 3, heads, hd)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, heads, N, hd)
    a = (q * hd**-0.5) @ k.transpose(0, 1, 3, 2)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    x = x + y @ p["attn"]["proj"]["kernel"] + p["attn"]["proj"]["bias"]
    y = np_layer_norm(x, p["norm2"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    return x + y @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def np_encode(params, x, patch_size, heads):
    """timm VisionTransformer.forward_features for a MAE checkpoint, numpy float64."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b, h, w, c = x.shape
    gh, gw, p = h // patch_size, w // patch_size, patch_size
    patches = np.einsum("nchpwq->nhwpqc", x.transpose(0, 3, 1, 2).reshape(b, c, gh, p, gw, p))
    k = params["patch_embed"]["kernel"]
    tok = patches.reshape(b, gh * gw, -1) @ k.reshape(-1, k.shape[-1]) + params["patch_embed"]["bias"]
    pos = mae_get_2d_sincos_pos_embed(k.shape[-1], gh, gw, True)
    tok = np.concatenate([np.broadcast_to(params["cls_token"], (b, 1, k.shape[-1])), tok], axis=1) + pos
    blocks = params["encoder"]["blocks"]
    for i in range(blocks["norm1"]["scale"].shape[0]):
        tok = np_block(tok, jax.tree.map(lambda a: a[i], blocks), heads)
    return np_layer_norm(tok, params["encoder"]["norm"])


def test_encode_matches_timm_forward_features_in_float64(tiny):
    cfg, model, params = tiny
    # Perturb norms and biases away from their init so that every term is exercised.
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: a + np.float32(0.1) * rng.normal(size=a.shape).astype(np.float32), params)
    x = np.random.default_rng(0).normal(size=(2, 32, 48, 1)).astype(np.float32)
    tokens, pooled = jax.jit(partial(model.apply, method="encode"))({"params": params}, jnp.asarray(x))
    assert tokens.shape == (2, 1 + 4 * 6, cfg.embed_dim) and tokens.dtype == jnp.float32
    np.testing.assert_array_equal(pooled, tokens[:, 0])
    ref = np_encode(params, x.astype(np.float64), cfg.patch_size, cfg.num_heads)
    np.testing.assert_allclose(np.asarray(tokens), ref, rtol=0, atol=2e-4)


def test_mlp_uses_exact_erf_gelu():
    mlp = vit.Mlp(hidden=8, dim=4)
    x = jnp.linspace(-3, 3, 12).reshape(3, 4)
    p = mlp.init(jax.random.key(0), x)["params"]
    p = jax.tree.map(lambda a: a + 1.0, p)  # push pre-activations where erf and tanh GELU differ by ~1e-3
    h = np.asarray(x, np.float64) @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
    exact = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    tanh = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    fc2 = np.asarray(p["fc2"]["kernel"]), np.asarray(p["fc2"]["bias"])
    got = np.asarray(mlp.apply({"params": p}, x))
    np.testing.assert_allclose(got, exact @ fc2[0] + fc2[1], rtol=1e-5, atol=1e-5)
    assert np.abs(got - (tanh @ fc2[0] + fc2[1])).max() > 1e-4


# ---------------------------------------------------------------- masking semantics
def test_encoder_sees_only_visible_patches_and_order_of_ids_is_irrelevant(tiny):
    cfg, model, params = tiny
    b, num, n_keep, p = 2, 24, 12, cfg.patch_size
    x = jax.random.normal(jax.random.key(5), (b, 32, 48, 1))
    ids_keep, ids_restore, mask = random_masks(jax.random.key(6), b, num, n_keep)
    apply = jax.jit(lambda x, k, r: model.apply({"params": params}, x, k, r))
    pred = apply(x, ids_keep, ids_restore)
    assert pred.shape == (b, num, p * p) and pred.dtype == jnp.float32

    # Changing pixels of masked patches changes nothing; changing a visible patch changes the prediction.
    noise = jax.random.normal(jax.random.key(7), (b, num, p * p))
    x_masked = models.unpatchify(models.patchify(x, p) + noise * mask[..., None], p, 4, 6, 1)
    np.testing.assert_array_equal(apply(x_masked, ids_keep, ids_restore), pred)
    x_visible = models.unpatchify(models.patchify(x, p) + noise * (1 - mask[..., None]), p, 4, 6, 1)
    assert np.abs(apply(x_visible, ids_keep, ids_restore) - pred).min() > 0

    # Reordering the visible ids (and the masked ones) with a consistent ids_restore gives the same prediction.
    ids_shuffle = jnp.argsort(ids_restore, axis=1)
    perm_keep, perm_mask = jnp.arange(n_keep)[::-1], n_keep + jnp.roll(jnp.arange(num - n_keep), 3)
    shuffled = ids_shuffle[:, jnp.concatenate([perm_keep, perm_mask])]
    pred2 = apply(x, shuffled[:, :n_keep], jnp.argsort(shuffled, axis=1).astype(jnp.int32))
    np.testing.assert_allclose(pred2, pred, rtol=0, atol=1e-5)


def test_full_visibility_encoder_equals_encode(tiny):
    _, model, params = tiny
    x = jax.random.normal(jax.random.key(8), (2, 32, 48, 1))
    ids = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))

    @jax.jit
    def latent_and_tokens(x):
        _, state = model.apply({"params": params}, x, ids, ids,
                               capture_intermediates=lambda mdl, method: mdl.name == "encoder")
        return state["intermediates"]["encoder"]["__call__"][0], model.apply({"params": params}, x, method="encode")

    latent, (tokens, _) = latent_and_tokens(x)
    np.testing.assert_allclose(latent, tokens, rtol=0, atol=1e-6)


@pytest.mark.parametrize("in_chans,stored", [(1, 1), (3, 1), (3, 3)])
def test_raw_uint8_input_equals_preprocessed_float_input(in_chans, stored):
    """The training path: the model gathers visible patches as bytes and folds `preprocess` into the patch
    kernel; MAE and encode give what they give on the preprocessed float image (grey replicated when stored
    as one channel)."""
    stats = (common.GREY_MEAN, common.GREY_STD) if in_chans == 1 else (common.IMAGENET_MEAN, common.IMAGENET_STD)
    cfg = tiny_cfg(in_chans=in_chans, mean=stats[0], std=stats[1])
    model = models.build_mae(cfg)
    params = jax.jit(models.init_params, static_argnums=(0, 2))(model, jax.random.key(0), (2, 32, 48, in_chans))
    params["patch_embed"]["bias"] = jax.random.normal(jax.random.key(3), params["patch_embed"]["bias"].shape)
    images = jax.random.randint(jax.random.key(4), (2, 32, 48, stored), 0, 256).astype(jnp.uint8)
    ids_keep, ids_restore, mask = random_masks(jax.random.key(6), 2, 24, 12)
    apply = jax.jit(lambda x: (model.apply({"params": params}, x, ids_keep, ids_restore),
                               model.apply({"params": params}, x, method="encode")[0]))
    raw = images[..., 0] if stored == 1 else images
    (pred_u8, tokens_u8), (pred, tokens) = apply(raw), apply(models.preprocess(raw, cfg))
    np.testing.assert_allclose(pred_u8, pred, rtol=0, atol=2e-5 * float(jnp.abs(pred).max()))
    np.testing.assert_allclose(tokens_u8, tokens, rtol=0, atol=2e-5 * float(jnp.abs(tokens).max()))
    # Only the visible bytes reach the encoder.
    flipped = models.unpatchify(models.patchify(images, 8) ^ (mask[..., None] > 0).astype(jnp.uint8) * 255,
                                8, 4, 6, stored)
    np.testing.assert_array_equal(apply(flipped[..., 0] if stored == 1 else flipped)[0], pred_u8)


def test_raw_uint8_input_needs_the_normalisation_and_fitting_channels(tiny):
    _, model, params = tiny
    ids = jnp.zeros((2, 24), jnp.int32)
    with pytest.raises(ValueError, match=r"uint8 \(B, H, W\[, 1\|1\]\)"):
        jax.eval_shape(partial(model.apply, {"params": params}), jnp.zeros((2, 32, 48, 2), jnp.uint8), ids, ids)
    bare = model.clone(mean=None, std=None)
    with pytest.raises(ValueError, match="config.model.mean/std"):
        jax.eval_shape(partial(bare.apply, {"params": params}), jnp.zeros((2, 32, 48), jnp.uint8), ids, ids)


def test_model_rejects_wrong_shapes(tiny):
    _, model, params = tiny
    ids = jnp.zeros((2, 24), jnp.int32)
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        jax.eval_shape(partial(model.apply, {"params": params}), jnp.zeros((2, 30, 48, 1)), ids, ids)
    with pytest.raises(ValueError, match="in_chans=1"):
        jax.eval_shape(partial(model.apply, {"params": params}, method="encode"), jnp.zeros((2, 32, 48, 3)))
    with pytest.raises(ValueError, match="ids_restore"):
        jax.eval_shape(partial(model.apply, {"params": params}), jnp.zeros((2, 32, 48, 1)), ids[:, :4], ids[:, :20])


@pytest.mark.parametrize("field,value", [("dtype", "float16"), ("remat_policy", "some"), ("num_heads", 5),
                                         ("decoder_embed_dim", 18), ("patch_size", 0)])
def test_build_mae_names_the_bad_config_field(field, value):
    with pytest.raises(ValueError, match=f"config.model.*{field}"):
        models.build_mae(tiny_cfg(**{field: value}))


# ---------------------------------------------------------------- stochastic depth (drop-path)
def test_drop_path_drops_whole_examples_with_the_given_rate_and_keeps_the_mean():
    x = jnp.ones((20000, 3))
    y = vit.drop_path(x, jnp.float32(0.25), jax.random.key(0))
    dropped = np.asarray(jnp.all(y == 0, axis=1))
    assert np.all(np.asarray(y)[~dropped] == pytest.approx(1 / 0.75))
    assert dropped.mean() == pytest.approx(0.25, abs=0.01)
    np.testing.assert_array_equal(np.asarray(vit.drop_path(x, jnp.float32(0.0), jax.random.key(0))), x)


def test_mae_drop_path_acts_on_the_encoder_only_in_training(tiny):
    cfg, model, params = tiny
    x = jax.random.normal(jax.random.key(8), (8, 32, 48, 1))
    keep, restore, _ = random_masks(jax.random.key(9), 8, 24, 12)
    dropping = model.clone(drop_path_rate=0.5)

    @partial(jax.jit, static_argnums=(0, 1))
    def outputs(mdl, train, key):
        rngs = {"dropout": key}
        pred = mdl.apply({"params": params}, x, keep, restore, train=train, rngs=rngs)
        return pred, mdl.apply({"params": params}, x, train=train, rngs=rngs, method="encode")[0]

    ref_pred, ref_tokens = outputs(model, False, jax.random.key(0))
    for mdl, train in ((model, True), (dropping, False)):  # rate 0 or eval: today's model, bit for bit
        pred, tokens = outputs(mdl, train, jax.random.key(1))
        np.testing.assert_array_equal(pred, ref_pred)
        np.testing.assert_array_equal(tokens, ref_tokens)
    (pred1, tokens1), (pred2, _) = outputs(dropping, True, jax.random.key(1)), outputs(dropping, True,
                                                                                     jax.random.key(2))
    assert float(jnp.abs(pred1 - ref_pred).max()) > 1e-3 and float(jnp.abs(tokens1 - ref_tokens).max()) > 1e-3
    assert float(jnp.abs(pred1 - pred2).max()) > 1e-3


def test_drop_path_rate_rises_linearly_from_zero_over_the_blocks():
    """timm's linspace(0, rate, depth): block 0 is never dropped, the last block at ``rate``."""
    x = jax.random.normal(jax.random.key(0), (512, 3, 16))
    two = vit.Transformer(dim=16, depth=2, num_heads=2, drop_path_rate=0.5)
    params = jax.jit(two.init)(jax.random.key(1), x)
    train = jax.jit(lambda k: two.apply(params, x, deterministic=False, rngs={"dropout": k}))(jax.random.key(2))
    # Block 0 alone (its params, the same final norm) = both residual branches of block 1 dropped, p = 0.5^2.
    one = vit.Transformer(dim=16, depth=1, num_heads=2)
    first = jax.tree.map(lambda a: a[:1], params["params"]["blocks"])
    block0 = jax.jit(one.apply)({"params": {"blocks": first, "norm": params["params"]["norm"]}}, x)
    skipped = np.asarray(jnp.abs(train - block0).max(axis=(1, 2)) < 1e-5)
    assert skipped.mean() == pytest.approx(0.25, abs=0.07)
    single = vit.Transformer(dim=16, depth=1, num_heads=2, drop_path_rate=0.9)
    run = jax.jit(lambda p, train: single.apply(p, x, deterministic=not train, rngs={"dropout": jax.random.key(2)}),
                  static_argnums=1)
    single_params = jax.jit(single.init)(jax.random.key(1), x)
    np.testing.assert_array_equal(run(single_params, True), run(single_params, False))


# ---------------------------------------------------------------- training-path properties
def masked_mse(model, params, x, ids_keep, ids_restore, mask):
    pred = model.apply({"params": params}, x, ids_keep, ids_restore)
    err = ((pred - models.patchify(x, model.patch_size)) ** 2).mean(-1)
    return (err * mask).sum() / mask.sum(), pred


@partial(jax.jit, static_argnums=0)
def train_outputs(model, params, x, masks):
    """(pred, loss, grads, encode tokens, pooled) of a masked-MSE step, one compilation."""
    (loss, pred), grads = jax.value_and_grad(lambda p: masked_mse(model, p, x, *masks), has_aux=True)(params)
    tokens, pooled = model.apply({"params": params}, x, method="encode")
    return pred, loss, grads, tokens, pooled


def ti_cfg(dtype="float32"):
    """The demo model: ViT-Ti/8 encoder (192 x 12 x 3) at 64 px, decoder 128 x 2 x 4, one channel."""
    cfg = demo_tiny.get_config().model
    cfg.dtype = dtype
    return cfg


@pytest.fixture(scope="module")
def ti():
    model = models.build_mae(ti_cfg())
    return model, jax.jit(models.init_params, static_argnums=(0, 2))(model, jax.random.key(0), (1, 64, 64, 1))


@pytest.fixture(scope="module")
def batch():
    images, _ = synthetic.angiograms(2, size=64)
    return models.preprocess(jnp.asarray(images), ti_cfg()), random_masks(jax.random.key(10), 2, 64, 32)


@pytest.fixture(scope="module")
def f32_outputs(ti, batch):
    model, params = ti
    return train_outputs(model, params, *batch)


def test_remat_policies_give_the_same_outputs_and_grads():
    x = jax.random.normal(jax.random.key(11), (2, 7, 32))

    @jax.jit
    def all_policies(x):
        out = {}
        for policy in vit.REMAT_POLICIES:
            stack = vit.Transformer(dim=32, depth=2, num_heads=2, remat_policy=policy)
            params = stack.init(jax.random.key(0), x)  # same key: same params for every policy
            out[policy] = jax.value_and_grad(lambda p, x: (stack.apply(p, x) ** 2).sum(), argnums=(0, 1))(params, x)
        return out

    out = all_policies(x)
    for policy in ("full", "dots", "dots_no_batch"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out[policy], out["none"])


def test_ti_forward_backward_on_synthetic_angiograms_reaches_every_parameter(f32_outputs):
    pred, loss, grads, tokens, pooled = f32_outputs
    assert pred.shape == (2, 64, 64) and tokens.shape == (2, 65, 192) and pooled.shape == (2, 192)
    assert np.isfinite(loss) and loss > 0
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(k) for k, g in flat if not np.all(np.abs(g).reshape(g.shape[0], -1).max(-1) > 0)]
    assert dead == []


def test_bfloat16_compute_keeps_float32_params_grads_and_outputs(ti, batch, f32_outputs):
    params = ti[1]
    model = models.build_mae(ti_cfg("bfloat16"))
    shapes = jax.eval_shape(partial(models.init_params, model, batch_shape=(1, 8, 8, 1)), jax.random.key(0))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
    pred, loss, grads, tokens, pooled = train_outputs(model, params, *batch)
    pred32, loss32 = f32_outputs[:2]
    assert pred.dtype == tokens.dtype == pooled.dtype == loss.dtype == jnp.float32
    assert 0 < np.abs(pred - pred32).max() < 0.05 * np.abs(pred32).max()  # really bf16, still close
    assert abs(loss - loss32) < 0.02 * loss32
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("in_chans,mean,std", [(1, common.GREY_MEAN, common.GREY_STD),
                                               (3, common.IMAGENET_MEAN, common.IMAGENET_STD)])
def test_preprocess_replicates_grey_and_normalises_and_inverts(in_chans, mean, std):
    cfg = tiny_cfg(in_chans=in_chans, mean=mean, std=std)
    images = np.arange(2 * 4 * 6, dtype=np.uint8).reshape(2, 4, 6) * 5
    x = np.asarray(models.preprocess(jnp.asarray(images), cfg))
    assert x.shape == (2, 4, 6, in_chans) and x.dtype == np.float32
    ref = (images[..., None].astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(models.preprocess(jnp.asarray(images[..., None]), cfg), x)
    np.testing.assert_allclose(models.to_grey_intensity(jnp.asarray(x), cfg), images, rtol=0, atol=1e-4)


def test_preprocess_rejects_non_uint8_and_wrong_channels():
    with pytest.raises(TypeError, match="uint8"):
        models.preprocess(jnp.zeros((1, 4, 4)), tiny_cfg())
    with pytest.raises(ValueError, match="in_chans=1"):
        models.preprocess(jnp.zeros((1, 4, 4, 3), jnp.uint8), tiny_cfg())
    with pytest.raises(ValueError, match="config.model.mean"):
        models.preprocess(jnp.zeros((1, 4, 4), jnp.uint8), tiny_cfg(mean=common.IMAGENET_MEAN))
