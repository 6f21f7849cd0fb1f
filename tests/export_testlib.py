"""Shared builders for tests/test_export.py and tests/test_pretrained.py: configs and real orbax workdirs."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import common
from vasomim_jax import checkpoint, models


def tiny_config(size="ti", patch_size=8, img_size=32, in_chans=1, depth=2, decoder=(64, 1, 4)):
    """A pre-training config with a small model (the shapes of ViT-``size`` at reduced depth)."""
    c = common.pretrain_config()
    c.model = common.model_config(size, patch_size, img_size, in_chans)
    c.model.depth = depth
    c.model.decoder_embed_dim, c.model.decoder_depth, c.model.decoder_num_heads = decoder
    return c


def random_params(model_cfg, seed=0) -> dict:
    """Random params of the model's tree, every leaf non-trivial (zero biases / unit norms would hide layout
    bugs). Shapes from ``eval_shape`` (no compilation), values from numpy: LayerNorm scales 1 + N(0, 0.1²),
    everything else N(0, 0.02²) as timm's ViT init."""
    model = models.build_mae(model_cfg)
    shape = (1, model_cfg.patch_size, model_cfg.patch_size, model_cfg.in_chans)
    abstract = jax.eval_shape(lambda k: models.init_params(model, k, shape), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return base + np.float32(0.1 if base else 0.02) * rng.standard_normal(x.shape, dtype=np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def write_workdir(workdir: Path, config, params_by_step: dict[int, dict]) -> Path:
    """A pre-training workdir as the trainer writes it: config.json + checkpoints/<step>/state."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    with ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir), item_names=checkpoint.ITEMS) as manager:
        for step, params in params_by_step.items():
            state = {"step": np.int32(step), "params": params, "opt_state": {"count": np.int32(step)}}
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    return workdir


def random_images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def assert_trees_equal(a: dict, b: dict) -> None:
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        assert np.asarray(x).dtype == np.asarray(y).dtype == np.float32, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
