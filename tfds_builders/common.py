"""What every vasomim builder shares: the config fields, the pre-training features, the bad-file policy, and the
two ways to generate a pre-training split (a plain generator with worker processes, or an Apache Beam pipeline
that computes the vessel maps inside the Beam workers).

Flow of a pre-training build (`xa170k`, `angio_folder`, `synthetic_angio`):
  1. the builder lists its sources (`images.Source`: image path, file name, source, optional supplied map);
  2. `check_all` decodes every file and map once, in parallel: bad files are collected, and the build stops
     here — before any shard is written — listing all of them, unless `skip_bad_files`;
  3. the split's counts and the skipped / ignored files go into the dataset metadata (`metadata.json`);
  4. examples are made in chunks: decode + PNG-encode the image (worker processes), vessel maps for the images
     without a supplied map in batches with `vesselness.vessel_maps`, maps PNG-encoded; under Beam each batch of
     sources is one `FlatMap` call, so the maps are computed where Beam runs it.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import multiprocessing
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import images
from tfds_builders.images import BadFileError, Source

# Paths listed in the metadata, at most (the counts are always exact).
MAX_LISTED_FILES = 1000
CHUNK = 64  # sources per generation chunk (the pool decodes the next chunk while maps are computed)


@dataclasses.dataclass(eq=False)
class VasoConfig(tfds.core.BuilderConfig):
    """Config fields shared by the vasomim builders (the defaults are those of the real-data configs).

    With the TFDS CLI a config can be given as JSON, under a name of its own (TFDS refuses a custom config
    named like a registered one); fields left out take these defaults:
    `--config='{"name": "native_skip", "skip_bad_files": true}'`.
    """

    skip_bad_files: bool = False  # skip (and list in the metadata) bad files instead of failing the build
    num_workers: int = 0  # processes that decode / encode; 0 = os.cpu_count(), 1 = in the main process
    # Offline vessel-map recipe (../shared/METHOD.md §2); the official values by default.
    map_filter: str = "sato"
    map_border: int = 20
    map_percentile: float = 92.0
    map_batch_size: int = 16
    resize_shorter: int = 0  # > 0: store images resized to this shorter side, maps by nearest neighbour


class BadFilesError(ValueError):
    """The build found files it cannot use (and `skip_bad_files` is off): all of them are listed."""

    def __init__(self, dataset: str, bad: Sequence[BadFileError]):
        self.bad = list(bad)
        lines = "\n".join(f"  {e.path}: {e.reason}" for e in self.bad)
        super().__init__(
            f"{dataset}: {len(self.bad)} bad input file(s); nothing was written. Fix or remove them, or build "
            f"with skip_bad_files (vasomim convert --skip_bad_files, or tfds build "
            f"--config='{{\"name\": \"<new name>\", \"skip_bad_files\": true}}'):\n{lines}")


class DuplicateKeysError(ValueError):
    pass


def num_workers(config: VasoConfig) -> int:
    return config.num_workers if config.num_workers > 0 else (os.cpu_count() or 1)


def process_pool(n: int) -> concurrent.futures.ProcessPoolExecutor | None:
    # spawn, not fork: the parent may hold JAX / XLA threads, which fork does not survive.
    if n <= 1:
        return None
    return concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))


def pretrain_features() -> tfds.features.FeaturesDict:
    grey = dict(shape=(None, None, 1), dtype=np.uint8, encoding_format="png")
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(**grey, doc="the angiogram, 8-bit grey"),
        "vessel_map": tfds.features.Image(**grey, doc="binary vessel map {0,1} (official offline recipe)"),
        "source": tfds.features.Text(doc="sub-corpus the image comes from"),
        "file_name": tfds.features.Text(doc="path relative to the manual_dir, extension (and #frame) included"),
        "vessel_fraction": tfds.features.Scalar(np.float32, doc="fraction of vessel pixels in vessel_map"),
    })


def check_unique(keys: Iterable[str], dataset: str) -> None:
    dup = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dup:
        raise DuplicateKeysError(f"{dataset}: {len(dup)} duplicate example key(s): {dup[:20]}")


def check_all(items: Sequence[Any], check: Callable[[Any], Any], config: VasoConfig, dataset: str,
              *, desc: str = "checking files", pool: concurrent.futures.Executor | None = None,
              ) -> tuple[list[tuple[Any, Any]], list[BadFileError]]:
    """Runs `check(item)` (returns a result or a BadFileError) over all items, in `pool` or a pool of its own.

    Returns ([(item, result)] for the good ones, [BadFileError]); raises BadFilesError listing every bad file
    unless `config.skip_bad_files`.
    """
    from tqdm import tqdm

    own = None if pool else process_pool(min(num_workers(config), max(1, len(items) // 8)))
    run = pool or own
    try:
        results = run.map(check, items, chunksize=16) if run else map(check, items)
        results = list(tqdm(results, total=len(items), desc=f"{dataset}: {desc}", unit="file", leave=False))
    finally:
        if own:
            own.shutdown()
    good = [(i, r) for i, r in zip(items, results) if not isinstance(r, BadFileError)]
    bad = [r for r in results if isinstance(r, BadFileError)]
    if bad and not config.skip_bad_files:
        raise BadFilesError(dataset, bad)
    return good, bad


def listed(paths: Iterable[str]) -> list[str]:
    return sorted(paths)[:MAX_LISTED_FILES]


def bad_metadata(bad: Sequence[BadFileError], ignored: Sequence[Path], root: Path) -> dict[str, Any]:
    """The skipped and ignored files for metadata.json, paths relative to the manual_dir `root`."""
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    return {
        "num_skipped_files": len(bad),
        "skipped_files": listed(f"{rel(e.path)}: {e.reason}" for e in bad),
        "num_ignored_files": len(ignored),
        "ignored_files": listed(rel(p) for p in ignored),
    }


# ---------------------------------------------------------------------------------------------------------------
# Pre-training examples: image + vessel map.


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How examples are made from sources (picklable: it travels to pool and Beam workers)."""

    map_filter: str = "sato"
    map_border: int = 20
    map_percentile: float = 92.0
    map_batch_size: int = 16
    resize_shorter: int = 0

    @classmethod
    def from_config(cls, c: VasoConfig) -> Recipe:
        return cls(c.map_filter, c.map_border, c.map_percentile, c.map_batch_size, c.resize_shorter)


@dataclasses.dataclass
class Loaded:
    """One frame of a source, decoded: the native image (for the map), its stored PNG, a supplied map or None."""

    key: str
    source: str
    file_name: str
    image: np.ndarray  # uint8 (H, W), native resolution
    image_png: bytes  # the stored image (resized when the recipe says so)
    vessel_map: np.ndarray | None  # uint8 {0,1} (H, W) native resolution, when supplied


def load_source(src: Source, resize: int = 0) -> list[Loaded]:
    """Decodes one source file into frames (worker-side; raises BadFileError)."""
    frames = images.read_frames(src.path)
    vmap = images.read_map(src.map_path, frames[0].shape)[0] if src.map_path else None
    out = []
    for i, frame in enumerate(frames):
        name = src.file_name if len(frames) == 1 else f"{src.file_name}#{i}"
        png = images.png_bytes(images.resize_shorter(frame, resize))
        out.append(Loaded(name, src.source, name, frame, png, vmap))
    return out


def _load_resized(args: tuple[Source, int]) -> list[Loaded]:
    return load_source(*args)


def padded_batch(imgs: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Pads each same-shape group's last partial batch to a power of two by repeating its last image, so the
    filter compiles for at most log2(batch_size) + 1 batch sizes per image shape (the extra maps are dropped:
    callers zip the output with their own list)."""
    groups: dict[tuple[int, ...], list[np.ndarray]] = {}
    for img in imgs:
        groups.setdefault(img.shape, []).append(img)
    extra = []
    for group in groups.values():
        rest = len(group) % batch_size
        if rest:
            extra += [group[-1]] * (min(batch_size, 1 << (rest - 1).bit_length()) - rest)
    return imgs + extra


def examples_from_loaded(loaded: Sequence[Loaded], recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
    """Computes the missing vessel maps (batched) and assembles (key, example) pairs."""
    need = [i for i, item in enumerate(loaded) if item.vessel_map is None]
    computed = {}
    if need:
        from vasomim_jax import vesselness  # here: workers that never compute a map do not import JAX

        batch = padded_batch([loaded[i].image for i in need], recipe.map_batch_size)
        maps = vesselness.vessel_maps(batch, batch_size=recipe.map_batch_size, filter=recipe.map_filter,
                                      border=recipe.map_border, percentile=recipe.map_percentile)
        computed = dict(zip(need, maps))
    out = []
    for i, item in enumerate(loaded):
        vmap = item.vessel_map if item.vessel_map is not None else np.asarray(computed[i], np.uint8)
        vmap = images.resize_shorter(vmap, recipe.resize_shorter, nearest=True)
        out.append((item.key, {
            "image": item.image_png,
            "vessel_map": images.png_bytes(vmap),
            "source": item.source,
            "file_name": item.file_name,
            "vessel_fraction": np.float32(vmap.mean()),
        }))
    return out


def generate_plain(sources: Sequence[Source], recipe: Recipe,
                   pool: concurrent.futures.Executor | None) -> Iterator[tuple[str, dict]]:
    """Plain-generator path: the pool decodes/encodes chunk i+1 while the main process computes maps of chunk i.
    The generator owns `pool` (None = decode in this process) and shuts it down when done."""
    chunks = [sources[i:i + CHUNK] for i in range(0, len(sources), CHUNK)]
    try:
        def submit(chunk):
            args = [(s, recipe.resize_shorter) for s in chunk]
            return pool.map(_load_resized, args) if pool else map(_load_resized, args)

        pending = submit(chunks[0]) if chunks else None
        for k in range(len(chunks)):
            loaded = [frame for frames in pending for frame in frames]
            pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else None
            yield from examples_from_loaded(loaded, recipe)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def beam_process_batch(batch: Sequence[Source], recipe: Recipe) -> list[tuple[str, dict]]:
    """Beam worker: decode, compute the maps, encode — for one batch of sources."""
    loaded = [frame for src in batch for frame in load_source(src, recipe.resize_shorter)]
    return examples_from_loaded(loaded, recipe)


def generate_beam(sources: Sequence[Source], recipe: Recipe):
    """Beam path: a PTransform (nothing -> (key, example)); the maps are computed inside the Beam workers."""
    beam = tfds.core.lazy_imports.apache_beam
    return (
        "Sources" >> beam.Create(list(sources))
        | "Spread" >> beam.Reshuffle()
        | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=recipe.map_batch_size)
        | "MapsAndEncode" >> beam.FlatMap(beam_process_batch, recipe=recipe)
    )


class VasoBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the vasomim builders: run options that do not change the dataset (`skip_bad_files`,
    `num_workers`) may be given to the constructor (`tfds.builder(name, skip_bad_files=True)`, as
    `vasomim convert` does) or as config fields (the TFDS CLI's JSON `--config`)."""

    def __init__(self, *, skip_bad_files: bool | None = None, num_workers: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._overrides = {k: v for k, v in (("skip_bad_files", skip_bad_files), ("num_workers", num_workers))
                           if v is not None}

    @property
    def options(self) -> VasoConfig:
        """The builder config with the constructor's run options applied."""
        return dataclasses.replace(self.builder_config, **self._overrides)

    def require_examples(self, counts: Mapping[str, int], root: Path, *, bad: int = 0, ignored: int = 0) -> None:
        """Fails when the manual_dir gave no split, or a split with no example: an empty build is never silent."""
        empty = sorted(split for split, n in counts.items() if n == 0)
        if counts and not empty:
            return
        where = f"split(s) {', '.join(empty)}" if empty else "any split"
        raise FileNotFoundError(
            f"{self.name}/{self.builder_config.name}: no usable examples for {where} in the manual_dir {root} "
            f"({bad} bad file(s) skipped, {ignored} other file(s) ignored). Expected layout:\n"
            f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")


class PretrainBuilder(VasoBuilder):
    """Base of the image + vessel-map builders: Beam when the build has Beam options, a generator otherwise."""

    _use_beam = False

    def _download_and_prepare(self, dl_manager, download_config):
        self._use_beam = download_config.beam_options is not None or download_config.beam_runner is not None
        return super()._download_and_prepare(dl_manager, download_config)

    def pretrain_split(self, sources: Sequence[Source], ignored: Sequence[Path], root: Path):
        """Checks every source, records the metadata, and returns the split's generator or PTransform."""
        config = self.options
        name = f"{self.name}/{config.name}"
        check_unique([s.file_name for s in sources], name)
        # One pool checks the files and then generates (worker start-up is paid once).
        pool = None if self._use_beam else process_pool(min(num_workers(config), max(1, len(sources) // 8)))
        try:
            good, bad = check_all(sources, images.check_source, config, name, pool=pool)
            self.require_examples({"train": len(good)}, root, bad=len(bad), ignored=len(ignored))
        except BaseException:
            if pool:
                pool.shutdown()
            raise
        # Generated grouped by image size: same-size batches for the filter, few distinct shapes to compile.
        # (Records are ordered by key hash on disk, so the generation order does not show.)
        kept = [s for s, r in sorted(good, key=lambda g: (g[1][2], g[0].file_name))]
        frames = {s.file_name: r[0] for s, r in good}
        per_source = Counter()
        for s in kept:
            per_source[s.source] += frames[s.file_name]
        self.info.metadata.update({
            "num_images_per_source": dict(sorted(per_source.items())),
            "num_maps_supplied": sum(frames[s.file_name] for s in kept if s.map_path),
            "num_maps_computed": sum(frames[s.file_name] for s in kept if not s.map_path),
            "num_map_pixels_binarised": int(sum(r[1] for _, r in good)),
            "map_recipe": dataclasses.asdict(Recipe.from_config(config)),
            **bad_metadata(bad, ignored, root),
        })
        return self._generate_examples(kept, pool)

    def _generate_examples(self, sources: Sequence[Source], pool: concurrent.futures.Executor | None = None):
        recipe = Recipe.from_config(self.builder_config)
        if self._use_beam:
            return generate_beam(sources, recipe)
        return generate_plain(sources, recipe, pool)


class FolderPretrainBuilder(PretrainBuilder):
    """Base of the pre-training builders that read a manual_dir folder (`xa170k`, `angio_folder`): the `native`
    and `r256` configs, the pre-training features, one `train` split. Subclasses set `find_sources`,
    ``root -> ([Source], [ignored Path])``, and the MANUAL_DOWNLOAD_INSTRUCTIONS."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        VasoConfig(name="native", description="Images at their native resolution."),
        VasoConfig(name="r256", resize_shorter=256,
                   description="Shorter side resized to 256 (area filter); maps computed at native resolution, "
                               "then resized by nearest neighbour. For fast input pipelines."),
    ]
    DEFAULT_CONFIG_NAME = "native"

    @staticmethod
    @abc.abstractmethod
    def find_sources(root: Path) -> tuple[list[Source], list[Path]]:
        """Abstract: keeps this base out of the TFDS registry."""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=pretrain_features(),
            homepage="https://github.com/Dxhuang-CASIA/XA-SSL",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        sources, ignored = self.find_sources(root)
        return {"train": self.pretrain_split(sources, ignored, root)}


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning builders (no vessel maps computed).

SPLIT_FOLDERS = {"training": "train", "train": "train", "testing": "test", "test": "test",
                 "val": "validation", "validation": "validation"}


def grey_image_feature(doc: str) -> tfds.features.Image:
    return tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png", doc=doc)


def read_binary_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask ({0,1} or {0,255}, grey anti-aliasing allowed) → uint8 {0,1}, binarised at > 127."""
    m = images.read_image(path)
    if m.shape != tuple(shape):
        raise BadFileError(path, f"mask size {m.shape[1]}x{m.shape[0]} differs from its image {shape[1]}x{shape[0]}")
    return m if m.max() <= 1 else (m > 127).astype(np.uint8)
