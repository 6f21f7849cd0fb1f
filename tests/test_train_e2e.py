"""End-to-end `vasomim pretrain` on 8 fake CPU devices (subprocesses: the device count is fixed at jax import).

A tiny demo_tiny variant (ViT 64x2, 32 px, batch 16, 12 steps) on a `synthetic_angio/small` build made once for
the module. Runs share a persistent compilation cache, so repeated meshes compile once per session.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vasomim_jax import checkpoint, metrics

REPO = Path(__file__).resolve().parents[1]
TOTAL = 12
TINY = ["--config=configs/demo_tiny.py", f"--config.total_steps={TOTAL}", "--config.batch_size=16",
        "--config.model.img_size=32", "--config.model.depth=2", "--config.model.embed_dim=64",
        "--config.model.num_heads=2", "--config.log_every_steps=1", "--config.checkpoint.every_steps=4",
        "--config.optim.base_lr=0.01", "--config.metrics.tensorboard=true"]
MESH_4x2 = ["--config.mesh.data=4", "--config.mesh.fsdp=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the runs: the dataset built once, a shared compilation cache."""
    data_dir = tmp_path_factory.mktemp("tfds")
    import tensorflow_datasets as tfds

    from tfds_builders.synthetic_angio import synthetic_angio_dataset_builder  # noqa: F401  (registers it)

    tfds.builder("synthetic_angio/small", data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    cache = tmp_path_factory.mktemp("jax_cache")
    return {"data_dir": str(data_dir),
            "env": dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")}


def _cmd(env, workdir, *overrides):
    return [sys.executable, "-m", "vasomim_jax.train", f"--workdir={workdir}", *TINY,
            f"--config.dataset.data_dir={env['data_dir']}", *overrides]


def _env(env, devices):
    return dict(env["env"], XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _run(env, workdir, *overrides, devices=8, check=True):
    res = subprocess.run(_cmd(env, workdir, *overrides), cwd=REPO, env=_env(env, devices), capture_output=True,
                         text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-4000:]
    return res


def _losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
    """12 steps on a data=4 x fsdp=2 mesh, checkpoints at 4, 8, 12."""
    workdir = tmp_path_factory.mktemp("straight")
    res = _run(env, workdir, *MESH_4x2)
    return workdir, res.stderr


@pytest.fixture(scope="module")
def one_device(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    _run(env, workdir, "--config.mesh.data=1", "--config.mesh.fsdp=1", devices=1)
    return workdir


def test_pretrain_on_a_4x2_mesh_learns_logs_and_shards_the_large_kernels(straight):
    workdir, log = straight
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    for key in ("loss", "loss_rec", "loss_cons", "vessel_share", "vessel_share_random", "lr", "beta",
                "img_per_sec"):
        assert all(np.isfinite(r[key]) for r in records), key
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert "param encoder/blocks/mlp/fc1/kernel (2, 64, 256) P(None, None, 'fsdp')" in log
    assert "param cls_token (1, 1, 64) P()" in log
    assert log.index("memory: ") < log.index(f"step 1/{TOTAL}")
    assert "process 0/1 drives devices [0, 1, 2, 3, 4, 5, 6, 7]" in log
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 8, 12]
    tb = metrics.read_tensorboard_scalars(workdir / "tensorboard")
    np.testing.assert_allclose([v for _, v in tb["loss"]], losses, rtol=1e-6)
    config, params, step = checkpoint.load_params(workdir)
    assert step == TOTAL and config.model.embed_dim == 64 and params["cls_token"].shape == (1, 1, 64)


def test_first_losses_agree_across_meshes_and_device_counts(env, straight, one_device, tmp_path):
    _run(env, tmp_path, "--config.mesh.data=8", "--config.mesh.fsdp=1")
    ref = _losses(straight[0])
    for other in (_losses(tmp_path), _losses(one_device)):
        np.testing.assert_allclose([other[s] for s in range(1, 6)], [ref[s] for s in range(1, 6)], rtol=0,
                                   atol=1e-5)


def test_sigterm_saves_the_current_step_and_the_resumed_run_is_bit_exact(env, straight, tmp_path):
    proc = subprocess.Popen(_cmd(env, tmp_path, *MESH_4x2), cwd=REPO, env=_env(env, 8), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "metrics.jsonl"
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 6:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(_losses(tmp_path))
    assert 6 <= stopped < TOTAL, f"the run reached step {stopped} before SIGTERM landed"
    assert f"SIGTERM received: saved step {stopped}" in err
    assert stopped in {int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()}

    res = _run(env, tmp_path, *MESH_4x2)
    assert f"resumed from step {stopped}" in res.stderr, res.stderr[-4000:]
    lines = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(1, stopped + 1)) + list(range(stopped + 1, TOTAL + 1))
    assert _losses(tmp_path) == _losses(straight[0])  # bit-exact
    _, resumed, _ = checkpoint.load_params(tmp_path)
    _, ref, _ = checkpoint.load_params(straight[0])
    for a, b in zip(*(sorted(_flat(t).items()) for t in (resumed, ref))):
        np.testing.assert_array_equal(a[1], b[1], err_msg=a[0])


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_a_checkpoint_from_8_devices_continues_on_1_device(env, straight, tmp_path):
    shutil.copytree(straight[0], tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "12")
    (tmp_path / "metrics.jsonl").unlink()
    res = _run(env, tmp_path, "--config.mesh.data=1", "--config.mesh.fsdp=1", devices=1)
    assert "resumed from step 8" in res.stderr
    ref, got = _losses(straight[0]), _losses(tmp_path)
    assert sorted(got) == [9, 10, 11, 12]
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=0, atol=1e-5)


def test_a_truncated_step_folder_is_skipped(env, straight, tmp_path):
    shutil.copytree(straight[0], tmp_path, dirs_exist_ok=True)
    (tmp_path / "metrics.jsonl").unlink()
    state = tmp_path / "checkpoints" / "12" / "state"
    for f in [f for f in state.rglob("*") if f.is_file() and "ocdbt" in str(f.relative_to(state))]:
        f.unlink()  # killed mid-save: the array data never landed
    res = _run(env, tmp_path, *MESH_4x2)
    assert "checkpoint step 12 is incomplete or unreadable" in res.stderr
    assert "resumed from step 8" in res.stderr
    assert _losses(tmp_path) == {s: v for s, v in _losses(straight[0]).items() if s > 8}


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(env, one_device, tmp_path):
    # lr 1e30 from step 1 (no warm-up): the first update blows the weights up, step 2's loss is not finite.
    res = _run(env, tmp_path, "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.optim.lr=1e30",
               "--config.optim.warmup_fraction=0.0", "--config.checkpoint.every_steps=1", devices=1, check=False)
    assert res.returncode != 0
    assert "non-finite loss" in res.stderr and "at step 2" in res.stderr
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost_match_one_process_and_their_checkpoint_continues_on_one(env, tmp_path):
    single = tmp_path / "single"
    _run(env, single, "--config.mesh.data=8", "--config.mesh.fsdp=1")
    multi = tmp_path / "multi"
    port = _free_port()
    procs = [subprocess.Popen(
        _cmd(env, multi, "--config.mesh.data=8", "--config.mesh.fsdp=1",
             f"--config.distributed.coordinator_address=localhost:{port}", "--config.distributed.num_processes=2",
             f"--config.distributed.process_id={i}"),
        cwd=REPO, env=_env(env, 4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for i, (p, err) in enumerate(zip(procs, errs)):
        assert p.returncode == 0, err[-3000:]
        assert f"process {i}/2 drives devices" in err
        assert f"process {i} reads rows [{8 * i}, {8 * i + 8}) of each global batch of 16" in err
        assert f"process {i} step 1 reads global positions {list(range(8 * i, 8 * i + 8))}" in err
    ref, got = _losses(single), _losses(multi)
    assert sorted(got) == list(range(1, TOTAL + 1))
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=0, atol=1e-5)

    # The 2-process checkpoint of step 8 continues on 1 process: its iterator is repositioned from the step.
    shutil.rmtree(multi / "checkpoints" / "12")
    (multi / "metrics.jsonl").unlink()
    res = _run(env, multi, "--config.mesh.data=8", "--config.mesh.fsdp=1")
    assert "data iterator: checkpoint written by 2 processes, now 1; repositioned from step 8" in res.stderr
    assert f"process 0 step 9 reads global positions {list(range(128, 144))}" in res.stderr
    got = _losses(multi)
    assert sorted(got) == [9, 10, 11, 12]
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=0, atol=1e-5)


def test_init_from_a_workdir_starts_from_its_weights(env, straight, tmp_path):
    """`--config.init_from=<workdir>` loads the source's final params before step 1 (a fresh run, not a resume)."""
    source, _ = straight
    workdir = tmp_path / "warm"
    res = _run(env, workdir, "--config.mesh.data=1", "--config.mesh.fsdp=1", f"--config.init_from={source}",
               "--config.total_steps=1", "--config.optim.base_lr=1e-12", devices=1)
    assert "initialised" in res.stderr and "resumed from step" not in res.stderr
    _, src_params, _ = checkpoint.load_params(source)
    _, params, step = checkpoint.load_params(workdir)
    assert step == 1
    # One step at lr 1e-12 leaves the loaded weights as they were (to float32 rounding).
    np.testing.assert_allclose(params["encoder"]["blocks"]["mlp"]["fc1"]["kernel"],
                               src_params["encoder"]["blocks"]["mlp"]["fc1"]["kernel"], atol=1e-6)


def test_init_from_a_missing_path_names_the_field(env, tmp_path):
    res = _run(env, tmp_path / "bad", "--config.mesh.data=1", "--config.mesh.fsdp=1",
               f"--config.init_from={tmp_path / 'nowhere'}", devices=1, check=False)
    assert res.returncode != 0 and "config.init_from=" in res.stderr
