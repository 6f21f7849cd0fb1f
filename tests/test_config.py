"""Config files, command-line overrides and the validation rules (all before any compilation)."""

import pathlib
import subprocess
import sys

import pytest

from vasomim_jax import config as cfg

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN_CONFIGS = ["configs/vasomim_vitb16_xa170k.py", "configs/mae_vitb16_xa170k.py", "configs/demo_tiny.py"]


def load(path="configs/demo_tiny.py", *overrides):
    return cfg.load_config(["prog", f"--config={ROOT / path}", *overrides])


# (pinned field, command-line value, expected parsed value)
PINNED_OVERRIDES = [
    ("dataset.name", "angio_folder/default", "angio_folder/default"),
    ("dataset.data_dir", "/data/tfds", "/data/tfds"),
    ("dataset.split", "train[:90%]", "train[:90%]"),
    ("batch_size", "64", 64),
    ("epochs", "3", 3),
    ("total_steps", "123", 123),
    ("optim.warmup_fraction", "0.1", 0.1),
    ("seed", "7", 7),
    ("log_every_steps", "5", 5),
    ("init_from", "/ckpt/run1", "/ckpt/run1"),
    ("masking.mask_ratio", "0.75", 0.75),
    ("masking.beta_start", "0.1", 0.1),
    ("masking.beta_end", "0.6", 0.6),
    ("loss.consistency_weight", "0.5", 0.5),
    ("checkpoint.every_steps", "17", 17),
    ("mesh.data", "4", 4),
    ("mesh.fsdp", "2", 2),
]


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS)
@pytest.mark.parametrize("field,text,expected", PINNED_OVERRIDES)
def test_every_pinned_field_overrides_from_the_command_line(path, field, text, expected):
    c = load(path, f"--config.{field}={text}")
    value = c
    for part in field.split("."):
        value = value[part]
    assert value == expected


def test_paper_recipe_has_the_official_numbers():
    c = load("configs/vasomim_vitb16_xa170k.py")
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads, c.model.patch_size) == (768, 12, 12, 16)
    assert (c.model.decoder_embed_dim, c.model.decoder_depth, c.model.decoder_num_heads) == (512, 8, 16)
    assert c.model.img_size == 224 and c.model.in_chans == 3
    assert c.masking.mask_ratio == 0.5 and (c.masking.beta_start, c.masking.beta_end) == (0.0, 0.5)
    assert c.batch_size == 2048 and c.epochs == 800 and c.optim.warmup_fraction == 40 / 800
    assert c.optim.base_lr == 1.5e-4 and cfg.learning_rate(c) == pytest.approx(1.2e-3)
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay) == (0.9, 0.95, 0.05)
    assert c.loss.consistency_weight == 1.0 and c.loss.norm_pix_loss
    assert tuple(c.input.crop_scale) == (0.2, 1.0)
    assert cfg.validate_pretrain_config(c, num_devices=8) == {"data": 8, "fsdp": 1}


def test_mae_baseline_switches_off_guidance_and_consistency():
    c = load("configs/mae_vitb16_xa170k.py")
    assert c.masking.beta_start == c.masking.beta_end == 0.0 and c.loss.consistency_weight == 0.0
    recipe = load("configs/vasomim_vitb16_xa170k.py")
    assert c.optim == recipe.optim and c.model == recipe.model and c.batch_size == recipe.batch_size


def test_demo_config_runs_on_eight_fake_devices():
    c = load("configs/demo_tiny.py")
    assert c.batch_size % 8 == 0
    assert cfg.validate_pretrain_config(c, num_devices=8) == {"data": 8, "fsdp": 1}


@pytest.mark.parametrize("override,field", [
    ("--config.model.img_size=230", "model.img_size"),
    ("--config.masking.mask_ratio=1.0", "masking.mask_ratio"),
    ("--config.masking.mask_ratio=0.0", "masking.mask_ratio"),
    ("--config.batch_size=36", "batch_size"),
    ("--config.masking.beta_end=0.05", "masking.beta_end"),
    ("--config.masking.guidance_filter=hessian", "masking.guidance_filter"),
    ("--config.total_steps=-5", "total_steps"),
    ("--config.checkpoint.every_steps=-1", "checkpoint.every_steps"),
    ("--config.log_every_steps=-2", "log_every_steps"),
    ("--config.epochs=-1", "epochs"),
    ("--config.mesh.fsdp=3", "mesh"),
    ("--config.model.dtype=float16", "model.dtype"),
    ("--config.loss.consistency_distance=mse", "loss.consistency_distance"),
    ("--config.dataset.name=angio_folder/r256,,synthetic_angio", "dataset.name"),
])
def test_bad_values_name_the_field_and_value(override, field):
    c = load("configs/demo_tiny.py", "--config.masking.beta_start=0.1", override)
    with pytest.raises(cfg.ConfigError, match=rf"config\.{field}\b"):
        cfg.validate_pretrain_config(c, num_devices=8)


def test_dataset_name_lists_several_builds_for_pretraining_only():
    c = load("configs/demo_tiny.py", "--config.dataset.name=angio_folder/r256, synthetic_angio/small")
    cfg.validate_pretrain_config(c, num_devices=8)
    assert cfg.dataset_names(c.dataset.name) == ["angio_folder/r256", "synthetic_angio/small"]
    with pytest.raises(cfg.ConfigError, match=r"config\.dataset\.name = .*reads one dataset"):
        cfg.validate_common(c, num_devices=8)  # fine-tuning's rules


def test_mesh_resolves_one_free_axis():
    c = load("configs/demo_tiny.py", "--config.mesh.data=-1", "--config.mesh.fsdp=2")
    assert cfg.mesh_shape(c, 8) == {"data": 4, "fsdp": 2}
    c = load("configs/demo_tiny.py", "--config.mesh.data=-1", "--config.mesh.fsdp=-1")
    with pytest.raises(cfg.ConfigError, match="at most one axis"):
        cfg.mesh_shape(c, 8)


def test_total_steps_wins_and_warmup_keeps_its_fraction():
    c = load("configs/vasomim_vitb16_xa170k.py")
    s = cfg.resolve_schedule(c, num_examples=171_478)
    assert s.steps_per_epoch == 171_478 // 2048 and s.total_steps == 800 * (171_478 // 2048)
    assert s.warmup_steps == round(0.05 * s.total_steps)
    c = load("configs/vasomim_vitb16_xa170k.py", "--config.total_steps=1000")
    s = cfg.resolve_schedule(c, num_examples=171_478)
    assert (s.total_steps, s.warmup_steps) == (1000, 50)


def test_unknown_field_is_rejected_by_the_parser():
    with pytest.raises(AttributeError, match="mask_ratioo"):
        load("configs/demo_tiny.py", "--config.masking.mask_ratioo=0.5")


def test_config_accepts_exactly_the_models_remat_policies():
    from vasomim_jax.models import vit

    assert set(cfg.REMAT_POLICIES) == set(vit.REMAT_POLICIES)
