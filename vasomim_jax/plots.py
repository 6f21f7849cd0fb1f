"""Training curves from ``WORKDIR/metrics.jsonl`` (matplotlib, Agg): the vessel share of the masked patches
against the share expected under uniform masking (with β), and the loss components."""

from __future__ import annotations

import json
import pathlib

import numpy as np


def read_metrics(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """metrics.jsonl -> {key: float64 (N,)} sorted by step; a step logged twice (a resumed run) keeps its last
    record. Keys missing from some records are NaN there."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (has the run logged a step yet?)")
    records = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines):  # a run killed mid-write leaves a partial last line
                    break
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            records[int(r["step"])] = r
    steps = sorted(records)
    keys = sorted({k for r in records.values() for k in r} - {"step"})
    out = {"step": np.asarray(steps, np.float64)}
    out.update({k: np.asarray([records[s].get(k, np.nan) for s in steps], np.float64) for k in keys})
    return out


PLOTS = {  # file name -> (title, metric keys)
    "vessel_share.png": ("masked patches containing vessel", ("vessel_share", "vessel_share_random", "beta")),
    "losses.png": ("loss components", ("loss", "loss_rec", "loss_cons")),
}


def plot_metrics(metrics_path: str | pathlib.Path, out_dir: str | pathlib.Path, *,
                 vessel_min_fraction: float | None = None) -> list[pathlib.Path]:
    """Training curves from metrics.jsonl: vessel_share vs vessel_share_random (with β) and the loss components.
    ``vessel_min_fraction`` (``config.masking.vessel_patch_min_fraction``) goes into the share plot's title: the
    share means little without the definition of a vessel patch. Returns the written PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    m = read_metrics(metrics_path)
    if len(m["step"]) == 0:
        raise ValueError(f"{metrics_path}: no records to plot")
    written = []
    for name, (title, keys) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for k in keys:
            if k in m:
                ax.plot(m["step"], m[k], marker="." if len(m["step"]) < 30 else None, label=k)
        ax.set_xlabel("step")
        if name == "vessel_share.png" and vessel_min_fraction is not None:
            title = f"{title} (> {100 * vessel_min_fraction:g}% vessel pixels)"
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = pathlib.Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
