"""Score a fine-tuned checkpoint on any split built by our builders:
``vasomim evaluate --workdir=FINETUNE_DIR --config.dataset.name=... --config.dataset.data_dir=...
--config.dataset.split=...``.

Segmentation writes ``WORKDIR/eval/<dataset>_<split>.csv`` (``file_name,dice,cldice`` per image) and
``WORKDIR/eval/<dataset>_<split>.json`` (``dice_mean``, ``dice_std``, ``cldice_mean``, ``cldice_std``, ``n``);
optional prediction PNGs in ``WORKDIR/eval/<dataset>_<split>/``. Classification writes ``accuracy``, ``auc`` and
``n`` to the JSON. Fields of ``--config`` left empty / -1 take the fine-tuning run's values (config.json).
Inference at the native resolution: the image is resized to the model's input size, the vessel probability map
resized back (bilinear) to the image's own size, then thresholded; with a field-of-view key, prediction and ground
truth are both restricted to the field of view before scoring.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import cv2
import jax
import numpy as np
from absl import flags
from ml_collections import ConfigDict, config_dict, config_flags

from vasomim_jax import checkpoint, sharding
from vasomim_jax.finetune import cls_metrics, data, seg_metrics, task


def eval_flags_config() -> ConfigDict:
    """Overrides of the fine-tuning config for evaluation; "" / -1 = the run's own value."""
    return config_dict.ConfigDict(dict(
        dataset=dict(name="", data_dir="", split="", image_key="", mask_key="", fov_key="", label_key=""),
        eval=dict(threshold=-1.0, batch_size=-1, save_predictions=False),
        step=-1,  # checkpoint step; -1 = latest
    ))


def define_flags() -> None:
    config_flags.DEFINE_config_dict("config", eval_flags_config(), "Evaluation overrides (--config.dataset.*).")
    flags.DEFINE_string("workdir", None, "A fine-tuning workdir (config.json + checkpoints/).")
    flags.mark_flags_as_required(["workdir"])


def merge(run_config: ConfigDict, overrides: ConfigDict) -> ConfigDict:
    """The run's config with the non-empty evaluation overrides applied; ``dataset.split`` -> ``eval_split``."""
    c = ConfigDict(run_config.to_dict())
    for k, v in overrides.dataset.items():
        if v != "":
            c.dataset[("eval_split" if k == "split" else k)] = v
    if overrides.eval.threshold >= 0:
        c.eval.threshold = overrides.eval.threshold
    if overrides.eval.batch_size > 0:
        c.eval.batch_size = overrides.eval.batch_size
    c.eval.save_predictions = bool(overrides.eval.save_predictions or c.eval.save_predictions)
    return c


def _batches(examples, n: int):
    chunk = []
    for ex in examples:
        chunk.append(ex)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict_split(predict_fn, params, source, config: ConfigDict, mesh):
    """Yields (example, probabilities) for every record of ``source`` in order: probabilities float32 at the
    image's native (H, W) for segmentation, (K,) for classification."""
    ndev = mesh.size
    bsz = max(ndev, math.ceil(config.eval.batch_size / ndev) * ndev)
    size = config.model.img_size
    batch_sh = sharding.batch_sharding(mesh)
    for chunk in _batches(data.eval_examples(source, config.dataset, config.task), bsz):
        images = np.zeros((bsz, size, size), np.uint8)  # padded rows are dropped below
        for i, ex in enumerate(chunk):
            images[i] = data.resize(ex["image"], size)
        x = jax.make_array_from_callback(images.shape, batch_sh, lambda idx: images[idx])
        probs = np.asarray(jax.device_get(predict_fn(params, x)))
        for i, ex in enumerate(chunk):
            if config.task == "segmentation":
                h, w = ex["image"].shape
                yield ex, cv2.resize(probs[i], (w, h), interpolation=cv2.INTER_LINEAR)
            else:
                yield ex, probs[i]


def score_split(predict_fn, params, source, config: ConfigDict, mesh, pred_dir: Path | None = None):
    """Segmentation: ([(file_name, dice, cldice)], summary {dice_mean, dice_std, cldice_mean, cldice_std, n});
    classification: ([(file_name, label, prob of the predicted class)], {accuracy, auc, n})."""
    rows, probs_all, labels = [], [], []
    for ex, prob in predict_split(predict_fn, params, source, config, mesh):
        if config.task == "classification":
            probs_all.append(prob)
            labels.append(ex["label"])
            rows.append((ex["file_name"], ex["label"], float(prob.max())))
            continue
        pred = (prob >= config.eval.threshold).astype(np.uint8)
        gt = ex["mask"]
        if ex["fov"] is not None:
            pred, gt = pred * ex["fov"], gt * ex["fov"]
        rows.append((ex["file_name"], seg_metrics.dice(pred, gt), seg_metrics.cldice(pred, gt)))
        if pred_dir is not None:
            out = pred_dir / (re.sub(r"\.[^./]+$", "", ex["file_name"]) + ".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out), pred * 255)
    if not rows:
        raise ValueError(f"config.dataset.eval_split={config.dataset.eval_split!r}: no records to evaluate")
    if config.task == "classification":
        p, y = np.stack(probs_all), np.asarray(labels)
        return rows, {"accuracy": cls_metrics.accuracy(p, y), "auc": cls_metrics.auc(p, y), "n": len(rows)}
    d = np.array([r[1] for r in rows])
    c = np.array([r[2] for r in rows])
    return rows, {"dice_mean": float(d.mean()), "dice_std": float(d.std()), "cldice_mean": float(c.mean()),
                  "cldice_std": float(c.std()), "n": len(rows)}


def source_keys(config: ConfigDict) -> list[str]:
    ds = config.dataset
    if config.task == "classification":
        return [ds.image_key, ds.label_key]
    return [ds.image_key, ds.mask_key] + ([ds.fov_key] if ds.fov_key else [])


def evaluate(workdir: str | Path, overrides: ConfigDict) -> dict:
    """Restores the fine-tuned params of ``workdir`` and writes the CSV + JSON; returns the summary."""
    workdir = Path(workdir)
    run_config, params, step = checkpoint.load_params(workdir, None if overrides.step < 0 else int(overrides.step))
    if "task" not in run_config:
        raise ValueError(f"{workdir}/config.json: not a fine-tuning run (no 'task' field)")
    config = merge(run_config, overrides)
    task.validate(config)
    source = data.tfds_source(config.dataset, config.dataset.eval_split, source_keys(config))
    mesh = sharding.make_mesh(config)
    model = task.build_model(config)
    predict_fn = task.make_predict_fn(model, config, sharding.replicated(mesh))
    params = jax.device_put(params, sharding.replicated(mesh))
    stem = f"{config.dataset.name.replace('/', '_')}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', config.dataset.eval_split)}"
    out_dir = workdir / "eval"
    pred_dir = out_dir / stem if config.eval.save_predictions else None
    rows, summary = score_split(predict_fn, params, source, config, mesh, pred_dir)
    summary = {**summary, "step": step, "dataset": config.dataset.name, "split": config.dataset.eval_split}
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"{stem}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("file_name", "dice", "cldice") if config.task == "segmentation"
                            else ("file_name", "label", "confidence"))
            writer.writerows(rows)
        (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv) -> None:
    if len(argv) > 1:
        raise SystemExit(f"vasomim evaluate: unexpected arguments {argv[1:]}")
    summary = evaluate(flags.FLAGS.workdir, flags.FLAGS.config)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
