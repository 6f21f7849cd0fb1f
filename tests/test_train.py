"""Specifications of the trainer's pure parts: AdamW decay mask, lr schedule, gradient accumulation, analytic
FLOPs, the metrics writer (jsonl + TensorBoard read back) and the progress line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vasomim_jax import config as config_lib
from vasomim_jax import metrics, models, train


def _tiny_model_cfg():
    cfg = common.model_config("ti", patch_size=8, img_size=32, in_chans=1)
    cfg.embed_dim, cfg.depth, cfg.num_heads = 32, 2, 2
    cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads = 16, 2, 2
    return cfg


@pytest.mark.parametrize("decay_tokens", [True, False])
def test_weight_decay_mask_is_the_official_param_groups(decay_tokens):
    model = models.build_mae(_tiny_model_cfg())
    params = jax.eval_shape(lambda k: models.init_params(model, k, (1, 32, 32, 1)), jax.random.PRNGKey(0))
    mask = train.decay_mask(params, decay_tokens)
    assert mask["cls_token"] is decay_tokens and mask["mask_token"] is decay_tokens
    assert mask["patch_embed"]["kernel"] and not mask["patch_embed"]["bias"]
    blocks = mask["encoder"]["blocks"]
    assert blocks["attn"]["qkv"]["kernel"] and blocks["mlp"]["fc2"]["kernel"]
    # scanned: biases and norm scales are (depth, D) arrays but still 1-D parameters per block
    assert not blocks["attn"]["qkv"]["bias"] and not blocks["norm1"]["scale"] and not blocks["norm2"]["bias"]
    assert not mask["encoder"]["norm"]["scale"] and not mask["decoder_pred"]["bias"]
    assert mask["decoder_pred"]["kernel"] and mask["decoder_embed"]["kernel"]


def test_lr_is_scaled_warmed_up_per_step_then_cosine_to_min_lr():
    cfg = common.pretrain_config()
    cfg.batch_size, cfg.optim.base_lr, cfg.optim.min_lr = 512, 1e-4, 1e-6
    schedule = config_lib.Schedule(total_steps=100, steps_per_epoch=10, warmup_steps=10)
    _, lr = train.make_optimizer(cfg, schedule)
    peak = 1e-4 * 512 / 256
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), peak / 2, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(lr(55)), 1e-6 + (peak - 1e-6) * 0.5, rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose(float(lr(100)), 1e-6, rtol=1e-5)
    cfg.optim.lr = 3e-3  # an explicit lr wins over the scaling rule
    _, lr = train.make_optimizer(cfg, schedule)
    np.testing.assert_allclose(float(lr(10)), 3e-3, rtol=1e-6)


def _toy_loss(params, batch, rng, step):
    """Per-example randomness from (rng, step, index) as the real loss keys its masks."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, step), i))(batch["index"])
    noise = jax.vmap(lambda k: jax.random.normal(k, (4,)))(keys)
    x = batch["image"].astype(jnp.float32).reshape(batch["image"].shape[0], -1)[:, :4] / 255 + noise
    err = (x @ params["w"] - 1.0) ** 2
    loss = err.mean()
    return loss, {"loss": loss, "err_max": err.max() * 0 + err.mean()}


def test_gradient_accumulation_matches_one_big_batch():
    cfg = common.pretrain_config()
    cfg.optim.clip_grad_norm = 1.0
    tx, _ = train.make_optimizer(cfg, config_lib.Schedule(total_steps=10, steps_per_epoch=10, warmup_steps=0))
    cfg.optim.lr = 1e-2
    params = {"w": jnp.linspace(-1, 1, 4)}
    state = {"step": jnp.asarray(3, jnp.int32), "params": params, "opt_state": tx.init(params)}
    batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 255, (8, 4, 4)), jnp.uint8),
             "index": jnp.arange(100, 108, dtype=jnp.int32)}
    rng = jax.random.PRNGKey(0)
    one, m1 = jax.jit(train.make_train_step(_toy_loss, tx, 1))(state, batch, rng)
    four, m4 = jax.jit(train.make_train_step(_toy_loss, tx, 4))(state, batch, rng)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(one["params"]["w"], four["params"]["w"], rtol=1e-6, atol=1e-7)
    assert int(one["step"]) == int(four["step"]) == 4


def test_analytic_flops_match_the_published_vit_b16_count():
    cfg = common.model_config("b", 16, 224, in_chans=3)
    cfg.decoder_depth = 0
    cfg.decoder_embed_dim = 0
    # mask_ratio 0, no decoder: the plain ViT-B/16 forward, 17.56 GMACs (timm / fvcore count) = 35.1 GFLOPs
    fwd = metrics.mae_train_flops_per_example(cfg, 0.0) / 3
    np.testing.assert_allclose(fwd, 2 * 17.56e9, rtol=0.01)
    # the fine-tuning backbone count (encoder on all patches) is the same plain ViT-B/16 forward
    np.testing.assert_allclose(metrics.encoder_train_flops_per_example(cfg) / 3, 2 * 17.56e9, rtol=0.01)


def test_peak_lookup_and_progress_line():
    assert metrics.peak_tflops("NVIDIA H200", 0.0) == 989.0
    assert metrics.peak_tflops("TPU v5 lite", 0.0) == 197.0
    assert metrics.peak_tflops("cpu", 0.0) == 0.0 and metrics.peak_tflops("cpu", 2.5) == 2.5
    line = metrics.progress_line(30, 300, {"loss": 0.5, "loss_rec": 0.25}, img_per_sec_per_device=12.0,
                                 tflops_per_device=0.5, peak=10.0, seconds_per_step=2.0)
    assert line.startswith("step 30/300 (10%)") and "loss 0.5000" in line and "12.0 img/s/dev" in line
    assert "MFU 5.0%" in line and "ETA 0:09:00" in line


def test_metric_writer_flushes_each_step_and_tensorboard_reads_back(tmp_path):
    writer = metrics.MetricWriter(tmp_path, enabled=True, tensorboard=True)
    writer.write(10, {"loss": 1.5, "lr": 1e-3})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # flushed before close
    assert json.loads(lines[0]) == {"step": 10, "loss": 1.5, "lr": 1e-3}
    writer.write(20, {"loss": 1.25, "lr": 2e-3})
    writer.close()
    scalars = metrics.read_tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(10, 1.5), (20, 1.25)]
    np.testing.assert_allclose([v for _, v in scalars["lr"]], [1e-3, 2e-3], rtol=1e-6)
    silent = metrics.MetricWriter(tmp_path / "other", enabled=False, tensorboard=True)
    silent.write(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()
