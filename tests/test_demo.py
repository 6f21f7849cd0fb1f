"""`vasomim demo`, shortened (32 images, a 2-block ViT on 32 px, a few steps), end to end as a user runs it:
interrupted during pre-training, run again (resumes and finishes), run a third time (reuses every stage)."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vasomim_jax import demo

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--num_images=32", "--num_panels=2", "--size=64",
         *(f"--pretrain_flag={f}" for f in (
             "--config.batch_size=8", "--config.model.img_size=32", "--config.model.depth=2",
             "--config.model.embed_dim=64", "--config.model.num_heads=2", "--config.log_every_steps=1",
             "--config.checkpoint.every_steps=2", "--config.metrics.tensorboard=false"))]


def _demo(out, steps):
    return subprocess.run([sys.executable, "-m", "vasomim_jax.cli", "demo", f"--out={out}", f"--steps={steps}",
                           *SHORT], cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A 1000-step demo interrupted (SIGINT to the demo) once the trainer has logged a step, then the same demo
    with --steps=k+2: it resumes from the interrupted run's checkpoint k and finishes."""
    out = tmp_path_factory.mktemp("demo_out")
    cmd = [sys.executable, "-m", "vasomim_jax.cli", "demo", f"--out={out}", "--steps=1000", *SHORT]
    logs = tmp_path_factory.mktemp("logs")
    with open(logs / "out", "w") as fout, open(logs / "err", "w") as ferr:  # files: a full pipe would block
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fout, stderr=ferr)
        metrics, deadline = out / "workdir" / "metrics.jsonl", time.time() + 600
        while not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    stdout, stderr = (logs / "out").read_text(), (logs / "err").read_text()
    stopped = re.search(r"pre-training stopped at step (\d+); run the same command again", stderr)
    assert proc.returncode != 0 and stopped, stdout[-2000:] + stderr[-3000:]
    k = int(stopped.group(1))
    assert 1 <= k < 1000 and (out / f"workdir/checkpoints/{k}/state").is_dir()
    res = _demo(out, k + 2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"(resuming from step {k})" in res.stdout and f"resumed from step {k}" in res.stderr
    return out, res, k + 2


def test_short_demo_writes_every_output_and_says_where(first_run):
    out, res, total = first_run
    expected = ["synthetic_samples.png", "tfds/synthetic_angio/small32/1.0.0", f"workdir/checkpoints/{total}/state",
                "workdir/metrics.jsonl", "panels/example0_full.png", "panels/example1_pasted.png",
                "plots/vessel_share.png", "plots/losses.png", "export/encoder.safetensors", "export/timm_call.txt"]
    for rel in expected:
        assert (out / rel).exists(), rel
    logged = {int(json.loads(line)["step"]) for line in (out / "workdir/metrics.jsonl").read_text().splitlines()}
    assert logged == set(range(1, total + 1))
    call = (out / "export/timm_call.txt").read_text().splitlines()[0]
    assert call.startswith("timm.create_model(") and "img_size=32" in call and "depth=2" in call
    for line in (f"model = {call}", str(out / "export" / "encoder.safetensors"), "demo finished in",
                 "vasomim convert xa170k --manual_dir", "vasomim pretrain --config=configs/vasomim_vitb16_xa170k.py"):
        assert line in res.stdout
    panel = np.asarray(Image.open(out / "panels/example0_full.png").convert("RGB"))
    assert len(np.unique(panel.reshape(-1, 3), axis=0)) > 50
    assert f"step {total}/{total}" in res.stderr  # the trainer's progress display


def test_another_run_reuses_dataset_checkpoint_pictures_and_export(first_run):
    out, _, total = first_run
    before = {p: p.stat().st_mtime_ns for p in (out / "panels/example0_full.png", out / "export/encoder.safetensors")}
    res = _demo(out, total)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already built (reused)" in res.stdout
    assert "pre-training: reusing" in res.stdout and "pictures: reusing" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_demo_refuses_negative_step_counts():
    res = subprocess.run([sys.executable, "-m", "vasomim_jax.cli", "demo", "--out=/nonexistent", "--steps=-1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "--steps must be >= 0" in res.stderr


def test_latest_step_ignores_unfinished_checkpoint_folders(tmp_path):
    for name in ("2/state", "4/state", "6.orbax-checkpoint-tmp/state", "8"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert demo.latest_step(tmp_path) == 4
    assert demo.latest_step(tmp_path / "missing") == 0
