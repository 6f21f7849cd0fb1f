"""Specifications of vasomim_jax.sharding: FSDP rules, optimizer state following its parameters, the mesh."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from configs import common
from vasomim_jax import sharding

MESH_4x2 = AbstractMesh((4, 2), ("data", "fsdp"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params():
    return {"cls_token": np.zeros((1, 1, 64), np.float32),
            "patch_embed": {"kernel": np.zeros((16, 16, 3, 768), np.float32), "bias": np.zeros(768, np.float32)},
            "encoder": {"blocks": {"mlp": {"fc1": {"kernel": np.zeros((12, 768, 3072), np.float32)}},
                                   "attn": {"qkv": {"kernel": np.zeros((3, 5, 7), np.float32)}}}},
            "mask_token": np.zeros((1, 1, 2**15), np.float32)}


def test_fsdp_shards_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((12, 768, 3072), 2, 2**14) == P(None, None, "fsdp")
    assert sharding.fsdp_spec((3072, 6, 3072), 4, 2**14) == P("fsdp", None, None)  # ties: the first
    assert sharding.fsdp_spec((16, 16, 3, 768), 2, 2**14) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((3, 5, 7), 2, 1) == P()  # nothing divides
    assert sharding.fsdp_spec((768,), 2, 2**14) == P()  # below the size threshold
    assert sharding.fsdp_spec((12, 768, 3072), 1, 2**14) == P()  # no fsdp axis


def test_rules_apply_in_order_and_unmatched_leaves_are_replicated():
    cfg = common.pretrain_config().sharding
    specs = sharding.partition_specs(_params(), cfg, MESH_4x2)
    assert specs["mask_token"] == P()  # 'replicate' rule wins over the later '.*' fsdp rule
    assert specs["encoder"]["blocks"]["mlp"]["fc1"]["kernel"] == P(None, None, "fsdp")
    assert specs["patch_embed"]["bias"] == P()
    cfg.rules = (("fc1", "fsdp"),)
    specs = sharding.partition_specs(_params(), cfg, MESH_4x2)
    assert specs["patch_embed"]["kernel"] == P()


def test_optimizer_moments_follow_their_parameter():
    params = _params()
    state = {"params": params, "opt_state": optax.adamw(1e-3).init(params), "step": np.zeros((), np.int32)}
    specs = sharding.partition_specs(state, common.pretrain_config().sharding, MESH_4x2)
    mu = specs["opt_state"][0].mu
    assert mu["encoder"]["blocks"]["mlp"]["fc1"]["kernel"] == P(None, None, "fsdp")
    assert mu["mask_token"] == P()
    assert specs["step"] == P() and specs["opt_state"][0].count == P()


def test_bad_rules_name_the_config_field():
    cfg = common.pretrain_config().sharding
    cfg.rules = (("x", "shard_everything"),)
    with pytest.raises(ValueError, match=r"config.sharding.rules\[0\]"):
        sharding.partition_specs(_params(), cfg, MESH_4x2)
    cfg.rules = (("(", "fsdp"),)
    with pytest.raises(ValueError, match="bad regex"):
        sharding.partition_specs(_params(), cfg, MESH_4x2)


def test_mesh_on_eight_devices_uses_auto_axes_and_contiguous_batch_blocks():
    code = textwrap.dedent("""
        import json, jax
        from jax.sharding import AxisType
        from configs import common
        from vasomim_jax import sharding
        cfg = common.pretrain_config()
        out = {}
        for data, fsdp in ((-1, 2), (8, 1), (2, -1)):
            cfg.mesh.data, cfg.mesh.fsdp = data, fsdp
            m = sharding.make_mesh(cfg)
            out[f"{data}x{fsdp}"] = [list(m.devices.shape), all(t == AxisType.Auto for t in m.axis_types),
                                     list(sharding.process_block(m, 16))]
        print(json.dumps(out))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"-1x2": [[4, 2], True, [0, 16]], "8x1": [[8, 1], True, [0, 16]],
                   "2x-1": [[2, 4], True, [0, 16]]}


def test_mesh_size_mismatch_names_the_config_field():
    cfg = common.pretrain_config()
    cfg.mesh.data, cfg.mesh.fsdp = 3, 1
    with pytest.raises(ValueError, match="config.mesh"):
        sharding.make_mesh(cfg, jax.devices()[:1])
