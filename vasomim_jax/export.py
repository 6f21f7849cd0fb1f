"""Export to PyTorch (timm `VisionTransformer` / facebookresearch-mae naming) and import of PyTorch state dicts.

    vasomim export --workdir=DIR [--step=N] --format=timm --out=encoder.safetensors
    vasomim export --workdir=DIR --format=mae --out=mae.pth

``--workdir`` takes anything `vasomim_jax.load_pretrained` reads (a workdir, an exported .safetensors, an official
MAE / XA-SSL .pth). ``timm`` writes the encoder only (a state dict with ``mask_token`` is routed by timm to its
DINOv2 converter and mangled) and prints, alone on one line, the ``timm.create_model(...)`` call that builds the
matching model; ``mae`` writes encoder + decoder with the key names of facebookresearch/mae ``models_mae.py``.
The call and the model config are stored in the safetensors metadata and in ``<out>.json`` next to the weights.
Tensors are float32 whatever the training dtype; the conversion needs numpy only (torch only to write ``.pth``).

Layout differences handled here: our patch embedding is an HWIO conv kernel (torch: OIHW), dense kernels are
(in, out) (torch: (out, in)), LayerNorm ``scale`` is torch's ``weight``, and the scanned blocks carry a leading
depth axis (torch: ``blocks.<i>.``). The qkv output features are ordered (3, heads, head_dim) in both.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from absl import flags
from flax import traverse_util

from vasomim_jax.models.pos_embed import sincos_2d

ENCODER_KEYS = ("patch_embed", "cls_token", "encoder")
DECODER_KEYS = ("decoder_embed", "mask_token", "decoder", "decoder_pred")
# Source (torch) keys of the MAE decoder, as listed in `ImportReport.missing` for encoder-only sources.
DECODER_SOURCE_KEYS = ("decoder_embed.*", "mask_token", "decoder_pos_embed", "decoder_blocks.*", "decoder_norm.*",
                       "decoder_pred.*")
TIMM_BASE_ARCH = "vit_base_patch16_224"  # every architecture keyword is passed explicitly on top of it


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What an import did: torch keys it did not use, params it could not fill, and adaptations applied."""

    missing: tuple[str, ...]  # source (torch) keys of the full MAE that the source lacks
    unexpected: tuple[str, ...]  # source keys that were not used
    notes: tuple[str, ...]  # adaptations: regenerated / interpolated position embeddings, channel adaptation

    def __str__(self) -> str:
        parts = [f"missing keys ({len(self.missing)}): {list(self.missing)}",
                 f"unexpected keys ({len(self.unexpected)}): {list(self.unexpected)}"]
        return "\n".join(parts + [f"note: {n}" for n in self.notes])


def grid_size(model_cfg) -> tuple[int, int]:
    if model_cfg.img_size % model_cfg.patch_size:
        raise ValueError(f"config.model.img_size={model_cfg.img_size} is not divisible by "
                         f"config.model.patch_size={model_cfg.patch_size}")
    g = model_cfg.img_size // model_cfg.patch_size
    return g, g


def timm_create_model_call(model_cfg) -> str:
    """A Python expression building the timm model that loads ``to_timm(...)`` with ``strict=True``."""
    c = model_cfg
    return (f"timm.create_model({TIMM_BASE_ARCH!r}, pretrained=False, img_size={int(c.img_size)}, "
            f"patch_size={int(c.patch_size)}, in_chans={int(c.in_chans)}, embed_dim={int(c.embed_dim)}, "
            f"depth={int(c.depth)}, num_heads={int(c.num_heads)}, mlp_ratio={float(c.mlp_ratio)!r}, "
            f"num_classes=0, global_pool='token', class_token=True, qkv_bias=True)")


# ---------------------------------------------------------------------------------------------------------------
# Flax -> torch naming


def _f32(x) -> np.ndarray:
    # C-contiguous: safetensors writes the raw buffer, so a transposed view would be stored untransposed.
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _leaf_to_torch(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
    """One dense / LayerNorm leaf: kernel (in, out) -> weight (out, in); scale -> weight."""
    *mod, leaf = path
    if leaf == "kernel":
        return ".".join([*mod, "weight"]), _f32(value.T)
    if leaf == "scale":
        return ".".join([*mod, "weight"]), _f32(value)
    return ".".join(path), _f32(value)


def _blocks_to_torch(blocks: dict, prefix: str) -> dict[str, np.ndarray]:
    """Scanned blocks (leading depth axis) -> ``{prefix}.{i}.<name>``."""
    flat = traverse_util.flatten_dict(blocks)
    depth = {np.shape(v)[0] for v in flat.values()}
    if len(depth) != 1:
        raise ValueError(f"{prefix}: scanned block params disagree on the depth axis: {sorted(depth)}")
    out = {}
    for i in range(depth.pop()):
        for path, value in flat.items():
            name, tensor = _leaf_to_torch(path, np.asarray(value)[i])
            out[f"{prefix}.{i}.{name}"] = tensor
    return out


def to_timm(params: dict, model_cfg) -> dict[str, np.ndarray]:
    """Encoder params -> timm ``VisionTransformer(global_pool='token', class_token=True)`` state dict (float32).

    ``pos_embed`` (1, 1+L, D) is the fixed MAE sin-cos table for ``model_cfg``'s grid (zero cls row)."""
    missing = [k for k in ENCODER_KEYS if k not in params]
    if missing:
        raise KeyError(f"to_timm: params lack the encoder entries {missing} (have {sorted(params)})")
    kernel = np.asarray(params["patch_embed"]["kernel"])  # (p, p, C, D)
    out = {
        "cls_token": _f32(params["cls_token"]),
        "pos_embed": sincos_2d(model_cfg.embed_dim, grid_size(model_cfg), cls_token=True)[None],
        "patch_embed.proj.weight": _f32(kernel.transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": _f32(params["patch_embed"]["bias"]),
    }
    out.update(_blocks_to_torch(params["encoder"]["blocks"], "blocks"))
    out["norm.weight"] = _f32(params["encoder"]["norm"]["scale"])
    out["norm.bias"] = _f32(params["encoder"]["norm"]["bias"])
    return out


def to_mae(params: dict, model_cfg) -> dict[str, np.ndarray]:
    """Full model -> facebookresearch/mae ``MaskedAutoencoderViT`` state dict (float32, fixed pos-embeds)."""
    missing = [k for k in DECODER_KEYS if k not in params]
    if missing:
        raise KeyError(f"to_mae: params lack the decoder entries {missing}: encoder-only weights can only be "
                       f"exported with --format=timm")
    out = to_timm(params, model_cfg)
    out["decoder_embed.weight"] = _f32(np.asarray(params["decoder_embed"]["kernel"]).T)
    out["decoder_embed.bias"] = _f32(params["decoder_embed"]["bias"])
    out["mask_token"] = _f32(params["mask_token"])
    out["decoder_pos_embed"] = sincos_2d(model_cfg.decoder_embed_dim, grid_size(model_cfg), cls_token=True)[None]
    out.update(_blocks_to_torch(params["decoder"]["blocks"], "decoder_blocks"))
    out["decoder_norm.weight"] = _f32(params["decoder"]["norm"]["scale"])
    out["decoder_norm.bias"] = _f32(params["decoder"]["norm"]["bias"])
    out["decoder_pred.weight"] = _f32(np.asarray(params["decoder_pred"]["kernel"]).T)
    out["decoder_pred.bias"] = _f32(params["decoder_pred"]["bias"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# torch naming -> Flax, with grid / channel adaptation


def _cubic_aa(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The bicubic kernel of torch's antialiased resize (PIL's, a = -0.5)."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) operator of ``F.interpolate(mode='bicubic', antialias=True, align_corners=False)``."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = _cubic_aa((np.arange(lo, hi) - center + 0.5) * inv)
        m[i, lo:hi] = w / w.sum()
    return m


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int], old_grid: tuple[int, int]) -> np.ndarray:
    """Learned (1, 1+L, D) table -> (1, 1+gh*gw, D) as timm ``resample_abs_pos_embed`` (bicubic, antialias)."""
    d = pos_embed.shape[-1]
    grid = np.asarray(pos_embed[0, 1:], np.float64).reshape(*old_grid, d)
    grid = np.einsum("ih,jw,hwd->ijd", _resize_matrix(old_grid[0], new_grid[0]),
                     _resize_matrix(old_grid[1], new_grid[1]), grid)
    return np.concatenate([pos_embed[:, :1], grid.reshape(1, -1, d)], axis=1).astype(np.float32)


def adapt_in_chans(weight: np.ndarray, in_chans: int) -> np.ndarray:
    """OIHW patch kernel to ``in_chans`` inputs as timm ``adapt_input_conv``: 3 -> 1 sums, 1 -> 3 repeats / 3."""
    have = weight.shape[1]
    if have == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(axis=1, keepdims=True)
    if have == 1:
        return np.repeat(weight, in_chans, axis=1) / in_chans
    raise ValueError(f"patch_embed.proj.weight has {have} input channels; cannot adapt it to in_chans={in_chans} "
                     f"(only 3 -> 1 and 1 -> n are defined)")


def adapt_pred_chans(weight: np.ndarray, bias: np.ndarray, have: int, in_chans: int) -> tuple[np.ndarray, ...]:
    """decoder_pred (p*p*C_src, Dd) / (p*p*C_src,) to ``in_chans`` outputs per pixel (order (p_row, p_col, c)):
    3 -> 1 averages the channels, 1 -> n repeats them (with norm_pix targets of replicated grey channels the
    per-patch normalised prediction is the same for every channel)."""
    if have == in_chans:
        return weight, bias
    w, b = weight.reshape(-1, have, weight.shape[-1]), bias.reshape(-1, have)
    if in_chans == 1:
        w, b = w.mean(axis=1, keepdims=True), b.mean(axis=1, keepdims=True)
    elif have == 1:
        w, b = np.repeat(w, in_chans, axis=1), np.repeat(b, in_chans, axis=1)
    else:
        raise ValueError(f"decoder_pred predicts {have} channels; cannot adapt it to in_chans={in_chans}")
    return w.reshape(-1, weight.shape[-1]), b.reshape(-1)


def _square_grid(num_tokens: int, key: str) -> tuple[int, int]:
    g = math.isqrt(num_tokens)
    if g * g != num_tokens:
        raise ValueError(f"{key} has {num_tokens} patch positions, not a square grid")
    return g, g


def _pos_embed(sd: dict, key: str, dim: int, grid: tuple[int, int], notes: list[str]) -> np.ndarray | None:
    """Checks a source position table: fixed sin-cos -> None (regenerated by the model for ``grid``); learned ->
    resampled to ``grid`` (returned: the model cannot hold it, the caller decides)."""
    table = np.asarray(sd[key], np.float32)
    if table.ndim != 3 or table.shape[0] != 1 or table.shape[2] != dim:
        raise ValueError(f"{key} has shape {table.shape}, expected (1, 1 + L, {dim})")
    old = _square_grid(table.shape[1] - 1, key)
    if np.allclose(table[0], sincos_2d(dim, old, cls_token=True), atol=1e-5):
        if old != grid:
            notes.append(f"{key}: fixed sin-cos for a {old[0]}x{old[1]} grid, regenerated for {grid[0]}x{grid[1]}")
        return None
    notes.append(f"{key}: learned, resampled (bicubic, antialias) from {old[0]}x{old[1]} to {grid[0]}x{grid[1]}"
                 if old != grid else f"{key}: learned")
    return table if old == grid else resample_pos_embed(table, grid, old)


def _take(sd: dict, used: set, key: str, shape: tuple[int, ...], transpose: bool = False) -> np.ndarray:
    if key not in sd:
        raise KeyError(f"{key}: missing from the source (a truncated file, or another architecture / depth?)")
    value = np.asarray(sd[key], np.float32)
    value = value.T if transpose else value
    if value.shape != tuple(shape):
        got = value.T.shape if transpose else value.shape
        want = tuple(reversed(shape)) if transpose else tuple(shape)
        raise ValueError(f"{key}: shape {got} does not match the model's {want} (another architecture? check "
                         f"embed_dim / depth / mlp_ratio / patch_size)")
    used.add(key)
    return np.ascontiguousarray(value)


def _blocks_from_torch(sd: dict, used: set, prefix: str, depth: int, dim: int, hidden: int) -> dict:
    """``{prefix}.{i}.*`` -> scanned block params with a leading depth axis."""
    shapes = {  # (our path, torch name, our per-block shape, dense kernel?)
        ("norm1", "scale"): ("norm1.weight", (dim,), False), ("norm1", "bias"): ("norm1.bias", (dim,), False),
        ("attn", "qkv", "kernel"): ("attn.qkv.weight", (dim, 3 * dim), True),
        ("attn", "qkv", "bias"): ("attn.qkv.bias", (3 * dim,), False),
        ("attn", "proj", "kernel"): ("attn.proj.weight", (dim, dim), True),
        ("attn", "proj", "bias"): ("attn.proj.bias", (dim,), False),
        ("norm2", "scale"): ("norm2.weight", (dim,), False), ("norm2", "bias"): ("norm2.bias", (dim,), False),
        ("mlp", "fc1", "kernel"): ("mlp.fc1.weight", (dim, hidden), True),
        ("mlp", "fc1", "bias"): ("mlp.fc1.bias", (hidden,), False),
        ("mlp", "fc2", "kernel"): ("mlp.fc2.weight", (hidden, dim), True),
        ("mlp", "fc2", "bias"): ("mlp.fc2.bias", (dim,), False),
    }
    extra = sorted({int(k.split(".")[1]) for k in sd if k.startswith(prefix + ".")} - set(range(depth)))
    if extra:
        raise ValueError(f"{prefix}: the source has blocks {extra} beyond the model's depth={depth} "
                         f"(another architecture?)")
    flat = {path: np.stack([_take(sd, used, f"{prefix}.{i}.{name}", shape, kernel) for i in range(depth)])
            for path, (name, shape, kernel) in shapes.items()}
    return traverse_util.unflatten_dict(flat)


def from_torch(state_dict: dict, model_cfg) -> tuple[dict, np.ndarray | None, ImportReport]:
    """timm / official-MAE state dict (numpy or torch tensors) -> our params for ``model_cfg``.

    Returns (params, learned_pos_embed, report). The decoder is imported when the source has one (MAE naming),
    else params hold the encoder only. ``learned_pos_embed`` (1, 1+L, D) is not None only for sources with learned
    (non sin-cos) position embeddings, resampled to ``model_cfg``'s grid. Raises a ValueError naming the key on any
    shape mismatch and a KeyError listing the missing keys for an incomplete encoder / decoder.
    """
    sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in state_dict.items()}
    c = model_cfg
    d, p, grid = c.embed_dim, c.patch_size, grid_size(c)
    used: set[str] = set()
    notes: list[str] = []

    def section(keys: list[str], build):
        absent = [k for k in keys if k not in sd]
        if absent:
            raise KeyError(f"the source lacks {absent} (have e.g. {sorted(sd)[:8]})")
        return build()

    def encoder():
        w = np.asarray(sd["patch_embed.proj.weight"], np.float32)
        if w.ndim != 4 or w.shape[0] != d or w.shape[2:] != (p, p):
            raise ValueError(f"patch_embed.proj.weight: shape {w.shape} does not match the model's "
                             f"({d}, {c.in_chans}, {p}, {p}) (another embed_dim / patch_size?)")
        if w.shape[1] != c.in_chans:
            notes.append(f"patch_embed.proj.weight: {w.shape[1]} -> {c.in_chans} input channels (adapt_input_conv)")
        used.add("patch_embed.proj.weight")
        return {
            "patch_embed": {"kernel": np.ascontiguousarray(adapt_in_chans(w, c.in_chans).transpose(2, 3, 1, 0)),
                            "bias": _take(sd, used, "patch_embed.proj.bias", (d,))},
            "cls_token": _take(sd, used, "cls_token", (1, 1, d)),
            "encoder": {"blocks": _blocks_from_torch(sd, used, "blocks", c.depth, d, int(d * c.mlp_ratio)),
                        "norm": {"scale": _take(sd, used, "norm.weight", (d,)),
                                 "bias": _take(sd, used, "norm.bias", (d,))}},
        }

    params = section(["patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "norm.weight"], encoder)
    learned = None
    if "pos_embed" in sd:
        used.add("pos_embed")
        learned = _pos_embed(sd, "pos_embed", d, grid, notes)
    missing = [] if "pos_embed" in sd else ["pos_embed"]

    if any(k.startswith("decoder") or k == "mask_token" for k in sd):
        dd = c.decoder_embed_dim
        have = sd["patch_embed.proj.weight"].shape[1]
        if have != c.in_chans and "decoder_pred.weight" in sd and "decoder_pred.bias" in sd:
            sd["decoder_pred.weight"], sd["decoder_pred.bias"] = adapt_pred_chans(
                np.asarray(sd["decoder_pred.weight"], np.float32), np.asarray(sd["decoder_pred.bias"], np.float32),
                have, c.in_chans)
            notes.append(f"decoder_pred: {have} -> {c.in_chans} predicted channels per pixel")

        def decoder():
            return {
                "decoder_embed": {"kernel": _take(sd, used, "decoder_embed.weight", (d, dd), True),
                                  "bias": _take(sd, used, "decoder_embed.bias", (dd,))},
                "mask_token": _take(sd, used, "mask_token", (1, 1, dd)),
                "decoder": {"blocks": _blocks_from_torch(sd, used, "decoder_blocks", c.decoder_depth, dd,
                                                         int(dd * c.mlp_ratio)),
                            "norm": {"scale": _take(sd, used, "decoder_norm.weight", (dd,)),
                                     "bias": _take(sd, used, "decoder_norm.bias", (dd,))}},
                "decoder_pred": {"kernel": _take(sd, used, "decoder_pred.weight", (dd, p * p * c.in_chans), True),
                                 "bias": _take(sd, used, "decoder_pred.bias", (p * p * c.in_chans,))},
            }

        params.update(section(["decoder_embed.weight", "mask_token", "decoder_blocks.0.attn.qkv.weight",
                               "decoder_norm.weight", "decoder_pred.weight"], decoder))
        if "decoder_pos_embed" in sd:
            used.add("decoder_pos_embed")
            if _pos_embed(sd, "decoder_pos_embed", dd, grid, notes) is not None:
                raise ValueError("decoder_pos_embed is learned; the MAE decoder here uses fixed sin-cos embeddings")
        elif "decoder_pos_embed" not in missing:
            missing.append("decoder_pos_embed")
    else:
        missing += list(DECODER_SOURCE_KEYS)
    unexpected = tuple(sorted(set(sd) - used))
    return params, learned, ImportReport(tuple(missing), unexpected, tuple(notes))


# ---------------------------------------------------------------------------------------------------------------
# files


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """The safetensors format (8-byte header length, JSON header, raw little-endian buffers) written straight
    from the arrays: ``safetensors.numpy.save_file`` first copies every tensor into one bytes object (~7x slower
    for a ViT-B)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, value in tensors.items():
        if value.dtype != np.float32 or not value.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous float32 array, got {value.dtype}")
        header[name] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the reference writer aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for value in tensors.values():
            f.write(memoryview(value.astype("<f4", copy=False)).cast("B"))


def save_state_dict(state_dict: dict[str, np.ndarray], out: str | Path, *, fmt: str, model_cfg,
                    extra: dict | None = None) -> Path:
    """Writes ``out`` (.safetensors, or .pth via torch) and ``<out>.json`` with the timm call and the config.

    A ``.pth`` in MAE format is ``{'model': state_dict}`` as the official checkpoints (their fine-tuning code reads
    ``checkpoint['model']``); in timm format it is the plain state dict."""
    out = Path(out)
    call = timm_create_model_call(model_cfg)
    meta = {"format": fmt, "timm_create_model": call, "model": json.loads(model_cfg.to_json_best_effort()),
            **(extra or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        write_safetensors(out, state_dict, {"vasomim": json.dumps(meta)})
    elif out.suffix in (".pth", ".pt"):
        import torch  # only to write .pth

        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
        torch.save({"model": tensors} if fmt == "mae" else tensors, out)
    else:
        raise ValueError(f"--out={out}: the file name must end in .safetensors or .pth")
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def export(source: str | Path, out: str | Path, *, fmt: str = "timm", step: int | None = None) -> str:
    """Exports any `load_pretrained` source to ``out``; returns the ``timm.create_model(...)`` call."""
    from vasomim_jax.pretrained import load_pretrained

    if fmt not in ("timm", "mae"):
        raise ValueError(f"--format={fmt!r}: expected 'timm' or 'mae'")
    if Path(out).suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"--out={out}: the file name must end in .safetensors or .pth")
    pre = load_pretrained(source, step=step)
    if fmt == "mae" and not pre.has_decoder:
        raise ValueError(f"{source}: encoder-only weights; --format=mae needs a decoder, use --format=timm")
    if pre.learned_pos_embed is not None:
        raise ValueError(f"{source}: learned position embeddings; export writes the fixed sin-cos tables only")
    model_cfg = pre.config.model
    state_dict = (to_timm if fmt == "timm" else to_mae)(pre.params, model_cfg)
    save_state_dict(state_dict, out, fmt=fmt, model_cfg=model_cfg,
                    extra={"source": str(source), "step": pre.step,
                           "config": json.loads(pre.config.to_json_best_effort())})
    return timm_create_model_call(model_cfg)


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Pre-training / fine-tuning workdir, exported .safetensors or official "
                        "MAE / XA-SSL .pth to export.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
    flags.DEFINE_enum("format", "timm", ["timm", "mae"], "timm: encoder as a timm VisionTransformer state dict; "
                      "mae: encoder + decoder with facebookresearch/mae key names.")
    flags.DEFINE_string("out", None, "Output file: .safetensors (numpy only) or .pth (needs torch).", required=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"vasomim export: unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    call = export(f.workdir, f.out, fmt=f.format, step=f.step)
    print(call)
    print(f"# wrote {f.out} ({f.format}) and {Path(f.out).with_suffix('.json')}; load with "
          f"model.load_state_dict(state_dict, strict=True)")
