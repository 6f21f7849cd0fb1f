"""The `vasomim` command line: seven subcommands, real help, honest refusals."""

import os
import subprocess
import sys

import pytest

from vasomim_jax import cli


def run(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "vasomim_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_the_seven_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for name in ("convert", "pretrain", "finetune", "evaluate", "export", "visualize", "demo"):
        assert f"\n  {name} " in r.stdout


def test_unknown_subcommand_fails_with_usage():
    r = run("pretrian")
    assert r.returncode == 2 and "unknown subcommand 'pretrian'" in r.stderr


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_subcommand_help_describes_its_own_flags(name):
    r = run(name, "--help")
    assert r.returncode == 0, r.stderr
    assert f"usage: vasomim {name}" in r.stdout
    assert "--" in r.stdout.split("flags:")[1]  # at least one real option


@pytest.mark.parametrize("override,field", [
    ("--config.masking.mask_ratio=1.5", "masking.mask_ratio"),
    ("--config.model.img_size=70", "model.img_size"),
    ("--config.batch_size=30", "batch_size"),
])
def test_pretrain_rejects_a_bad_field_before_compiling(tmp_path, override, field):
    import time

    t0 = time.time()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = run("pretrain", "--config=configs/demo_tiny.py", f"--workdir={tmp_path}", override, env=env)
    assert r.returncode != 0 and f"config.{field}" in r.stderr
    assert time.time() - t0 < 60 and not (tmp_path / "checkpoints").exists()
