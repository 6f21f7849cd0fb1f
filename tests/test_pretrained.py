"""`load_pretrained` without torch: workdirs, exported safetensors, round trips, adaptation, bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from export_testlib import assert_trees_equal, random_images, random_params, tiny_config, write_workdir
from vasomim_jax import export
from vasomim_jax.pretrained import load_init_from, load_pretrained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pre-training workdir with checkpoints at steps 5 and 9 (different params)."""
    config = tiny_config()
    params = {5: random_params(config.model, seed=5), 9: random_params(config.model, seed=9)}
    workdir = write_workdir(tmp_path_factory.mktemp("run") / "workdir", config, params)
    return workdir, config, params


def test_workdir_loads_latest_step_or_the_requested_one(run):
    workdir, config, params = run
    latest = load_pretrained(workdir)
    assert latest.step == 9 and latest.has_decoder
    assert json.loads(latest.config.model.to_json()) == json.loads(config.model.to_json())
    assert_trees_equal(latest.params, params[9])
    assert_trees_equal(load_pretrained(workdir, step=5).params, params[5])
    with pytest.raises(ValueError, match=r"step=7.*have \[5, 9\]"):
        load_pretrained(workdir, step=7)


def test_timm_export_round_trip_is_encoder_only_and_identical(run, tmp_path):
    workdir, _, params = run
    call = export.export(workdir, tmp_path / "enc.safetensors", fmt="timm")
    meta = json.loads((tmp_path / "enc.json").read_text())
    assert meta["timm_create_model"] == call and meta["format"] == "timm" and meta["step"] == 9
    loaded = load_pretrained(tmp_path / "enc.safetensors")
    assert not loaded.has_decoder and "mask_token" in loaded.report.missing and not loaded.report.unexpected
    assert_trees_equal(loaded.params, {k: params[9][k] for k in export.ENCODER_KEYS})
    images = random_images((2, 32, 32))
    np.testing.assert_array_equal(loaded.encode(images)[0], load_pretrained(workdir).encode(images)[0])
    with pytest.raises(ValueError, match="encoder-only"):
        loaded.reconstruct(images, jax.random.key(0))
    with pytest.raises(ValueError, match="encoder-only.*--format=timm"):
        export.export(tmp_path / "enc.safetensors", tmp_path / "mae.safetensors", fmt="mae")


def test_mae_export_round_trip_is_identical_and_reconstructs(run, tmp_path):
    workdir, config, params = run
    export.export(workdir, tmp_path / "mae.safetensors", fmt="mae")
    loaded = load_pretrained(tmp_path / "mae.safetensors")
    assert loaded.has_decoder and loaded.report.missing == () and loaded.report.unexpected == ()
    assert loaded.config.masking.mask_ratio == config.masking.mask_ratio  # the full config travels along
    assert_trees_equal(loaded.params, params[9])
    images, vessels = random_images((2, 32, 32)), np.zeros((2, 32, 32), np.uint8)
    vessels[:, :8, :] = 1  # vessels in the first patch row only
    rec = loaded.reconstruct(images, jax.random.key(0))
    assert rec.mask.shape == (2, 16) and rec.prediction.shape == (2, 16, 64) and rec.image.shape == (2, 32, 32)
    np.testing.assert_array_equal(rec.mask.sum(axis=1), [8, 8])  # mask_ratio 0.5 of 16 patches
    guided = loaded.reconstruct(images, jax.random.key(0), vessels, beta=1.0)
    np.testing.assert_array_equal(guided.mask[:, :4], np.ones((2, 4)))  # all 4 vessel patches masked first


def test_model_cfg_regenerates_sincos_and_adapts_channels(run, tmp_path):
    workdir, config, _ = run
    export.export(workdir, tmp_path / "mae.safetensors", fmt="mae")
    target = config.model.copy_and_resolve_references()
    target.img_size, target.in_chans = 64, 3
    target.mean, target.std = config.model.mean * 3, config.model.std * 3
    moved = load_pretrained(tmp_path / "mae.safetensors", model_cfg=target)
    notes = " ".join(moved.report.notes)
    assert "regenerated for 8x8" in notes and "1 -> 3 input channels" in notes
    assert moved.params["patch_embed"]["kernel"].shape == (8, 8, 3, 192)
    # Kernel repeated / 3 over three identical grey channels = the original single-channel embedding.
    images = random_images((2, 64, 64))
    tokens_3, _ = moved.encode(images)
    tokens_1, _ = load_pretrained(workdir).encode(images)
    np.testing.assert_allclose(tokens_3, tokens_1, atol=1e-4)


def test_bad_workdirs_name_what_is_missing(tmp_path, run):
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(run[1].to_json_best_effort())
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_pretrained(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_pretrained(tmp_path)


def test_another_architecture_is_refused_naming_the_key(run, tmp_path):
    workdir, config, _ = run
    export.export(workdir, tmp_path / "mae.safetensors", fmt="mae")
    deeper = config.model.copy_and_resolve_references()
    deeper.depth = 3
    with pytest.raises(ValueError, match=r"blocks\.2\.norm1\.weight: missing"):
        load_pretrained(tmp_path / "mae.safetensors", model_cfg=deeper)
    shallower = config.model.copy_and_resolve_references()
    shallower.depth = 1
    with pytest.raises(ValueError, match=r"blocks: the source has blocks \[1\] beyond the model's depth=1"):
        load_pretrained(tmp_path / "mae.safetensors", model_cfg=shallower)
    wider = config.model.copy_and_resolve_references()
    wider.mlp_ratio = 2.0
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight: shape \(768, 192\) does not match .*384"):
        load_pretrained(tmp_path / "mae.safetensors", model_cfg=wider)
    from safetensors.numpy import save_file

    save_file({"conv1.weight": np.zeros((8, 3, 3, 3), np.float32)}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(ValueError, match="not a ViT state dict: no patch_embed.proj.weight"):
        load_pretrained(tmp_path / "resnet.safetensors")


def test_truncated_or_unknown_files_are_refused(run, tmp_path):
    workdir, _, _ = run
    export.export(workdir, tmp_path / "mae.safetensors", fmt="mae")
    data = (tmp_path / "mae.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors: not a readable safetensors file \(truncated"):
        load_pretrained(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_pretrained(tmp_path / "mae.json")
    with pytest.raises(ValueError, match="step=3 only applies to workdirs"):
        load_pretrained(tmp_path / "mae.safetensors", step=3)
    with pytest.raises(ValueError, match=r"--out=.*\.npz: the file name must end"):
        export.export(workdir, tmp_path / "w.npz")


def test_encode_refuses_unnormalised_float_images_without_channels(run):
    with pytest.raises(ValueError, match=r"float images must be normalised \(B, H, W, in_chans=1\)"):
        load_pretrained(run[0]).encode(np.zeros((2, 32, 32), np.float32))


def test_fine_tuning_workdir_yields_its_encoder(run, tmp_path):
    _, config, params = run
    encoder = {k: params[9][k] for k in export.ENCODER_KEYS}
    head = {"kernel": np.ones((192, 1), np.float32)}
    workdir = write_workdir(tmp_path / "ft", config, {2: {"backbone": encoder, "head": head}})
    loaded = load_pretrained(workdir)
    assert not loaded.has_decoder and loaded.step == 2
    assert_trees_equal(loaded.params, encoder)


def test_init_from_weights_fit_the_run_grid_and_keep_the_source_decoder(run, tmp_path):
    """The one loader behind pre-training's and fine-tuning's ``config.init_from``."""
    workdir, config, params = run
    run_model = config.model.copy_and_resolve_references()
    run_model.img_size, run_model.decoder_embed_dim, run_model.decoder_depth = 64, 32, 3
    assert_trees_equal(load_init_from(str(workdir), run_model), params[9])  # sin-cos tables are not params
    assert_trees_equal(load_init_from(str(workdir), config.model, step=5), params[5])
    with pytest.raises(ValueError, match=r"config\.init_from='.*nowhere': .*no such file"):
        load_init_from(str(tmp_path / "nowhere"), config.model)
