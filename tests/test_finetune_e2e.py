"""`vasomim finetune` / `vasomim evaluate` end to end: ViT-Ti width (2 blocks, 32 px, patch 16) on tiny
`vessel_seg_folder` / `class_folder` builds of synthetic angiograms, from each kind of initialisation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_builders  # noqa: F401  (registers the builders)
from builders_testlib import write
from configs import common
from export_testlib import random_params, tiny_config, write_workdir
from vasomim_jax import checkpoint, export, synthetic
from vasomim_jax.finetune import evaluate, train

N_TRAIN, N_TEST = 6, 3


def _build(name, manual, data_dir):
    builder = tfds.builder(name, data_dir=str(data_dir), num_workers=1)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)),
                                 file_format="array_record")


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    for i in range(N_TRAIN + N_TEST):
        split = "training" if i < N_TRAIN else "testing"
        image, mask = synthetic.angiogram(i, 64)
        write(root / "manual" / "images" / split / f"{i}.png", image)
        write(root / "manual" / "masks" / split / f"{i}_gt.png", mask * 255)
    _build("vessel_seg_folder", root / "manual", root / "tfds")
    return root / "tfds"


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every run compiles the same step: compile once per module."""
    old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def seg_config(data_dir: Path, init_from: str = ""):
    c = common.finetune_config("segmentation")
    c.dataset.name, c.dataset.data_dir, c.dataset.eval_split = "vessel_seg_folder", str(data_dir), "test"
    c.model = common.model_config("ti", patch_size=16, img_size=32, in_chans=1)
    c.model.depth = 2
    c.decoder.features = 4
    c.batch_size, c.total_steps, c.log_every_steps, c.eval_every_steps = 2, 4, 2, 2
    c.checkpoint.every_steps = 4
    c.metrics.tensorboard = False
    c.optim.lr = 1e-3
    c.init_from = init_from
    return c


def pretrain_workdir(tmp_path: Path) -> tuple[Path, dict]:
    config = tiny_config(patch_size=16, img_size=32, depth=2)
    params = random_params(config.model, seed=3)
    return write_workdir(tmp_path / "pretrain", config, {7: params}), params


def logged(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_finite_seg_eval(workdir: Path, steps=(2, 4)):
    evals = [r for r in logged(workdir) if "dice" in r]
    assert [r["step"] for r in evals] == list(steps)
    for r in evals:
        assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["cldice"] <= 1.0
    train_rows = [r for r in logged(workdir) if "loss" in r]
    assert train_rows and all(np.isfinite(r["loss"]) for r in train_rows)


def test_random_init_fine_tunes_logs_dice_and_evaluates_any_split(seg_data, tmp_path):
    workdir = tmp_path / "ft"
    assert train.train(seg_config(seg_data), workdir) == 4
    assert_finite_seg_eval(workdir)
    assert (checkpoint.checkpoint_dir(workdir) / "4").is_dir()

    overrides = evaluate.eval_flags_config()
    overrides.dataset.split = "train"  # not the run's eval split
    overrides.eval.save_predictions = True
    summary = evaluate.evaluate(workdir, overrides)
    with open(workdir / "eval" / "vessel_seg_folder_train.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r.keys() for r in rows][0] == {"file_name", "dice", "cldice"}
    assert sorted(r["file_name"] for r in rows) == sorted(f"training/{i}.png" for i in range(N_TRAIN))
    stored = json.loads((workdir / "eval" / "vessel_seg_folder_train.json").read_text())
    dice = np.array([float(r["dice"]) for r in rows])
    assert stored["n"] == summary["n"] == N_TRAIN
    assert stored["dice_mean"] == pytest.approx(dice.mean()) and stored["dice_std"] == pytest.approx(dice.std())
    for k in ("cldice_mean", "cldice_std"):
        assert 0.0 <= stored[k] <= 1.0
    pred = (workdir / "eval" / "vessel_seg_folder_train" / "training" / "0.png")
    assert pred.is_file()  # native resolution
    import cv2

    assert cv2.imread(str(pred), cv2.IMREAD_GRAYSCALE).shape == (64, 64)


def test_init_from_a_pretraining_workdir_loads_its_encoder(seg_data, tmp_path):
    pre_dir, pre_params = pretrain_workdir(tmp_path)
    c = seg_config(seg_data, str(pre_dir))  # the random-init run's step: compiled once
    workdir = tmp_path / "ft"
    train.train(c, workdir)
    assert_finite_seg_eval(workdir)
    _, params, _ = checkpoint.load_params(workdir)
    # 4 AdamW steps move a weight by at most ~4 * lr * (1 - b1) / sqrt(1 - b2) = 0.0127: what is read back is
    # the loaded encoder (a fresh xavier init differs from these N(0, 0.02²) weights by far more).
    bound = 4 * c.optim.lr * (1 - c.optim.b1) / np.sqrt(1 - c.optim.b2) + 1e-4
    for key in ("patch_embed", "cls_token", "encoder"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=bound), params["backbone"][key],
                     pre_params[key])


@pytest.mark.parametrize("file_name,fmt", [("encoder.safetensors", "timm"), ("mae_official.pth", "mae")])
def test_init_from_an_exported_or_official_file(seg_data, tmp_path, file_name, fmt):
    if file_name.endswith(".pth"):
        pytest.importorskip("torch")
    pre_dir, pre_params = pretrain_workdir(tmp_path)
    out = tmp_path / file_name
    export.export(pre_dir, out, fmt=fmt)
    train.train(seg_config(seg_data, str(out)), tmp_path / "ft")
    assert_finite_seg_eval(tmp_path / "ft")
    _, params, _ = checkpoint.load_params(tmp_path / "ft")
    np.testing.assert_allclose(params["backbone"]["cls_token"], pre_params["cls_token"], atol=0.013)


def test_architecture_mismatch_fails_before_training_naming_init_from(seg_data, tmp_path):
    pre_dir, _ = pretrain_workdir(tmp_path)
    c = seg_config(seg_data, str(pre_dir))
    c.model.depth = 3
    with pytest.raises(ValueError, match="config.init_from="):
        train.train(c, tmp_path / "ft")
    assert not (tmp_path / "ft" / "metrics.jsonl").exists()


def test_linear_probe_classification_logs_accuracy_and_auc(tmp_path):
    manual = tmp_path / "manual"
    for i in range(8):  # label = whether the image is flipped upside down (separable, not trivially)
        image, _ = synthetic.angiogram(100 + i, 64)
        for split in ("train", "test"):
            write(manual / split / "flipped" / f"{i}.png", image[::-1])
            write(manual / split / "upright" / f"{i}.png", image)
    _build("class_folder", manual, tmp_path / "tfds")
    c = common.finetune_config("classification")
    c.dataset.name, c.dataset.data_dir, c.dataset.eval_split = "class_folder", str(tmp_path / "tfds"), "test"
    c.model = common.model_config("ti", patch_size=16, img_size=32, in_chans=1)
    c.model.depth = 2
    c.num_classes, c.linear_probe, c.drop_path_rate = 2, True, 0.0
    c.batch_size, c.total_steps, c.log_every_steps, c.eval_every_steps = 4, 3, 1, 0
    c.checkpoint.every_steps = 3
    c.metrics.tensorboard = False
    workdir = tmp_path / "ft"
    train.train(c, workdir)
    evals = [r for r in logged(workdir) if "accuracy" in r]
    assert [r["step"] for r in evals] == [3]
    assert 0.0 <= evals[0]["accuracy"] <= 1.0 and 0.0 <= evals[0]["auc"] <= 1.0


@pytest.mark.slow
def test_fine_tuning_on_a_2x2_fake_device_mesh_resumes_from_its_checkpoint(seg_data, tmp_path):
    """Subprocesses (the device count is fixed at jax import): 4 fake CPU devices, mesh data=2 x fsdp=2 with FSDP
    on every parameter; a run stopped at step 2 resumes there and finishes at step 4."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    workdir = tmp_path / "ft"
    script = (
        "import sys; sys.path.insert(0, 'tests'); import test_finetune_e2e as t; from vasomim_jax.finetune import "
        f"train; c = t.seg_config(__import__('pathlib').Path({str(seg_data)!r})); c.mesh.data, c.mesh.fsdp = 2, 2; "
        "c.sharding.min_fsdp_size = 1; c.batch_size = 4; c.checkpoint.every_steps = 2; "
        "c.total_steps = int(sys.argv[1]); c.optim.warmup_fraction = 0.0; "
        f"print('LAST', train.train(c, {str(workdir)!r}))")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    for total in ("2", "4"):
        res = subprocess.run([sys.executable, "-c", script, total], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-4000:]
        assert f"LAST {total}" in res.stdout
    # A fresh second run would log steps 2 and 4 again: resumed, it logs (and evaluates) step 4 only.
    assert [r["step"] for r in logged(workdir) if "loss" in r] == [2, 4]
    assert [r["step"] for r in logged(workdir) if "dice" in r] == [2, 4]
