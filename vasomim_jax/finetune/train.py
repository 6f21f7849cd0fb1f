"""Fine-tuning: ``vasomim finetune --config=configs/seg_vessel.py --workdir=DIR [--config.x=y ...]``.

Uses the pre-training machinery: the mesh and sharding rules (`sharding`), the jitted, donated train step
(`train.make_train_step`, fed this task's loss, compiled by `train.compile_step`), resume
(`train.restore_or_init`) and the one loop (`train.run_loop`: orbax checkpoints of state + grain iterator,
SIGTERM save, non-finite stop, metrics.jsonl / TensorBoard / progress line). Evaluation on
``config.dataset.eval_split`` every ``eval_every_steps`` and at the last step logs ``dice`` / ``cldice`` (means
over images, native resolution) or ``accuracy`` / ``auc`` to metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from absl import flags, logging
from ml_collections import ConfigDict, config_flags

from vasomim_jax import checkpoint, distributed, metrics, sharding
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


def train(config: ConfigDict, workdir: str | Path) -> int:
    """Runs (or resumes) fine-tuning to ``total_steps``; returns the last step."""
    workdir = Path(workdir)
    distributed.maybe_initialize(config.distributed)
    task.validate(config)
    config_lib.validate_common(config, jax.device_count())
    config_lib.validate_model(config.model)
    mesh = sharding.make_mesh(config)
    pidx, pcount = jax.process_index(), jax.process_count()
    train_lib.write_run_config(config, workdir)

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

    def init():
        logging.info("initialised %s", f"the encoder from {config.init_from}" if backbone else "at random")
        return jax.jit(init_fn, out_shardings=state_sh)(init_key, backbone)

    manager = checkpoint.make_manager(workdir, config.checkpoint)
    state, start = train_lib.restore_or_init(manager, abstract, data_iter, init)

    batch_sh = sharding.batch_sharding(mesh)
    step_fn = train_lib.make_train_step(task.make_loss_fn(model, config), tx, config.optim.grad_accum_steps)
    compiled = train_lib.compile_step(step_fn, abstract, abstract_batch(config, batch_sh), train_key, mesh,
                                      "fine-tuning")
    predict_fn = task.make_predict_fn(model, config, sharding.replicated(mesh))

    def evaluate_fn(step, state):
        _, summary = evaluate.score_split(predict_fn, state["params"], eval_source, config, mesh)
        logging.info("step %d eval on %s: %s", step, config.dataset.eval_split, summary)
        return eval_scalars(summary)

    flops_per_step = metrics.encoder_train_flops_per_example(config.model) * config.batch_size
    return train_lib.run_loop(
        compiled, state, data_iter, batch_sharding=batch_sh, global_batch=config.batch_size, rng=train_key,
        start=start, total=config.total_steps, manager=manager,
        writer=metrics.MetricWriter(workdir, enabled=pidx == 0, tensorboard=config.metrics.tensorboard),
        lr_fn=lr_fn, flops_per_step=flops_per_step, peak=metrics.peak_tflops(jax.devices()[0].device_kind, 0.0),
        log_every=config.log_every_steps, checkpoint_every=config.checkpoint.every_steps,
        evaluate_fn=evaluate_fn, eval_every=config.eval_every_steps)


def main(argv) -> None:
    if len(argv) > 1:
        raise SystemExit(f"vasomim finetune: unexpected arguments {argv[1:]}")
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
