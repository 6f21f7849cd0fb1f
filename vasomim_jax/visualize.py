"""Pictures of a run: ``vasomim visualize --workdir=DIR --out=DIR``.

Pre-training workdir (or an MAE-format weights file): for the first records of the run's dataset, a panel of
eight labelled tiles per example in ``OUT/panels/``: the angiogram, its stored vessel map, the guidance
probability per patch, the sampled mask (guided and random patches in different colours, from
``MaskResult.guided``), the masked input, the reconstruction and the Frangi response of input and reconstruction;
training curves in ``OUT/plots/`` (``plots.py``). With norm-pix targets the full reconstruction is de-normalised
with the *true* patch statistics, which leaks the hidden patches' brightness and contrast into the picture: its
label says so. The ``_pasted`` panel keeps the visible patches and de-normalises the masked predictions with the
visible patches' mean statistics, so nothing in it comes from a hidden pixel. Encoder-only weights are refused.

Segmentation fine-tuning workdir: image / probability / prediction / ground truth / error overlays in
``OUT/finetune/``. During pre-training ``make_panel_fn`` + ``log_panels`` put the same panels in TensorBoard.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from PIL import Image, ImageDraw, PngImagePlugin

from vasomim_jax import losses, plots

GUIDED_RGB = (255, 140, 0)  # masked because the vessel guidance drew it
RANDOM_RGB = (40, 110, 255)  # masked by the uniform remainder
LINE_HEIGHT = 12  # PIL's default bitmap font is 11 px high
LABEL_LINES = 2  # labels wrap onto at most two lines above each tile
LABEL_HEIGHT = LABEL_LINES * LINE_HEIGHT + 4
TILE = 160  # minimum tile side in pixels (small crops are enlarged by pixel repetition)


def _to_uint8(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    x = np.asarray(x, np.float64)
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    return np.clip(np.round((x - lo) / max(hi - lo, 1e-12) * 255), 0, 255).astype(np.uint8)


def grey_rgb(image: np.ndarray, lo: float | None = 0.0, hi: float | None = 255.0) -> np.ndarray:
    """(H, W) -> (H, W, 3) uint8; values scaled from [lo, hi] (None = the image's own range)."""
    g = _to_uint8(image, lo, hi)
    return np.repeat(g[..., None], 3, axis=-1)


def heat_rgb(values: np.ndarray) -> np.ndarray:
    """(H, W) non-negative values -> (H, W, 3) uint8 heat map, black -> red -> yellow -> white."""
    v = _to_uint8(values, 0.0, max(float(np.max(values)), 1e-12)).astype(np.float32) / 255
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def patch_grid(values: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """(L,) per-patch values -> (gh·p, gw·p) image, each patch a constant block (row-major patch order)."""
    return np.kron(np.asarray(values).reshape(grid), np.ones((patch_size, patch_size)))


def mask_rgb(image: np.ndarray, mask: np.ndarray, guided: np.ndarray, patch_size: int) -> np.ndarray:
    """Visible patches show the image; guided-masked patches are GUIDED_RGB, random-masked ones RANDOM_RGB."""
    h, w = image.shape
    grid = (h // patch_size, w // patch_size)
    out = grey_rgb(image)
    guided_px = patch_grid(np.asarray(guided, bool) & (np.asarray(mask) > 0), grid, patch_size) > 0
    random_px = patch_grid(~np.asarray(guided, bool) & (np.asarray(mask) > 0), grid, patch_size) > 0
    out[guided_px] = GUIDED_RGB
    out[random_px] = RANDOM_RGB
    return out


def masked_input_rgb(image: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """What the encoder sees: masked patches blanked to dark grey 48 (mid-grey would blend into the background)."""
    h, w = image.shape
    hidden = patch_grid(np.asarray(mask) > 0, (h // patch_size, w // patch_size), patch_size) > 0
    out = grey_rgb(image)
    out[hidden] = 48
    return out


def _wrap(draw: ImageDraw.ImageDraw, label: str, width: int) -> list[str]:
    """Greedy word wrap of ``label`` to ``width`` pixels; refuses labels that need more than LABEL_LINES lines."""
    lines: list[str] = []
    for word in label.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > LABEL_LINES or any(draw.textlength(line) > width for line in lines):
        raise ValueError(f"tile label {label!r} does not fit in {LABEL_LINES} lines of {width} px")
    return lines


def _labelled(tile: np.ndarray, label: str, scale: int) -> Image.Image:
    tile = np.kron(tile, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else tile
    h, w, _ = tile.shape
    canvas = Image.new("RGB", (w, h + LABEL_HEIGHT), (255, 255, 255))
    canvas.paste(Image.fromarray(tile), (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(_wrap(draw, label, w - 4)):
        draw.text((2, 2 + i * LINE_HEIGHT), line, fill=(0, 0, 0))
    return canvas


def compose_panel(tiles: list[tuple[str, np.ndarray]], columns: int = 4, pad: int = 4) -> Image.Image:
    """Labelled tiles (label, (H, W, 3) uint8) on a grid; the labels are also stored as PNG text ``labels``."""
    h, w, _ = tiles[0][1].shape
    scale = max(1, -(-TILE // max(h, w)))
    cells = [_labelled(t, label, scale) for label, t in tiles]
    cw, ch = cells[0].size
    rows = -(-len(cells) // columns)
    panel = Image.new("RGB", (columns * (cw + pad) + pad, rows * (ch + pad) + pad), (255, 255, 255))
    for i, cell in enumerate(cells):
        panel.paste(cell, (pad + (i % columns) * (cw + pad), pad + (i // columns) * (ch + pad)))
    panel.info["labels"] = json.dumps([label for label, _ in tiles])
    panel.info["tile_geometry"] = json.dumps(dict(scale=scale, cell=[cw, ch], pad=pad, columns=columns,
                                                  label_height=LABEL_HEIGHT))
    return panel


def save_png(image: Image.Image, path: str | pathlib.Path) -> pathlib.Path:
    """Saves with the panel's text entries (labels, geometry) as PNG tEXt chunks."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = PngImagePlugin.PngInfo()
    for key in ("labels", "tile_geometry"):
        if key in image.info:
            meta.add_text(key, image.info[key])
    image.save(path, pnginfo=meta)
    return path


def _recon_labels(norm_pix: bool) -> tuple[str, str]:
    """(label of the full reconstruction, label of the pasted one): say where the picture borrows the truth."""
    if norm_pix:
        return ("recon, de-normalised with true patch stats (leaks)",
                "visible pasted, masked predicted (visible-patch stats)")
    return "recon, all patches predicted", "visible pasted, masked predicted"


def mae_panel(ex: dict[str, np.ndarray], patch_size: int, *, pasted: bool) -> Image.Image:
    """Eight tiles for one example. ``ex`` holds numpy arrays: image (H, W) 0..255, vessel_map (H, W) {0,1},
    probability (L,), mask (L,), guided (L,), reconstruction / reconstruction_pasted (H, W) 0..255,
    frangi_input / frangi_reconstruction / frangi_pasted (H, W) in [0, 1], norm_pix () bool."""
    image = ex["image"]
    grid = (image.shape[0] // patch_size, image.shape[1] // patch_size)
    full_label, pasted_label = _recon_labels(bool(ex["norm_pix"]))
    if pasted:
        rec, rec_label = ex["reconstruction_pasted"], pasted_label
        fr, fr_label = ex["frangi_pasted"], "Frangi(pasted recon)"
    else:
        rec, rec_label = ex["reconstruction"], full_label
        fr, fr_label = ex["frangi_reconstruction"], "Frangi(recon)"
    n_guided, n_mask = int(np.sum(ex["guided"])), int(np.sum(ex["mask"]))
    fr_hi = float(np.max(ex["frangi_input"])) or None  # both Frangi tiles on the input's scale
    tiles = [
        ("angiogram", grey_rgb(image)),
        ("stored vessel map", grey_rgb(ex["vessel_map"], 0, 1)),
        ("guidance p per patch", heat_rgb(patch_grid(ex["probability"], grid, patch_size))),
        (f"mask: {n_guided} guided (orange), {n_mask - n_guided} random (blue)",
         mask_rgb(image, ex["mask"], ex["guided"], patch_size)),
        ("masked input", masked_input_rgb(image, ex["mask"], patch_size)),
        (rec_label, grey_rgb(rec)),
        ("Frangi(input)", grey_rgb(ex["frangi_input"], 0, fr_hi)),
        (fr_label, grey_rgb(fr, 0, fr_hi)),
    ]
    return compose_panel(tiles)


# --------------------------------------------------------------------------------------------- compute side


def intermediates(model, config, params, batch: dict, rng: jax.Array, step, *, total_steps: int,
                  steps_per_epoch: int) -> dict[str, jax.Array]:
    """The pre-training forward (``losses.forward``: the training masks) with everything a panel shows (pure,
    jit-able; ``model``/``config`` static).

    batch: {"image": uint8 (B, H, W), "vessel_map": uint8 (B, H, W), "index": int32 (B,)}; rng: the run's base
    key; step: the 0-based step (may be traced). Returns float32 arrays: probability (B, L), mask (B, L), guided
    bool (B, L), reconstruction / reconstruction_pasted (B, H, W) on 0..255, frangi_input /
    frangi_reconstruction / frangi_pasted (B, H, W).
    The full reconstruction is de-normalised with the true per-patch statistics (as the consistency loss does);
    the pasted one keeps the visible patches and de-normalises the masked predictions with the mean statistics
    of the visible patches only, so no pixel of it depends on a hidden patch.
    """
    f = losses.forward(model, config, params, batch, rng, step, total_steps=total_steps,
                       steps_per_epoch=steps_per_epoch)
    mk, mcfg = f.mask, config.model
    p = mcfg.patch_size
    grid = (f.x.shape[1] // p, f.x.shape[2] // p)
    visible = 1.0 - mk.mask[..., None]
    n_visible = jnp.maximum(visible.sum(axis=1, keepdims=True), 1.0)
    vis_mean, vis_var = (jnp.sum(v * visible, axis=1, keepdims=True) / n_visible for v in (f.mean, f.var))
    # Not f.rec_grey: that one pastes the visible patches when the run's loss does.
    rec = losses.reconstructed_grey(f.pred, f.target, f.mean, f.var, mk.mask, mcfg, grid=grid)
    rec_pasted = losses.reconstructed_grey(f.pred, f.target, vis_mean, vis_var, mk.mask, mcfg, grid=grid,
                                           paste_visible=True)
    fr_in, fr_rec, fr_pasted = losses.frangi_on_input_scale(f.grey_in, rec, rec_pasted,
                                                            **losses.frangi_settings(config.loss))
    return dict(probability=mk.probability, mask=mk.mask, guided=mk.guided, reconstruction=rec,
                reconstruction_pasted=rec_pasted, frangi_input=fr_in, frangi_reconstruction=fr_rec,
                frangi_pasted=fr_pasted)


def make_panel_fn(model, config, *, total_steps: int, steps_per_epoch: int, max_examples: int = 4):
    """``panels(params, batch, rng, step) -> list of PIL images``: for the first ``max_examples`` examples of a host
    batch (numpy, as the input pipeline yields it), the full and the pasted panel, in that order
    (``np.asarray(image)`` is the (H', W', 3) uint8 picture; ``save_png`` keeps the labels).
    ``rng`` is the run's base key and ``step`` the 0-based step whose masks to show (the trainer's keying).
    Compiled once per call of make_panel_fn: build it before the loop."""
    fn = jax.jit(functools.partial(intermediates, model, config, total_steps=total_steps,
                                   steps_per_epoch=steps_per_epoch))

    def panels(params, batch, rng, step) -> list[Image.Image]:
        b = {k: np.asarray(batch[k])[:max_examples] for k in ("image", "vessel_map", "index")}
        b["index"] = b["index"].astype(np.int32)
        out = jax.device_get(fn(params, b, rng, jnp.int32(step)))
        pictures = []
        for i in range(len(b["image"])):
            ex = {k: np.asarray(v[i]) for k, v in out.items()}
            ex.update(image=b["image"][i], vessel_map=b["vessel_map"][i], norm_pix=bool(config.loss.norm_pix_loss))
            pictures += [mae_panel(ex, config.model.patch_size, pasted=pasted) for pasted in (False, True)]
        return pictures

    return panels


def log_panels(logdir: str | pathlib.Path, step: int, pictures: list) -> None:
    """Panels from ``make_panel_fn`` to TensorBoard (tensorboardX) as ``panels/example<i>_{full,pasted}``."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        for j, picture in enumerate(pictures):
            writer.add_image(f"panels/example{j // 2}_{('full', 'pasted')[j % 2]}", np.asarray(picture), int(step),
                             dataformats="HWC")


# ----------------------------------------------------------------------------------------- fine-tuning


PRED_RGB, GT_RGB = (230, 40, 40), (40, 200, 60)
FP_RGB, FN_RGB, TP_RGB = (255, 60, 60), (60, 120, 255), (255, 255, 255)


def tint(image: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int], alpha: float = 0.55) -> np.ndarray:
    """(H, W) uint8 image with ``mask`` pixels blended towards ``rgb`` -> (H, W, 3) uint8."""
    out = grey_rgb(image).astype(np.float32)
    m = np.asarray(mask) > 0
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(rgb, np.float32)
    return np.round(out).astype(np.uint8)


def error_rgb(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """True positives white, false positives FP_RGB, false negatives FN_RGB, true negatives black."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    out = np.zeros(pred.shape + (3,), np.uint8)
    out[pred & gt], out[pred & ~gt], out[~pred & gt] = TP_RGB, FP_RGB, FN_RGB
    return out


def segmentation_panel(image: np.ndarray, prob: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> Image.Image:
    """Image, predicted probability, prediction / ground truth overlays and the error map of one example."""
    from vasomim_jax.finetune import seg_metrics

    pred = (np.asarray(prob) >= threshold).astype(np.uint8)
    tiles = [("angiogram", grey_rgb(image)), ("vessel probability", grey_rgb(prob, 0, 1)),
             (f"prediction (p >= {threshold:g})", tint(image, pred, PRED_RGB)),
             ("ground truth", tint(image, gt, GT_RGB)),
             (f"errors: FP red, FN blue (Dice {seg_metrics.dice(pred, gt):.3f})", error_rgb(pred, gt))]
    return compose_panel(tiles, columns=5)


# ------------------------------------------------------------------------------------ vasomim visualize


def _dataset_config(config, dataset: str, data_dir: str, split: str):
    """The run's ``config.dataset`` with the command line's non-empty overrides."""
    base = config.get("dataset", ConfigDict()).to_dict() if "dataset" in config else {}
    merged = ConfigDict({"name": "", "data_dir": "", "split": "train", "num_examples": -1, **base})
    for key, value in (("name", dataset), ("data_dir", data_dir), ("split", split)):
        if value:
            merged[key] = value
    if not merged.name:
        raise ValueError("--dataset: the weights carry no dataset config; name the TFDS dataset to draw from")
    return merged


def load_examples(dataset_cfg, n: int, size: int) -> tuple[dict[str, np.ndarray], int]:
    """(host batch of the first ``n`` records of the split, number of records in the split). Each image (and map)
    is centre-cropped to a square and resized to ``size`` as the training crops are (bicubic / nearest), not
    flipped; index = the record number."""
    from vasomim_jax import input_pipeline

    source = input_pipeline.tfds_source(dataset_cfg)
    n = min(n, len(source))
    images, maps = [], []
    for i in range(n):
        record = source[i]
        img, vmap = input_pipeline.augment(
            input_pipeline.as_2d_uint8(record["image"], "image"),
            input_pipeline.as_2d_uint8(record["vessel_map"], "vessel_map"), np.random.default_rng(0), size=size,
            scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=0.0)
        images.append(img)
        maps.append(vmap)
    batch = {"image": np.stack(images), "vessel_map": np.stack(maps), "index": np.arange(n, dtype=np.int32)}
    return batch, len(source)


def pretrain_pictures(weights: str, out: str | pathlib.Path, *, num_examples: int = 4, step: int | None = None,
                      seed: int = 0, dataset: str = "", data_dir: str = "", split: str = "") -> list[pathlib.Path]:
    """Panels ``out/panels/example<i>_{full,pasted}.png`` from a pre-training workdir or an MAE-format file, and
    ``out/plots/*.png`` from the workdir's metrics.jsonl. Returns the written paths."""
    from vasomim_jax import config as config_lib
    from vasomim_jax.pretrained import load_pretrained

    pre = load_pretrained(weights, step=step)
    if not pre.has_decoder:
        raise ValueError(f"{weights}: encoder-only weights (a timm export or a fine-tuned backbone) have no MAE "
                         "decoder, so there is no reconstruction to draw; pass the pre-training workdir or an "
                         "MAE-format export (vasomim export --format=mae)")
    config = pre.config
    missing = [s for s in ("masking", "loss") if s not in config]
    if missing:
        raise ValueError(f"{weights}: no {'/'.join(missing)} config stored with the weights; panels need the run's "
                         "masking and loss settings (use the pre-training workdir or our MAE-format export)")
    ds_cfg = _dataset_config(config, dataset, data_dir, split)
    batch, num_records = load_examples(ds_cfg, num_examples, config.model.img_size)
    if "batch_size" in config:  # the run's schedule: β as at the checkpoint's step
        sched = config_lib.resolve_schedule(config, ds_cfg.num_examples if ds_cfg.num_examples > 0
                                            else num_records)
        total_steps, steps_per_epoch = sched.total_steps, sched.steps_per_epoch
    else:  # no schedule stored: β at its end value
        total_steps = steps_per_epoch = 1
    at = max(int(pre.step or total_steps) - 1, 0)  # the masks of the last step trained
    panels = make_panel_fn(pre.model, config, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                           max_examples=num_examples)(pre.params, batch, jax.random.PRNGKey(seed), at)
    out = pathlib.Path(out)
    written = [save_png(p, out / "panels" / f"example{j // 2}_{('full', 'pasted')[j % 2]}.png")
               for j, p in enumerate(panels)]
    metrics_path = pathlib.Path(weights) / "metrics.jsonl"
    if metrics_path.is_file():
        written += plots.plot_metrics(metrics_path, out / "plots",
                                      vessel_min_fraction=config.masking.get("vessel_patch_min_fraction"))
    return written


def finetune_pictures(workdir: str, out: str | pathlib.Path, *, num_examples: int = 4, step: int | None = None,
                      dataset: str = "", data_dir: str = "", split: str = "") -> list[pathlib.Path]:
    """Prediction / ground truth / error panels ``out/finetune/<file>.png`` for the first examples of the
    fine-tuning run's evaluation split (segmentation runs)."""
    import itertools

    from vasomim_jax import checkpoint, sharding
    from vasomim_jax.finetune import data, evaluate, task

    config, params, _ = checkpoint.load_params(workdir, step)
    if config.task != "segmentation":
        raise ValueError(f"{workdir}: a {config.task} run; overlays are drawn for segmentation runs only")
    config = ConfigDict(config.to_dict())
    for key, value in (("name", dataset), ("data_dir", data_dir), ("eval_split", split)):
        if value:
            config.dataset[key] = value
    source = data.tfds_source(config.dataset, config.dataset.eval_split, evaluate.source_keys(config))
    mesh = sharding.make_mesh(config)
    predict_fn = task.make_predict_fn(task.build_model(config), config, sharding.replicated(mesh))
    params = jax.device_put(params, sharding.replicated(mesh))
    written = []
    for ex, prob in itertools.islice(evaluate.predict_split(predict_fn, params, source, config, mesh), num_examples):
        gt = ex["mask"] if ex["fov"] is None else ex["mask"] * ex["fov"]
        prob = prob if ex["fov"] is None else prob * ex["fov"]
        stem = pathlib.Path(ex["file_name"]).stem
        written.append(save_png(segmentation_panel(ex["image"], prob, gt, config.eval.threshold),
                                pathlib.Path(out) / "finetune" / f"{stem}.png"))
    return written


def visualize(workdir: str, out: str | pathlib.Path, **kw) -> list[pathlib.Path]:
    """Fine-tuning workdir (config has ``task``) -> overlays; otherwise pre-training panels and plots."""
    config_path = pathlib.Path(workdir) / "config.json"
    if config_path.is_file() and "task" in json.loads(config_path.read_text()):
        kw.pop("seed", None)
        return finetune_pictures(workdir, out, **kw)
    return pretrain_pictures(workdir, out, **kw)


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Pre-training workdir (panels + plots), MAE-format weights file, or a "
                                         "segmentation fine-tuning workdir (overlays).", required=True)
    flags.DEFINE_string("out", None, "Folder for panels/, plots/ and finetune/.", required=True)
    flags.DEFINE_integer("num_examples", 4, "Examples to draw (the first records of the split).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
    flags.DEFINE_integer("seed", 0, "Key of the masks drawn for the panels.")
    flags.DEFINE_string("dataset", "", "TFDS dataset name; '' = the run's.")
    flags.DEFINE_string("data_dir", "", "TFDS data_dir; '' = the run's.")
    flags.DEFINE_string("split", "", "Split; '' = the run's (fine-tuning: its evaluation split).")


def main(argv) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"vasomim visualize: unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if f.num_examples < 1:
        raise SystemExit(f"vasomim visualize: --num_examples must be >= 1, got {f.num_examples}")
    try:
        written = visualize(f.workdir, f.out, num_examples=f.num_examples, step=f.step, seed=f.seed,
                            dataset=f.dataset, data_dir=f.data_dir, split=f.split)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"vasomim visualize: {e}") from None
    for path in written:
        print(path)
