"""The `vasomim` command line: seven subcommands, real help, honest refusals."""

import subprocess
import sys

import pytest

from vasomim_jax import cli


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "vasomim_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_the_seven_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for name in ("convert", "pretrain", "finetune", "evaluate", "export", "visualize", "demo"):
        assert f"\n  {name} " in r.stdout


def test_unknown_subcommand_fails_with_usage():
    r = run("pretrian")
    assert r.returncode == 2 and "unknown subcommand 'pretrian'" in r.stderr


@pytest.mark.parametrize("name", [n for n, (_, m) in cli.SUBCOMMANDS.items() if m is None])
def test_subcommand_not_landed_says_so_and_fails(name):
    r = run(name, "--help")
    assert r.returncode != 0 and "has not landed yet" in r.stderr


@pytest.mark.parametrize("name", [n for n, (_, m) in cli.SUBCOMMANDS.items() if m is not None])
def test_subcommand_help_describes_its_own_flags(name):
    r = run(name, "--help")
    assert r.returncode == 0, r.stderr
    assert f"usage: vasomim {name}" in r.stdout
    assert "--" in r.stdout.split("flags:")[1]  # at least one real option
