"""Fine-tuning: ``vasomim finetune --config=configs/seg_vessel.py --workdir=DIR [--config.x=y ...]``.

Uses the pre-training machinery: the mesh and sharding rules (`sharding`), the jitted, donated train step
(`train.make_train_step`, fed this task's loss), orbax checkpoints of state + grain iterator with resume
(`checkpoint`), metrics.jsonl / TensorBoard / progress line (`metrics`). Evaluation on
``config.dataset.eval_split`` every ``eval_every_steps`` and at the last step logs ``dice`` / ``cldice`` (means
over images, native resolution) or ``accuracy`` / ``auc`` to metrics.jsonl.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import flags, logging
from ml_collections import ConfigDict, config_flags

from vasomim_jax import checkpoint, distributed, input_pipeline, metrics, sharding
from vasomim_jax import config as config_lib
from vasomim_jax import train as train_lib
from vasomim_jax.finetune import data, evaluate, optim, task


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Fine-tuning config file (configs/seg_vessel.py, cls_*.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: config.json, metrics.jsonl, checkpoints/.")
    flags.mark_flags_as_required(["config", "workdir"])


def batch_keys(config: ConfigDict) -> tuple[str, ...]:
    return ("image", "mask", "index") if config.task == "segmentation" else ("image", "label", "index")


def abstract_batch(config: ConfigDict, batch_sh) -> dict:
    b, s = config.batch_size, config.model.img_size
    shapes = {"image": ((b, s, s), jnp.uint8), "mask": ((b, s, s), jnp.uint8), "label": ((b,), jnp.int32),
              "index": ((b,), jnp.int32)}
    return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=batch_sh) for k in batch_keys(config)}


def eval_scalars(summary: dict) -> dict[str, float]:
    if "dice_mean" in summary:
        return {"dice": summary["dice_mean"], "cldice": summary["cldice_mean"]}
    return {"accuracy": summary["accuracy"], "auc": summary["auc"]}


def encoder_train_flops_per_example(model_cfg: ConfigDict) -> float:
    """Analytic matmul FLOPs (forward + backward = 3x forward) of the encoder on all patches; the conv decoder
    is left out, so TFLOP/s and MFU are lower bounds."""
    p, c = model_cfg.patch_size, model_cfg.in_chans
    num = (model_cfg.img_size // p) ** 2
    fwd = 2 * num * p * p * c * model_cfg.embed_dim + metrics._vit_flops(num + 1, model_cfg.embed_dim,
                                                                           model_cfg.depth, model_cfg.mlp_ratio)
    return 3.0 * fwd


def train(config: ConfigDict, workdir: str | Path) -> int:
    """Runs (or resumes) fine-tuning to ``total_steps``; returns the last step."""
    workdir = Path(workdir)
    distributed.maybe_initialize(config.distributed)
    task.validate(config)
    config_lib.validate_common(config, jax.device_count())
    config_lib.validate_model(config.model)
    mesh = sharding.make_mesh(config)
    pidx, pcount = jax.process_index(), jax.process_count()
    if pidx == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    keys = evaluate.source_keys(config)
    train_source = data.tfds_source(config.dataset, config.dataset.split, keys)
    eval_source = data.tfds_source(config.dataset, config.dataset.eval_split, keys)
    backbone = task.load_backbone(config)  # before any compilation: a bad init_from fails fast
    data_iter = iter(data.make_train_dataset(train_source, config, process_index=pidx, process_count=pcount))

    model = task.build_model(config)
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    abstract_params = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros(task.input_shape(config)), train=False)["params"], init_key)
    tx, lr_fn = optim.make_optimizer(config, abstract_params, config.total_steps)

    def init_fn(key, pretrained):
        params = model.init(key, jnp.zeros(task.input_shape(config)), train=False)["params"]
        if pretrained is not None:
            params = {**params, "backbone": pretrained}
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    if backbone is not None:
        task.check_backbone(backbone, abstract_params["backbone"], config.init_from)
    abstract = jax.eval_shape(init_fn, init_key, backbone)
    state_sh = sharding.named_shardings(abstract, config.sharding, mesh)
    abstract = checkpoint.abstract_like(abstract, state_sh)

    manager = checkpoint.make_manager(workdir, config.checkpoint)
    restored = checkpoint.restore_latest(manager, abstract, data_iter)
    if restored is None:
        state = jax.jit(init_fn, out_shardings=state_sh)(init_key, backbone)
        start = 0
        logging.info("initialised %s", f"the encoder from {config.init_from}" if backbone else "at random")
    else:
        state, start = restored
        logging.info("resumed from step %d", start)

    batch_sh = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    step_fn = jax.jit(train_lib.make_train_step(task.make_loss_fn(model, config), tx, config.optim.grad_accum_steps),
                      in_shardings=(state_sh, {k: batch_sh for k in batch_keys(config)}, rep),
                      out_shardings=(state_sh, rep), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step_fn.lower(abstract, abstract_batch(config, batch_sh), train_key).compile()
    logging.info("compiled the fine-tuning step in %.1f s", time.perf_counter() - t0)
    logging.info(train_lib._memory_line(compiled))
    predict_fn = task.make_predict_fn(model, config, rep)

    writer = metrics.MetricWriter(workdir, enabled=pidx == 0, tensorboard=config.metrics.tensorboard)
    flops_per_step = encoder_train_flops_per_example(config.model) * config.batch_size
    peak = metrics.peak_tflops(jax.devices()[0].device_kind, 0.0)
    stop = train_lib._StopFlag()
    step, total = start, config.total_steps
    t_last, step_last = time.perf_counter(), step
    try:
        while step < total:
            batch = input_pipeline.to_global(next(data_iter), batch_sh, config.batch_size)
            state, step_metrics = compiled(state, batch, train_key)
            step += 1
            save_now = step % config.checkpoint.every_steps == 0 or step == total or stop.signal
            if step % config.log_every_steps == 0 or save_now:
                scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                if not all(map(math.isfinite, scalars.values())):
                    raise SystemExit(f"non-finite training metrics {scalars} at step {step}")
                now = time.perf_counter()
                sec_per_step = (now - t_last) / max(step - step_last, 1)
                t_last, step_last = now, step
                scalars.update(lr=float(lr_fn(step - 1)), img_per_sec=config.batch_size / sec_per_step)
                writer.write(step, scalars)
                logging.info(metrics.progress_line(step, total, scalars,
                                                   img_per_sec_per_device=scalars["img_per_sec"] / mesh.size,
                                                   tflops_per_device=flops_per_step / sec_per_step / mesh.size / 1e12,
                                                   peak=peak, seconds_per_step=sec_per_step))
            if (config.eval_every_steps and step % config.eval_every_steps == 0) or step == total:
                _, summary = evaluate.score_split(predict_fn, state["params"], eval_source, config, mesh)
                writer.write(step, eval_scalars(summary))
                logging.info("step %d eval on %s: %s", step, config.dataset.eval_split, summary)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if save_now:
                checkpoint.save(manager, step, state, data_iter)
            if stop.signal:
                logging.info("%s received: saved step %d, exiting", stop.signal, step)
                break
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return step


def main(argv) -> None:
    if len(argv) > 1:
        raise SystemExit(f"vasomim finetune: unexpected arguments {argv[1:]}")
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
