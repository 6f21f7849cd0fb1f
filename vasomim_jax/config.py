"""Loading, validating and resolving run configs (before anything is compiled).

Every rule names the offending field and value, so a bad launch on a pod fails in seconds with a message a user
can act on, instead of minutes later inside XLA.
"""

from __future__ import annotations

import dataclasses
import math

from absl import flags
from ml_collections import config_dict, config_flags

from vasomim_jax.models.mae import DTYPES as _MODEL_DTYPES
from vasomim_jax.models.vit import REMAT_POLICIES as _MODEL_REMAT_POLICIES

FILTERS = ("frangi", "sato")
# What the model builds: one list, so a policy the model has is never refused here.
DTYPES = tuple(_MODEL_DTYPES)
REMAT_POLICIES = tuple(_MODEL_REMAT_POLICIES)
DISTANCES = ("bce", "l1")
BETA_PER = ("epoch", "step")


class ConfigError(ValueError):
    """A config field holds a value the run cannot use."""


def load_config(argv: list[str]) -> config_dict.ConfigDict:
    """Parses ``--config=path.py --config.a.b=v ...`` exactly as the CLI does (for scripts and tests)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, sys_argv=argv)
    fv(argv)
    if fv.config is None:
        raise ConfigError("no --config=<file.py> given")
    return fv.config


def _fail(field: str, value, why: str):
    raise ConfigError(f"config.{field} = {value!r}: {why}")


def mesh_shape(config: config_dict.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves ``config.mesh`` ({axis: size}, at most one -1) against the device count."""
    sizes = dict(config.mesh.items())
    free = [k for k, v in sizes.items() if v == -1]
    for k, v in sizes.items():
        if v == 0 or v < -1:
            _fail(f"mesh.{k}", v, "mesh sizes are positive, or -1 for 'all remaining devices'")
    if len(free) > 1:
        _fail("mesh", dict(sizes), "at most one axis may be -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            _fail("mesh", dict(sizes), f"{num_devices} devices are not divisible by the fixed axes ({fixed})")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        _fail("mesh", dict(sizes), f"needs {math.prod(sizes.values())} devices, {num_devices} are present")
    return sizes


def validate_model(model: config_dict.ConfigDict, prefix: str = "model") -> None:
    for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        if model[name] <= 0:
            _fail(f"{prefix}.{name}", model[name], "must be positive")
    if model.img_size % model.patch_size:
        _fail(f"{prefix}.img_size", model.img_size,
              f"not divisible by {prefix}.patch_size = {model.patch_size}")
    if model.embed_dim % model.num_heads:
        _fail(f"{prefix}.embed_dim", model.embed_dim, f"not divisible by num_heads = {model.num_heads}")
    if model.in_chans not in (1, 3):
        _fail(f"{prefix}.in_chans", model.in_chans, "must be 1 or 3")
    if len(model.mean) != model.in_chans or len(model.std) != model.in_chans:
        _fail(f"{prefix}.mean", model.mean, f"mean and std need {model.in_chans} values (in_chans)")
    if model.dtype not in DTYPES:
        _fail(f"{prefix}.dtype", model.dtype, f"must be one of {DTYPES}")
    if model.remat_policy not in REMAT_POLICIES:
        _fail(f"{prefix}.remat_policy", model.remat_policy, f"must be one of {REMAT_POLICIES}")
    if "decoder_embed_dim" in model and model.decoder_embed_dim % model.decoder_num_heads:
        _fail(f"{prefix}.decoder_embed_dim", model.decoder_embed_dim,
              f"not divisible by decoder_num_heads = {model.decoder_num_heads}")


def dataset_names(name: str, several: bool = True) -> list[str]:
    """``config.dataset.name`` -> its TFDS names: ``name`` or ``name/config``, or (``several``) a comma-separated
    list of them whose splits are read as one."""
    names = [n.strip() for n in name.split(",")]
    if not all(names):
        _fail("dataset.name", name, "give a TFDS name, `name` or `name/config`"
              + (", or several separated by commas" if several else ""))
    if len(names) > 1 and not several:
        _fail("dataset.name", name, "this run reads one dataset; give a single TFDS name")
    return names


def validate_common(config: config_dict.ConfigDict, num_devices: int,
                    several_datasets: bool = False) -> dict[str, int]:
    """Rules shared by pre-training and fine-tuning (``several_datasets``: a name list is allowed); returns the
    resolved mesh."""
    dataset_names(config.dataset.name, several_datasets)
    steps = {"total_steps": config.total_steps, "log_every_steps": config.log_every_steps,
             "checkpoint.every_steps": config.checkpoint.every_steps}
    for field, value in steps.items():
        if value < 0:
            _fail(field, value, "steps cannot be negative")
    if config.log_every_steps == 0:
        _fail("log_every_steps", 0, "must be >= 1")
    mesh = mesh_shape(config, num_devices)
    if config.batch_size <= 0:
        _fail("batch_size", config.batch_size, "must be positive")
    if config.batch_size % num_devices:
        _fail("batch_size", config.batch_size,
              f"the global batch must split evenly over the {num_devices} data-parallel devices "
              f"(mesh {mesh})")
    return mesh


def validate_objective(config: config_dict.ConfigDict) -> None:
    """The masking and loss rules of pre-training (``config.masking``, ``config.loss``): raises ConfigError naming
    the field. Shared by ``validate_pretrain_config`` and ``losses.make_loss_fn``."""
    m = config.masking
    if not 0.0 < m.mask_ratio < 1.0:
        _fail("masking.mask_ratio", m.mask_ratio, "must be in (0, 1)")
    for name in ("beta_start", "beta_end", "map_weight"):
        if not 0.0 <= m[name] <= 1.0:
            _fail(f"masking.{name}", m[name], "must be in [0, 1]")
    if m.beta_end < m.beta_start:
        _fail("masking.beta_end", m.beta_end, f"below masking.beta_start = {m.beta_start} (weak-to-strong)")
    if m.beta_per not in BETA_PER:
        _fail("masking.beta_per", m.beta_per, f"must be one of {BETA_PER}")
    if m.guidance_filter not in FILTERS:
        _fail("masking.guidance_filter", m.guidance_filter, f"unknown filter; use one of {FILTERS}")
    if not 0.0 <= m.vessel_patch_min_fraction < 1.0:
        _fail("masking.vessel_patch_min_fraction", m.vessel_patch_min_fraction, "must be in [0, 1)")
    loss = config.loss
    if loss.consistency_weight < 0:
        _fail("loss.consistency_weight", loss.consistency_weight, "cannot be negative")
    if loss.consistency_distance not in DISTANCES:
        _fail("loss.consistency_distance", loss.consistency_distance, f"must be one of {DISTANCES}")
    for field, sigmas in (("loss.frangi_sigmas", loss.frangi_sigmas), ("masking.guidance_sigmas", m.guidance_sigmas)):
        if not sigmas or min(sigmas) <= 0:
            _fail(field, sigmas, "needs at least one sigma, all positive")


def validate_pretrain_config(config: config_dict.ConfigDict, num_devices: int) -> dict[str, int]:
    """Raises ConfigError naming the field; returns the resolved mesh {axis: size}."""
    mesh = validate_common(config, num_devices, several_datasets=True)
    validate_model(config.model)
    if config.epochs < 0:
        _fail("epochs", config.epochs, "cannot be negative")
    if config.total_steps == 0 and config.epochs == 0:
        _fail("total_steps", 0, "set total_steps > 0 or epochs > 0")
    validate_objective(config)
    o = config.optim
    if not 0.0 <= o.warmup_fraction < 1.0:
        _fail("optim.warmup_fraction", o.warmup_fraction, "must be in [0, 1)")
    if o.grad_accum_steps < 1:
        _fail("optim.grad_accum_steps", o.grad_accum_steps, "must be >= 1")
    if (config.batch_size // o.grad_accum_steps) % num_devices or config.batch_size % o.grad_accum_steps:
        _fail("optim.grad_accum_steps", o.grad_accum_steps,
              f"batch_size {config.batch_size} / accumulation steps must split over {num_devices} devices")
    if o.base_lr <= 0 and o.lr <= 0:
        _fail("optim.base_lr", o.base_lr, "must be positive (or set optim.lr)")
    return mesh


@dataclasses.dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def resolve_schedule(config: config_dict.ConfigDict, num_examples: int) -> Schedule:
    """``total_steps > 0`` wins; otherwise epochs x examples // batch. Warm-up keeps its fraction of the run."""
    if num_examples <= 0:
        _fail("dataset.num_examples", num_examples, "the dataset has no examples")
    steps_per_epoch = max(1, num_examples // config.batch_size)
    total = config.total_steps if config.total_steps > 0 else config.epochs * steps_per_epoch
    if total <= 0:
        _fail("epochs", config.epochs, "gives zero training steps")
    warmup = int(round(config.optim.warmup_fraction * total))
    return Schedule(total_steps=int(total), steps_per_epoch=int(steps_per_epoch), warmup_steps=warmup)


def learning_rate(config: config_dict.ConfigDict) -> float:
    """Peak lr: the linear scaling rule lr = base_lr * global batch / 256, unless ``optim.lr`` is set."""
    return config.optim.lr if config.optim.lr > 0 else config.optim.base_lr * config.batch_size / 256
