"""Pre-training loop: ``vasomim pretrain --config=configs/<file>.py --workdir=DIR [--config.x=y ...]``.

Sharded over a (data, fsdp) mesh with ``jax.jit`` + NamedSharding; the train state {"step", "params",
"opt_state"} is created already sharded, the step is compiled ahead of time (``memory: ...`` logged) and the
state donated. Checkpoints (state + data iterator) every ``checkpoint.every_steps``; the latest complete one
is restored on start (``resumed from step N``), onto whatever mesh and process count this run has.
SIGTERM / SIGINT: finish the current step, save it, wait, exit 0. A non-finite loss stops the run (exit 1) before
it is checkpointed.

The loop and its setup pieces (`run_loop`, `compile_step`, `restore_or_init`, `write_run_config`, `StopFlag`,
`memory_line`) are shared with fine-tuning (`vasomim_jax.finetune.train`).
"""

from __future__ import annotations

import logging as pylogging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from ml_collections import ConfigDict, config_flags

from vasomim_jax import checkpoint, distributed, input_pipeline, losses, metrics, models, sharding
from vasomim_jax import config as config_lib

METRIC_KEYS = ("loss", "loss_rec", "loss_cons", "beta", "vessel_share", "vessel_share_random")


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Pre-training config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: config.json, metrics.jsonl, checkpoints/, tensorboard/.")
    flags.mark_flags_as_required(["config", "workdir"])


# ----------------------------------------------------------------------------------------------- optimizer


def decay_mask(params, decay_tokens: bool):
    """True where AdamW applies weight decay: the official param groups (no decay on biases and 1-D params,
    i.e. norms; the scanned blocks' leading depth axis does not count) and the cls/mask tokens per config."""

    def rule(path, leaf):
        name = sharding.path_str(path)
        leaf_name = name.rsplit("/", 1)[-1]
        if leaf_name in ("cls_token", "mask_token"):
            return decay_tokens
        ndim = np.ndim(leaf) - (1 if "/blocks/" in f"/{name}" else 0)
        return leaf_name not in ("bias", "scale") and ndim > 1

    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(config: ConfigDict, schedule: config_lib.Schedule):
    """AdamW with per-step linear warm-up then cosine to ``optim.min_lr``; optional global-norm clipping.
    Returns (optax transform, lr schedule)."""
    o = config.optim
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config_lib.learning_rate(config), warmup_steps=schedule.warmup_steps,
        decay_steps=max(schedule.total_steps, schedule.warmup_steps + 1), end_value=o.min_lr)
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                     mask=lambda p: decay_mask(p, bool(o.decay_tokens)))
    if o.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
    return tx, lr


# ---------------------------------------------------------------------------------------------------- step


def make_train_step(loss_fn, tx, grad_accum_steps: int):
    """step(state, batch, rng) -> (state, metrics). With accumulation the global batch is split into
    ``grad_accum_steps`` interleaved micro-batches (each device keeps its own rows), gradients and metrics are
    averaged over them in a scan: the same update as one big batch up to float rounding."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, rng):
        step, params = state["step"], state["params"]
        if grad_accum_steps == 1:
            (_, m), grads = grad_fn(params, batch, rng, step)
        else:
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps,
                                                 *x.shape[1:]), 0, 1), batch)

            def body(acc, mb):
                (_, m_i), g_i = grad_fn(params, mb, rng, step)
                return jax.tree.map(jnp.add, acc, (g_i, m_i)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, batch, rng, step)))
            (grads, m), _ = jax.lax.scan(body, (zeros[1], zeros[0][1]), micro)
            grads, m = jax.tree.map(lambda x: x / grad_accum_steps, (grads, m))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        m = dict(m, grad_norm=optax.global_norm(grads))
        return {"step": step + 1, "params": params, "opt_state": opt_state}, m

    return train_step


# ---------------------------------------------------------------------------------- loop (shared with finetune)


class StopFlag:
    """SIGTERM / SIGINT set the flag; the loop saves at the step it just finished and exits 0."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name


def memory_line(compiled) -> str:
    mem = compiled.memory_analysis()
    if mem is None:
        return "memory: not reported by this backend"
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return "memory: " + ", ".join(f"{f.removesuffix('_size_in_bytes')} {getattr(mem, f) / 2**20:.1f} MiB"
                                  for f in fields if hasattr(mem, f))


def write_run_config(config: ConfigDict, workdir: Path) -> None:
    """Process 0 creates ``workdir`` and writes its config.json."""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def restore_or_init(manager, abstract_state, data_iter, init: Callable[[], Any]) -> tuple[Any, int]:
    """(state, first step): the latest complete checkpoint (state and ``data_iter``, logs ``resumed from step
    N``; a checkpoint of another process count repositions ``data_iter`` from N) or ``init()`` at step 0."""
    restored = checkpoint.restore_latest(manager, abstract_state, data_iter)
    if restored is None:
        return init(), 0
    state, start = restored
    logging.info("resumed from step %d", start)
    return state, start


def compile_step(train_step, abstract_state, abstract_batch: dict, rng: jax.Array, mesh, what: str):
    """``train_step(state, batch, rng) -> (state, metrics)`` jitted with the shardings the abstract trees carry
    (rng and metrics replicated, state donated) and compiled ahead; logs compile time and the memory report."""
    state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)
    batch_sh = jax.tree.map(lambda x: x.sharding, abstract_batch)
    rep = sharding.replicated(mesh)
    step_fn = jax.jit(train_step, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                      donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step_fn.lower(abstract_state, abstract_batch, rng).compile()
    logging.info("compiled the %s step in %.1f s", what, time.perf_counter() - t0)
    logging.info(memory_line(compiled))
    return compiled


def run_loop(compiled, state, data_iter, *, batch_sharding, global_batch: int, rng: jax.Array, start: int,
             total: int, manager, writer: metrics.MetricWriter, lr_fn, flops_per_step: float, peak: float,
             log_every: int, checkpoint_every: int, evaluate_fn: Callable[[int, Any], dict] | None = None,
             eval_every: int = 0, on_step: Callable[[int, Any, dict], None] | None = None) -> int:
    """Runs ``compiled(state, batch, rng) -> (state, metrics)`` from step ``start`` to ``total``; returns the last
    step. Closes ``manager`` (after its saves land) and ``writer``.

    Each step: this process's block of the global batch (``next(data_iter)``) -> global arrays laid out as
    ``batch_sharding`` -> the compiled step. Every ``log_every`` steps that step's own metrics (not a window
    average) + ``lr`` + ``img_per_sec`` go to ``writer`` and the progress line. ``evaluate_fn(step, state) ->
    scalars`` runs every ``eval_every`` steps (0: only at the end) and at ``total`` if given; its scalars go to
    ``writer`` and its time is not counted as training throughput. ``on_step(step, state, host_batch)`` runs after
    every step. The state and iterator are saved every ``checkpoint_every`` steps, at ``total`` and on SIGTERM /
    SIGINT (then the loop stops; the caller exits 0). A non-finite loss raises SystemExit naming the step,
    before that state is saved.
    """
    pidx, ndev = jax.process_index(), jax.device_count()
    stop = StopFlag()
    step = start
    t_last, step_last = time.perf_counter(), step
    pending = None  # (step, loss) of the previous step, checked once the next one is dispatched

    def check_finite(at_step, loss):
        if not math.isfinite(float(loss)):
            raise SystemExit(f"non-finite loss {float(loss)} at step {at_step}; stopping with the last good "
                             f"checkpoint kept in {manager.directory}")

    try:
        while step < total:
            local = next(data_iter)
            if step == start:
                logging.info("process %d step %d reads global positions %s", pidx, step + 1,
                             local["index"].tolist())
            batch = input_pipeline.to_global(local, batch_sharding, global_batch)
            state, step_metrics = compiled(state, batch, rng)
            step += 1
            if pending is not None:
                check_finite(*pending)
            pending = (step, step_metrics["loss"])
            stopping = stop.signal  # read once: a signal landing later in this iteration waits for the next
            save_now = step % checkpoint_every == 0 or step == total or stopping is not None
            if step % log_every == 0 or save_now:
                scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                check_finite(step, scalars["loss"])
                pending = None
                now = time.perf_counter()
                sec_per_step = (now - t_last) / max(step - step_last, 1)
                t_last, step_last = now, step
                img_s = global_batch / sec_per_step
                scalars.update(lr=float(lr_fn(step - 1)), img_per_sec=img_s)
                if step % log_every == 0:
                    writer.write(step, scalars)
                    logging.info(metrics.progress_line(step, total, scalars, img_per_sec_per_device=img_s / ndev,
                                                       tflops_per_device=flops_per_step / sec_per_step / ndev / 1e12,
                                                       peak=peak, seconds_per_step=sec_per_step))
            if evaluate_fn is not None and ((eval_every and step % eval_every == 0) or step == total):
                writer.write(step, evaluate_fn(step, state))
                t_last = time.perf_counter()
            if on_step is not None:
                on_step(step, state, local)
            if save_now:
                checkpoint.save(manager, step, state, data_iter)
            if stopping is not None:
                logging.info("%s received: saved step %d, exiting", stopping, step)
                break
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return step


# ------------------------------------------------------------------------------------------------ pre-training


def _params_from(config: ConfigDict, params, shardings):
    """``config.init_from`` weights (workdir, export or official .pth) adapted to ``config.model``, placed with the
    run's shardings. Entries the source lacks (e.g. the decoder of an encoder-only export) keep their fresh init."""
    from vasomim_jax.pretrained import load_init_from  # torch / orbax only when asked for

    loaded = load_init_from(config.init_from, config.model)
    merged = dict(params)
    for name, value in loaded.items():
        want = jax.tree.map(lambda x: x.shape, params[name])
        if jax.tree.map(np.shape, value) != want:
            raise ValueError(f"config.init_from={config.init_from!r}: {name} does not match config.model")
        merged[name] = value
    logging.info("initialised %s from %s", sorted(loaded), config.init_from)
    return jax.device_put(merged, shardings)


def train(config: ConfigDict, workdir: str | Path) -> int:
    """Runs (or resumes) pre-training to ``total_steps``; returns the last step. Raises SystemExit(1) with the
    step number on a non-finite loss."""
    workdir = Path(workdir)
    distributed.maybe_initialize(config.distributed)
    config_lib.validate_pretrain_config(config, jax.device_count())
    mesh = sharding.make_mesh(config)
    pidx, pcount = jax.process_index(), jax.process_count()
    logging.info("process %d/%d drives devices %s; mesh %s", pidx, pcount,
                 [d.id for d in jax.local_devices()], dict(mesh.shape))
    write_run_config(config, workdir)

    # Data: this process's contiguous block of every global batch.
    source = input_pipeline.tfds_source(config.dataset)
    num_examples = config.dataset.num_examples if config.dataset.num_examples > 0 else len(source)
    schedule = config_lib.resolve_schedule(config, num_examples)
    block = sharding.process_block(mesh, config.batch_size)
    logging.info("process %d reads rows [%d, %d) of each global batch of %d", pidx, *block, config.batch_size)
    dataset = input_pipeline.make_dataset(source, global_batch=config.batch_size, process_index=pidx,
                                          process_count=pcount, seed=config.seed, input_cfg=config.input,
                                          size=config.model.img_size)
    data_iter = iter(dataset)

    # Model, optimizer, abstract state with shardings from the rules.
    model = models.build_mae(config.model)
    tx, lr_fn = make_optimizer(config, schedule)
    loss_fn = losses.make_loss_fn(model, config, total_steps=schedule.total_steps,
                                  steps_per_epoch=schedule.steps_per_epoch)
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    m = config.model
    in_shape = (1, m.img_size, m.img_size, m.in_chans)

    def init_fn(key):
        params = models.init_params(model, key, in_shape)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    abstract = jax.eval_shape(init_fn, init_key)
    state_sh = sharding.named_shardings(abstract, config.sharding, mesh)
    abstract = checkpoint.abstract_like(abstract, state_sh)
    if pidx == 0:
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract["params"]):
            logging.info("param %s %s %s", sharding.path_str(path), tuple(leaf.shape), leaf.sharding.spec)

    def init():
        state = jax.jit(init_fn, out_shardings=state_sh)(init_key)
        if config.init_from:
            state = dict(state, params=_params_from(config, state["params"], state_sh["params"]))
        return state

    manager = checkpoint.make_manager(workdir, config.checkpoint)
    state, start = restore_or_init(manager, abstract, data_iter, init)

    batch_sh = sharding.batch_sharding(mesh)
    b, s = config.batch_size, m.img_size
    shapes = {"image": ((b, s, s), jnp.uint8), "vessel_map": ((b, s, s), jnp.uint8), "index": ((b,), jnp.int32)}
    abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in shapes.items()}
    compiled = compile_step(make_train_step(loss_fn, tx, config.optim.grad_accum_steps), abstract, abstract_batch,
                            train_key, mesh, "train")

    on_step = None
    if config.metrics.panels_every_steps > 0 and pcount == 1:  # panels read params on host: single process
        from vasomim_jax import visualize

        panel_fn = visualize.make_panel_fn(model, config, total_steps=schedule.total_steps,
                                           steps_per_epoch=schedule.steps_per_epoch, max_examples=2)

        def on_step(step, state, local):
            if step % config.metrics.panels_every_steps == 0:
                # step - 1: the 0-based step whose masks this train step drew.
                visualize.log_panels(workdir / "tensorboard", step,
                                     panel_fn(state["params"], local, train_key, step - 1))

    return run_loop(compiled, state, data_iter, batch_sharding=batch_sh, global_batch=config.batch_size,
                    rng=train_key, start=start, total=schedule.total_steps, manager=manager,
                    writer=metrics.MetricWriter(workdir, enabled=pidx == 0, tensorboard=config.metrics.tensorboard),
                    lr_fn=lr_fn, flops_per_step=metrics.mae_train_flops_per_example(m, config.masking.mask_ratio) * b,
                    peak=metrics.peak_tflops(jax.devices()[0].device_kind, config.metrics.peak_tflops_per_device),
                    log_every=config.log_every_steps, checkpoint_every=config.checkpoint.every_steps,
                    on_step=on_step)


class _QuietLibraries:
    """Drops INFO records of orbax (dozens of lines per save) from the console; warnings still show."""

    def filter(self, record) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
    if len(argv) > 1:
        raise SystemExit(f"vasomim pretrain: unexpected arguments {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
