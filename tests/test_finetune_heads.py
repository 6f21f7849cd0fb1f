"""Fine-tuning model pieces: the UNETR decoder's structure, drop-path, layer-wise lr decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from vasomim_jax import models
from vasomim_jax.finetune import encoder as encoder_lib
from vasomim_jax.finetune import heads, optim


def tiny_model_cfg(patch_size=16, depth=2):
    m = common.model_config("ti", patch_size=patch_size, img_size=32, in_chans=1)
    m.depth = depth
    m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads = 32, 1, 2
    return m


def seg_model(m, drop_path_rate=0.0, features=4):
    return heads.SegmentationModel(encoder_lib.build_encoder(m, drop_path_rate),
                                   heads.UNETRDecoder(m.patch_size, features))


def test_decoder_has_three_upsampling_branches_and_a_stem_for_patch_16():
    m = tiny_model_cfg()
    x = jnp.zeros((1, 32, 32, 1))
    variables = jax.eval_shape(lambda: seg_model(m).init(jax.random.key(0), x, train=False))
    head = variables["params"]["head"]
    assert sorted(k for k in head if k.startswith("branch_")) == ["branch_x2", "branch_x4", "branch_x8"]
    assert "stem" in head and "out" in head
    for k in (2, 4, 8):  # branch ×2^k = k transposed convs
        assert len([n for n in head[f"branch_x{k}"] if n.startswith("ConvTranspose")]) == int(np.log2(k))
    assert sorted(k for k in head if k.startswith("up_to_")) == ["up_to_1", "up_to_2", "up_to_4", "up_to_8"]


def test_branches_land_at_half_quarter_and_eighth_resolution():
    m = tiny_model_cfg()
    x = jnp.zeros((2, 64, 32, 1))
    model = seg_model(m)
    _, inter = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x, train=False), x, train=False,
                                                  capture_intermediates=True))
    shape = lambda name: inter["intermediates"]["head"][name]["__call__"][0].shape
    assert shape("branch_x8")[1:3] == (32, 16)
    assert shape("branch_x4")[1:3] == (16, 8)
    assert shape("branch_x2")[1:3] == (8, 4)
    assert shape("stem")[1:3] == (64, 32)


def test_segmentation_output_has_the_input_size():
    m = tiny_model_cfg()
    model = seg_model(m)
    for hw in [(32, 32), (48, 48), (64, 32), (16, 80)]:  # shapes by tracing (finite values: the e2e tests)
        x = jax.ShapeDtypeStruct((2, *hw, 1), jnp.float32)
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0), x, train=False), x, train=False), x)
        assert out.shape == (2, *hw, 1) and out.dtype == jnp.float32


def test_patch_8_has_two_branches_and_the_input_size():
    m = tiny_model_cfg(patch_size=8)
    x = jnp.zeros((1, 32, 32, 1))
    model = seg_model(m)
    variables, out = jax.eval_shape(lambda: (lambda v: (v, model.apply(v, x, train=False)))(
        model.init(jax.random.key(0), x, train=False)))
    assert sorted(k for k in variables["params"]["head"] if k.startswith("branch_")) == ["branch_x2", "branch_x4"]
    assert out.shape == (1, 32, 32, 1)


def test_non_power_of_two_patch_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match="config.model.patch_size=14"):
        heads.num_levels(14)


def test_encoder_params_are_the_mae_encoder_subset_and_eval_output_equals_mae_encode():
    m = tiny_model_cfg()
    mae = models.build_mae(m)
    mae_params = models.init_params(mae, jax.random.key(0), (1, 32, 32, 1))
    enc = encoder_lib.build_encoder(m, drop_path_rate=0.3)
    subset = {k: mae_params[k] for k in encoder_lib.ENCODER_KEYS}
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 1))
    own = jax.eval_shape(lambda: enc.init(jax.random.key(1), x, train=False)["params"])
    assert jax.tree.structure(own) == jax.tree.structure(subset)
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, subset)
    ours = jax.jit(lambda p: enc.apply({"params": p}, x, train=False))(subset)
    ref, _ = jax.jit(lambda p: mae.apply({"params": p}, x, method="encode"))(mae_params)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_drop_path_is_active_in_training_and_off_in_evaluation():
    m = tiny_model_cfg(depth=4)
    enc = encoder_lib.build_encoder(m, drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(2), (8, 32, 32, 1))
    params = jax.jit(lambda k: enc.init(k, x, train=False))(jax.random.key(1))
    run = jax.jit(lambda k, train: enc.apply(params, x, train=train, rngs={"dropout": k}), static_argnums=1)
    ev1, ev2 = run(jax.random.key(5), False), run(jax.random.key(6), False)
    np.testing.assert_array_equal(np.asarray(ev1), np.asarray(ev2))
    tr1, tr2 = run(jax.random.key(5), True), run(jax.random.key(6), True)
    assert float(jnp.abs(tr1 - ev1).max()) > 1e-3
    assert float(jnp.abs(tr1 - tr2).max()) > 1e-3


def fine_tune_params(depth=3):
    m = tiny_model_cfg(depth=depth)
    x = jnp.zeros((1, 32, 32, 1))
    return jax.eval_shape(lambda: seg_model(m).init(jax.random.key(0), x, train=False)["params"])


def test_layer_multipliers_are_decay_to_the_depth_minus_block_index():
    depth, decay = 3, 0.75
    mult = optim.layer_multipliers(fine_tune_params(depth), depth, decay)
    b = mult["backbone"]
    np.testing.assert_allclose(b["encoder"]["blocks"]["attn"]["qkv"]["kernel"].reshape(-1),
                               [0.75**3, 0.75**2, 0.75**1])
    np.testing.assert_allclose(b["encoder"]["blocks"]["norm1"]["scale"].reshape(-1), [0.75**3, 0.75**2, 0.75])
    assert b["patch_embed"]["kernel"] == pytest.approx(0.75**4)
    assert b["cls_token"] == pytest.approx(0.75**4)
    assert b["encoder"]["norm"]["scale"] == 1.0
    assert all(v == 1.0 for v in jax.tree.leaves(mult["head"]))


def test_optimizer_update_of_each_block_is_scaled_by_its_multiplier():
    from ml_collections import ConfigDict

    depth = 3
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), fine_tune_params(depth))
    config = ConfigDict(dict(batch_size=16, linear_probe=False, model=dict(depth=depth), optim=dict(
        base_lr=0.0, lr=1e-2, min_lr=0.0, warmup_fraction=0.0, b1=0.9, b2=0.999, weight_decay=0.0,
        layer_decay=0.75, clip_grad_norm=0.0)))
    tx, _ = optim.make_optimizer(config, params, total_steps=100)
    grads = jax.tree.map(jnp.ones_like, params)
    updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
    # Adam's first step is -lr * sign(g) for every element: the ratio to the head's update is the multiplier.
    qkv = updates["backbone"]["encoder"]["blocks"]["attn"]["qkv"]["bias"]
    head = float(updates["head"]["out"]["bias"][0])
    np.testing.assert_allclose(np.asarray(qkv[:, 0]) / head, [0.75**3, 0.75**2, 0.75], rtol=1e-5)
    assert float(updates["backbone"]["cls_token"].reshape(-1)[0]) / head == pytest.approx(0.75**4, rel=1e-5)


def test_linear_probe_freezes_the_backbone():
    from ml_collections import ConfigDict

    m = tiny_model_cfg()
    model = heads.ClassificationModel(encoder_lib.build_encoder(m, 0.1), num_classes=3, linear_probe=True)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 1))
    params = jax.jit(lambda k: model.init(k, x, train=False)["params"])(jax.random.key(1))
    config = ConfigDict(dict(batch_size=16, linear_probe=True, model=dict(depth=m.depth), optim=dict(
        base_lr=0.0, lr=1e-2, min_lr=0.0, warmup_fraction=0.0, b1=0.9, b2=0.999, weight_decay=0.05,
        layer_decay=0.75, clip_grad_norm=0.0)))
    tx, _ = optim.make_optimizer(config, params, total_steps=10)
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(2)}), jnp.arange(4) % 3).mean()
    updates = jax.jit(lambda p: tx.update(jax.grad(loss)(p), tx.init(p), p)[0])(params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["backbone"]))
    assert float(jnp.abs(updates["head"]["kernel"]).max()) > 0.0


@pytest.mark.parametrize("field,value,rate", [("dtype", "float16", 0.1), ("num_heads", 5, 0.1),
                                              ("drop_path_rate", None, 1.0)])
def test_build_encoder_names_the_bad_config_field(field, value, rate):
    m = tiny_model_cfg()
    if value is not None:
        m[field] = value
    with pytest.raises(ValueError, match=f"config.*{field}"):
        encoder_lib.build_encoder(m, rate)
