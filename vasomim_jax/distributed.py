"""Multi-host start-up: ``jax.distributed.initialize`` when the config or the environment asks for it.

``config.distributed.initialize``: "auto" (initialise on SLURM jobs with several tasks, on TPU pods with several
workers, or when ``JAX_COORDINATOR_ADDRESS`` is set; arguments then come from the environment), "always" or
"never". A ``coordinator_address`` in the config is passed on with ``num_processes`` / ``process_id`` (for
localhost runs and clusters without auto-detection). Must run before anything touches a jax backend.
"""

from __future__ import annotations

import os

import jax
from ml_collections import ConfigDict

MODES = ("auto", "always", "never")


def _environment_asks() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize(dist_cfg: ConfigDict) -> bool:
    """Initialises jax.distributed if asked; returns whether it did. CPU runs get gloo collectives."""
    mode = dist_cfg.initialize
    if mode not in MODES:
        raise ValueError(f"config.distributed.initialize={mode!r}: expected one of {MODES}")
    explicit = bool(dist_cfg.coordinator_address)
    if mode == "never" or (mode == "auto" and not explicit and not _environment_asks()):
        return False
    # Cross-process collectives on CPU backends (the localhost multi-host test, CPU clusters).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        if dist_cfg.num_processes < 1 or not 0 <= dist_cfg.process_id < dist_cfg.num_processes:
            raise ValueError(f"config.distributed: coordinator_address={dist_cfg.coordinator_address!r} needs "
                             f"num_processes >= 1 and 0 <= process_id < num_processes, got "
                             f"{dist_cfg.num_processes} / {dist_cfg.process_id}")
        kwargs = dict(coordinator_address=dist_cfg.coordinator_address, num_processes=dist_cfg.num_processes,
                      process_id=dist_cfg.process_id)
    jax.distributed.initialize(**kwargs)
    return True
