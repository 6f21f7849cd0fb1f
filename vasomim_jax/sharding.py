"""Device mesh and sharding rules (the one place that chooses the mesh axis types).

The mesh has two axes, ``data`` and ``fsdp``. The batch is split over both (every device holds a distinct block
of examples); parameters and optimizer state are additionally sharded over ``fsdp`` (ZeRO-3 style) according to
the rule list in ``config.sharding``. Axes are ``AxisType.Auto``: the model code is ordinary GSPMD code and XLA
propagates shardings from the annotated inputs/outputs of the jitted step (jax 0.10's ``make_mesh`` would default
to Explicit, under which a plain matmul on sharded operands is a type error).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from vasomim_jax import config as config_lib

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch dimension is split over all devices
RULES = ("fsdp", "replicate")


def make_mesh(config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh from ``config.mesh`` over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = config_lib.mesh_shape(config, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    if devices == list(jax.devices()):  # make_mesh orders devices for the topology (process-contiguous)
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_str(path) -> str:
    """'/'-joined key path of a pytree leaf (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def validate_rules(rules) -> list[tuple[re.Pattern, str]]:
    compiled = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or rule[1] not in RULES:
            raise ValueError(f"config.sharding.rules[{i}] must be (regex, one of {RULES}), got {rule!r}")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"config.sharding.rules[{i}]: bad regex {rule[0]!r}: {e}") from None
    return compiled


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """Shards the largest dimension divisible by ``fsdp_size`` (first one on ties); replicated when the array is
    smaller than ``min_size`` elements, when ``fsdp_size`` is 1, or when no dimension divides."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    candidates = [(d, -i) for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    _, neg_axis = max(candidates)
    spec = [None] * len(shape)
    spec[-neg_axis] = "fsdp"
    return P(*spec)


def partition_specs(tree, sharding_cfg: ConfigDict, mesh: Mesh):
    """PartitionSpecs for any pytree of arrays / ShapeDtypeStructs (params, optimizer state, the whole train
    state): the first rule whose regex ``re.search``-es the leaf's path decides; leaves no rule matches are
    replicated. Optimizer moments carry the parameter path as a suffix, so they follow their parameter."""
    rules = validate_rules(sharding_cfg.rules)
    fsdp_size = mesh.shape["fsdp"]

    def spec(path, leaf):
        name = path_str(path)
        for pattern, rule in rules:
            if pattern.search(name):
                if rule == "fsdp":
                    return fsdp_spec(np.shape(leaf), fsdp_size, int(sharding_cfg.min_fsdp_size))
                return P()
        return P()

    return jax.tree_util.tree_map_with_path(spec, tree)


def named_shardings(tree, sharding_cfg: ConfigDict, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(tree, sharding_cfg, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def process_block(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """[start, stop) rows of the global batch this process's devices hold under ``batch_sharding``.

    The input pipeline gives each process one contiguous block of every global batch; this checks that the mesh
    device order agrees (it does for ``jax.make_mesh``) and fails loudly otherwise.
    """
    sharding = batch_sharding(mesh)
    rows = set()
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        if device.process_index == jax.process_index():
            rows.update(range(*index[0].indices(global_batch)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start or (stop - start) * jax.process_count() != global_batch:
        raise ValueError(f"the mesh gives process {jax.process_index()} a non-contiguous or uneven block of the "
                         f"global batch ({len(rows)} rows in [{start}, {stop})); use jax.make_mesh device order")
    return start, stop
