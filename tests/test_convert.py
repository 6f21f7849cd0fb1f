"""`vasomim convert` as a command: summary on stdout, bad files as a clear error with exit status 1; and the
standard `tfds build` CLI on our builders when the `convert` extra is installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from builders_testlib import REPO, read_split, synthetic
from vasomim_jax import convert

RUN_CONVERT = ("import sys; from absl import app; from vasomim_jax import convert; convert.define_flags(); "
               "app.run(convert.main, argv=['vasomim convert', *sys.argv[1:]])")


def _convert(*args):
    return subprocess.run([sys.executable, "-c", RUN_CONVERT, *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_convert_command_builds_and_prints_the_summary(tmp_path):
    for seed in range(3):
        synthetic(tmp_path / "manual" / "run1" / f"{seed}.png", seed, 64)
    (tmp_path / "manual" / "README.md").write_text("ignored")
    out = _convert("angio_folder/native", f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'data'}",
                   "--num_workers=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "split train: 3 examples" in out.stdout and "source run1: 3 images" in out.stdout
    assert "ignored non-image files: 1" in out.stdout and "images/s" in out.stdout
    assert len(read_split("angio_folder/native", tmp_path / "data")) == 3


def test_convert_command_reports_bad_files_and_exits_1(tmp_path):
    synthetic(tmp_path / "manual" / "ok.png", 0, 64)
    (tmp_path / "manual" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = _convert("angio_folder", f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'data'}",
                   "--num_workers=1")
    assert out.returncode == 1
    assert "1 bad input file(s)" in out.stderr and "broken.png: cannot decode" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_builder_or_config_names_the_choices():
    with pytest.raises(SystemExit, match="unknown builder 'xa17k'.*xa170k"):
        convert.make_builder("xa17k")
    with pytest.raises(SystemExit, match="no config 'r512'; one of native, r256"):
        convert.make_builder("xa170k/r512")


def _tfds_cli_ready() -> str:
    missing = [m for m in ("tensorflow", "apache_beam", "mlcroissant") if importlib.util.find_spec(m) is None]
    return f"the tfds CLI needs the `convert` extra; missing: {', '.join(missing)}" if missing else ""


@pytest.mark.skipif(bool(_tfds_cli_ready()), reason=_tfds_cli_ready() or "ready")
@pytest.mark.parametrize("extra", [
    pytest.param([], id="plain"),
    pytest.param(['--config={"name": "native_skip", "skip_bad_files": true}',
                  "--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,"
                  "direct_running_mode=multi_processing"],
                 id="json_config_beam", marks=pytest.mark.slow),
])
def test_tfds_build_cli_builds_our_builder(tmp_path, extra):
    for seed in range(2):
        synthetic(tmp_path / "manual" / f"{seed}.png", seed, 64)
    if extra:
        (tmp_path / "manual" / "bad.png").write_bytes(b"")
    out = subprocess.run(
        [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main", "build", "tfds_builders/angio_folder",
         f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'data'}", "--file_format=array_record",
         *(extra or ["--config=native"])], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    name = "angio_folder/native_skip" if extra else "angio_folder/native"
    assert sorted(read_split(name, tmp_path / "data")) == ["0.png", "1.png"]
    if extra:
        import tensorflow_datasets as tfds

        meta = tfds.builder_from_directory(str(tmp_path / "data" / name / "1.0.0")).info.metadata
        assert meta["skipped_files"] == ["bad.png: empty file (0 bytes)"]
