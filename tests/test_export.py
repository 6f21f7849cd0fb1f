"""Export / import parity against PyTorch: timm `VisionTransformer`, an official-MAE model built from timm Blocks,
official `.pth` checkpoints, and timm's own resampling / channel adaptation."""

from __future__ import annotations

import argparse
import functools
import json
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from export_testlib import assert_trees_equal, random_images, random_params, tiny_config, write_workdir  # noqa: E402
from vasomim_jax import export, masking, models  # noqa: E402
from vasomim_jax.pretrained import load_pretrained  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-4  # max abs difference, float32


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2)))  # a writable copy


def _timm_from_export(path) -> torch.nn.Module:
    """The model built by the printed call, loaded strictly from the exported safetensors / .pth."""
    meta = json.loads(path.with_suffix(".json").read_text())
    with torch.device("meta"):  # skip timm's (slow) random init: every tensor comes from the file
        model = eval(meta["timm_create_model"], {"timm": timm})
    if path.suffix == ".pth":
        state_dict = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        state_dict = load_file(str(path))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("size,patch,img,chans", [
    ("ti", 16, 224, 3), ("ti", 8, 64, 1), ("b", 16, 224, 3),
    pytest.param("b", 16, 96, 1, marks=pytest.mark.slow)])  # B in_chans=1: same code path as Ti in_chans=1
def test_timm_export_matches_forward_features(tmp_path, size, patch, img, chans):
    config = tiny_config(size, patch, img, chans, depth=12)
    workdir = write_workdir(tmp_path / "wd", config, {1: random_params(config.model)})
    export.export(workdir, tmp_path / "enc.safetensors", fmt="timm")
    tm = _timm_from_export(tmp_path / "enc.safetensors")
    assert "mask_token" not in tm.state_dict()

    images = random_images((2, img, img))
    tokens, pooled = load_pretrained(workdir).encode(images)
    with torch.no_grad():
        x = _nchw(models.preprocess(jnp.asarray(images), config.model))
        ref_tokens, ref_pooled = tm.forward_features(x).numpy(), tm(x).numpy()
    assert tokens.shape == (2, 1 + (img // patch) ** 2, config.model.embed_dim)
    err = max(np.abs(ref_tokens - tokens).max(), np.abs(ref_pooled - pooled).max())
    print(f"parity {size} p{patch} {img}px in_chans={chans}: max abs err {err:.2e}")
    assert err <= TOL


class TorchMAE(torch.nn.Module):
    """facebookresearch/mae `MaskedAutoencoderViT` (its key names) from timm parts, masking given as indices."""

    def __init__(self, c):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
        num = (c.img_size // c.patch_size) ** 2
        d, dd = c.embed_dim, c.decoder_embed_dim
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, d)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, num + 1, d), requires_grad=False)
        self.blocks = torch.nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=norm)
                                          for _ in range(c.depth))
        self.norm = norm(d)
        self.decoder_embed = torch.nn.Linear(d, dd)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = torch.nn.Parameter(torch.zeros(1, num + 1, dd), requires_grad=False)
        self.decoder_blocks = torch.nn.ModuleList(
            Block(dd, c.decoder_num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(c.decoder_depth))
        self.decoder_norm = norm(dd)
        self.decoder_pred = torch.nn.Linear(dd, c.patch_size**2 * c.in_chans)

    def forward(self, x, ids_keep, ids_restore):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        masked = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], masked], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


@pytest.mark.parametrize("chans", [1, 3])
def test_mae_export_matches_official_mae_predictions(tmp_path, chans):
    config = tiny_config("ti", 8, 64, chans, depth=12, decoder=(128, 2, 4))
    params = random_params(config.model)
    workdir = write_workdir(tmp_path / "wd", config, {1: params})
    export.export(workdir, tmp_path / "mae.safetensors", fmt="mae")
    from safetensors.torch import load_file

    ref = TorchMAE(config.model).eval()
    ref.load_state_dict(load_file(str(tmp_path / "mae.safetensors")), strict=True)

    x = models.preprocess(jnp.asarray(random_images((2, 64, 64))), config.model)
    m = masking.guided_mask(jax.random.key(3), jnp.ones((2, 64)), mask_ratio=0.75, beta=0.0)
    pred = models.build_mae(config.model).apply({"params": params}, x, m.ids_keep, m.ids_restore)
    with torch.no_grad():
        ref_pred = ref(_nchw(x), torch.from_numpy(np.asarray(m.ids_keep, np.int64)),
                       torch.from_numpy(np.asarray(m.ids_restore, np.int64))).numpy()
    err = np.abs(ref_pred - np.asarray(pred)).max()
    print(f"MAE-format parity in_chans={chans}: max abs err {err:.2e}")
    assert err <= TOL


def test_cli_prints_the_create_model_call_alone_and_writes_pth(tmp_path):
    config = tiny_config()
    workdir = write_workdir(tmp_path / "wd", config, {3: random_params(config.model)})
    out = tmp_path / "encoder.pth"
    code = ("import sys; from absl import app; from vasomim_jax import export; export.define_flags(); "
            "app.run(export.main, argv=['vasomim export'] + sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", code, f"--workdir={workdir}", "--format=timm", f"--out={out}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    calls = [line for line in done.stdout.splitlines() if line.startswith("timm.create_model(")]
    assert len(calls) == 1 and calls[0] == json.loads(out.with_suffix(".json").read_text())["timm_create_model"]
    for keyword in ("img_size=32", "patch_size=8", "in_chans=1", "embed_dim=192", "depth=2", "num_heads=3",
                    "mlp_ratio=4.0", "num_classes=0", "global_pool='token'"):
        assert keyword in calls[0]
    tm = _timm_from_export(out)
    images = random_images((2, 32, 32))
    with torch.no_grad():
        ref = tm.forward_features(_nchw(models.preprocess(jnp.asarray(images), config.model))).numpy()
    assert np.abs(ref - load_pretrained(workdir).encode(images)[0]).max() <= TOL


def test_official_mae_pth_with_optimizer_and_args_imports(tmp_path, caplog):
    config = tiny_config(decoder=(64, 1, 16))  # official decoder heads: inferred when a file has no config
    params = random_params(config.model)
    workdir = write_workdir(tmp_path / "wd", config, {1: params})
    state_dict = {k: torch.from_numpy(v) for k, v in export.to_mae(params, config.model).items()}
    state_dict["segmentor.weight"] = torch.zeros(3)  # XA-SSL-style extra module: reported, not loaded
    checkpoint = {"model": state_dict, "epoch": 799, "scaler": {"scale": 65536.0},
                  "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]},
                  "args": argparse.Namespace(model="mae_vit_tiny_patch8", input_size=32, mask_ratio=0.5,
                                             norm_pix_loss=True, output_dir="./out")}
    torch.save(checkpoint, tmp_path / "checkpoint-799.pth")
    with pytest.raises(pickle.UnpicklingError):  # why the allow-list is needed (torch >= 2.6 default)
        torch.load(tmp_path / "checkpoint-799.pth")

    loaded = load_pretrained(tmp_path / "checkpoint-799.pth")
    assert loaded.report.unexpected == ("segmentor.weight",) and loaded.report.missing == ()
    assert "unexpected keys (1): ['segmentor.weight']" in caplog.text  # reported, not silently dropped
    assert (loaded.config.model.depth, loaded.config.model.num_heads, loaded.config.model.img_size) == (2, 3, 32)
    assert_trees_equal(loaded.params, params)
    images = random_images((2, 32, 32))
    ours, theirs = load_pretrained(workdir).reconstruct(images, jax.random.key(1)), loaded.reconstruct(
        images, jax.random.key(1))
    np.testing.assert_array_equal(ours.mask, theirs.mask)  # mask_ratio 0.5 from args
    np.testing.assert_allclose(ours.image, theirs.image, atol=1e-3)  # norm_pix_loss from args

    data = (tmp_path / "checkpoint-799.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"cut\.pth: cannot be read as a PyTorch checkpoint"):
        load_pretrained(tmp_path / "cut.pth")


def test_timm_checkpoint_with_learned_pos_embed_encodes_like_timm(tmp_path):
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    kw = dict(pretrained=False, patch_size=8, in_chans=3, embed_dim=192, depth=2, num_heads=3, num_classes=0,
              global_pool="token")
    small = timm.create_model("vit_base_patch16_224", img_size=32, **kw).eval()
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "timm.safetensors"))

    loaded = load_pretrained(tmp_path / "timm.safetensors")
    assert loaded.learned_pos_embed is not None and "pos_embed: learned" in loaded.report.notes
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)  # normalised floats
    with torch.no_grad():
        ref = small.forward_features(_nchw(x)).numpy()
    assert np.abs(ref - loaded.encode(x)[0]).max() <= TOL

    big = timm.create_model("vit_base_patch16_224", img_size=48, **kw).eval()
    state = dict(small.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [6, 6], num_prefix_tokens=1)
    big.load_state_dict(state, strict=True)
    target = loaded.config.model.copy_and_resolve_references()
    target.img_size = 48
    moved = load_pretrained(tmp_path / "timm.safetensors", model_cfg=target)
    x = np.random.default_rng(1).standard_normal((2, 48, 48, 3)).astype(np.float32)
    with torch.no_grad():
        ref = big.forward_features(_nchw(x)).numpy()
    assert np.abs(ref - moved.encode(x)[0]).max() <= TOL


@pytest.mark.parametrize("old,new", [((7, 7), (10, 10)), ((14, 14), (9, 9)), ((6, 4), (3, 8))])
def test_resample_pos_embed_matches_timm(old, new):
    from timm.layers import resample_abs_pos_embed

    table = np.random.default_rng(0).standard_normal((1, 1 + old[0] * old[1], 16)).astype(np.float32)
    ref = resample_abs_pos_embed(torch.from_numpy(table), list(new), old_size=list(old), num_prefix_tokens=1)
    np.testing.assert_allclose(export.resample_pos_embed(table, new, old), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("have,want", [(3, 1), (1, 3)])
def test_adapt_in_chans_matches_timm_adapt_input_conv(have, want):
    from timm.models import adapt_input_conv

    weight = np.random.default_rng(0).standard_normal((4, have, 2, 2)).astype(np.float32)
    ref = adapt_input_conv(want, torch.from_numpy(weight), base_chans=have).numpy()
    np.testing.assert_allclose(export.adapt_in_chans(weight, want), ref, rtol=1e-6)
