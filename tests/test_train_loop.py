"""Specifications of `train.run_loop`, the one loop of pre-training and fine-tuning, on a toy step in-process:
logging and evaluation cadence, checkpoints, resume, SIGTERM, the non-finite stop."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from configs import common
from vasomim_jax import checkpoint, metrics, sharding, train
from vasomim_jax import input_pipeline as ip

BATCH = 4


def _toy_loss(params, batch, rng, step):
    x = batch["image"].astype(jnp.float32).reshape(BATCH, -1)[:, :4] / 255
    loss = jnp.mean((x @ params["w"] - 1.0) ** 2)
    return loss, {"loss": loss}


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """run_loop installs SIGTERM / SIGINT handlers: give pytest its own back."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in old.items():
        signal.signal(s, h)


def _run(workdir, total, *, lr=0.1, checkpoint_every=4, log_every=2, **loop_kw):
    """Pre-training's setup in miniature (a toy step, 12 random 16x16 records): returns (last step, workdir)."""
    cfg = common.pretrain_config()
    mesh = sharding.make_mesh(cfg)
    rng = np.random.default_rng(0)
    source = [{"image": rng.integers(0, 256, (16, 16), dtype=np.uint8),
               "vessel_map": np.zeros((16, 16), np.uint8)} for _ in range(12)]
    data_iter = iter(ip.make_dataset(source, global_batch=BATCH, process_index=0, process_count=1, seed=0,
                                     input_cfg=cfg.input, size=8))
    tx = optax.sgd(lr)
    rep = sharding.replicated(mesh)
    params = {"w": jnp.zeros(4)}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    abstract = checkpoint.abstract_like(state, jax.tree.map(lambda _: rep, state))
    batch_sh = sharding.batch_sharding(mesh)
    abstract_batch = {"image": jax.ShapeDtypeStruct((BATCH, 8, 8), jnp.uint8, sharding=batch_sh),
                      "vessel_map": jax.ShapeDtypeStruct((BATCH, 8, 8), jnp.uint8, sharding=batch_sh),
                      "index": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=batch_sh)}
    key = jax.random.PRNGKey(0)
    manager = checkpoint.make_manager(workdir, ConfigDict(dict(every_steps=checkpoint_every, max_to_keep=10)))
    state, start = train.restore_or_init(manager, abstract, data_iter, lambda: jax.device_put(state, rep))
    compiled = train.compile_step(train.make_train_step(_toy_loss, tx, 1), abstract, abstract_batch, key, mesh,
                                  "toy")
    last = train.run_loop(compiled, state, data_iter, batch_sharding=batch_sh, global_batch=BATCH, rng=key,
                          start=start, total=total, manager=manager,
                          writer=metrics.MetricWriter(workdir, enabled=True, tensorboard=False),
                          lr_fn=lambda step: lr, flops_per_step=1e6, peak=0.0, log_every=log_every,
                          checkpoint_every=checkpoint_every, **loop_kw)
    return last


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _saved(workdir):
    return sorted(int(p.name) for p in checkpoint.checkpoint_dir(workdir).iterdir() if p.name.isdigit())


def test_logs_every_n_steps_evaluates_on_schedule_and_at_the_end_and_checkpoints(tmp_path):
    calls = []

    def evaluate_fn(step, state):
        calls.append((step, int(state["step"])))
        return {"score": float(step)}

    assert _run(tmp_path, 6, evaluate_fn=evaluate_fn, eval_every=4) == 6
    assert calls == [(4, 4), (6, 6)]
    rows = _records(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert all({"loss", "grad_norm", "lr", "img_per_sec"} <= set(r) for r in train_rows)
    assert [(r["step"], r["score"]) for r in rows if "score" in r] == [(4, 4.0), (6, 6.0)]
    assert _saved(tmp_path) == [4, 6]


def test_a_resumed_loop_continues_bit_exactly(tmp_path):
    _run(tmp_path / "straight", 8)
    _run(tmp_path / "resumed", 4)
    assert _run(tmp_path / "resumed", 8) == 8
    straight = {r["step"]: r["loss"] for r in _records(tmp_path / "straight")}
    resumed = {r["step"]: r["loss"] for r in _records(tmp_path / "resumed")}
    assert resumed == straight and sorted(resumed) == [2, 4, 6, 8]


def test_sigterm_saves_the_next_finished_step_and_stops(tmp_path):
    def on_step(step, state, host_batch):
        assert host_batch["image"].shape == (BATCH, 8, 8)
        if step == 3:  # lands after step 3 read the flag: step 4 is the one saved
            os.kill(os.getpid(), signal.SIGTERM)

    assert _run(tmp_path, 10, checkpoint_every=100, on_step=on_step) == 4
    assert _saved(tmp_path) == [4]


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="non-finite loss .* at step 2"):
        _run(tmp_path, 6, lr=1e30, checkpoint_every=1, log_every=100)
    assert _saved(tmp_path) == [1]
