"""Build a TFDS dataset (array_record shards, images + precomputed vessel maps) without TensorFlow.

  vasomim convert <builder>[/<config>] --manual_dir=DIR --data_dir=DIR [--skip_bad_files] [--num_workers=N]
                  [--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,...]

Builders: xa170k (native, r256), angio_folder (native, r256), synthetic_angio (small, large; no manual_dir),
arcade (stenosis, syntax), vessel_seg_folder, class_folder. Read the result with
`import tfds_builders; tfds.data_source("<builder>/<config>", split="train", data_dir=DIR)`.
With --beam_pipeline_options the pre-training builders run as an Apache Beam pipeline (the vessel maps are
computed in the Beam workers); the options are the TFDS CLI's, comma separated.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from absl import flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("manual_dir", "", "Folder with the source files (not needed for synthetic_angio).")
    flags.DEFINE_string("data_dir", "", "Where the dataset is written; '' = the TFDS default "
                                        "(~/tensorflow_datasets or $TFDS_DATA_DIR).")
    flags.DEFINE_bool("skip_bad_files", False, "Skip unreadable / inconsistent files (listed in the dataset "
                                               "metadata and the summary) instead of failing the build.")
    flags.DEFINE_integer("num_workers", 0, "Worker processes that decode / encode images; 0 = all CPUs.")
    flags.DEFINE_string("beam_pipeline_options", "", "Comma-separated Apache Beam options; when given, the "
                                                     "pre-training builders generate with Beam.")
    flags.DEFINE_bool("overwrite", False, "Rebuild a dataset that already exists in data_dir.")


@dataclasses.dataclass
class Summary:
    name: str  # builder/config
    data_dir: str
    examples_per_split: dict[str, int]
    images_per_source: dict[str, int]
    skipped_files: list[str]
    num_skipped_files: int
    num_ignored_files: int
    wall_s: float
    built: bool  # False when the dataset already existed and was reused

    @property
    def images_per_s(self) -> float:
        return sum(self.examples_per_split.values()) / self.wall_s if self.wall_s > 0 else 0.0

    def text(self) -> str:
        lines = [f"{self.name}: {'built' if self.built else 'already built (reused)'} in {self.data_dir}"]
        lines += [f"  split {s}: {n} examples" for s, n in self.examples_per_split.items()]
        lines += [f"  source {s}: {n} images" for s, n in self.images_per_source.items()]
        lines.append(f"  skipped bad files: {self.num_skipped_files}")
        lines += [f"    {f}" for f in self.skipped_files]
        lines.append(f"  ignored non-image files: {self.num_ignored_files}")
        if self.built:
            lines.append(f"  wall time {self.wall_s:.1f} s, {self.images_per_s:.1f} images/s")
        return "\n".join(lines)


def _beam_options(options: str):
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise SystemExit("vasomim convert: --beam_pipeline_options needs apache-beam "
                         "(pip install 'vasomim-jax[convert]')") from None
    return PipelineOptions(flags=[f"--{o.strip()}" for o in options.split(",") if o.strip()])


def make_builder(name: str, *, data_dir: str = "", skip_bad_files: bool = False, num_workers: int = 0):
    """The registered builder `name` (`builder` or `builder/config`) with the run's config fields applied."""
    import tensorflow_datasets as tfds

    import tfds_builders  # noqa: F401  (registers the builders)

    base, _, config_name = name.partition("/")
    known = sorted(tfds_builders.__all__)
    if base not in known:
        raise SystemExit(f"vasomim convert: unknown builder {base!r}; one of {', '.join(known)}")
    cls = tfds.builder_cls(base)
    configs = {c.name: c for c in cls.BUILDER_CONFIGS}
    config_name = config_name or cls.DEFAULT_CONFIG_NAME
    if config_name not in configs:
        raise SystemExit(f"vasomim convert: {base} has no config {config_name!r}; one of {', '.join(configs)}")
    return cls(config=config_name, data_dir=data_dir or None, skip_bad_files=skip_bad_files,
               num_workers=num_workers)


def run(name: str, *, manual_dir: str = "", data_dir: str = "", skip_bad_files: bool = False,
        num_workers: int = 0, beam_pipeline_options: str = "", overwrite: bool = False) -> Summary:
    """Builds `name` into `data_dir` and returns the summary. Errors a user can fix raise SystemExit(message)."""
    import tensorflow_datasets as tfds

    from tfds_builders import common

    builder = make_builder(name, data_dir=data_dir, skip_bad_files=skip_bad_files, num_workers=num_workers)
    full = f"{builder.name}/{builder.builder_config.name}"
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and (not manual_dir or not os.path.isdir(manual_dir)
                                                 or not os.listdir(manual_dir)):
        raise SystemExit(f"vasomim convert {full}: --manual_dir {manual_dir!r} is missing or empty. "
                         f"Instructions:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    existed = builder.is_prepared() and not overwrite
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir or None, download_mode=mode,
        beam_options=_beam_options(beam_pipeline_options) if beam_pipeline_options else None)
    start = time.perf_counter()
    try:
        builder.download_and_prepare(download_config=config, file_format="array_record")
    except (common.BadFilesError, common.DuplicateKeysError, FileNotFoundError) as e:  # messages name the dataset
        raise SystemExit(f"vasomim convert: {e}") from None
    except AssertionError as e:  # TFDS's manual_dir check: its message carries the instructions
        raise SystemExit(f"vasomim convert {full}: {e}") from None
    wall = time.perf_counter() - start
    meta: dict[str, Any] = dict(builder.info.metadata or {})
    return Summary(
        name=full,
        data_dir=str(builder.data_dir),
        examples_per_split={s: int(info.num_examples) for s, info in builder.info.splits.items()},
        images_per_source=dict(meta.get("num_images_per_source", {})),
        skipped_files=list(meta.get("skipped_files", [])),
        num_skipped_files=int(meta.get("num_skipped_files", 0)),
        num_ignored_files=int(meta.get("num_ignored_files", 0)),
        wall_s=wall,
        built=not existed,
    )


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: vasomim convert <builder>[/<config>] --manual_dir=DIR --data_dir=DIR "
                         "(exactly one builder name)")
    summary = run(argv[1], manual_dir=FLAGS.manual_dir, data_dir=FLAGS.data_dir,
                  skip_bad_files=FLAGS.skip_bad_files, num_workers=FLAGS.num_workers,
                  beam_pipeline_options=FLAGS.beam_pipeline_options, overwrite=FLAGS.overwrite)
    print(summary.text(), file=sys.stdout)
