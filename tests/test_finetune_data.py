"""Fine-tuning augmentation and the classification scores (host side, no compilation)."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from vasomim_jax.finetune import cls_metrics, data


def input_cfg(**kw):
    base = dict(rotate_deg=10.0, scale=(0.9, 1.1), hflip_prob=0.5, brightness=0.1, contrast=0.1)
    return ConfigDict({**base, **kw})


def test_identity_settings_only_resize_and_flip_exactly():
    image = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
    mask = (image > 128).astype(np.uint8)
    cfg = input_cfg(rotate_deg=0.0, scale=(1.0, 1.0), hflip_prob=1.0, brightness=0.0, contrast=0.0)
    img, m = data.augment(image, mask, np.random.default_rng(1), size=48, input_cfg=cfg)
    np.testing.assert_array_equal(img, image[:, ::-1])
    np.testing.assert_array_equal(m, mask[:, ::-1])


def test_image_and_mask_get_the_same_geometry():
    # A smooth blob and its thresholded mask stay aligned under rotation / scale / flip / resize.
    yy, xx = np.mgrid[:100, :100]
    image = (255 * np.exp(-((yy - 30) ** 2 + (xx - 65) ** 2) / 300.0)).astype(np.uint8)
    mask = (image > 100).astype(np.uint8)
    cfg = input_cfg(brightness=0.0, contrast=0.0)
    for seed in range(5):
        img, m = data.augment(image, mask, np.random.default_rng(seed), size=64, input_cfg=cfg)
        assert img.shape == m.shape == (64, 64) and set(np.unique(m)) <= {0, 1}
        agree = np.mean((img > 100) == (m == 1))
        assert agree > 0.98, seed


def test_augmentation_is_deterministic_in_its_generator():
    image = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    a = data.augment(image, None, np.random.default_rng((0, 1, 2)), size=32, input_cfg=input_cfg())[0]
    b = data.augment(image, None, np.random.default_rng((0, 1, 2)), size=32, input_cfg=input_cfg())[0]
    c = data.augment(image, None, np.random.default_rng((0, 1, 3)), size=32, input_cfg=input_cfg())[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_binary_auc_hand_computed_with_ties():
    # positives {0.9, 0.5}, negatives {0.5, 0.1}: pairs (0.9>0.5, 0.9>0.1, 0.5=0.5 -> 1/2, 0.5>0.1) = 3.5 / 4.
    assert cls_metrics.binary_auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0])) == 0.875
    assert np.isnan(cls_metrics.binary_auc(np.array([0.2, 0.3]), np.array([1, 1])))


def test_accuracy_and_multiclass_auc():
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2, 2])
    assert cls_metrics.accuracy(probs, labels) == 0.75
    # class 0: pos {0.8}, neg {0.1, 0.2, 0.6} -> 1; class 1: pos {0.7} vs {0.1, 0.3, 0.3} -> 1;
    # class 2: pos {0.5, 0.1} vs {0.1, 0.2}: (1 + 1 + 0.5 + 0) / 4 = 0.625.
    assert cls_metrics.auc(probs, labels) == pytest.approx((1 + 1 + 0.625) / 3)


def test_evaluate_overrides_replace_only_the_fields_given():
    from absl import flags
    from ml_collections import config_flags

    from configs import seg_vessel
    from vasomim_jax.finetune import evaluate

    argv = ["evaluate", "--config.dataset.name=arcade/syntax", "--config.dataset.split=validation",
            "--config.dataset.mask_key=vessel_mask", "--config.eval.threshold=0.3"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", evaluate.eval_flags_config(), flag_values=fv, sys_argv=argv)
    fv(argv)
    run = seg_vessel.get_config()
    merged = evaluate.merge(run, fv.config)
    assert (merged.dataset.name, merged.dataset.eval_split, merged.dataset.mask_key) == (
        "arcade/syntax", "validation", "vessel_mask")
    assert merged.eval.threshold == 0.3
    assert merged.dataset.image_key == run.dataset.image_key and merged.eval.batch_size == run.eval.batch_size
    assert merged.model == run.model


@pytest.mark.parametrize("module", ["seg_vessel", "cls_finetune", "cls_linear_probe"])
def test_shipped_configs_validate(module):
    import importlib

    from vasomim_jax.finetune import task

    task.validate(importlib.import_module(f"configs.{module}").get_config())


@pytest.mark.parametrize("field,value,message", [
    ("task", "detection", "config.task='detection'"),
    ("num_classes", 2, "config.num_classes=2"),
    ("eval_every_steps", -1, "config.eval_every_steps=-1"),
    ("linear_probe", True, "config.linear_probe=True"),
])
def test_bad_finetune_fields_are_named(field, value, message):
    from configs import seg_vessel
    from vasomim_jax.finetune import task

    c = seg_vessel.get_config()
    c[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        task.validate(c)


def test_non_power_of_two_patch_fails_validation_naming_the_field():
    from configs import seg_vessel
    from vasomim_jax.finetune import task

    c = seg_vessel.get_config()
    c.model.patch_size = 14
    with pytest.raises(ValueError, match="config.model.patch_size=14"):
        task.validate(c)
