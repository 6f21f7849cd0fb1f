"""Per-step metrics: ``WORKDIR/metrics.jsonl`` (one flushed JSON object per logged step), TensorBoard event files
(tensorboardX, no TensorFlow), a console progress line with ETA, img/s/device, analytic TFLOP/s/device and MFU.

Only process 0 writes (``MetricWriter(..., enabled=jax.process_index() == 0)``).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from pathlib import Path

from ml_collections import ConfigDict

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per device (vendor data sheets), for MFU when config.metrics.peak_tflops_per_device is 0.
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def peak_tflops(device_kind: str, configured: float) -> float:
    """Configured peak if > 0, else the table entry whose key occurs in ``device_kind``; 0 = unknown."""
    if configured > 0:
        return float(configured)
    for key, value in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in device_kind.lower():
            return value
    return 0.0


def vit_flops(tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
    """Forward matmul FLOPs (2 per multiply-add) of ``depth`` pre-norm ViT blocks on ``tokens`` tokens."""
    hidden = int(dim * mlp_ratio)
    per_block = 2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 4 * tokens * tokens * dim
    return depth * per_block


def mae_train_flops_per_example(model_cfg: ConfigDict, mask_ratio: float) -> float:
    """Analytic FLOPs of one training example (forward + backward = 3x forward) of the MAE's matmuls.

    Counts the official model's patch embedding (all patches, C channels; ours embeds only the visible ones, as
    grey bytes, < 1 % of the total for ViT-B), encoder on the visible patches + cls, decoder on all patches + cls
    and the two projections; ignores norms, softmax, the loss and the vesselness filter (the usual MFU convention).
    """
    p, c = model_cfg.patch_size, model_cfg.in_chans
    num_patches = (model_cfg.img_size // p) ** 2
    keep = int(num_patches * (1 - mask_ratio))
    d, dd = model_cfg.embed_dim, model_cfg.decoder_embed_dim
    fwd = (2 * num_patches * p * p * c * d
           + vit_flops(keep + 1, d, model_cfg.depth, model_cfg.mlp_ratio)
           + 2 * (keep + 1) * d * dd
           + vit_flops(num_patches + 1, dd, model_cfg.decoder_depth, model_cfg.mlp_ratio)
           + 2 * (num_patches + 1) * dd * p * p * c)
    return 3.0 * fwd


def encoder_train_flops_per_example(model_cfg: ConfigDict) -> float:
    """Analytic matmul FLOPs (forward + backward = 3x forward) of the ViT encoder on all patches + cls (the
    fine-tuning backbone); a task head is left out, so TFLOP/s and MFU derived from it are lower bounds."""
    p, c = model_cfg.patch_size, model_cfg.in_chans
    num = (model_cfg.img_size // p) ** 2
    fwd = 2 * num * p * p * c * model_cfg.embed_dim + vit_flops(num + 1, model_cfg.embed_dim, model_cfg.depth,
                                                                model_cfg.mlp_ratio)
    return 3.0 * fwd




class MetricWriter:
    """Writes one step's scalars to metrics.jsonl (flushed per line), TensorBoard and the console."""

    def __init__(self, workdir: str | Path, *, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def progress_line(step: int, total_steps: int, scalars: dict[str, float], *, img_per_sec_per_device: float,
                  tflops_per_device: float, peak: float, seconds_per_step: float) -> str:
    """``step 120/300 (40%) | loss 0.5312 | 250.1 img/s/dev | 1.23 TFLOP/s/dev | MFU 3.1% | ETA 0:02:10``."""
    eta = datetime.timedelta(seconds=round(max(total_steps - step, 0) * seconds_per_step))
    parts = [f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)"]
    parts += [f"{k} {scalars[k]:.4f}" for k in ("loss", "loss_rec", "loss_cons") if k in scalars]
    parts.append(f"{img_per_sec_per_device:.1f} img/s/dev")
    parts.append(f"{tflops_per_device:.3f} TFLOP/s/dev")
    if peak > 0:
        parts.append(f"MFU {100 * tflops_per_device / peak:.1f}%")
    parts.append(f"ETA {eta}" if math.isfinite(seconds_per_step) else "ETA ?")
    return " | ".join(parts)


def read_tensorboard_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files under ``logdir`` (TFRecord framing, no TensorFlow)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
