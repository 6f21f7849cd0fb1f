"""End-to-end demo on synthetic angiograms; everything it writes goes under --out (default demo_out/).

1. ``synthetic_samples.png``: eight seeded synthetic angiograms with their ground-truth vessel masks;
2. ``tfds/``: the ``synthetic_angio/small`` dataset, vessel maps computed by the converter (``vasomim convert``);
3. ``workdir/``: pre-training of ``configs/demo_tiny.py`` by the trainer (``vasomim pretrain``, a subprocess:
   progress lines, checkpoints, metrics.jsonl, TensorBoard);
4. ``panels/*.png`` and ``plots/*.png`` (``vasomim visualize``);
5. ``export/encoder.safetensors`` + ``export/timm_call.txt`` (``vasomim export``);
then where each output is and the next commands for real data. Each stage reuses what a previous run left;
Ctrl-C during pre-training saves a checkpoint, and running the demo again resumes from it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

_FLAGS = None


def define_flags():
    global _FLAGS
    from absl import flags

    flags.DEFINE_string("out", "demo_out", "Folder for everything the demo writes.")
    flags.DEFINE_integer("size", 256, "Size in pixels of the synthetic sample picture.")
    flags.DEFINE_integer("seed", 0, "First seed of the synthetic sample picture; key of the panel masks.")
    flags.DEFINE_integer("steps", 0, "Pre-training steps; 0 = the config's total_steps.")
    flags.DEFINE_integer("num_images", 0, "Images in the synthetic dataset; 0 = the small config's 512.")
    flags.DEFINE_integer("num_panels", 4, "Examples drawn as panels.")
    flags.DEFINE_string("config", "", "Pre-training config file; '' = configs/demo_tiny.py.")
    flags.DEFINE_multi_string("pretrain_flag", [], "Extra flag for the trainer, repeatable, e.g. "
                                                   "--pretrain_flag=--config.model.depth=2.")
    _FLAGS = flags.FLAGS


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8 image + {0,1} mask -> (H, W, 3) uint8 with the mask tinted red."""
    rgb = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    red = np.array([230.0, 40.0, 40.0], np.float32)
    m = mask.astype(bool)
    rgb[m] = 0.45 * rgb[m] + 0.55 * red
    return rgb.astype(np.uint8)


def sample_grid(images: np.ndarray, masks: np.ndarray, pad: int = 4) -> np.ndarray:
    """(N, H, W) images and masks -> one (2H + 3pad, N*(W+pad)+pad, 3) uint8 grid: images over overlays."""
    n, h, w = images.shape
    grid = np.full((2 * h + 3 * pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        x = pad + i * (w + pad)
        grid[pad:pad + h, x:x + w] = images[i][..., None]
        grid[2 * pad + h:2 * pad + 2 * h, x:x + w] = overlay(images[i], masks[i])
    return grid


def write_samples(out: pathlib.Path, seed: int = 0, size: int = 256, n: int = 8) -> pathlib.Path:
    from PIL import Image

    from vasomim_jax import synthetic

    images, masks = synthetic.angiograms(list(range(seed, seed + n)), size)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "synthetic_samples.png"
    Image.fromarray(sample_grid(images, masks)).save(path)
    return path


def demo_config_path() -> pathlib.Path:
    """configs/demo_tiny.py of this checkout / installation (located, not imported)."""
    spec = importlib.util.find_spec("configs.demo_tiny")
    if spec is None or spec.origin is None:
        raise SystemExit("vasomim demo: configs/demo_tiny.py not found; pass --config=PATH")
    return pathlib.Path(spec.origin)


def build_dataset(data_dir: pathlib.Path, num_images: int = 0) -> tuple[str, str]:
    """``synthetic_angio/small`` into ``data_dir`` through the converter (reused when already built). With
    ``num_images`` > 0 (a shortened demo) the same recipe builds ``synthetic_angio/small<n>`` with n images.
    Returns (dataset name, the converter's summary)."""
    from vasomim_jax import convert

    if num_images <= 0:
        return "synthetic_angio/small", convert.run("synthetic_angio/small", data_dir=str(data_dir)).text()
    builder = convert.make_builder("synthetic_angio/small", data_dir=str(data_dir))
    config = dataclasses.replace(builder.builder_config, num_images=num_images, name=f"small{num_images}")
    builder = type(builder)(config=config, data_dir=str(data_dir))
    existed = builder.is_prepared()
    builder.download_and_prepare(file_format="array_record")
    name = f"synthetic_angio/{config.name}"
    return name, f"{name}: {'already built (reused)' if existed else 'built'} in {data_dir} ({num_images} images)"


def latest_step(workdir: pathlib.Path) -> int:
    """Newest finished checkpoint step of a workdir; 0 when there is none."""
    ckpts = workdir / "checkpoints"
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and (p / "state").is_dir()] \
        if ckpts.is_dir() else []
    return max(steps, default=0)


def pretrain(config_path: pathlib.Path, workdir: pathlib.Path, dataset: str, data_dir: pathlib.Path, *,
             steps: int, extra: list[str], cache_dir: pathlib.Path) -> int:
    """Runs (or resumes) the trainer as ``python -m vasomim_jax.train``; its progress goes to this console.
    Ctrl-C / SIGTERM make the trainer save and exit; the demo then stops too. Returns the trainer's exit code."""
    cmd = [sys.executable, "-m", "vasomim_jax.train", f"--config={config_path}", f"--workdir={workdir}",
           f"--config.dataset.name={dataset}", f"--config.dataset.data_dir={data_dir}",
           *([f"--config.total_steps={steps}"] if steps > 0 else []), *extra]
    env = dict(os.environ)
    # Resumed runs (and re-runs) skip most of the compile time.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    process = subprocess.Popen(cmd, env=env)
    # The trainer saves and exits on SIGINT / SIGTERM: pass them on (a terminal's Ctrl-C reaches it anyway; a
    # second copy is harmless) and wait for the save instead of dying first.
    forward = {sig: signal.signal(sig, lambda signum, _: process.send_signal(signum))
               for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for sig, previous in forward.items():
            signal.signal(sig, previous)


def total_steps_of(workdir: pathlib.Path) -> int:
    return int(json.loads((workdir / "config.json").read_text())["total_steps"])


class _State:
    """``out/demo_state.json``: which checkpoint step the panels / export were made from (reuse on re-runs)."""

    def __init__(self, out: pathlib.Path):
        self.path = out / "demo_state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, stage: str, step: int, *paths: pathlib.Path) -> bool:
        return self.data.get(stage) == step and all(p.exists() for p in paths)

    def mark(self, stage: str, step: int) -> None:
        self.data[stage] = step
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


NEXT_STEPS = """next, on real angiograms:
  vasomim convert xa170k --manual_dir=/path/to/XA-170K --data_dir=/path/to/tfds
  vasomim pretrain --config=configs/vasomim_vitb16_xa170k.py --workdir=/path/to/run \\
      --config.dataset.data_dir=/path/to/tfds
  vasomim visualize --workdir=/path/to/run --out=/path/to/pictures
  vasomim export --workdir=/path/to/run --out=/path/to/encoder.safetensors"""


def run(out: str | pathlib.Path, *, steps: int = 0, num_images: int = 0, num_panels: int = 4, seed: int = 0,
        size: int = 256, config: str = "", pretrain_flags: tuple[str, ...] = ()) -> dict:
    """The whole demo; returns {"wall_s", "step", "outputs": {name: path}}. Raises SystemExit(message) when the
    pre-training was interrupted (run again to resume) or failed."""
    from vasomim_jax import export, plots, visualize

    t0 = time.perf_counter()
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out)
    samples = out / "synthetic_samples.png"
    if not samples.exists():
        write_samples(out, seed, size)
    print(f"[1/5] synthetic angiograms: {samples}", flush=True)

    data_dir = out / "tfds"
    dataset, summary = build_dataset(data_dir, num_images)
    print(f"[2/5] dataset (vessel maps by the converter):\n{summary}", flush=True)

    workdir = out / "workdir"
    config_path = pathlib.Path(config) if config else demo_config_path()
    step = latest_step(workdir)
    wanted = steps if steps > 0 else (total_steps_of(workdir) if (workdir / "config.json").is_file() else None)
    if wanted is not None and step >= wanted:
        print(f"[3/5] pre-training: reusing {workdir} (checkpoint at step {step})", flush=True)
    else:
        print(f"[3/5] pre-training {config_path.name} into {workdir}"
              + (f" (resuming from step {step})" if step else ""), flush=True)
        code = pretrain(config_path, workdir, dataset, data_dir, steps=steps, extra=list(pretrain_flags),
                        cache_dir=out / "jax_cache")
        step = latest_step(workdir)
        if code != 0:
            raise SystemExit(f"vasomim demo: pre-training failed (exit {code}); fix the error above and run "
                             f"again: it resumes from step {step}")
        if step < total_steps_of(workdir):
            raise SystemExit(f"vasomim demo: pre-training stopped at step {step}; run the same command again "
                             "to resume")

    panels = [out / "panels" / f"example{i}_{kind}.png" for i in range(num_panels) for kind in ("full", "pasted")]
    plot_files = [out / "plots" / name for name in plots.PLOTS]
    if state.done("pictures", step, *panels, *plot_files):
        print(f"[4/5] pictures: reusing {out / 'panels'} and {out / 'plots'}", flush=True)
    else:
        written = visualize.pretrain_pictures(str(workdir), out, num_examples=num_panels, seed=seed)
        panels = [p for p in written if p.parent.name == "panels"]
        state.mark("pictures", step)
        print(f"[4/5] pictures: {len(written)} files in {out / 'panels'} and {out / 'plots'}", flush=True)

    encoder, call_txt = out / "export" / "encoder.safetensors", out / "export" / "timm_call.txt"
    if state.done("export", step, encoder, call_txt):
        call = call_txt.read_text().splitlines()[0]
    else:
        call = export.export(str(workdir), encoder, fmt="timm")
        call_txt.write_text(f"{call}\n# then: model.load_state_dict(safetensors.torch.load_file("
                            f"{str(encoder)!r}), strict=True)\n")
        state.mark("export", step)
    print(f"[5/5] export: {encoder}\n  model = {call}", flush=True)

    outputs = {"samples": samples, "dataset": data_dir, "workdir": workdir, "checkpoints": workdir / "checkpoints",
               "metrics": workdir / "metrics.jsonl", "panels": out / "panels", "plots": out / "plots",
               "encoder": encoder, "timm_call": call_txt}
    wall = time.perf_counter() - t0
    print(f"\ndemo finished in {wall:.0f} s (pre-trained to step {step}). Outputs:")
    width = max(map(len, outputs))
    for name, path in outputs.items():
        print(f"  {name:<{width}}  {path}")
    print(f"  e.g. {panels[0]}\n\n{NEXT_STEPS}", flush=True)
    return {"wall_s": wall, "step": step, "outputs": outputs}


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"vasomim demo: unexpected arguments {argv[1:]}")
    f = _FLAGS
    for name in ("steps", "num_images"):
        if f[name].value < 0:
            raise SystemExit(f"vasomim demo: --{name} must be >= 0, got {f[name].value}")
    if f.num_panels < 1:
        raise SystemExit(f"vasomim demo: --num_panels must be >= 1, got {f.num_panels}")
    run(f.out, steps=f.steps, num_images=f.num_images, num_panels=f.num_panels, seed=f.seed, size=f.size,
        config=f.config, pretrain_flags=tuple(f.pretrain_flag))
