"""The Apache Beam path of the pre-training builders: same examples as the plain path, maps made in workers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_builders  # noqa: F401
from builders_testlib import read_split, real, synthetic

beam = pytest.importorskip("apache_beam", reason="apache-beam (the `convert` extra) is not installed")


def _build(manual, data_dir, beam_options=None):
    builder = tfds.builder("angio_folder", data_dir=str(data_dir), num_workers=1)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual), beam_options=beam_options),
        file_format="array_record")
    return builder


def test_beam_direct_runner_writes_exactly_the_plain_examples_with_maps_from_the_workers(tmp_path, monkeypatch):
    from apache_beam.options.pipeline_options import PipelineOptions

    from vasomim_jax import vesselness

    manual = tmp_path / "folder"
    for name in ("1.png", "2.png"):
        (manual / "arcade").mkdir(parents=True, exist_ok=True)
        shutil.copy(real("arcade_stenosis_test") / "images" / name, manual / "arcade" / name)
    for seed in range(4):
        synthetic(manual / "synthetic" / f"{seed}.png", seed, 64)
    plain = _build(manual, tmp_path / "plain")

    def driver_must_not_compute(*args, **kwargs):
        raise AssertionError("a vessel map was computed in the driver process")

    # The Beam workers are separate processes that import vesselness afresh: only the driver is patched.
    monkeypatch.setattr(vesselness, "vessel_maps", driver_must_not_compute)
    monkeypatch.setattr(vesselness, "vessel_map", driver_must_not_compute)
    options = PipelineOptions(flags=["--runner=DirectRunner", "--direct_num_workers=2",
                                     "--direct_running_mode=multi_processing"])
    beamed = _build(manual, tmp_path / "beam", options)

    a, b = read_split("angio_folder", tmp_path / "plain"), read_split("angio_folder", tmp_path / "beam")
    assert sorted(a) == sorted(b) and len(a) == 6
    for name in a:
        for feature in ("image", "vessel_map", "source", "file_name", "vessel_fraction"):
            np.testing.assert_array_equal(np.asarray(a[name][feature]), np.asarray(b[name][feature]))
    assert beamed.info.metadata == plain.info.metadata
    assert beamed.info.splits["train"].num_examples == 6
