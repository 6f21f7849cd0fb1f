"""One loader for every kind of pre-trained weights: ``vasomim_jax.load_pretrained(path, step=None)``.

Sources: a pre-training (or fine-tuning) workdir (orbax checkpoints + config.json), a safetensors file written by
``vasomim export`` (config in its metadata or in ``<file>.json``) or any timm / facebookresearch-mae state dict, and
official MAE / XA-SSL ``.pth`` files (``{'model', 'optimizer', 'epoch', 'args', ...}``). ``.pth`` files are read
with ``torch.load(weights_only=True)`` through an allow-list of the globals they need (``argparse.Namespace``);
never with ``weights_only=False``. Without a stored config, the architecture is inferred from the tensor shapes
(and the ``args`` of an official checkpoint); ``model_cfg=`` makes the weights fit another grid / in_chans.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from vasomim_jax import export, losses, masking, models
from vasomim_jax.models.preprocess import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # timm / MAE ViT-Ti/S/B/L/H
TORCH_SAFE_GLOBALS = (argparse.Namespace,)  # the only non-tensor global of official MAE / XA-SSL .pth files


class Reconstruction(NamedTuple):
    mask: jax.Array  # float32 (B, L): 1 = masked (MAE convention)
    prediction: jax.Array  # float32 (B, L, p*p*C): raw decoder output (per-patch normalised with norm_pix_loss)
    image: jax.Array  # float32 (B, H, W): reconstruction of every patch, grey 0..255 (de-normalised per patch)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Loaded weights. ``params`` is our linen param tree (numpy float32): encoder entries always, decoder entries
    (``decoder_embed``, ``mask_token``, ``decoder``, ``decoder_pred``) when the source has them."""

    config: ConfigDict  # at least ``.model``; the full run config for workdirs and our exports
    params: dict
    source: str
    step: int | None
    report: export.ImportReport
    learned_pos_embed: np.ndarray | None = None  # (1, 1+L, D) for timm sources with learned embeddings

    @property
    def has_decoder(self) -> bool:
        return all(k in self.params for k in export.DECODER_KEYS)

    @functools.cached_property
    def model(self) -> models.MAE:
        return models.build_mae(self.config.model)

    @functools.cached_property
    def _variables(self) -> dict:
        params = dict(self.params)
        # MAE.setup declares mask_token eagerly; encoder-only weights get an unused zero one (never exposed).
        params.setdefault("mask_token", np.zeros((1, 1, self.config.model.decoder_embed_dim), np.float32))
        return {"params": jax.device_put(params)}

    def _model_input(self, images) -> jax.Array:
        """uint8 images go to the model as they are (it normalises them as in training); float ones must be
        normalised already."""
        images = jnp.asarray(images)
        if images.dtype == jnp.uint8:
            return images
        c = self.config.model.in_chans
        if images.ndim != 4 or images.shape[-1] != c:
            raise ValueError(f"float images must be normalised (B, H, W, in_chans={c}), got shape {images.shape}; "
                             f"pass uint8 images to have them normalised as in training")
        return images.astype(jnp.float32)

    @functools.cached_property
    def _encode_fn(self):
        pos = None if self.learned_pos_embed is None else jnp.asarray(self.learned_pos_embed)
        return jax.jit(lambda variables, x: self.model.apply(variables, x, pos_embed=pos, method="encode"))

    def encode(self, images) -> tuple[jax.Array, jax.Array]:
        """Encoder on all patches, no masking: tokens float32 (B, 1+L, D) after the final norm (timm
        ``forward_features``) and pooled (B, D) = the cls token. uint8 (B, H, W[, C]) images are normalised as in
        training; float (B, H, W, C) images are taken as already normalised."""
        return self._encode_fn(self._variables, self._model_input(images))

    @functools.cached_property
    def _reconstruct_fn(self):
        loss_cfg = self.config.get("loss", ConfigDict())
        norm_pix, unbiased = loss_cfg.get("norm_pix_loss", True), loss_cfg.get("unbiased_var", True)

        def fn(variables, x, scores, key, beta, mask_ratio):
            mk = masking.guided_mask(key, scores, mask_ratio=mask_ratio, beta=beta)
            f = losses.masked_forward(self.model, variables["params"], x, mk, beta, self.config.model,
                                      norm_pix=norm_pix, unbiased=unbiased)
            return Reconstruction(mk.mask, f.pred, f.rec_grey)

        return jax.jit(fn, static_argnames="mask_ratio")

    def reconstruct(self, images, key: jax.Array, vessel_map=None, *, mask_ratio: float | None = None,
                    beta: float | None = None) -> Reconstruction:
        """Masks (random, β = 0; or guided by ``vessel_map`` (B, H, W) {0,1} with β = masking.beta_end) and
        reconstructs. ``mask_ratio`` defaults to the config's (0.75 for official checkpoints without one)."""
        if not self.has_decoder:
            raise ValueError(f"{self.source}: these are encoder-only weights (no decoder_embed / mask_token / "
                             f"decoder_blocks), so .reconstruct is not available; load a pre-training workdir or "
                             f"an MAE-format export / official MAE .pth")
        x = self._model_input(images)
        p = self.config.model.patch_size
        masking_cfg = self.config.get("masking", ConfigDict())
        if vessel_map is None:
            scores = jnp.zeros((x.shape[0], (x.shape[1] // p) * (x.shape[2] // p)), jnp.float32)
            beta = 0.0 if beta is None else beta
        else:
            vessel_map = jnp.asarray(vessel_map)
            if vessel_map.shape != x.shape[:3]:
                raise ValueError(f"vessel_map has shape {vessel_map.shape}, images {x.shape[:3]}")
            scores = masking.patch_scores(vessel_map.astype(jnp.float32), p)
            beta = masking_cfg.get("beta_end", 0.5) if beta is None else beta
        mask_ratio = masking_cfg.get("mask_ratio", 0.75) if mask_ratio is None else mask_ratio
        return self._reconstruct_fn(self._variables, x, scores, key, jnp.float32(beta), mask_ratio=mask_ratio)


# ---------------------------------------------------------------------------------------------------------------
# reading files


def read_state_dict(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(state_dict as numpy, info) from a .safetensors or .pth; info holds the stored config / ``args``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        info = json.loads(meta["vasomim"]) if "vasomim" in meta else {}
    elif path.suffix in (".pth", ".pt", ".bin"):
        sd, info = _read_torch(path)
    else:
        raise ValueError(f"{path}: unknown weights format (expected a workdir, .safetensors or .pth)")
    sidecar = path.with_suffix(".json")
    if not info and sidecar.is_file():
        info = json.loads(sidecar.read_text())
    return sd, info


def _read_torch(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading .pth files needs torch (pip install 'vasomim-jax[torch]')") from e
    try:
        with torch.serialization.safe_globals(list(TORCH_SAFE_GLOBALS)):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError / EOFError for bad files
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True (truncated, or it "
                         f"needs globals beyond {[g.__name__ for g in TORCH_SAFE_GLOBALS]}): "
                         f"{str(e).splitlines()[0][:300]}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict (a state dict or {{'model': ...}}), got {type(ckpt).__name__}")
    info = {}
    if isinstance(ckpt.get("args"), argparse.Namespace):
        info["args"] = vars(ckpt["args"])
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))
    tensors = {k: v.detach().float().cpu().numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: no tensors in the checkpoint's state dict (keys: {sorted(ckpt)[:10]})")
    return {k.removeprefix("module."): v for k, v in tensors.items()}, info


def infer_model_config(sd: dict[str, np.ndarray], args: dict | None = None) -> ConfigDict:
    """A ``config.model`` from tensor shapes (+ official ``args``: ``input_size``, ``model`` name)."""
    if "patch_embed.proj.weight" not in sd:
        raise ValueError(f"not a ViT state dict: no patch_embed.proj.weight (keys: {sorted(sd)[:8]})")
    d, c, p, _ = sd["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if "pos_embed" in sd:
        img = math.isqrt(sd["pos_embed"].shape[1] - 1) * p
    else:
        img = int((args or {}).get("input_size", 224))
    dd = sd["decoder_embed.weight"].shape[0] if "decoder_embed.weight" in sd else 512
    dec_depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")}) or 8
    return ConfigDict(dict(
        name=str((args or {}).get("model", f"vit_d{d}_p{p}")), img_size=int(img), patch_size=int(p),
        in_chans=int(c), embed_dim=int(d), depth=depth, num_heads=HEADS_BY_WIDTH.get(int(d), max(1, int(d) // 64)),
        mlp_ratio=float(sd["blocks.0.mlp.fc1.weight"].shape[0] / d) if "blocks.0.mlp.fc1.weight" in sd else 4.0,
        decoder_embed_dim=int(dd), decoder_depth=dec_depth, decoder_num_heads=16,  # official MAE decoder heads
        dtype="float32", remat_policy="none",
        mean=IMAGENET_MEAN if c == 3 else GREY_MEAN, std=IMAGENET_STD if c == 3 else GREY_STD))


def _config_from_info(sd: dict, info: dict) -> ConfigDict:
    if "config" in info:
        return ConfigDict(info["config"])
    if "model" in info:
        return ConfigDict({"model": info["model"]})
    args = info.get("args", {})
    config = ConfigDict({"model": infer_model_config(sd, args)})
    config.loss = ConfigDict({"norm_pix_loss": bool(args.get("norm_pix_loss", False)), "unbiased_var": True})
    config.masking = ConfigDict({"mask_ratio": float(args.get("mask_ratio", 0.75)), "beta_end": 0.5})
    return config


def _vit_subtree(params: dict, where: str) -> dict:
    """The MAE / ViT param dict inside a (pre-training or fine-tuning) param tree."""
    if all(k in params for k in export.ENCODER_KEYS):
        return params
    for value in params.values():
        if isinstance(value, dict) and all(k in value for k in export.ENCODER_KEYS):
            return value
    raise ValueError(f"{where}: no ViT encoder ({list(export.ENCODER_KEYS)}) in the checkpoint params "
                     f"(top-level keys: {sorted(params)})")


def load_pretrained(path: str | Path, step: int | None = None, *, model_cfg: ConfigDict | None = None) -> Pretrained:
    """Loads a workdir (``step`` = checkpoint step, default latest), an exported / timm / MAE ``.safetensors`` or
    an official MAE / XA-SSL ``.pth``. ``model_cfg`` (a ``config.model``) adapts the weights to another image
    size / in_chans (sin-cos tables regenerated, learned ones resampled, patch kernel channels summed / repeated)
    and must otherwise match the source architecture."""
    path = Path(path)
    if path.is_dir():
        from vasomim_jax import checkpoint  # orbax only for workdirs

        config, params, step = checkpoint.load_params(path, step=step)
        if "model" not in config:
            raise ValueError(f"{path}/config.json has no 'model' section")
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), _vit_subtree(params, str(path)))
        encoder_only = not all(k in params for k in export.DECODER_KEYS)
        missing = export.DECODER_SOURCE_KEYS if encoder_only else ()
        report, learned = export.ImportReport(missing, (), ()), None
        if model_cfg is not None:
            as_torch = export.to_timm if encoder_only else export.to_mae
            params, learned, report = export.from_torch(as_torch(params, config.model), model_cfg)
    else:
        if step is not None:
            raise ValueError(f"step={step} only applies to workdirs, not to the file {path}")
        sd, info = read_state_dict(path)
        config, step = _config_from_info(sd, info), info.get("step")
        try:
            params, learned, report = export.from_torch(sd, model_cfg or config.model)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: {e.args[0] if e.args else e}") from e
    if model_cfg is not None:
        config = ConfigDict(config.to_dict())
        config.model = model_cfg
    # Half-loaded weights are the classic MAE-repository failure: always say what was left out.
    (log.warning if report.unexpected else log.info)("load_pretrained(%s):\n%s", path, report)
    return Pretrained(config=config, params=params, source=str(path), step=step, report=report,
                      learned_pos_embed=learned)


GRID_KEYS = ("img_size", "patch_size", "in_chans")  # what model_cfg may change in load_pretrained
DECODER_CFG_KEYS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def load_init_from(init_from: str, model_cfg: ConfigDict, step: int | None = None) -> dict:
    """The weights a run's ``config.init_from`` names (workdir at ``step``, export or official .pth), for
    pre-training and fine-tuning alike: our param tree (numpy float32) with the encoder, and the decoder entries
    when the source has them (its own decoder architecture), fitted to ``model_cfg``'s image size / patch size /
    in_chans. Whether depth and widths fit is the caller's check (against its model's shapes). Errors are
    ValueErrors naming ``config.init_from``."""
    try:
        loaded = load_pretrained(init_from, step)
        if any(loaded.config.model[k] != model_cfg[k] for k in GRID_KEYS):
            # Adapt only the grid; the source's decoder fields keep its decoder weights loadable.
            target = ConfigDict(model_cfg.to_dict())
            for k in DECODER_CFG_KEYS:
                target[k] = loaded.config.model[k]
            loaded = load_pretrained(init_from, step, model_cfg=target)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ValueError(f"config.init_from={init_from!r}: {e}") from e
    if loaded.learned_pos_embed is not None:
        raise ValueError(f"config.init_from={init_from!r}: learned position embeddings; our models use the fixed "
                         "MAE sin-cos table")
    return loaded.params
