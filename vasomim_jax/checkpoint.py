"""Orbax checkpoints of the train state and the grain iterator: save, resume, elastic restore, params export.

Layout: ``WORKDIR/checkpoints/<step>/{state, data_iter}``; ``state`` = {"step", "params", "opt_state"},
``data_iter`` = the iterator state (one JSON per process), so a resumed run sees exactly the batches it would
have seen. Saves are asynchronous (``wait`` before exit). Restores go into an *abstract* state carrying the
shardings of the current mesh, so a checkpoint written on one mesh / device count / process count restores onto
another (the data iterator is then repositioned from the step, see `restore_latest`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

log = logging.getLogger(__name__)

ITEMS = ("state", "data_iter")


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def make_manager(workdir: str | Path, ckpt_cfg: ConfigDict) -> ocp.CheckpointManager:
    """Async manager keeping the last ``checkpoint.max_to_keep`` step folders."""
    if int(ckpt_cfg.max_to_keep) < 1:
        raise ValueError(f"config.checkpoint.max_to_keep must be >= 1, got {ckpt_cfg.max_to_keep}")
    if int(ckpt_cfg.every_steps) < 1:
        raise ValueError(f"config.checkpoint.every_steps must be >= 1, got {ckpt_cfg.every_steps}")
    options = ocp.CheckpointManagerOptions(max_to_keep=int(ckpt_cfg.max_to_keep), create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter) -> None:
    """Starts an async save of ``state`` and the iterator position at ``step`` (``force``: any step may save)."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data_iter=grain.checkpoint.CheckpointSave(data_iter)), force=True)


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``state`` (arrays or structs) with the given shardings: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iter) -> tuple[Any, int] | None:
    """Restores the newest checkpoint that reads back completely, into ``abstract_state``'s shardings.

    ``data_iter`` gets the saved iterator state when the checkpoint was written by this run's process count; from
    another process count (the saved state is per process) it is repositioned from the step alone
    (``data_iter.seek(step)``, an `input_pipeline.GlobalBatchIterator`): the input pipeline makes every process's
    position a function of the step, so the run still sees the global batches of a straight run.
    A step folder that fails to restore (a run killed mid-save, truncated files) is moved aside to
    ``<step>.incomplete-<time>`` with a warning and the previous step is tried. Returns (state, step) or None.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        folder = Path(manager.directory) / str(step)
        written = _iterator_process_count(folder)
        elastic = written is not None and written != jax.process_count()
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if not elastic:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for missing / truncated files
            aside = folder.with_name(f"{step}.incomplete-{int(time.time())}")
            log.warning("checkpoint step %d is incomplete or unreadable (%s: %s); moved to %s",
                        step, type(e).__name__, str(e).splitlines()[0][:200], aside.name)
            if jax.process_index() == 0 and folder.exists():
                shutil.move(folder, aside)
            manager.reload()
            continue
        if elastic:
            data_iter.seek(step)
            data_iter.start_prefetch()  # as grain's restore does: batches load while the step compiles
            log.info("data iterator: checkpoint written by %d processes, now %d; repositioned from step %d",
                     written, jax.process_count(), step)
        return restored["state"], step
    return None


def _iterator_process_count(folder: Path) -> int | None:
    """The process count that wrote ``folder``'s iterator states (grain names them ``process_<i>-of-<K>.json``);
    None when there are none."""
    counts = {p.name.rsplit("-of-", 1)[-1].removesuffix(".json") for p in (folder / "data_iter").glob("process_*")}
    if len(counts) > 1:
        raise ValueError(f"{folder / 'data_iter'}: iterator states from different process counts {sorted(counts)}")
    return int(counts.pop()) if counts else None


def load_params(workdir: str | Path, step: int | None = None) -> tuple[ConfigDict, dict, int]:
    """Host-side (numpy) params of a pre-training workdir, with its config; ``step=None`` = latest complete.

    For export / fine-tuning / visualisation: no mesh, no optimizer state, no data iterator needed.
    """
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not a pre-training workdir (config.json missing)")
    config = ConfigDict(json.loads(config_path.read_text()))
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints in workdir {workdir}")
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"step={step}: no checkpoint at that step in {directory} (have {steps})")
    ckptr = ocp.PyTreeCheckpointer()
    state_dir = directory / str(step) / "state"
    # Only the params subtree, as plain host numpy arrays whatever mesh it was written on.
    params_meta = ckptr.metadata(state_dir).item_metadata.tree["params"]
    target = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), params_meta)}
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
        partial_restore=True))
    return config, restored["params"], int(step)
